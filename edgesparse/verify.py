"""Verification that runs inside every build: the package's outputs against the reference, and
how many of the sparse nodes really run on a sparse kernel."""
from __future__ import annotations

from collections import Counter
import numpy as np
import onnx
import onnx.inliner

from . import external_data
from .errors import EdgesparseError


def dense_session(model: onnx.ModelProto, threads: int = 1, spin: bool = True):
    """An ORT session on a dense model (see dense_equivalent), with ORT's own kernels.
    spin=False stops idle worker threads from spinning: needed when two sessions alternate."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        if external_data.is_large(model):  # over protobuf's limit: ORT reads it from files
            with external_data.as_file(model) as path:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EdgesparseError(f"dense model does not load in ONNX Runtime: {str(exc).splitlines()[0]}") from exc


def reference_outputs(dense: onnx.ModelProto, batches: list[dict]) -> list[list[np.ndarray]]:
    """The reference: the same pruned weights executed densely by ORT's own kernels."""
    session = dense_session(dense)
    return [session.run(None, b) for b in batches]


def uses_op_references(model: onnx.ModelProto, libraries) -> bool:
    """Whether some node belongs to a library with its own reference implementation (an op whose
    kernel approximates its dense meaning on purpose)."""
    domains = {lib.domain for lib in libraries if getattr(lib, "reference", None) is not None}
    return any(n.domain in domains for n in model.graph.node)


def verification_reference(model: onnx.ModelProto, libraries, batches: list[dict],
                           threads: int = 1) -> tuple[list[list[np.ndarray]], str, dict | None]:
    """What the package must reproduce, and how it was computed: the dense equivalent run by ORT's
    own kernels ("dense"); or, when some nodes belong to a library with its own reference
    implementation (KernelLibrary.reference: an approximation the kernel computes on purpose),
    the dense equivalent of everything else run by ORT, stage by stage, with those nodes computed
    by that reference in between ("op reference"). Third: for an op reference, every value of the
    first batch's staged run (node_agreement's inputs), else None."""
    if not uses_op_references(model, libraries):
        return reference_outputs(dense_equivalent(model, libraries), batches), "dense", None
    staged = _Staged(model, libraries, threads)
    first = staged.values(batches[0]) if batches else None
    outputs = ([[first[o] for o in staged.outputs]] if batches else []) + [staged.run(b) for b in batches[1:]]
    return outputs, "op reference", first


class _Staged:
    """The model cut at the nodes computed by an op reference: the rest, densified, is split into
    stages by dependency (stage s needs the outputs of the referenced nodes of stages < s), each
    stage one ORT session; the referenced nodes run between the stages."""

    def __init__(self, model: onnx.ModelProto, libraries, threads: int):
        refs = {lib.domain: lib for lib in libraries if getattr(lib, "reference", None) is not None}
        self.held = [(n, refs[n.domain]) for n in model.graph.node if n.domain in refs]
        used = {i for n, _ in self.held for i in n.input if i}
        self.arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in used}
        produced = [o for n, _ in self.held for o in n.output if o]
        cut = onnx.ModelProto()
        cut.CopyFrom(model)
        del cut.graph.node[:]
        cut.graph.node.extend(n for n in model.graph.node if n.domain not in refs)
        types = _value_types(model)
        for name in produced:  # the referenced nodes' outputs come in from outside
            cut.graph.input.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
        dense = dense_equivalent(cut, libraries)
        types.update(_value_types(dense))
        if len(types) < len({o for n in dense.graph.node for o in n.output}) and not external_data.is_large(dense):
            try:  # intermediate values crossing stages need their element types
                types.update(_value_types(onnx.shape_inference.infer_shapes(dense)))
            except Exception:  # noqa: BLE001 - the types of the values that remain unknown stay float
                pass
        self.types = types
        self.threads = threads
        self.outputs = [o.name for o in dense.graph.output]
        initializers = {i.name: i for i in dense.graph.initializer}
        feeds = {i.name for i in dense.graph.input} | set(initializers)
        level = {name: 0 for name in feeds if name not in produced}
        nodes = list(dense.graph.node)
        node_level: list[int | None] = [None] * len(nodes)
        held_level: list[int | None] = [None] * len(self.held)
        outer = feeds | set(produced) | {o for n in nodes for o in n.output if o}
        deps = [[d for d in _used_names(n) if d in outer] for n in nodes]
        while None in node_level or None in held_level:
            progress = False
            for i, node in enumerate(nodes):
                if node_level[i] is None and all(d in level for d in deps[i]):
                    node_level[i] = max((level[d] for d in deps[i]), default=0)
                    for o in node.output:
                        if o:
                            level[o] = node_level[i]
                    progress = True
            for i, (node, _) in enumerate(self.held):
                if held_level[i] is None and all(d in level for d in node.input if d):
                    held_level[i] = max((level[d] for d in node.input if d), default=0)
                    for o in node.output:
                        if o:
                            level[o] = held_level[i] + 1
                    progress = True
            if not progress:
                raise EdgesparseError("verification: the model cannot be staged around its referenced nodes "
                                      "(a value is used before it is produced)")
        self.held_level = held_level
        stages = max([*node_level, *(h + 1 for h in held_level)], default=0) + 1
        later_use: dict[str, int] = {}  # value -> the last stage that reads it (held nodes read at their level)
        for i, node in enumerate(nodes):
            for d in deps[i]:
                later_use[d] = max(later_use.get(d, -1), node_level[i])
        for i, (node, _) in enumerate(self.held):
            for d in node.input:
                if d:
                    later_use[d] = max(later_use.get(d, -1), held_level[i] + 0.5)
        wanted = set(self.outputs)
        self.stages = []
        for s in range(stages):
            members = [n for n, l in zip(nodes, node_level) if l == s]
            made = {o for n in members for o in n.output if o}
            reads = {d for i, n in enumerate(nodes) if node_level[i] == s for d in deps[i]}
            ins = sorted(d for d in reads if d not in made and d not in initializers)
            outs = sorted(o for o in made if o in wanted or later_use.get(o, -1) > s)
            if not members:
                self.stages.append(None)
                continue
            self.stages.append((members, ins, outs, [initializers[d] for d in sorted(reads & set(initializers))]))
        self.opsets, self.ir_version = list(dense.opset_import), dense.ir_version
        self.sessions: dict[int, object] = {}

    def _session(self, s: int, env: dict):
        """Stage s as an ORT session; its inputs typed as the values that arrive (first batch)."""
        if s not in self.sessions:
            members, ins, outs, inits = self.stages[s]
            graph = onnx.helper.make_graph(
                members, f"stage{s}",
                [onnx.helper.make_tensor_value_info(d, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(env[d]).dtype), None)
                 for d in ins],
                [onnx.helper.make_tensor_value_info(o, self.types.get(o, onnx.TensorProto.FLOAT), None) for o in outs],
                inits)
            model = onnx.helper.make_model(graph, opset_imports=self.opsets, ir_version=self.ir_version)
            self.sessions[s] = dense_session(model, self.threads)
        return self.sessions[s]

    def run(self, batch: dict) -> list[np.ndarray]:
        env = self.values(batch)
        return [env[o] for o in self.outputs]

    def values(self, batch: dict) -> dict:
        """Every value of the staged run, the referenced nodes' inputs and outputs included."""
        env = dict(batch)
        for s, stage in enumerate(self.stages):
            if stage is not None:
                _, ins, outs, _ = stage
                got = self._session(s, env).run(outs, {d: env[d] for d in ins})
                env.update(zip(outs, got))
            for (node, lib), l in zip(self.held, self.held_level):
                if l == s:
                    values = [env.get(i, self.arrays.get(i)) if i else None for i in node.input]
                    results = lib.reference(node, values, self.arrays)
                    for name, value in zip(node.output, results):
                        if name:
                            if value is None:
                                raise EdgesparseError(f"verification: the reference of {node.op_type} does not "
                                                      f"compute output '{name}'")
                            env[name] = value
        return env


ROWS_WITHIN = 0.99   # node check: at least this share of output rows within the tolerance ...
OF_APPROXIMATION = 0.05  # ... and the rest small next to what the approximation itself changes


def node_agreement(model: onnx.ModelProto, libraries, batch: dict, library_files: list[str], tolerance: float,
                   threads: int = 1, values: dict | None = None) -> list[dict]:
    """Teacher forcing: each node computed by an op reference, run by its kernel on the inputs the
    reference run gave it, against the reference's output there. Decisions (thresholds) that
    round differently in kernel and reference still flip here, in a few rows; a kernel that
    computes something else differs in most rows, or by a share of what the approximation itself
    changes. A node agrees when every output row (the last axis) is within the tolerance, or when
    at least ROWS_WITHIN of them are and |kernel - reference| is at most OF_APPROXIMATION of
    |reference - exact| (exact: the node's dense meaning, its ONNX function, run by ORT).
    values: the staged reference run's values for `batch` when the caller has them
    (verification_reference's third result), so the reference does not run twice."""
    import onnxruntime as ort

    staged = _Staged(model, libraries, threads)
    env = values if values is not None else staged.values(batch)

    def session(single, with_kernels: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for path in library_files if with_kernels else ():
            so.register_custom_ops_library(str(path))
        return ort.InferenceSession(single.SerializeToString(), so, providers=["CPUExecutionProvider"])

    rows = []
    for node, _ in staged.held:
        feeds = {i: np.asarray(env.get(i, staged.arrays.get(i))) for i in node.input if i}
        out = node.output[0]
        graph = onnx.helper.make_graph(
            [node], "node",
            [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for i, v in feeds.items()],
            [onnx.helper.make_tensor_value_info(out, staged.types.get(out, onnx.TensorProto.FLOAT), None)])
        single = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                        functions=[f for f in model.functions if f.domain == node.domain])
        got = session(single, True).run([out], feeds)[0].astype(np.float64)
        want = np.asarray(env[out], np.float64)
        scale = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
        diff = np.abs(got - want)
        within = float((diff.reshape(-1, want.shape[-1]).max(-1) <= tolerance * scale).mean()) if want.size else 1.0
        row = {"node": node.name or node.op_type, "op": node.op_type, "max_abs_error": float(diff.max(initial=0.0)),
               "scale": scale, "rows_within": round(within, 5)}
        if within < 1.0:
            exact = session(single, False).run([out], feeds)[0].astype(np.float64)  # the dense meaning
            approximation = float(np.linalg.norm(want - exact))
            row["of_approximation"] = float(np.linalg.norm(got - want)) / max(approximation, 1e-30)
        row["agrees"] = within == 1.0 or (within >= ROWS_WITHIN and row["of_approximation"] <= OF_APPROXIMATION)
        rows.append(row)
    return rows


def _used_names(node: onnx.NodeProto) -> list[str]:
    """The values a node reads: its inputs and what its subgraphs read from outside them."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                names += [d for d in _used_names(n) if d not in inner]
                inner.update(o for o in n.output if o)
    return list(dict.fromkeys(names))


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in model.graph.initializer}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def max_abs_error(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for g_batch, w_batch in zip(got, want, strict=True):
        for g, w in zip(g_batch, w_batch, strict=True):
            if g.shape != w.shape:
                raise EdgesparseError(f"package output shape {g.shape} differs from reference {w.shape}")
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            if diff.size:
                worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else float("inf"))
            if np.isnan(g).any() != np.isnan(w).any():
                worst = float("inf")
    return worst


def sparse_nodes(model: onnx.ModelProto, libraries) -> Counter:
    """Nodes of the model that belong to a kernel library's domain, by op type."""
    domains = {lib.domain for lib in libraries}
    return Counter(n.op_type for n in model.graph.node if n.domain in domains)


def coverage(emitted: Counter, on_kernel: dict[str, int] | None, libraries) -> dict:
    """DeepSparse called this fraction_of_supported_ops: sparse nodes on a sparse kernel / all."""
    total = sum(emitted.values())
    if on_kernel is None:  # the target cannot observe execution: count what the library provides
        provided = {op for lib in libraries for op in lib.ops}
        on_kernel = {op: n for op, n in emitted.items() if op in provided}
        measured = False
    else:
        measured = True
    ran = sum(min(on_kernel.get(op, 0), n) for op, n in emitted.items())
    return {
        "sparse_nodes": total,
        "sparse_nodes_on_kernel": ran,
        "fraction_on_sparse_kernels": (ran / total) if total else None,
        "measured": measured,
        "by_op": {op: {"nodes": n, "on_kernel": min(on_kernel.get(op, 0), n)} for op, n in emitted.items()},
    }


def dense_equivalent(model: onnx.ModelProto, libraries) -> onnx.ModelProto:
    """The model with every sparse node replaced by standard ops on its dense weights: what a user
    would deploy without edgesparse, and the reference the package is checked against."""
    by_domain = {lib.domain: lib for lib in libraries}
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes = value_shapes(model)
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    del dense.graph.node[:]
    used_by_sparse, replaced_outputs, inline = set(), set(), False
    for node in model.graph.node:
        lib = by_domain.get(node.domain)
        replacement = lib.densify(node, arrays, shapes) if lib is not None else None
        if replacement is None:  # not sparse, or its dense meaning is its ONNX function
            dense.graph.node.append(node)
            inline = inline or lib is not None
            continue
        nodes, initializers = replacement
        replaced_outputs.update(node.output)
        dense.graph.node.extend(nodes)
        dense.graph.initializer.extend(initializers)
        used_by_sparse.update(node.input[1:])
    # a replaced node's outputs may change shape (a layout that only the sparse ops used)
    kept_info = [v for v in dense.graph.value_info if v.name not in replaced_outputs]
    del dense.graph.value_info[:]
    dense.graph.value_info.extend(kept_info)
    if inline:
        _fill_attribute_defaults(dense)
        dense = onnx.inliner.inline_local_functions(dense)
    del dense.functions[:]
    still_used = {i for n in dense.graph.node for i in n.input}
    keep = [i for i in dense.graph.initializer if i.name in still_used or i.name not in used_by_sparse]
    del dense.graph.initializer[:]
    dense.graph.initializer.extend(keep)
    for opset in list(dense.opset_import):
        if opset.domain in by_domain:
            dense.opset_import.remove(opset)
    return dense


def _fill_attribute_defaults(model: onnx.ModelProto) -> None:
    """Give every node calling a model-local function the function's attribute defaults it does not
    set (onnx's inliner leaves references to absent attributes unresolved, where ORT would use the
    default)."""
    defaults = {(f.domain, f.name): list(f.attribute_proto) for f in model.functions}
    for node in model.graph.node:
        have = {a.name for a in node.attribute}
        for default in defaults.get((node.domain, node.op_type), []):
            if default.name not in have:
                node.attribute.append(default)


def value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    values = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in values}
