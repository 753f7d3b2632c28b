#!/bin/bash
# GPU check of the tvm backend's CUDA kernels and a jetson-target package, for a machine with an
# NVIDIA GPU (H200: sm_90), torch and the NVIDIA driver, and NO TVM. Builds nothing: it runs what
# prepare.py built on a CPU machine with TVM.
#
#   on the CPU machine:  .venv/bin/python benchmarks/gpu/prepare.py      (~1 min, ~35 MB of artifacts)
#   on the GPU machine:  bash benchmarks/gpu/run_h200.sh                  (carry benchmarks/gpu/artifacts)
#
# Needs only TVM's runtime: libtvm_runtime.so, libtvm_runtime_cuda.so (artifacts/runtime/) and the
# apache-tvm-ffi wheel matching this Python (artifacts/wheels/, unpacked to a temp folder, no pip).
# Results: $OUT/h200_results.json (OUT defaults to ./gpu-results). Expected wall time: ~2-3 min
# (BlockSparseMatMul sweep, two packages on the GPU, conv and gathered-FFN kernels); capped at 540 s.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ART="${ARTIFACTS:-$HERE/artifacts}"
OUT="${OUT:-$PWD/gpu-results}"
PY="${PYTHON:-python3}"

if [ ! -f "$ART/kernels_sm90.so" ] || [ ! -d "$ART/package" ]; then
    echo "run_h200.sh: $ART is incomplete: run 'python benchmarks/gpu/prepare.py' on a machine with TVM and carry benchmarks/gpu/artifacts" >&2
    exit 2
fi
tag="$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
wheel="$(ls "$ART"/wheels/apache_tvm_ffi-*-"$tag"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    echo "run_h200.sh: no apache-tvm-ffi wheel for $tag in $ART/wheels (prepare.py fetches cp310-cp313)" >&2
    exit 2
fi
FFI="$(mktemp -d /tmp/es-tvm-ffi.XXXXXX)"
trap 'rm -rf "$FFI"' EXIT
"$PY" -m zipfile -e "$wheel" "$FFI"
export PYTHONPATH="$FFI${PYTHONPATH:+:$PYTHONPATH}"

# CUDA runtime 13 for libtvm_runtime_cuda.so: the system's first, the carried copy last.
cuda_dirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
    [ -e "$d/libcudart.so.13" ] && cuda_dirs="$cuda_dirs:$d"
done
export LD_LIBRARY_PATH="${cuda_dirs#:}${cuda_dirs:+:}$ART/runtime/cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TVM_RUNTIME_LIBS="$ART/runtime"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
mkdir -p "$OUT"
timeout 540 "$PY" "$HERE/bench_h200.py" --artifacts "$ART" --out "$OUT" "$@"
