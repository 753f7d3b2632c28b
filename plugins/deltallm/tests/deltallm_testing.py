import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import tiny_llama  # noqa: E402

DOMAIN = "com.edgesparse.deltallm"


@pytest.fixture(scope="session")
def library():
    from edgesparse_deltallm.build import build_library

    return str(build_library())


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """The 2-layer random Llama with its KV cache, exported once (dynamo, as the build does)."""
    from edgesparse import export

    path = tmp_path_factory.mktemp("tiny") / "tiny_llama.onnx"
    onnx.save(export.export_torch(tiny_llama.build()), str(path))
    return path


def op_model(scale, window, sinks, carry=0, state=False, outputs=3):
    """A one-node graph: DeltaAttention(q, k, v, theta_q, theta_v[, state])."""
    names = ["q", "k", "v", "tq", "tv"] + (["s"] if state else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    outs = ["y", "so", "macs"][:outputs]
    node = helper.make_node("DeltaAttention", names, outs, domain=DOMAIN, scale=float(scale), window=window,
                            sinks=sinks, carry=carry)
    out_info = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("so", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("macs", TensorProto.INT64, None)][:outputs]
    graph = helper.make_graph([node], "g", inputs, out_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def session(model, library, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def smooth_qkv(seed, heads=9, kv_heads=3, n=120, d=64, step=0.3):
    """Queries that drift slowly from token to token (as real ones do), random keys and values."""
    rng = np.random.default_rng(seed)
    q = (np.cumsum(rng.standard_normal((1, heads, n, d)) * step, axis=2) / 3).astype(np.float32)
    k = rng.standard_normal((1, kv_heads, n, d)).astype(np.float32)
    v = rng.standard_normal((1, kv_heads, n, d)).astype(np.float32)
    return q, k, v
