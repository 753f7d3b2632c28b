"""Export SmolLM2-135M's CoreInfer prefill and decode graphs once per setting and cache them under
<cache>/corematching-samples/keep<K>-layers<A-B>/{prefill,decode}.onnx.

    nice -n 10 .venv/bin/python samples/corematching/export.py --keep 0.7 --layers 1-28
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import cache_dir, eval_windows, load_smollm2  # noqa: E402


def exported(keep: float, layers: str, rho: float = 0.2) -> tuple[Path, Path]:
    folder = cache_dir() / "corematching-samples" / f"keep{keep}-layers{layers}-rho{rho}-v4"  # v4: partial top-k selection, token sums as MatMul
    pre, dec = folder / "prefill.onnx", folder / "decode.onnx"
    if pre.exists() and dec.exists():
        return pre, dec
    import onnx
    import torch

    from edgesparse_corematching import onnx_graphs
    from edgesparse_corematching.settings import Settings, parse_span

    torch.set_num_threads(1)
    tok, model = load_smollm2()
    start = time.time()
    prompt = torch.tensor(eval_windows(tok, 16, 1)[0])[None]
    p, d = onnx_graphs.export(model, Settings(keep=keep, rho=rho, neuron_layers=parse_span(layers)), prompt)
    folder.mkdir(parents=True, exist_ok=True)
    for proto, path in ((p, pre), (d, dec)):
        onnx.save(proto, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)
    print(f"exported {folder} in {time.time() - start:.0f} s", file=sys.stderr)
    return pre, dec


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--layers", default="1-28")
    print(exported(ap.parse_args().keep, ap.parse_args().layers))
