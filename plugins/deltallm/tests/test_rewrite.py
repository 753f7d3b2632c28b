"""Finding attention in exported graphs and replacing it."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import tiny_llama
from deltallm_testing import session
from edgesparse import EdgesparseError
from edgesparse_deltallm import rewrite


def _load(path):
    return ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load(str(path))))


def test_finds_every_layer_with_its_geometry(tiny_onnx):
    found = rewrite.find_attention(_load(tiny_onnx))
    assert len(found) == tiny_llama.LAYERS
    for att in found:
        assert att.q.shape[1] == 9 and att.q.shape[3] == 64   # [B, H, T, D] after RoPE
        assert att.k.shape[1] == 3 and att.v.shape[1] == 3    # the cache-concatenated KV heads
        assert att.scale == pytest.approx(64 ** -0.5, rel=1e-6)
        kinds = {n.op_type for n in att.removed}
        assert {"MatMul", "Softmax"} <= kinds


def test_exact_window_reproduces_the_model_in_prefill_and_decode(tiny_onnx, library):
    model = _load(tiny_onnx)
    rewrite.apply(model, window=1 << 20, sinks=0, theta_q=0.5, theta_v=0.01)
    proto = ir.to_proto(model)
    proto.opset_import.append(helper.make_opsetid(rewrite.DOMAIN, 1))
    ops = {n.op_type for n in proto.graph.node}
    assert "Softmax" not in ops and "DeltaAttention" in ops
    import onnxruntime as ort

    dense = ort.InferenceSession(str(tiny_onnx))
    delta = session(proto, library)
    rng = np.random.default_rng(0)
    for past, new in [(0, 40), (25, 6), (60, 1)]:
        feeds = {"input_ids": tiny_llama.tokens(new, 7)[None],
                 "attention_mask": np.ones((1, past + new), np.int64),
                 "past_keys": rng.standard_normal((2, 1, 3, past, 64)).astype(np.float32),
                 "past_values": rng.standard_normal((2, 1, 3, past, 64)).astype(np.float32)}
        for a, b in zip(dense.run(None, feeds), delta.run(None, feeds)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def _mlp_with_softmax():
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _attention_without_pv():
    """Q.K^T and a softmax whose result is an output: no P.V product, so not attention."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1)]
    info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 5, 8])  # noqa: E731
    g = helper.make_graph(nodes, "half", [info("q"), info("k")],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2, 5, 5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("make", [_mlp_with_softmax, _attention_without_pv])
def test_models_without_attention_get_a_clear_error(make):
    model = ir.from_proto(make())
    assert rewrite.find_attention(model) == []
    with pytest.raises(EdgesparseError, match="no attention block found"):
        rewrite.apply(model, window=8, sinks=0)
