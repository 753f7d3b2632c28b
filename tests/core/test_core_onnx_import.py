"""ONNX models from the wild: dynamic dims, old opsets, weights behind other nodes or in external
data files. Each either builds and verifies, or stops with one line that says what to give."""
import json
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesparse import inputs
from edgesparse.errors import EdgesparseError
from edgesparse_testing import conv_model, fails, mlp_model, no_leftovers, run_json

SPARSE = ["-t", "x86", "-p", "magnitude:dispatch=off"]  # every eligible layer sparse, whatever the host measured


def build(path, out, options=None, **request) -> dict:
    """A build in this process (the CLI's start-up costs seconds): magnitude with every eligible
    layer sparse unless `options` says otherwise. Errors raise EdgesparseError, whose one line the
    CLI prints (test_core_bad_input checks that for every error)."""
    from edgesparse.pipeline import BuildRequest, build as run_build

    return run_build(BuildRequest(model=str(path), target="x86", output=out, quiet=True,
                                  passes=[("magnitude", options or {"dispatch": "off"})], **request))


def at_opset(model, opset, ir_version=7):
    model.opset_import[0].version = opset
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def image_model(tmp_path, opset=12):
    """The conv block with height and width left dynamic, at an older opset."""
    model = conv_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    for d in model.graph.output[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "H2"
    path = tmp_path / "image.onnx"
    onnx.save(at_opset(model, opset), str(path))
    return path


def signature_model(dims_by_input: dict) -> onnx.ModelProto:
    """Inputs with the given dims (ints, names, -1 or None for unset) and dtypes, summed into one output."""
    graph_inputs, nodes, outputs = [], [], []
    for name, (dtype, dims) in dims_by_input.items():
        info = helper.make_tensor_value_info(name, dtype, None)
        shape = info.type.tensor_type.shape
        for d in dims:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif d is not None:
                dim.dim_param = d
        graph_inputs.append(info)
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", dtype, None))
    return helper.make_model(helper.make_graph(nodes, "sig", graph_inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 18)])


# -- input shapes ---------------------------------------------------------------------------------

def test_generated_inputs_follow_dtypes_ranks_and_shared_named_dims():
    model = signature_model({
        "input_ids": (TensorProto.INT64, ["batch", "sequence_length"]),
        "attention_mask": (TensorProto.INT64, ["batch", "sequence_length"]),
        "features": (TensorProto.FLOAT16, [-1, "sequence_length", 8]),  # -1: dynamic, unnamed
        "flags": (TensorProto.BOOL, ["batch", 3]),
    })
    batch = inputs.generated(model, count=1)[0]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, 16)
    assert batch["features"].shape == (1, 16, 8) and batch["features"].dtype == np.float16
    assert batch["input_ids"].dtype == np.int64 and batch["flags"].dtype == np.bool_
    # a named dim guessable in one input sizes it in another, whichever comes first
    pair = signature_model({"frames": (TensorProto.FLOAT, [2, "time", 3]), "ids": (TensorProto.INT64, ["b", "time"])})
    assert inputs.generated(pair, count=1)[0]["frames"].shape == (2, 16, 3)
    cross = signature_model({"a": (TensorProto.FLOAT, [3, "n"]), "b": (TensorProto.FLOAT, ["n", 3])})
    assert inputs.generated(cross, count=1)[0]["a"].shape == (3, 1)  # "n" leads b: its batch dim
    # a given size for a named dim reaches every input that uses the name
    batch = inputs.generated(model, count=1, shapes={"input_ids": [2, 7]})[0]
    assert batch["attention_mask"].shape == (2, 7) and batch["features"].shape == (1, 7, 8)


def test_unguessable_dims_are_refused_with_what_to_give():
    model = signature_model({"x": (TensorProto.FLOAT, ["N", 3, "H", -1])})
    with pytest.raises(EdgesparseError) as err:
        inputs.generated(model)
    assert str(err.value) == "input 'x' has dynamic dims H, d3: give --inputs FILE.npz or --input-shape x=1,3,H,d3"
    # [batch, tokens, features] with fixed features: the middle dim is a sequence, a safe guess
    assert inputs.resolve_shapes(signature_model({"h": (TensorProto.FLOAT, ["b", "t", 96])}))["h"][2] == 96
    unset = signature_model({"x": (TensorProto.FLOAT, [None, None])})  # dims present but neither value nor name
    with pytest.raises(EdgesparseError, match=r"dynamic dims d1: .* --input-shape x=1,d1$"):
        inputs.generated(unset)
    no_shape = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    with pytest.raises(EdgesparseError, match="input 'x' has no shape in the model"):
        inputs.generated(no_shape)
    assert inputs.generated(no_shape, shapes={"x": [2, 5]})[0]["x"].shape == (2, 5)


def test_image_with_dynamic_height_width_builds_with_input_shape(tmp_path):
    path = image_model(tmp_path)
    out = tmp_path / "out"
    fails("build", path, *SPARSE, "-o", out,
          expect="input 'x' has dynamic dims H, W: give --inputs FILE.npz or --input-shape x=1,64,H,W")
    assert not out.exists() and no_leftovers(tmp_path) == []
    manifest = build(path, out, input_shapes={"x": [1, 64, 24, 20]})
    assert manifest["import"]["input_shapes"] == {"x": [1, 64, 24, 20]}
    v = manifest["verification"]
    assert v["passed"] and v["sparse_nodes"] == 2 and v["sparse_nodes_on_kernel"] == 2


def test_input_shape_in_a_recipe(tmp_path):
    path = image_model(tmp_path)
    (tmp_path / "r.toml").write_text('model = "image.onnx"\ntarget = "x86"\noutput = "pkg"\n'
                                     'input_shapes = { x = [1, 64, 8, 8] }\n'
                                     '[[passes]]\nname = "magnitude"\ndispatch = "off"\n')
    manifest = run_json("build", "--recipe", tmp_path / "r.toml")
    assert manifest["import"]["input_shapes"] == {"x": [1, 64, 8, 8]} and manifest["verification"]["passed"]


def test_bad_input_shapes_are_one_line_and_write_nothing(tmp_path):
    from edgesparse.pipeline import BuildRequest, build
    from edgesparse.recipe import parse_input_shapes

    path = image_model(tmp_path)
    out = tmp_path / "out"
    fails("build", path, *SPARSE, "--input-shape", "y=1,64,8,8", "-o", out,
          expect="--input-shape names input 'y', which the model lacks (inputs: x)")
    for flags, expect in [
        (["x=1,32,8,8"], "contradicts the model: dim 1 of 'x' is fixed at 64"),
        (["x=1,64,8"], "has 3 dims; input 'x' has 4"),
        (["x=1,64,a,8"], "dims must be whole numbers"),
        (["x=1,64,0,8"], "dims must be at least 1"),
        (["x=1,64,8,8", "x=1,64,9,9"], "gives input 'x' twice"),
    ]:
        with pytest.raises(EdgesparseError, match=expect):
            build(BuildRequest(model=str(path), target="x86", output=out, quiet=True,
                               input_shapes=parse_input_shapes(flags), passes=[("magnitude", {})]))
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 64, 8, 8), np.float32))
    with pytest.raises(EdgesparseError, match="--input-shape is for ONNX models without --inputs"):
        build(BuildRequest(model=str(path), target="x86", output=out, quiet=True, inputs=tmp_path / "x.npz",
                           input_shapes={"x": [1, 64, 8, 8]}))
    assert not out.exists() and no_leftovers(tmp_path) == []


def test_model_that_rejects_the_generated_inputs_says_so(tmp_path):
    # [batch, seq] + a constant [1, 4]: runs only when seq is 4 (or 1); the guess is 16
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "offset"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])],
        [numpy_helper.from_array(np.arange(4, dtype=np.int64).reshape(1, 4), "offset")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    line = fails("build", tmp_path / "m.onnx", "-t", "x86", "-o", tmp_path / "out",
                 expect="ONNX Runtime cannot run the model on generated inputs (ids[1,16])")
    assert "internal error" not in line and "--input-shape" in line
    assert not (tmp_path / "out").exists()
    from edgesparse.pipeline import BuildRequest, build as run_build

    manifest = run_build(BuildRequest(model=str(tmp_path / "m.onnx"), target="x86", output=tmp_path / "out", quiet=True,
                                      input_shapes={"ids": [2, 4]}))
    assert manifest["verification"]["passed"]


# -- opset upgrade --------------------------------------------------------------------------------

def test_opset_11_gemm_model_is_upgraded_and_gets_sparse_operators(tmp_path):
    path = tmp_path / "mlp11.onnx"
    onnx.save(at_opset(mlp_model(gemm=True), 11), str(path))
    manifest = build(path, tmp_path / "out")
    converted = manifest["import"]["converted"]
    assert (converted["from"], converted["to"]) == (11, 16) and converted["max_abs_error"] <= converted["tolerance"]
    v = manifest["verification"]
    assert v["passed"] and v["sparse_nodes"] == v["sparse_nodes_on_kernel"] == 2
    packaged = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [o.version for o in packaged.opset_import if o.domain == ""] == [16]


def test_initializers_listed_as_inputs_are_constants(tmp_path):
    # IR 3 exporters list every initializer as a graph input too
    model = mlp_model()
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer)
    onnx.save(at_opset(model, 9, ir_version=3), str(tmp_path / "ir3.onnx"))
    manifest = build(tmp_path / "ir3.onnx", tmp_path / "out")
    assert manifest["import"]["initializers_as_inputs"] == 4
    assert [i["name"] for i in manifest["inputs"]] == ["x"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2


def test_opset_that_cannot_be_converted_names_the_op(tmp_path):
    graph = helper.make_graph(  # ImageScaler: experimental, ORT runs it, the converter has no schema for it
        [helper.make_node("ImageScaler", ["x"], ["s"], scale=2.0, bias=[0.0] * 64),
         helper.make_node("Conv", ["s", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])],
        [numpy_helper.from_array(np.ones((64, 64, 1, 1), np.float32), "w")])
    onnx.save(at_opset(helper.make_model(graph), 9), str(tmp_path / "old.onnx"))
    with pytest.raises(EdgesparseError, match="cannot convert the model from opset 9 to 16: op ImageScaler has no conversion"):
        build(tmp_path / "old.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


# -- weights wherever they live -------------------------------------------------------------------

def wild_weights_model() -> tuple[onnx.ModelProto, dict]:
    """x[batch, 128] through four layers whose weights sit behind Transpose, Cast (fp16 storage),
    Identity of a Constant node, and a Gemm with alpha/beta/transB; a Gemm with transA; and a
    MatMul with batched weights, which no sparse operator takes."""
    rng = np.random.default_rng(0)
    w = lambda k, n: (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    w_t, w_half, w_const, w_gemm, w_a = w(128, 128).T.copy(), w(128, 128).astype(np.float16), w(128, 128), w(128, 128), w(128, 64)
    bias = rng.standard_normal(128).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w1"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="behind_transpose"),
        helper.make_node("Cast", ["w_half"], ["w2"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="behind_cast"),
        helper.make_node("Constant", [], ["w3c"], value=numpy_helper.from_array(w_const)),
        helper.make_node("Identity", ["w3c"], ["w3"]),
        helper.make_node("MatMul", ["h2", "w3"], ["h3"], name="constant_node"),
        helper.make_node("Gemm", ["h3", "w_gemm_t", "bias"], ["h4"], name="gemm_attrs", alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Transpose", ["h4"], ["h4t"], perm=[1, 0]),
        helper.make_node("Gemm", ["h4t", "w_a"], ["y"], name="gemm_transA", transA=1),
        helper.make_node("Reshape", ["h4", "shape3"], ["h5"]),
        helper.make_node("MatMul", ["h5", "w_batched"], ["z"], name="batched"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w_t, "w_t"), (w_half, "w_half"), (w_gemm.T.copy(), "w_gemm_t"), (bias, "bias"), (w_a, "w_a"),
        (np.array([2, -1, 64], np.int64), "shape3"), (rng.standard_normal((2, 64, 64)).astype(np.float32), "w_batched")]]
    graph = helper.make_graph(nodes, "wild", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [128, 64]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_weights_behind_other_nodes_are_pruned_and_unsupported_layers_say_why(tmp_path):
    onnx.save(wild_weights_model(), str(tmp_path / "wild.onnx"))
    manifest = build(tmp_path / "wild.onnx", tmp_path / "out")
    report = manifest["passes"][0]["report"]
    assert sorted(p["layer"] for p in report["pruned"]) == \
        ["behind_cast", "behind_transpose", "constant_node", "gemm_attrs", "gemm_transA"]
    reasons = {d["layer"]: d["reason"] for d in report["kept_dense"]}
    assert list(reasons) == ["batched"] and "batched (3-D) weights" in reasons["batched"]
    v = manifest["verification"]
    assert v["passed"] and v["sparse_nodes"] == v["sparse_nodes_on_kernel"] == 5
    by_node = {l["node"]: l for l in manifest["layers"]}
    assert by_node["behind_cast_sparse"]["weight_dtype"] == "float16"
    assert "weight_dtype" not in by_node["behind_transpose_sparse"]
    packaged = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert not {"Transpose", "Cast", "Constant", "Identity"} & {n.op_type for n in packaged.graph.node
                                                                  if n.output[0] in ("w1", "w2", "w3", "w3c")}
    assert not {"w_t", "w_half", "w_gemm_t"} & {i.name for i in packaged.graph.initializer}


def test_gemm_alpha_beta_fold_matches_onnx_runtime(tmp_path):
    """The folded weights compute what the Gemm computed: the package against the original model."""
    import onnxruntime as ort

    from edgesparse import runtime

    model = wild_weights_model()
    onnx.save(model, str(tmp_path / "wild.onnx"))
    build(tmp_path / "wild.onnx", tmp_path / "out", {"dispatch": "off", "sparsity": 0.0})
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = runtime.load(tmp_path / "out").run({"x": x})
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < 1e-3


def test_1d_convolutions_run_on_the_sparse_conv(tmp_path):
    """Speech models are 1-D convs: strides, pads, dilations and bias map onto the 2-D kernel."""
    import onnxruntime as ort

    from edgesparse import runtime

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", kernel_shape=[3], pads=[1, 1], strides=[2]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", kernel_shape=[5], pads=[4, 3], dilations=[2])], "c1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, "time"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64, "time2"])],
        [numpy_helper.from_array((rng.standard_normal(s) / 10).astype(np.float32), n)
         for n, s in [("w1", (128, 64, 3)), ("b1", (128,)), ("w2", (64, 128, 5))]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "c1d.onnx"))
    manifest = build(tmp_path / "c1d.onnx", tmp_path / "out", {"dispatch": "off", "sparsity": 0.0})
    assert manifest["verification"]["sparse_nodes_on_kernel"] == 2
    assert [p["shape"] for p in manifest["passes"][0]["report"]["pruned"]] == [[128, 64, 1, 3], [64, 128, 1, 5]]
    x = rng.standard_normal((2, 64, 37)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = runtime.load(tmp_path / "out").run({"x": x})[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


def test_float16_model_runs_its_sparse_layers_in_float32(tmp_path):
    model = mlp_model()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(tmp_path / "half.onnx"))
    manifest = build(tmp_path / "half.onnx", tmp_path / "out")
    v = manifest["verification"]
    assert v["passed"] and v["sparse_nodes_on_kernel"] == 2
    assert [l["weight_dtype"] for l in manifest["layers"]] == ["float16", "float16"]
    assert manifest["inputs"][0]["dtype"] == manifest["outputs"][0]["dtype"] == "float16"


# -- external data --------------------------------------------------------------------------------

def save_external(model, path):
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=0)


def test_external_data_model_builds(tmp_path):
    save_external(mlp_model(), tmp_path / "ext.onnx")
    manifest = build(tmp_path / "ext.onnx", tmp_path / "out")
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    assert "model.onnx.data" not in manifest["files"]  # small: the package holds its weights inline


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_external_data_is_one_line(tmp_path, damage):
    save_external(mlp_model(), tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1000])
    if damage == "missing":  # once through the CLI, as a user sees it
        fails("build", tmp_path / "ext.onnx", *SPARSE, "-o", tmp_path / "out",
              expect="external data file 'ext.onnx.data' of ext.onnx is missing")
    with pytest.raises(EdgesparseError, match=f"external data file 'ext.onnx.data' of ext.onnx is {damage}"):
        build(tmp_path / "ext.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_large_model_path_keeps_external_data_in_the_package(tmp_path, monkeypatch):
    """Everything a model over 2 GB goes through (checker and ORT by file, the package's external
    data beside model.onnx, checksums, archive), exercised on a small model by lowering the bar."""
    from edgesparse import external_data, runtime

    monkeypatch.setattr(external_data, "LARGE", 0)
    save_external(mlp_model(), tmp_path / "ext.onnx")
    out = tmp_path / "out"
    manifest = build(tmp_path / "ext.onnx", out)
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    assert "model.onnx.data" in manifest["files"] and (out / "model.onnx.data").stat().st_size > 100_000
    assert (out / "model.onnx").stat().st_size < 50_000
    with zipfile.ZipFile(f"{out}.zip") as archive:
        assert "out/model.onnx.data" in archive.namelist()
    pkg = runtime.load(f"{out}.zip")  # checksums checked, external data found beside the model
    x = np.load(out / "verification.npz")["input:x"]
    assert np.abs(pkg.run({"x": x})[0] - np.load(out / "verification.npz")["output:y"]).max() < 1e-4
    (out / "model.onnx.data").write_bytes(b"\0" * 10)
    with pytest.raises(EdgesparseError, match="checksum mismatch for model.onnx.data"):
        runtime.load(out)


def test_layers_share_weights_and_fold_a_scalar_gemm_bias():
    import onnx_ir as ir

    from edgesparse import graph

    rng = np.random.default_rng(0)
    s, w = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "s"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "s"], ["b"], name="second"),  # the same weight again
             helper.make_node("Gemm", ["b", "w", "c"], ["y"], name="gemm", alpha=2.0, beta=3.0)]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(s, "s"), numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.5), "c")]),
        opset_imports=[helper.make_opsetid("", 18)])
    found = {l.name: l for l in graph.layers(ir.from_proto(model))}
    assert np.array_equal(found["first"].weight, s) and np.array_equal(found["second"].weight, s)
    assert np.allclose(found["gemm"].weight, 2.0 * w) and np.allclose(found["gemm"].bias, np.full(32, 1.5))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_convs_get_explicit_pads(tmp_path, auto_pad):
    """Older TF exports write auto_pad: with the input size known, the pads are made explicit."""
    import onnxruntime as ort

    from edgesparse import runtime

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="same", kernel_shape=[3, 2], strides=[2, 2], auto_pad=auto_pad)],
        "ap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, "h", "w"])],
        [numpy_helper.from_array((rng.standard_normal((64, 64, 3, 2)) / 10).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "ap.onnx"))
    manifest = build(tmp_path / "ap.onnx", tmp_path / "out", {"dispatch": "off", "sparsity": 0.0})
    assert manifest["verification"]["sparse_nodes_on_kernel"] == 1
    x = rng.standard_normal((1, 64, 9, 10)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = runtime.load(tmp_path / "out").run({"x": x})[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


def test_auto_pad_same_on_a_dynamic_size_stays_dense_with_a_reason():
    import onnx_ir as ir

    from edgesparse import graph

    graph_proto = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="same", kernel_shape=[3, 3], auto_pad="SAME_UPPER")], "ap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, "h", "w"])],
        [numpy_helper.from_array(np.ones((64, 64, 3, 3), np.float32), "w")])
    model = ir.from_proto(helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)]))
    assert list(graph.layers(model)) == []
    (layer,) = graph.layers(model, unsupported=True)
    assert "auto_pad SAME on an input of dynamic size" in layer.unsupported
