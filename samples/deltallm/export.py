"""Export SmolLM2-135M with its KV cache to ONNX once (dynamo exporter, as edgesparse's build
does) and cache it: <cache>/deltallm-samples/smollm2.onnx. Used by the evaluation scripts.

    python samples/deltallm/export.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import cache_dir  # noqa: E402


def exported() -> Path:
    path = cache_dir() / "deltallm-samples" / "smollm2.onnx"
    if path.exists():
        return path
    import onnx

    from edgesparse import export
    import model as factory

    start = time.time()
    source = factory.build()
    proto = export.export_torch(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(proto, str(tmp))
    tmp.rename(path)
    print(f"exported {path} in {time.time() - start:.0f} s", file=sys.stderr)
    return path


if __name__ == "__main__":
    print(exported())
