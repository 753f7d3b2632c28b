"""The Android NDK path, as far as it goes without an NDK (none can be installed here).

The NDK's clang is replaced by a stand-in script at the NDK's path that logs its arguments and
compiles with Debian's aarch64 g++. This exercises everything edgesparse itself does with an NDK:
toolchain selection from ANDROID_NDK_HOME, the compiler path and flags, the package metadata,
verification (which must use the glibc build, since qemu-user cannot load bionic libraries) and
the arm64-v8a export. What it cannot show is that the real NDK compiles and links the kernels."""
from __future__ import annotations

import os
import shutil
import stat

import pytest
from snapdragon_helpers import cli, manifest

from edgesparse import EdgesparseError
from edgesparse_snapdragon import android, ort_aarch64, toolchains


@pytest.fixture(scope="module")
def fake_ndk(tmp_path_factory):
    ndk = tmp_path_factory.mktemp("ndk")
    clang = toolchains.ndk_compiler(ndk, toolchains.DEFAULT_ANDROID_API)
    clang.parent.mkdir(parents=True)
    log = ndk / "calls.log"
    clang.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {shutil.which("aarch64-linux-gnu-g++")} "$@"\n')
    clang.chmod(clang.stat().st_mode | stat.S_IXUSR)
    return ndk, log


@pytest.fixture(scope="module")
def android_package(fake_ndk, mlp_onnx, tmp_path_factory):
    ndk, _ = fake_ndk
    out = tmp_path_factory.mktemp("android") / "mlp"
    env = {**os.environ, "ANDROID_NDK_HOME": str(ndk)}
    env.pop("EDGESPARSE_ANDROID_API", None)
    result = cli("build", mlp_onnx, "--target", "snapdragon", "--pass", "magnitude:sparsity=0.9", "-o", out, env=env)
    return out, result.stderr


def test_ndk_compiler_builds_the_shipped_library(fake_ndk, android_package):
    _, log = fake_ndk
    package, _ = android_package
    m = manifest(package)
    assert m["target"]["toolchain"] == f"aarch64-linux-android{toolchains.DEFAULT_ANDROID_API}"
    assert "-static-libstdc++" in m["target"]["cflags"]
    calls = log.read_text().splitlines()
    assert any("-shared" in c and "-static-libstdc++" in c and "-march=armv8.2-a+fp16+dotprod" in c for c in calls)


def test_android_package_is_verified_with_the_glibc_build(android_package):
    package, stderr = android_package
    assert "verifying with the glibc build of the same kernel sources" in stderr
    v = manifest(package)["verification"]
    assert v["passed"] and v["max_abs_error"] <= 1e-4 and v["fraction_on_sparse_kernels"] == 1.0


def test_export_writes_the_arm64_v8a_layout(android_package, tmp_path):
    package, _ = android_package
    dest = android.export(package, tmp_path / "app")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["assets/manifest.json", "assets/model.onnx", "lib/arm64-v8a/libedgesparse.so"]
    assert ort_aarch64.is_aarch64_elf(dest / "lib/arm64-v8a/libedgesparse.so")
    with pytest.raises(EdgesparseError, match="already exists"):
        android.export(package, dest)


def test_export_refuses_a_glibc_package(snapdragon_package, tmp_path):
    with pytest.raises(EdgesparseError, match="Android cannot load: set ANDROID_NDK_HOME"):
        android.export(snapdragon_package, tmp_path / "app")
