#!/bin/sh
# The "every machine" evidence: the kernel benchmark (FFN shapes, M = 1, 8, 64, 1 thread) and the
# MiniLM sample at 75 % (build + bench, 1 thread), once on this machine's best ISA and once as an
# AVX2-only machine (benchmarks/avx2_host: AVX-512 masked out of CPUID for every process, so ORT
# runs its AVX2 kernels too). Writes benchmarks/kernels/results/<isa>-*.json.
#   sh benchmarks/kernels/isa_checks.sh            (about 10 minutes on 2 cores)
set -eu
cd "$(dirname "$0")/../.."
out=benchmarks/kernels/results
es=.venv/bin/edgesparse
lock=/tmp/edgesparse-timing.lock
run() {  # isa, then the command; the AVX2 runs go through the CPUID mask
    isa=$1; shift
    if [ "$isa" = avx2 ]; then flock "$lock" benchmarks/avx2_host/run.sh "$@"; else flock "$lock" "$@"; fi
}
for isa in avx512 avx2; do
    if [ "$isa" = avx512 ] && ! grep -qw avx512f /proc/cpuinfo; then continue; fi
    run $isa $es bench kernels --threads 1 --json > $out/$isa-kernels.json
    target=x86; [ "$isa" = avx2 ] && target=x86:isa=avx2
    run $isa $es build samples/minilm/model.py:build --target $target \
        --pass magnitude:sparsity=0.75,block=16 -o /tmp/edgesparse-isa-minilm-$isa --force --json \
        > /tmp/edgesparse-isa-minilm-$isa.json
    run $isa $es bench /tmp/edgesparse-isa-minilm-$isa --threads 1 --rounds 300 --json > $out/$isa-minilm75-bench.json
    .venv/bin/python - "$isa" <<'PY'
import json, sys
isa = sys.argv[1]
m = json.load(open(f"/tmp/edgesparse-isa-minilm-{isa}.json"))
keep = {k: m[k] for k in ("target", "layers", "verification", "quality")}
keep["passes"] = [{"name": p["name"], "options": p["options"]} for p in m["passes"]]
json.dump(keep, open(f"benchmarks/kernels/results/{isa}-minilm75-build.json", "w"), indent=1)
PY
done
.venv/bin/python benchmarks/kernels/isa_summary.py $out
