"""Splitting a model into onnxruntime-web segments and wasm kernel steps.

onnxruntime-web cannot load custom operators, so the package runs as a plan: the sparse nodes
run on edgesparse's wasm kernels, and everything else runs in onnxruntime-web sessions over
sub-models ("segments"). Each node gets a level, the largest number of kernel nodes on any path
from the graph inputs to it (itself included): kernel nodes of level L run after segment L-1 and
before segment L. That gives the fewest segments a topological split can have (the longest
chain of sparse nodes, plus one), so parallel sparse nodes (Q, K, V projections) share a level.

A standard activation that directly and solely follows a sparse node (Relu, Gelu, x*Sigmoid(x)) is
fused into the kernel call, since the kernels apply activations in their epilogue.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgesparse import EdgesparseError
from edgesparse.kernels import DOMAIN

PLAN_FORMAT = "edgesparse-web-plan"
PLAN_VERSION = 1
KERNEL_OPS = ("BlockSparseMatMul", "BlockSparseConv")  # ops the wasm module implements (es_wasm_api.cpp)
# Standard activations that may be folded into each op's kernel call (the op's own contract).
FUSABLE = {"BlockSparseMatMul": ("relu", "gelu", "silu"), "BlockSparseConv": ("relu", "silu")}
MAX_CONV_TAPS = 256  # ES_CONV_MAX_TAPS in bsconv_kernel.h
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "relu6": 4}  # ES_ACT_* in es_kernels.h
ALIGN = 16

ORT_WEB_TYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.UINT32: "uint32",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.FLOAT16: "float16",
}


@dataclass
class KernelCall:
    index: int              # position of the sparse node in the graph
    node: onnx.NodeProto
    output: str             # after activation fusion: the fused activation's output
    activation: str
    fused: list[str] = field(default_factory=list)  # names of the standard nodes folded in


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    used: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                used |= {i for i in n.input if i} | _subgraph_inputs(n)
                defined |= set(n.output)
            used -= defined
    return used


def _inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_inputs(node))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help, not a requirement
        inferred = model
    types = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type
    return types


class Planner:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.graph_outputs = [o.name for o in self.graph.output]
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.producer: dict[str, int] = {}
        for idx, node in enumerate(self.graph.node):
            for name in node.output:
                self.producer[name] = idx
            for name in _inputs(node):
                self.consumers[name].append(idx)
        self.kernels: dict[int, KernelCall] = {}
        self.removed: set[int] = set()
        self.fallback: list[dict] = []  # sparse nodes left to onnxruntime-web, with the reason

    # -- which sparse nodes run on the kernels -----------------------------------------------
    def choose_kernels(self) -> None:
        for idx, node in enumerate(self.graph.node):
            if node.domain != DOMAIN:
                continue
            reason = self._unsupported(node)
            if reason:
                self.fallback.append({"node": node.name, "op": node.op_type, "reason": reason})
                continue
            self.kernels[idx] = KernelCall(idx, node, node.output[0], _attr(node, "activation", "none"))
        for call in self.kernels.values():
            if call.activation == "none":
                self._fuse_activation(call)

    def _unsupported(self, node: onnx.NodeProto) -> str | None:
        if node.op_type not in KERNEL_OPS:
            return f"no wasm kernel for {node.op_type} yet: runs its dense ONNX function in onnxruntime-web"
        weights = [n for n in node.input[1:] if n]
        if any(n not in self.initializers for n in weights):
            return "weights are not constant initializers"
        if _attr(node, "activation", "none") not in ACTIVATIONS:
            return f"activation {_attr(node, 'activation')!r} is not in the kernels"
        if node.op_type == "BlockSparseConv":
            kh, kw = _attr(node, "kernel_shape")
            if kh * kw > MAX_CONV_TAPS:
                return f"kernel {kh}x{kw} has more than {MAX_CONV_TAPS} taps"
        return None

    def _only_consumer(self, value: str) -> onnx.NodeProto | None:
        users = self.consumers.get(value, [])
        if len(users) != 1 or value in self.graph_outputs:
            return None
        idx = users[0]
        return None if idx in self.removed or idx in self.kernels else self.graph.node[idx]

    def _fuse_activation(self, call: KernelCall) -> None:
        y = call.output
        users = [i for i in self.consumers.get(y, []) if i not in self.removed]
        if y in self.graph_outputs or not users:
            return
        nodes = [self.graph.node[i] for i in users]
        if any(n.domain not in ("", "ai.onnx") for n in nodes):
            return
        if len(users) == 1 and nodes[0].op_type == "Relu":
            self._fold(call, users, "relu", nodes[0].output[0])
        elif len(users) == 1 and nodes[0].op_type == "Gelu" and _attr(nodes[0], "approximate", "none") == "none":
            self._fold(call, users, "gelu", nodes[0].output[0])
        elif len(users) == 2 and {n.op_type for n in nodes} == {"Sigmoid", "Mul"}:
            sig = next(i for i in users if self.graph.node[i].op_type == "Sigmoid")
            mul = next(i for i in users if self.graph.node[i].op_type == "Mul")
            s_out = self.graph.node[sig].output[0]
            if sorted(self.graph.node[mul].input) == sorted([y, s_out]) and self.consumers.get(s_out) == [mul] \
                    and s_out not in self.graph_outputs:
                self._fold(call, [sig, mul], "silu", self.graph.node[mul].output[0])
        elif len(users) == 2:
            self._fuse_erf_gelu(call, users)

    def _scalar(self, name: str) -> float | None:
        """The value of a one-element constant (initializer or Constant node), else None."""
        if name in self.initializers:
            array = numpy_helper.to_array(self.initializers[name])
        elif name in self.producer and self.graph.node[self.producer[name]].op_type == "Constant":
            node = self.graph.node[self.producer[name]]
            value = next((a for a in node.attribute if a.name in ("value", "value_float")), None)
            if value is None:
                return None
            array = numpy_helper.to_array(value.t) if value.name == "value" else np.array(value.f)
        else:
            return None
        return float(array.reshape(-1)[0]) if array.size == 1 and array.dtype.kind == "f" else None

    def _next(self, idx: int, op: str) -> tuple[int, str] | None:
        """The single consumer of node idx's output when it is an `op`, with the other input."""
        out = self.graph.node[idx].output[0]
        nxt = self._only_consumer(out)
        if nxt is None or nxt.op_type != op or len(nxt.input) != 2:
            return None
        other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        return self.consumers[out][0], other

    def _fuse_erf_gelu(self, call: KernelCall, users: list[int]) -> None:
        """0.5 * y * (1 + erf(y / sqrt 2)) as exporters write it (Div or Mul by 1/sqrt 2; the 0.5
        applied before or after the product with y)."""
        y = call.output
        close = lambda v, want: v is not None and abs(v - want) < 1e-5
        for scale_idx, mul_idx in (users, users[::-1]):
            s, m = self.graph.node[scale_idx], self.graph.node[mul_idx]
            if m.op_type != "Mul" or len(s.input) != 2 or s.input[0] != y:
                continue
            factor = self._scalar(s.input[1])
            if not ((s.op_type == "Div" and close(factor, 2 ** 0.5)) or (s.op_type == "Mul" and close(factor, 2 ** -0.5))):
                continue
            erf = self._only_consumer(s.output[0])
            if erf is None or erf.op_type != "Erf":
                continue
            erf_idx = self.consumers[s.output[0]][0]
            add = self._next(erf_idx, "Add")
            if add is None or not close(self._scalar(add[1]), 1.0):
                continue
            chain = [scale_idx, erf_idx, add[0]]
            nxt = self._next(add[0], "Mul")
            if nxt is None:
                return
            if nxt[0] == mul_idx:  # (y * (1 + erf)) * 0.5
                last = self._next(mul_idx, "Mul")
                if last is not None and close(self._scalar(last[1]), 0.5):
                    self._fold(call, chain + [mul_idx, last[0]], "gelu", self.graph.node[last[0]].output[0])
            elif close(self._scalar(nxt[1]), 0.5) and sorted(m.input) == sorted([y, self.graph.node[nxt[0]].output[0]]):
                self._fold(call, chain + [nxt[0], mul_idx], "gelu", m.output[0])  # y * (0.5 * (1 + erf))
            return

    def _fold(self, call: KernelCall, indices: list[int], activation: str, output: str) -> None:
        if activation not in FUSABLE[call.node.op_type]:
            return
        call.activation, call.output = activation, output
        call.fused = [self.graph.node[i].name or self.graph.node[i].op_type for i in indices]
        self.removed.update(indices)

    # -- levels and steps -----------------------------------------------------------------------
    def steps(self) -> list[tuple[str, list[int]]]:
        """[("segment", node indices) | ("kernel", [index])] in execution order."""
        level: dict[str, int] = {}
        segment_nodes: dict[int, list[int]] = defaultdict(list)
        kernel_nodes: dict[int, list[int]] = defaultdict(list)
        for idx, node in enumerate(self.graph.node):
            if idx in self.removed:
                continue
            d = max((level.get(i, 0) for i in _inputs(node)), default=0)
            if idx in self.kernels:
                d += 1
                kernel_nodes[d].append(idx)
                level[self.kernels[idx].output] = d
            else:
                segment_nodes[d].append(idx)
                for o in node.output:
                    level[o] = d
        top = max([*segment_nodes, *kernel_nodes], default=0)
        steps: list[tuple[str, list[int]]] = []
        for d in range(top + 1):
            steps += [("kernel", [k]) for k in kernel_nodes.get(d, [])]
            if segment_nodes.get(d):
                steps.append(("segment", segment_nodes[d]))
        return steps


def _value_info(name: str, types: dict, what: str) -> onnx.ValueInfoProto:
    t = types.get(name)
    if t is None:
        raise EdgesparseError(f"cannot tell the type of '{name}' ({what}): the model needs shape information "
                              "(run onnx.shape_inference on it) to be split for onnxruntime-web")
    v = onnx.ValueInfoProto()
    v.name = name
    v.type.CopyFrom(t)
    return v


def _align(blob: bytearray) -> None:
    blob.extend(b"\0" * ((-len(blob)) % ALIGN))


def _add_array(blob: bytearray, array: np.ndarray, dtype) -> list[int]:
    _align(blob)
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    offset = len(blob)
    blob.extend(data)
    return [offset, len(data)]


def check_packed(name: str, block: int, nnzb: int, index: np.ndarray, row_ptr: np.ndarray, n: int, k: int | None) -> None:
    """The checks es_bsmm_validate makes, done once at build time (the kernels trust their input).
    n: outputs (N or out_channels); k: inputs the index points into (K or in_channels), if known."""
    problem = None
    nb = -(-n // block) if block > 0 else 0
    if block not in (4, 8, 16):
        problem = "block size must be 4, 8 or 16"
    elif len(row_ptr) != nb + 1 or row_ptr[0] != 0 or row_ptr[-1] != len(index) or len(index) != nnzb:
        problem = "row_ptr does not match the blocks"
    elif np.any(np.diff(row_ptr) < 0):
        problem = "row_ptr must be non-decreasing"
    elif len(index) and (index.min() < 0 or (k is not None and index.max() >= k)):
        problem = "block index out of range"
    else:
        for j in range(nb):
            row = index[row_ptr[j]:row_ptr[j + 1]]
            if np.any(np.diff(row) <= 0):
                problem = "block indices must be strictly ascending within a block row"
                break
    if problem:
        raise EdgesparseError(f"sparse node '{name}': {problem}")


def _known_dim(t: onnx.TypeProto | None, axis: int) -> int | None:
    if t is None:
        return None
    dims = t.tensor_type.shape.dim
    if len(dims) <= abs(axis) - (1 if axis < 0 else 0) or not dims[axis].HasField("dim_value"):
        return None
    return int(dims[axis].dim_value)


def _kernel_step(call: KernelCall, planner: "Planner", types: dict, blob: bytearray) -> dict:
    node = call.node
    arrays = [numpy_helper.to_array(planner.initializers[n]) for n in node.input[1:4]]
    values, index, row_ptr = arrays
    bias_name = node.input[4] if len(node.input) > 4 and node.input[4] else None
    step = {"kind": "kernel", "op": node.op_type, "node": node.name, "input": node.input[0], "output": call.output,
            "activation": ACTIVATIONS[call.activation], "activation_name": call.activation, "fused": call.fused,
            "nnzb": int(len(index)), "block": int(values.shape[-1])}
    if node.op_type == "BlockSparseMatMul":
        n = int(_attr(node, "N"))
        k = _known_dim(types.get(node.input[0]), -1)
        if k is None:
            k = int(index.max()) + 1 if len(index) else 1
        check_packed(node.name, step["block"], len(values), index, row_ptr, n, k)
        step.update({"K": int(k), "N": n})
    else:  # BlockSparseConv, NCHW
        cout = int(_attr(node, "out_channels"))
        kh, kw = (int(v) for v in _attr(node, "kernel_shape"))
        cin = _known_dim(types.get(node.input[0]), 1)
        check_packed(node.name, step["block"], len(values), index, row_ptr, cout, cin)
        if values.ndim != 3 or values.shape[1] != kh * kw:
            raise EdgesparseError(f"sparse node '{node.name}': values must be [nnzb, kh*kw, block]")
        step.update({"out_channels": cout, "kernel_shape": [kh, kw],
                     "strides": [int(v) for v in _attr(node, "strides", [1, 1])],
                     "pads": [int(v) for v in _attr(node, "pads", [0, 0, 0, 0])],
                     "dilations": [int(v) for v in _attr(node, "dilations", [1, 1])],
                     "min_in_channels": int(index.max()) + 1 if len(index) else 0})
    step.update({
        "values": _add_array(blob, values, np.float32),
        "index": _add_array(blob, index, np.int32),
        "row_ptr": _add_array(blob, row_ptr, np.int32),
        "bias": _add_array(blob, numpy_helper.to_array(planner.initializers[bias_name]).reshape(-1), np.float32)
        if bias_name else None,
    })
    return step


def write_plan(model: onnx.ModelProto, web: Path) -> dict:
    """Write segments, weights.bin into `web` and return the plan (also written as plan.json)."""
    planner = Planner(model)
    planner.choose_kernels()
    steps = planner.steps()
    types = _value_types(model)
    graph = model.graph
    graph_inputs = [i.name for i in graph.input if i.name not in planner.initializers]

    # what every step reads and writes, to know which values cross steps
    reads: list[set[str]] = []
    writes: list[list[str]] = []
    for kind, indices in steps:
        if kind == "kernel":
            call = planner.kernels[indices[0]]
            reads.append({call.node.input[0]})
            writes.append([call.output])
        else:
            r, w = set(), []
            for idx in indices:
                node = graph.node[idx]
                r |= {i for i in _inputs(node) if i not in w}
                w += [o for o in node.output if o]
            reads.append(r - set(w))
            writes.append(w)

    blob = bytearray()
    plan_steps = []
    segment_count = 0
    for s, (kind, indices) in enumerate(steps):
        later = set(planner.graph_outputs).union(*reads[s + 1:]) if s + 1 < len(steps) else set(planner.graph_outputs)
        if kind == "kernel":
            step = _kernel_step(planner.kernels[indices[0]], planner, types, blob)
        else:
            nodes = [graph.node[i] for i in indices]
            outputs = [o for o in writes[s] if o in later]
            if not outputs:
                continue
            inputs = sorted(reads[s] - set(planner.initializers), key=lambda v: (v not in graph_inputs, v))
            used_inits = [planner.initializers[i] for i in sorted(reads[s] & set(planner.initializers))]
            sub = helper.make_graph(
                nodes, f"{graph.name or 'model'}_segment{segment_count}",
                [_value_info(v, types, "an input of an onnxruntime-web segment") for v in inputs],
                [_value_info(v, types, "an output of an onnxruntime-web segment") for v in outputs],
                used_inits,
            )
            sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
            sub_model.functions.extend(model.functions)
            file = f"segment{segment_count}.onnx"
            onnx.save(sub_model, str(web / file))
            segment_count += 1
            step = {"kind": "onnx", "model": file, "inputs": inputs, "outputs": outputs, "nodes": len(nodes)}
        # values no later step needs can be dropped after this one
        step["release"] = sorted(v for v in reads[s] if v not in later and v not in planner.initializers)
        plan_steps.append(step)

    (web / "weights.bin").write_bytes(bytes(blob))
    missing = [o for o in planner.graph_outputs if o not in set(graph_inputs).union(*writes)]
    if missing:
        raise EdgesparseError(f"graph output '{missing[0]}' is not computed by any node (a constant output); "
                              "the wasm target does not support that")
    plan = {
        "format": PLAN_FORMAT,
        "format_version": PLAN_VERSION,
        "kernels": "edgesparse_kernels.wasm",
        "weights": "weights.bin",
        "inputs": [{"name": n, **_type_json(types.get(n))} for n in graph_inputs],
        "outputs": [{"name": n, **_type_json(types.get(n))} for n in planner.graph_outputs],
        "steps": plan_steps,
        "kernel_nodes": len(planner.kernels),
        "segments": segment_count,
        "fallback": planner.fallback,
    }
    return plan


def _type_json(t: onnx.TypeProto | None) -> dict:
    if t is None:
        return {"dtype": None, "shape": None}
    tt = t.tensor_type
    return {"dtype": ORT_WEB_TYPES.get(tt.elem_type, str(tt.elem_type)),
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]}
