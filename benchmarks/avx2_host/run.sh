#!/bin/sh
# Run a command as on an AVX2-only x86-64 machine (see mask_avx512.c): every process it starts
# sees no AVX-512 in CPUID, so ONNX Runtime, the peers and edgesparse's kernels all run AVX2 code.
#   benchmarks/avx2_host/run.sh .venv/bin/edgesparse bench kernels --threads 1 --json
# Needs an x86-64 Linux machine whose CPU offers CPUID faulting (flag cpuid_fault).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
grep -qw cpuid_fault /proc/cpuinfo || { echo "run.sh: this CPU has no CPUID faulting (cpuid_fault)" >&2; exit 3; }
lib="${EDGESPARSE_CACHE:-$HOME/.cache/edgesparse}/avx2_host/mask_avx512.so"
if [ ! -f "$lib" ] || [ "$here/mask_avx512.c" -nt "$lib" ]; then
    mkdir -p "$(dirname "$lib")"
    cc -O2 -shared -fPIC -o "$lib.tmp" "$here/mask_avx512.c" -ldl && mv "$lib.tmp" "$lib"
fi
# EDGESPARSE_CPU_NOTE labels what `edgesparse tune` measures here; NM_ARCH picks DeepSparse's AVX2
# binary.
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" EDGESPARSE_ISA=avx2 NM_ARCH=avx2 \
    EDGESPARSE_CPU_NOTE="AVX-512 masked by benchmarks/avx2_host: AVX2 code on both sides"
# Programs that read the flags in /proc/cpuinfo instead of running CPUID (DeepSparse's engine and its
# probe arch.bin do: with CPUID alone masked, its "AVX2" runs were as fast as its AVX-512 ones) get
# a copy without the AVX-512 and AMX flags, bind-mounted in a private mount namespace (needs root).
info="$(dirname "$lib")/cpuinfo"
sed -E 's/ (avx512[a-z0-9_]*|amx_[a-z0-9]*|avx_vnni)//g' /proc/cpuinfo > "$info.$$" && mv "$info.$$" "$info"
if unshare -m true 2>/dev/null; then
    exec unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$info" "$@"
fi
echo "run.sh: cannot mask /proc/cpuinfo (unshare -m needs root): programs that read it still see AVX-512" >&2
exec "$@"
