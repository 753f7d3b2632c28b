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
