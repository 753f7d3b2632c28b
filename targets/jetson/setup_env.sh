#!/bin/sh
# System tools the jetson target (and its tests) need on a Debian build machine; idempotent.
#   aarch64-linux-gnu-g++  links the aarch64 host code of the package (x86 build machines)
#   nvcc                    CUDA toolkit >= 12; not installable from Debian's main archive here:
#                           reported, not installed (set EDGESPARSE_NVCC to use another one)
set -e
if [ "$(uname -m)" != "aarch64" ] && ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
    else
        echo "jetson target: run as root or: sudo apt-get install g++-aarch64-linux-gnu" >&2; exit 1
    fi
fi
if ! command -v "${EDGESPARSE_NVCC:-nvcc}" >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "jetson target: nvcc not found (install the CUDA toolkit or set EDGESPARSE_NVCC); GPU builds will fail" >&2
fi
