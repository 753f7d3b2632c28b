"""Bad input and missing tools: one-line errors that name the problem and the Debian package."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from snapdragon_helpers import cli

from edgesparse import EdgesparseError
from edgesparse_snapdragon import Snapdragon, tensorfile, toolchains

TOOLS = ["aarch64-linux-gnu-g++", "aarch64-linux-gnu-ar", "qemu-aarch64-static", "unshare", "sh", "mount"]


def path_without(tmp_path: Path, left_out: str) -> dict:
    """An environment whose PATH holds the snapdragon tools except one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        if tool != left_out:
            os.symlink(shutil.which(tool), bin_dir / tool)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.parametrize("tool, package", [("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
                                           ("qemu-aarch64-static", "qemu-user-static")])
def test_missing_tool_names_the_debian_package(mlp_onnx, tmp_path, tool, package):
    out = tmp_path / "pkg"
    result = cli("build", mlp_onnx, "--target", "snapdragon", "--pass", "magnitude", "-o", out,
                 check=False, env=path_without(tmp_path, tool))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert tool in lines[0] and f"install Debian packages {package} " in lines[0]
    assert toolchains.SETUP_COMMAND in lines[0]
    assert not out.exists()


def test_check_environment_with_everything_present():
    Snapdragon().check_environment()


def test_android_toolchain_flags_and_layout(monkeypatch, tmp_path):
    tc = toolchains.ndk(Path("/opt/ndk"), 26)
    assert tc.name == "aarch64-linux-android26"
    assert tc.cxx == ("/opt/ndk/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android26-clang++",)
    assert tc.flags == ("-march=armv8.2-a+fp16+dotprod", "-mtune=cortex-a76", "-static-libstdc++")
    assert tc.isa_variants == ("neon",) and tc.suffix == ".so"
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    assert toolchains.selected() == toolchains.debian()
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    assert toolchains.selected().cxx[0].endswith(f"aarch64-linux-android{toolchains.DEFAULT_ANDROID_API}-clang++")
    monkeypatch.setenv("EDGESPARSE_ANDROID_API", "33")
    assert toolchains.selected().name == "aarch64-linux-android33"
    monkeypatch.setenv("EDGESPARSE_ANDROID_API", "lollipop")
    with pytest.raises(EdgesparseError, match="not an Android API level"):
        toolchains.selected()


def test_ndk_home_without_the_ndk_compiler(mlp_onnx, tmp_path):
    env = {**os.environ, "ANDROID_NDK_HOME": str(tmp_path)}
    result = cli("build", mlp_onnx, "--target", "snapdragon", "--pass", "magnitude", "-o", tmp_path / "pkg",
                 check=False, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "aarch64-linux-android24-clang++" in lines[0] and "ANDROID_NDK_HOME" in lines[0]


def test_run_package_rejects_a_non_arm_package(tmp_path):
    with pytest.raises(EdgesparseError, match="manifest.json is missing"):
        Snapdragon().run_package(tmp_path, {})


def test_tensor_file_round_trip(tmp_path):
    tensors = [("x", np.arange(12, dtype=np.float32).reshape(3, 4)), ("ids", np.array([[1, -2]], np.int64)),
               ("mask", np.array([True, False])), ("empty", np.zeros((0, 5), np.float32)),
               ("scalar", np.array(2.5, np.float64))]
    tensorfile.write(tmp_path / "t.esbt", tensors)
    back = tensorfile.read(tmp_path / "t.esbt")
    assert [n for n, _ in back] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, back):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    data = (tmp_path / "t.esbt").read_bytes()
    (tmp_path / "cut.esbt").write_bytes(data[:-3])
    with pytest.raises(EdgesparseError, match="truncated"):
        tensorfile.read(tmp_path / "cut.esbt")
    with pytest.raises(EdgesparseError, match="cannot be passed"):
        tensorfile.write(tmp_path / "s.esbt", [("s", np.array(["a"]))])


def test_ndk_option_without_the_ndk_compiler(mlp_onnx, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ANDROID_NDK_HOME"}
    result = cli("build", mlp_onnx, "--target", f"snapdragon:ndk={tmp_path},api=30", "--pass", "magnitude",
                 "-o", tmp_path / "pkg", check=False, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "aarch64-linux-android30-clang++" in lines[0], lines
    assert not (tmp_path / "pkg").exists()


def test_api_option_is_checked():
    with pytest.raises(EdgesparseError, match="must be an Android API level"):
        Snapdragon().configure({"api": "7"})
    assert Snapdragon().configure({"ndk": "/opt/ndk", "api": "33"}).toolchain().name == "aarch64-linux-android33"
