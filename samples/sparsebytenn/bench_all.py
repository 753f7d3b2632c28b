"""`edgesparse bench` on several packages of the Fashion-MNIST CNN, one after the other, into
results/cnn_bench.json (speed only: a package's speed depends on which groups it keeps per layer,
not on their values, so packages built without recovery time the same as recovered ones).

    flock /tmp/edgesparse-timing.lock python samples/sparsebytenn/bench_all.py \
        out/sparsebytenn/fashion-30 out/sparsebytenn/prof-50 ... [--rounds 100] [--tag T]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evidence import save  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("packages", nargs="+")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--tag", default="", help="appended to the result keys (keeps earlier records)")
    args = ap.parse_args(argv)
    for package in args.packages:
        manifest = json.loads((Path(package) / "manifest.json").read_text())
        rep = manifest["passes"][0]["report"]
        cmd = [sys.executable, str(HERE / "es.py"), "bench", package, "--threads", "1,2", "--json",
               "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        records = json.loads(out[out.index("["):])
        key = f"s{rep['target_sparsity']:.1f}" + (f"/{args.tag}" if args.tag else "")
        save("cnn_bench", key, {
            "package": os.path.basename(package.rstrip("/")), "options": manifest["passes"][0].get("options", {}),
            "sparse_nodes": manifest["verification"]["sparse_nodes"],
            "achieved_sparsity": round(rep["achieved_sparsity_of_candidates"], 4),
            "load_average": os.getloadavg()[0], "bench": records})


if __name__ == "__main__":
    main()
