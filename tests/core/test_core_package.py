"""The package round trip: an app with only onnxruntime and numpy runs it with the documented
lines, and its outputs match the reference recorded at build time."""
import json
import subprocess
import sys

import numpy as np
import pytest

from edgesparse_testing import ROOT

APP = """
import json, sys
import numpy as np, onnxruntime as ort
pkg = sys.argv[1]
manifest = json.load(open(f"{pkg}/manifest.json"))
options = ort.SessionOptions()
for lib in manifest["runtime"]["custom_op_libraries"]:
    options.register_custom_ops_library(f"{pkg}/{lib}")
session = ort.InferenceSession(f"{pkg}/{manifest['runtime']['model']}", options)
data = np.load(f"{pkg}/verification.npz")
inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
expected = [data[k] for k in data.files if k.startswith("output:")]
got = session.run(None, inputs)
print(json.dumps({"error": max(float(np.abs(a - b).max()) for a, b in zip(got, expected)),
                  "edgesparse_importable": __import__("importlib").util.find_spec("edgesparse") is not None}))
"""


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory):
    """A virtual environment with onnxruntime and numpy only, as in an app."""
    venv = tmp_path_factory.mktemp("appvenv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    import onnxruntime

    subprocess.run([*pip, f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"], check=True,
                   capture_output=True)
    return venv / "bin" / "python"


def test_runs_in_clean_venv_with_only_onnxruntime_and_numpy(built_mlp, clean_venv, tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP)
    out = subprocess.run([str(clean_venv), str(app), str(built_mlp)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    result = json.loads(out.stdout)
    assert result["edgesparse_importable"] is False
    assert result["error"] <= 1e-4


def test_external_data_package_runs_in_clean_venv(clean_venv, tmp_path, monkeypatch):
    """A package whose weights live in model.onnx.data (as one over 2 GB does; the bar is lowered
    here to build a small one) runs in an app's environment from the extracted archive."""
    import zipfile

    import onnx

    from edgesparse import external_data
    from edgesparse.pipeline import BuildRequest, build
    from edgesparse_testing import mlp_model

    monkeypatch.setattr(external_data, "LARGE", 0)
    onnx.save(mlp_model(), str(tmp_path / "mlp.onnx"))
    build(BuildRequest(model=str(tmp_path / "mlp.onnx"), target="x86", output=tmp_path / "pkg", quiet=True,
                       passes=[("magnitude", {"dispatch": "off"})]))
    with zipfile.ZipFile(tmp_path / "pkg.zip") as archive:
        archive.extractall(tmp_path / "unpacked")
    (tmp_path / "app.py").write_text(APP)
    out = subprocess.run([str(clean_venv), str(tmp_path / "app.py"), str(tmp_path / "unpacked" / "pkg")],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    assert (tmp_path / "unpacked" / "pkg" / "model.onnx.data").is_file()
    assert json.loads(out.stdout)["error"] <= 1e-4


def test_snippet_shipped_in_the_package_runs(built_mlp, clean_venv, tmp_path):
    snippet = (built_mlp / "RUN.py.txt").read_text().replace('pkg = "path/to/package"', f'pkg = "{built_mlp}"')
    (tmp_path / "snippet.py").write_text(snippet)
    subprocess.run([str(clean_venv), str(tmp_path / "snippet.py")], check=True, cwd=tmp_path, capture_output=True)


def test_runtime_load_checks_and_runs(built_mlp):
    from edgesparse import runtime

    pkg = runtime.load(built_mlp)
    data = np.load(built_mlp / "verification.npz")
    x = data["input:x"]
    (y,) = pkg.run({"x": x})
    assert np.abs(y - data["output:y"]).max() <= 1e-4
    (dense,) = pkg.session(kernels=False).run(None, {"x": x})
    assert np.abs(y - dense).max() <= 1e-4
    outputs, on_kernel = runtime.run_profiled(pkg, {"x": x})
    assert on_kernel == {"BlockSparseMatMul": 2}


def test_manifest_records_what_was_built(built_mlp):
    m = json.loads((built_mlp / "manifest.json").read_text())
    assert m["format"] == "edgesparse-package" and m["format_version"] == 1
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 256]}]
    assert m["tools"]["onnxruntime"] and m["runtime"]["compiler"].startswith("g++")
    report = m["passes"][0]["report"]
    assert len(report["pruned"]) == 2 and report["kept_dense"] == []
