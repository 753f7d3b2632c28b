"""Whole-model decode speed of the from-scratch BlockFFN package against its dense twin's package
(scratch_model.py builds both; same inputs and outputs), ONNX Runtime, one thread: one new token
after a prefix with the KV cache (chunk 1), and an 8-token step (chunk 8), each package continuing
its own prefix of held-out text. Interleaved, medians with p25/p75.

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/blockffn/bench_scratch_decode.py \\
        --run <run> --blockffn out/scratch-blockffn --dense out/scratch-dense
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import interleaved, session, with_chunk  # noqa: E402
from edgesparse_blockffn.generate import caches_after, empty_caches  # noqa: E402


def _session(pkg: Path, chunk: int):
    manifest = json.loads((pkg / "manifest.json").read_text())
    libs = manifest["runtime"]["custom_op_libraries"]
    model = with_chunk(pkg / manifest["runtime"]["model"], chunk) if libs else str(pkg / manifest["runtime"]["model"])
    return session(model, str(pkg / libs[0]) if libs else None), manifest


def step_runner(sess, ids: np.ndarray, prefix: int, steps: int):
    """A callable running `steps` new tokens after the package's own cache of `prefix` tokens."""
    prefilled = sess.run(None, {"input_ids": ids[None, :prefix], **empty_caches(sess)})
    step = {"input_ids": ids[None, prefix:prefix + steps], **caches_after(sess, prefilled)}
    binding = sess.io_binding()
    for k, v in step.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
    for o in sess.get_outputs():
        binding.bind_output(o.name)
    return lambda: sess.run_with_iobinding(binding)


def measure(run: Path, blockffn: Path, dense: Path, prefix: int, budget_s: float) -> dict:
    ids = np.load(run / "data.npz")["held"].astype(np.int64)
    if len(ids) < prefix + 8:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {prefix + 8}")
    rows = []
    for steps, chunk in ((1, 1), (8, 8)):
        (s_sess, manifest), (d_sess, _) = _session(blockffn, chunk), _session(dense, chunk)
        stats = interleaved({"dense": step_runner(d_sess, ids, prefix, steps),
                             "blockffn": step_runner(s_sess, ids, prefix, steps)}, budget_s)
        rows.append({"new_tokens": steps, "chunk": chunk, "prefix": prefix,
                     **{f"{n}_{k}": v for n, s in stats.items() for k, v in s.items()},
                     "speedup": round(stats["dense"]["median_ms"] / stats["blockffn"]["median_ms"], 3)})
        print(rows[-1], flush=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "threads": 1,
            "onnxruntime": ort.__version__, "package_sparsity_report": manifest["passes"][0]["report"].get("sparsity"),
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the train_scratch.py run folder (held-out text)")
    ap.add_argument("--blockffn", type=Path, required=True)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timing per row (at least 8 rounds)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_scratch_decode.json")
    args = ap.parse_args(argv)
    result = measure(args.run, args.blockffn, args.dense, args.prefix, args.budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
