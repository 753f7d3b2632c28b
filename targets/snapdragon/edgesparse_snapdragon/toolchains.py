"""Compilers for Arm64: Debian's cross g++ (glibc; the library the build verifies under qemu) and,
when ANDROID_NDK_HOME is set, the Android NDK's clang (bionic; what ships to a phone)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgesparse import EdgesparseError
from edgesparse.kernels import Toolchain

# Cortex-A76/A78/X1 and later (Snapdragon 855 onwards): Armv8.2-A with half precision and the
# dot-product instructions; NEON is part of the base Armv8-A.
ARCH_FLAGS = ("-march=armv8.2-a+fp16+dotprod", "-mtune=cortex-a76")

DEBIAN_CXX = "aarch64-linux-gnu-g++"
DEBIAN_SYSROOT = Path("/usr/aarch64-linux-gnu")
DEBIAN_PACKAGES = {  # command (or file) -> the Debian package that provides it
    DEBIAN_CXX: "g++-aarch64-linux-gnu",
    "aarch64-linux-gnu-ar": "binutils-aarch64-linux-gnu",
    str(DEBIAN_SYSROOT / "lib" / "ld-linux-aarch64.so.1"): "libc6-arm64-cross",
    "qemu-aarch64-static": "qemu-user-static",
    "unshare": "util-linux",
}
SETUP_COMMAND = "sh targets/snapdragon/setup_env.sh"

ANDROID_ABI = "arm64-v8a"
DEFAULT_ANDROID_API = 24  # Android 7.0
NDK_HOST = "linux-x86_64"


def debian() -> Toolchain:
    """aarch64 Linux with glibc: Debian's g++-aarch64-linux-gnu."""
    return Toolchain("aarch64-linux-gnu", (DEBIAN_CXX,), ARCH_FLAGS, ("neon",))


def android_api() -> int:
    value = os.environ.get("EDGESPARSE_ANDROID_API", str(DEFAULT_ANDROID_API))
    if not value.isdigit() or not 21 <= int(value) <= 99:
        raise EdgesparseError(f"EDGESPARSE_ANDROID_API={value!r} is not an Android API level (21 or above)")
    return int(value)


def ndk_home() -> Path | None:
    value = os.environ.get("ANDROID_NDK_HOME")
    return Path(value) if value else None


def ndk_compiler(ndk: Path, api: int) -> Path:
    """The NDK's clang++ wrapper for arm64-v8a at an API level (NDK r19 and later layout)."""
    return ndk / "toolchains" / "llvm" / "prebuilt" / NDK_HOST / "bin" / f"aarch64-linux-android{api}-clang++"


def ndk(ndk_dir: Path, api: int | None = None) -> Toolchain:
    """aarch64 Android (bionic) with the NDK's clang. libc++ is linked statically into the kernel
    library: it exports only a C entry point, so it cannot clash with the app's own C++ runtime."""
    api = api or android_api()
    return Toolchain(f"aarch64-linux-android{api}", (str(ndk_compiler(ndk_dir, api)),),
                     (*ARCH_FLAGS, "-static-libstdc++"), ("neon",))


def selected(ndk_dir: Path | None = None, api: int | None = None) -> Toolchain:
    """The toolchain that compiles what ships: the NDK's when one is given (the target's `ndk`
    option) or ANDROID_NDK_HOME is set, else Debian's aarch64 g++."""
    home = ndk_dir or ndk_home()
    return ndk(home, api) if home else debian()


def missing_debian_tools() -> list[tuple[str, str]]:
    """(what, Debian package) for each piece of the cross toolchain and emulator not present."""
    missing = []
    for what, package in DEBIAN_PACKAGES.items():
        found = Path(what).exists() if what.startswith("/") else shutil.which(what) is not None
        if not found:
            missing.append((what, package))
    return missing


def check_ndk(ndk_dir: Path, api: int | None = None) -> None:
    api = api or android_api()
    compiler = ndk_compiler(ndk_dir, api)
    if not ndk_dir.is_dir():
        raise EdgesparseError(f"Android NDK (ANDROID_NDK_HOME or ndk=) {ndk_dir} is not a directory")
    if not os.access(compiler, os.X_OK):
        raise EdgesparseError(
            f"Android NDK (ANDROID_NDK_HOME or ndk=) {ndk_dir} has no {compiler.relative_to(ndk_dir)} (an NDK r23 or later for "
            f"{NDK_HOST} with API level {api}; set EDGESPARSE_ANDROID_API to pick another)")
