"""Run a rewritten model with any thresholds, in ONNX Runtime with the deltallm kernels: the
thresholds become graph inputs and each DeltaAttention node's MAC counters graph outputs, so one
session serves a whole calibration search. Optionally the queries are captured too (to scale
the thresholds per head)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .rewrite import DOMAIN, OP


@dataclass
class Layer:
    index: int
    node: str
    heads: int
    query: str            # name of the query tensor fed to the node
    key: str


def layers_of(model: onnx.ModelProto) -> list[Layer]:
    found = []
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP:
            tq = inits.get(node.input[3])
            heads = int(tq.dims[0]) if tq is not None and len(tq.dims) else 1
            found.append(Layer(len(found), node.name, heads, node.input[0], node.input[1]))
    return found


def probe_model(model: onnx.ModelProto, *, window: int | None = None, sinks: int | None = None,
                capture_queries: bool = False, carry: bool = False) -> onnx.ModelProto:
    """A copy of `model` whose DeltaAttention thresholds are inputs deltallm.theta_q.<i> /
    deltallm.theta_v.<i> and whose MAC counters are outputs deltallm.macs.<i> ([B, H, 3])."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    threshold_names = set()
    i = 0
    for node in g.node:
        if node.domain != DOMAIN or node.op_type != OP:
            continue
        for slot, kind in ((3, "theta_q"), (4, "theta_v")):
            name = f"deltallm.{kind}.{i}"
            threshold_names.add(node.input[slot])
            node.input[slot] = name
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None]))
        while len(node.output) < 3:
            node.output.append("")
        node.output[1] = node.output[1] or f"deltallm.state.{i}"
        node.output[2] = f"deltallm.macs.{i}"
        g.output.append(helper.make_tensor_value_info(node.output[2], TensorProto.INT64, [None, None, 3]))
        if capture_queries:
            for name in node.input[:2]:
                if name not in {o.name for o in g.output}:
                    g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        for attr in node.attribute:
            if attr.name == "window" and window is not None:
                attr.i = int(window)
            if attr.name == "sinks" and sinks is not None:
                attr.i = int(sinks)
            if attr.name == "carry":
                attr.i = int(carry)
        i += 1
    keep = [t for t in g.initializer if t.name not in threshold_names]
    del g.initializer[:]
    g.initializer.extend(keep)
    return probe


class Probe:
    """An ORT session on a probe model. run(feeds, theta_q, theta_v) -> (model outputs by name,
    MACs per layer [L, 3] summed over batch and heads, [(queries, keys)] per layer or None)."""

    def __init__(self, model: onnx.ModelProto, library: str, threads: int = 1, **options):
        import onnxruntime as ort

        self.layers = layers_of(model)
        self.model = probe_model(model, **options)
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(library))
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(self.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.capture = options.get("capture_queries", False)

    def run(self, feeds: dict, theta_q, theta_v):
        feeds = dict(feeds)
        for layer in self.layers:
            feeds[f"deltallm.theta_q.{layer.index}"] = np.asarray(theta_q[layer.index], np.float32).reshape(-1)
            feeds[f"deltallm.theta_v.{layer.index}"] = np.asarray(theta_v[layer.index], np.float32).reshape(-1)
        values = dict(zip(self.outputs, self.session.run(None, feeds)))
        macs = np.stack([values.pop(f"deltallm.macs.{l.index}").reshape(-1, 3).sum(0) for l in self.layers])
        captured = [(values.pop(l.query), values.pop(l.key, None)) for l in self.layers] if self.capture else None
        return values, macs, captured
