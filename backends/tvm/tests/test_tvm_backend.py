"""The tvm backend end to end on this machine's CPU: a magnitude-pruned MLP built through the
pipeline verifies against the reference, runs with TVM's runtime libraries only, and models the
backend cannot take fail with one line naming the operator."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from edgesparse import EdgesparseError, pipeline
from edgesparse.plugins import load_registry
from edgesparse_tvm import frontend
from edgesparse_tvm.testing import mlp_model, x86_tvm_target


@pytest.fixture(scope="module")
def registry():
    reg = load_registry()
    reg.targets["x86-tvm"] = x86_tvm_target()
    return reg


@pytest.fixture(scope="module")
def built(tmp_path_factory, registry):
    tmp = tmp_path_factory.mktemp("tvm")
    onnx.save(mlp_model(activation="Relu"), str(tmp / "mlp.onnx"))
    manifest = pipeline.build(pipeline.BuildRequest(
        model=str(tmp / "mlp.onnx"), target="x86-tvm", output=tmp / "pkg", quiet=True,
        passes=[("magnitude", {"sparsity": 0.75, "block": 16})]), registry=registry)
    return tmp / "pkg", manifest


def test_pruned_mlp_builds_and_verifies(built):
    package, manifest = built
    runtime = manifest["runtime"]
    assert manifest["backend"] == "tvm" and runtime["engine"] == "tvm"
    v = manifest["verification"]
    assert v["passed"] and v["max_abs_error"] < 1e-4
    assert v["sparse_nodes"] == 2 and v["fraction_on_sparse_kernels"] == 1.0
    (module,) = runtime["modules"]
    assert module["device"] == "cpu" and module["machine"] == "x86_64" and module["sparse_kernel_calls"] == 2
    assert [l["sparsity"] for l in manifest["layers"]] == pytest.approx([0.75, 0.75], abs=0.01)
    assert set(runtime["files"]) <= set(manifest["files"])
    assert runtime["input_order"] == ["x"]


RUNTIME_ONLY = textwrap.dedent("""
    import sys, json, numpy as np
    sys.modules["tvm"] = None          # any import of the TVM compiler fails
    package = sys.argv[1]
    sys.path.insert(0, package + "/tvm")
    import run
    model = run.load(package)
    data = np.load(package + "/verification.npz")
    x = data["input:x"]
    got = model.run({"x": x})[0]
    batch = model.run({"x": np.concatenate([x, x, x])})[0]  # tokens are symbolic: any batch size
    raw = np.zeros(x.size + 64, np.float32)                   # TVM's CPU code assumes 64-byte alignment:
    start = next(i for i in range(1, 17) if (raw[i:].ctypes.data % 64) != 0)
    odd = raw[start:start + x.size].reshape(x.shape)
    odd[...] = x                                              # numpy only promises 16
    assert odd.ctypes.data % 64 != 0
    assert np.array_equal(model.run({"x": odd})[0], got)
    import tvm_ffi
    dev = tvm_ffi.device("cpu", 0)                             # the GPU path's copies, exercised on the CPU
    back = run.copy_out(run.copy_in(x.astype(np.float16), dev))
    assert back.dtype == np.float16 and np.array_equal(back, x.astype(np.float16))
    maps = open("/proc/self/maps").read()
    print(json.dumps({"error": float(np.abs(got - data["output:y"]).max()),
                      "batch_error": float(np.abs(batch[: len(x)] - got).max()), "rows": len(batch),
                      "compiler_loaded": "libtvm_compiler" in maps,
                      "runtime": [l.split()[-1] for l in maps.splitlines() if l.endswith("libtvm_runtime.so")][:1]}))
""")


def test_package_runs_on_tvm_runtime_only(built, tmp_path):
    """What a device gets: the package, libtvm_runtime.so copied alone, tvm_ffi and numpy."""
    import tvm

    package, manifest = built
    libs = tmp_path / "device-libs"
    libs.mkdir()
    shutil.copy2(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so", libs)
    env = {**os.environ, "TVM_RUNTIME_LIBS": str(libs)}
    result = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(package)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["error"] <= manifest["verification"]["tolerance"]
    assert out["batch_error"] == 0.0 and out["rows"] == 3 * len(np.load(package / "verification.npz")["input:x"])
    assert out["runtime"] == [str(libs / "libtvm_runtime.so")] and not out["compiler_loaded"]


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


def test_operator_tvm_cannot_import_is_named(tmp_path, registry):
    onnx.save(mlp_model(activation="Celu"), str(tmp_path / "celu.onnx"))
    with pytest.raises(EdgesparseError) as info:
        pipeline.build(pipeline.BuildRequest(model=str(tmp_path / "celu.onnx"), target="x86-tvm", output=tmp_path / "out",
                                             quiet=True, passes=[("magnitude", {"sparsity": 0.75})]), registry=registry)
    message = _one_line(info.value)
    # x86-tvm lists only the tvm backend, so the way out names a target that has ORT
    assert "'Celu'" in message and "target 'x86-tvm' compiles through tvm only" in message and "ORT backend" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.zip").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["celu.onnx"]  # no staging folder left behind


def test_way_out_is_the_ort_backend_where_the_target_has_one(tmp_path):
    from edgesparse_tvm import TvmBackend

    target = x86_tvm_target()
    target.backends = ("tvm", "ort")
    with pytest.raises(EdgesparseError) as info:
        TvmBackend().compile(mlp_model(activation="Celu"), target, tmp_path, [])
    assert _one_line(info.value).endswith("; build with --backend ort")


def test_edgesparse_op_without_tir_kernel_is_named():
    """deltallm's DeltaAttention has only a C++ kernel for ORT: named, with the way out."""
    model = mlp_model()
    model.graph.node.append(helper.make_node("DeltaAttention", ["y"], ["z"], domain="com.edgesparse.deltallm", name="att"))
    model.graph.node.append(helper.make_node("Foo", ["z"], ["w"], domain="com.example", name="foo"))
    with pytest.raises(EdgesparseError) as info:
        frontend.import_model(model, "cpu")
    message = _one_line(info.value)
    assert "'com.edgesparse.deltallm::DeltaAttention'" in message and "no TIR kernel" in message and "--backend ort" in message
    assert frontend.unsupported_ops(model) == ["com.edgesparse.deltallm::DeltaAttention", "com.example::Foo"]


def test_nchw16c_layout_is_not_imported():
    """The TIR kernels take NCHW: a BlockSparseConv in ORT's NCHW16c layout is named unsupported."""
    from onnx import TensorProto

    from edgesparse.kernels.conv import make_block_sparse_conv, pack_block_sparse_conv

    packed = pack_block_sparse_conv(np.ones((16, 16, 1, 1), np.float32), 16)
    node, inits = make_block_sparse_conv("x", "y", packed, 16, (1, 1), name="pw", y_channel_block=16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert frontend.unsupported_ops(helper.make_model(graph)) == ["com.edgesparse::BlockSparseConv"]
    node.attribute.pop()  # y_channel_block
    graph = helper.make_graph([node], "g", list(graph.input), list(graph.output), inits)
    assert frontend.unsupported_ops(helper.make_model(graph)) == []


def test_pinned_dims(monkeypatch):
    monkeypatch.setenv(frontend.DIMS_ENV, "batch=4")
    mod, calls = frontend.import_model(mlp_model(), "cpu")
    assert calls == 0 and "(4, 256)" in mod.script()
    monkeypatch.setenv(frontend.DIMS_ENV, "batch=four")
    with pytest.raises(EdgesparseError, match="EDGESPARSE_TVM_DIMS: expected name=positive integer, got 'batch=four'"):
        frontend.import_model(mlp_model(), "cpu")
