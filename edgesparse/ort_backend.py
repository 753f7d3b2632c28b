"""The ONNX Runtime backend: the model as .onnx plus each kernel library compiled for the target.
An app registers the libraries with SessionOptions.register_custom_ops_library and loads the model."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import onnx

from . import external_data
from .backends import Backend

EXTERNAL_DATA = "model.onnx.data"  # where a model over protobuf's 2 GB limit keeps its weights

APP_SNIPPET = """\
# Run this package with nothing but onnxruntime and numpy installed:
import json, numpy as np, onnxruntime as ort
pkg = "path/to/package"
manifest = json.load(open(f"{pkg}/manifest.json"))
options = ort.SessionOptions()
for lib in manifest["runtime"]["custom_op_libraries"]:
    options.register_custom_ops_library(f"{pkg}/{lib}")
session = ort.InferenceSession(f"{pkg}/{manifest['runtime']['model']}", options)
outputs = session.run(None, {i["name"]: np.zeros([d if isinstance(d, int) else 1 for d in i["shape"]], i["dtype"]) for i in manifest["inputs"]})
"""


class OrtBackend(Backend):
    name = "ort"
    summary = "ONNX Runtime plus edgesparse's sparse custom operators"

    def compile(self, model: onnx.ModelProto, target, staging: Path, libraries) -> dict:
        model_file = staging / "model.onnx"
        if external_data.is_large(model):  # beside model.onnx; the manifest's checksums and the archive cover it
            external_data.save(model, model_file, EXTERNAL_DATA)
        else:
            onnx.save(model, str(model_file))
        written = []
        toolchain = target.toolchain() if libraries else None
        for lib in libraries:
            built = Path(lib.build(toolchain))
            dest = staging / "lib" / built.name
            dest.parent.mkdir(exist_ok=True)
            shutil.copy2(built, dest)
            written.append(dest.relative_to(staging).as_posix())
        (staging / "RUN.py.txt").write_text(APP_SNIPPET)
        return {
            "engine": "onnxruntime",
            "model": "model.onnx",
            "custom_op_libraries": written,
            "custom_domains": sorted({lib.domain for lib in libraries}),
            "custom_ops": sorted({op for lib in libraries for op in lib.ops}),
            "compiler": _compiler_version(toolchain) if toolchain else None,
        }


def _compiler_version(toolchain) -> str | None:
    try:
        out = subprocess.run([*toolchain.cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        return None
