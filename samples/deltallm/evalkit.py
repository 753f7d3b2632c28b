"""Pieces shared by the deltallm evaluation scripts: the exported SmolLM2 graph, its rewritten
twin, ORT sessions, feeds, NLL, and the dense attention subgraph ORT runs for one layer."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "plugins" / "deltallm"))

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def original() -> onnx.ModelProto:
    from export import exported

    return onnx.load(str(exported()))


def session(model: onnx.ModelProto, threads: int = 2, library: str | None = None, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if library:
        so.register_custom_ops_library(str(library))
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feeds(ids: np.ndarray, past: int = 0, cache=None) -> dict:
    keys, values = cache if cache is not None else (np.zeros((LAYERS, 1, KV_HEADS, past, HEAD_DIM), np.float32),) * 2
    return {"input_ids": np.asarray(ids, np.int64).reshape(1, -1),
            "attention_mask": np.ones((1, keys.shape[3] + np.size(ids)), np.int64),
            "past_keys": keys, "past_values": values}


def nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ids[1:] given logits[:-1]."""
    x = logits.reshape(-1, logits.shape[-1])[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def dense_attention_subgraphs(model: onnx.ModelProto, layers: list[int], ids: np.ndarray, run_feeds: dict | None = None):
    """For each layer, the nodes ORT runs for its attention in the exported model (from the
    query after RoPE and the cache-concatenated keys/values to the P.V MatMul) as a standalone
    graph with inputs q, k, v (mask and shape tensors frozen as constants at this length), plus
    the real q, k, v of one forward over `ids` (or of `run_feeds`, e.g. a decode step with its
    cache). Returns [(subgraph, {input: array}, info)]."""
    import onnx_ir as ir
    from edgesparse_deltallm import rewrite

    m = ir.from_proto(onnx.shape_inference.infer_shapes(model))
    found = rewrite.find_attention(m)
    plans, wanted, dtypes = [], [], {}
    for layer in layers:
        att = found[layer]
        produced = {o.name for n in att.removed for o in n.outputs}
        external = []
        for n in att.removed:
            for v in n.inputs:
                if v is not None and v.name not in produced and v.const_value is None and v.name not in external:
                    external.append(v.name)
                    dtypes[v.name] = int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
        plans.append((att, external))
        wanted += [x for x in external if x not in wanted]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, dtypes[name], None))
    sess = session(probe, threads=2)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, run_feeds or feeds(ids))))
    del sess
    inits_by_name = {i.name: i for i in model.graph.initializer}
    result = []
    for att, external in plans:
        q, k, v = att.q.name, att.k.name, att.v.name
        names = {x.name for x in att.removed}
        proto_nodes = [n for n in model.graph.node if n.name in names]
        inputs = [q, k, v]
        inits = [onnx.numpy_helper.from_array(values[name], name) for name in external if name not in inputs]
        needed = {x for n in proto_nodes for x in n.input}
        inits += [inits_by_name[x] for x in needed if x in inits_by_name]
        g = onnx.helper.make_graph(
            proto_nodes, "attention",
            [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, values[n].shape) for n in inputs],
            [onnx.helper.make_tensor_value_info(att.pv.outputs[0].name, onnx.TensorProto.FLOAT, None)], inits)
        sub = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
        result.append((sub, {"q": values[q], "k": values[k], "v": values[v]},
                       {"q": q, "k": k, "v": v, "scale": att.scale, "nodes": sorted(names)}))
    return result


def dense_attention_subgraph(model: onnx.ModelProto, layer: int, ids: np.ndarray):
    """The nodes ORT runs for one layer's attention in the exported model (from the query after
    RoPE and the cache-concatenated keys/values to the P.V MatMul), as a standalone graph whose
    inputs are q, k, v and the boolean mask; shape tensors are frozen at this length.
    Returns (subgraph, {input name: array} captured from a real forward over `ids`)."""
    import onnx_ir as ir
    from edgesparse_deltallm import rewrite

    m = ir.from_proto(onnx.shape_inference.infer_shapes(model))
    att = rewrite.find_attention(m)[layer]
    nodes = {id(n) for n in att.removed}
    produced = {o.name for n in att.removed for o in n.outputs}
    external, dtypes = [], {}
    for n in att.removed:
        for v in n.inputs:
            if v is not None and v.name not in produced and v.const_value is None and v.name not in external:
                external.append(v.name)
                dtypes[v.name] = int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
    out_name = att.pv.outputs[0].name
    # capture every external input from one real forward
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in external:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, dtypes[name], None))
    sess = session(probe, threads=2)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds(ids))))
    q, k, v = att.q.name, att.k.name, att.v.name
    data_inputs = [q, k, v]
    proto_nodes = [n for n in model.graph.node if n.name in {x.name for x in att.removed}]
    mask_inputs = [name for name in external if name not in data_inputs and values[name].dtype == np.bool_]
    inputs = data_inputs + mask_inputs
    inits = [onnx.numpy_helper.from_array(values[name], name) for name in external if name not in inputs]
    consts = {i.name for i in model.graph.initializer}
    needed = {x for n in proto_nodes for x in n.input}
    inits += [i for i in model.graph.initializer if i.name in needed and i.name in consts]
    g = onnx.helper.make_graph(
        proto_nodes, f"attention{layer}",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype), values[n].shape) for n in inputs],
        [onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None)], inits)
    sub = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
    return sub, {n: values[n] for n in inputs}, {"q": q, "k": k, "v": v, "out": out_name, "scale": att.scale}
