#!/bin/sh
# Installs what the wasm target needs from Debian, skipping what is already present:
#   clang + lld + wasi-libc + libclang-rt-dev-wasm32 (builtins) + llvm (llvm-ar)
#                             compile the kernels to wasm32-wasi with SIMD128
#   chromium                  the headless browser the tests run the package in
# node (>= 20) must already be on PATH. npm packages (onnxruntime-web, pinned) are fetched by the
# plugin itself into the edgesparse cache the first time a package is built or run.
# Usage: sh targets/wasm/setup_env.sh     (as root, or with sudo available)
set -eu

need=""
command -v clang >/dev/null 2>&1 || need="$need clang"
command -v wasm-ld >/dev/null 2>&1 || need="$need lld"
[ -f /usr/lib/wasm32-wasi/libc.a ] || need="$need wasi-libc"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
# compiler-rt builtins for wasm32 (clang links them into every wasm module)
if command -v clang >/dev/null 2>&1; then
    rt=$(clang --target=wasm32-wasi -print-libgcc-file-name 2>/dev/null || true)
    [ -n "$rt" ] && [ -f "$rt" ] || need="$need libclang-rt-dev-wasm32"
else
    need="$need libclang-rt-dev-wasm32"
fi
command -v llvm-ar >/dev/null 2>&1 || need="$need llvm"

if [ -n "$need" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup_env (wasm): installing$need"
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends $need
fi

if ! command -v node >/dev/null 2>&1; then
    echo "setup_env (wasm): node >= 20 is required (Debian: apt-get install nodejs)" >&2
    exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
    echo "setup_env (wasm): node >= 20 is required, found $(node --version)" >&2
    exit 1
fi
echo "setup_env (wasm): clang, wasm-ld, wasi-libc, chromium and node $(node --version) present"
