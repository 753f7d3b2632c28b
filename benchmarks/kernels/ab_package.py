"""A/B of kernel libraries on a built package: its dense baseline and the package run with each
library, interleaved in one process, one thread (as `edgesparse bench` times one library). What
docs/kernels.md's package-level kernel A/Bs come from (aligned scratch, the wide tile's prefetch):
a kernel change that helps a layer alone can lose inside a model, where weights arrive cold.

    .venv/bin/python benchmarks/kernels/ab_package.py PACKAGE OLD.so NEW.so [--rounds 300]

Build OLD.so from another checkout's edgesparse/kernels/csrc (edgesparse.kernels.build.build_library)
and list the libraries in both orders to see the noise (OLD NEW NEW OLD).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from edgesparse import runtime, verify
from edgesparse.pipeline import VERIFICATION_DATA
from edgesparse.plugins import registry
from edgesparse.timing import interleaved


def session(model_path: Path, library: str):
    """The package's model with one kernel library, options as runtime.Package.session(spin=False)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.register_custom_ops_library(library)
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("libraries", nargs="+", help="kernel libraries (.so) to run the package with")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=60.0)
    args = ap.parse_args(argv)

    pkg = runtime.load(args.package, check_target=False)
    data = np.load(pkg.root / VERIFICATION_DATA)
    batch = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    domains = set(pkg.manifest["runtime"].get("custom_domains", []))
    dense_model = verify.dense_equivalent(onnx.load(str(pkg.model_path)),
                                          [lib for lib in registry().kernels.values() if lib.domain in domains])
    dense = verify.dense_session(dense_model, threads=1, spin=False)
    candidates = {"dense": lambda: dense.run(None, batch)}
    for i, lib in enumerate(args.libraries):
        s = session(pkg.model_path, lib)
        candidates[f"{i}: {Path(lib).name}"] = lambda s=s: s.run(None, batch)
    stats = interleaved(candidates, rounds=args.rounds, budget_s=args.budget_s)
    dense_ms = stats["dense"]["median_ms"]
    for name, st in stats.items():
        print(f"{name:>24}: {st['median_ms']:.3f} ms [{st['p25_ms']:.3f}-{st['p75_ms']:.3f}], "
              f"speedup {dense_ms / st['median_ms']:.3f}x ({st['rounds']} rounds)")


if __name__ == "__main__":
    main()
