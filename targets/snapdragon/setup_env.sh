#!/bin/sh
# Installs what the snapdragon target needs from Debian, skipping what is already present:
#   g++-aarch64-linux-gnu   cross-compiles the kernel library, the runner and the tests for arm64
#                           (pulls libc6-dev-arm64-cross: the aarch64 sysroot /usr/aarch64-linux-gnu)
#   qemu-user-static        runs aarch64 Linux programs on this x86-64 machine (qemu-aarch64-static)
#   util-linux              unshare(1), for the private mount namespace the runner needs
# ONNX Runtime for aarch64 is not installed here: the plugin downloads the PyPI wheel into the
# edgesparse cache the first time it builds or runs a package (pip download, no install).
# Usage: sh targets/snapdragon/setup_env.sh     (as root, or with sudo available)
set -eu

need=""
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need="$need g++-aarch64-linux-gnu"
command -v qemu-aarch64-static >/dev/null 2>&1 || need="$need qemu-user-static"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"

if [ -n "$need" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup_env (snapdragon): installing$need"
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends $need
fi
echo "setup_env (snapdragon): $(aarch64-linux-gnu-g++ --version | head -n1), $(qemu-aarch64-static --version | head -n1)"
