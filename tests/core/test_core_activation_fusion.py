"""An activation that follows a sparse MatMul alone goes into the kernel's epilogue
(graph.following_activation): every spelling exporters write is found, what is not safe to fuse
stays, and the package still computes what the original model computed."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

C = {"sqrt2": np.sqrt(2.0), "inv_sqrt2": 1 / np.sqrt(2.0), "one": 1.0, "half": 0.5}


def _act(form: str) -> tuple[list, list[str], str]:
    """Nodes computing the activation from "h" into "a", extra graph outputs, and the activation
    the fusion should find ("none": must stay as it is)."""
    n = helper.make_node
    erf_scaled = [n("Div", ["h", "sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["p"])]
    forms = {
        "relu": ([n("Relu", ["h"], ["a"])], [], "relu"),
        "clip0": ([n("Clip", ["h", "zero"], ["a"])], [], "relu"),
        "relu6": ([n("Clip", ["h", "zero", "six"], ["a"])], [], "none"),  # the MatMul epilogue has no relu6
        "silu": ([n("Sigmoid", ["h"], ["s"]), n("Mul", ["h", "s"], ["a"])], [], "silu"),
        "gelu_op": ([n("Gelu", ["h"], ["a"])], [], "gelu"),
        "gelu_op_tanh": ([n("Gelu", ["h"], ["a"], approximate="tanh")], [], "none"),
        # (x * (1 + erf(x / sqrt 2))) * 0.5: the TorchScript exporter
        "erf_x_then_half": (erf_scaled + [n("Mul", ["h", "p"], ["m"]), n("Mul", ["m", "half"], ["a"])], [], "gelu"),
        # (0.5 * x) * (1 + erf(x * (1 / sqrt 2)))
        "erf_half_x_first": ([n("Mul", ["h", "inv_sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["one", "e"], ["p"]),
                              n("Mul", ["half", "h"], ["hh"]), n("Mul", ["hh", "p"], ["a"])], [], "gelu"),
        # x * ((1 + erf(x / sqrt 2)) * 0.5): torch.export's decomposition (all-MiniLM-L6-v2)
        "erf_half_inner": (erf_scaled + [n("Mul", ["half", "p"], ["q"]), n("Mul", ["h", "q"], ["a"])], [], "gelu"),
        # the Erf value is also an output: fusing would lose it
        "erf_shared": (erf_scaled + [n("Mul", ["h", "p"], ["m"]), n("Mul", ["m", "half"], ["a"])], ["e"], "none"),
        # not GELU: x / 2 instead of x / sqrt 2
        "erf_wrong_scale": ([n("Div", ["h", "half_inv"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["p"]),
                             n("Mul", ["h", "p"], ["m"]), n("Mul", ["m", "half"], ["a"])], [], "none"),
    }
    return forms[form]


def model_with(form: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    act, extra, _ = _act(form)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"), *act,
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    consts = {"w1": rng.standard_normal((64, 128)) / 8, "b1": rng.standard_normal(128) / 4,
              "w2": rng.standard_normal((128, 64)) / 11, "zero": 0.0, "six": 6.0, "half_inv": 2.0, **C}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])]
    outputs += [helper.make_tensor_value_info(e, TensorProto.FLOAT, ["batch", 128]) for e in extra]
    graph = helper.make_graph(nodes, "act", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("form", ["relu", "clip0", "relu6", "silu", "gelu_op", "gelu_op_tanh", "erf_x_then_half",
                                  "erf_half_x_first", "erf_half_inner", "erf_shared", "erf_wrong_scale"])
def test_activation_goes_into_the_sparse_matmul(tmp_path, form):
    import onnxruntime as ort

    from edgesparse import runtime
    from edgesparse.pipeline import BuildRequest, build

    model = model_with(form)
    onnx.save(model, str(tmp_path / "m.onnx"))
    manifest = build(BuildRequest(model=str(tmp_path / "m.onnx"), target="x86", output=tmp_path / "out", quiet=True,
                                  passes=[("magnitude", {"dispatch": "off", "sparsity": 0.0})]))
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    packaged = onnx.load(str(tmp_path / "out" / "model.onnx"))
    sparse = [n for n in packaged.graph.node if n.op_type == "BlockSparseMatMul"]
    acts = [next((a.s.decode() for a in n.attribute if a.name == "activation"), "none") for n in sparse]
    want = _act(form)[2]
    assert acts == [want, "none"]
    original_ops = {n.op_type for n in model.graph.node} - {"MatMul", "Add"}
    left = {n.op_type for n in packaged.graph.node} & original_ops
    assert not left if want != "none" else left == original_ops
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    expect = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = runtime.load(tmp_path / "out").run({"x": x})
    assert len(got) == len(expect)
    for g, e in zip(got, expect):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_activation_that_is_a_graph_output_stays():
    import onnx_ir as ir

    from edgesparse import graph

    model = model_with("relu")
    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 128]))
    m = ir.from_proto(model)
    layer = next(graph.layers(m))
    assert graph.following_activation(layer.output, graph.MATMUL_ACTIVATIONS)[0] == "none"
