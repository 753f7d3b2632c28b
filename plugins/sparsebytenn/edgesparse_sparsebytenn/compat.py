"""Interim shim until the core's kernel library can densify BlockSparseConv.

`edgesparse.builtin.densify` (the standard-op equivalent that verification and `edgesparse bench`
compare packages with) handles BlockSparseMatMul only and raises for BlockSparseConv, so no build
with a sparse conv can be verified. `densify_block_sparse_conv` is that missing branch, written
against the public kernel API; `ensure_conv_densify(registry)` installs it into an in-process
registry *only when* the core lacks it (the sample scripts and tests call it; the pass itself does
not). Proposed for the core: call this function from builtin.densify for node.op_type ==
"BlockSparseConv" (it also needs a "relu6" -> Clip(0, 6) branch in builtin._activation).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from onnx import helper, numpy_helper


def densify_block_sparse_conv(node, arrays: dict, shapes: dict):
    from edgesparse import kernels

    inputs, out, name = list(node.input), node.output[0], node.name or node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    packed = dict(zip(("values", "c_index", "row_ptr"), (arrays[n] for n in inputs[1:4])))
    x_shape = shapes.get(inputs[0]) or []
    cin = x_shape[1] if len(x_shape) > 1 and isinstance(x_shape[1], int) and x_shape[1] > 0 \
        else int(np.max(packed["c_index"], initial=-1)) + 1
    kh, kw = (int(k) for k in attrs["kernel_shape"])
    weight = kernels.unpack_block_sparse_conv(packed, int(attrs["out_channels"]), cin, (kh, kw))
    inits = [numpy_helper.from_array(weight, f"{name}.dense_weight")]
    conv_in = [inputs[0], inits[0].name] + ([inputs[4]] if len(inputs) > 4 and inputs[4] else [])
    act = attrs.get("activation", b"none")
    act = act.decode() if isinstance(act, bytes) else act
    conv_out = out if act == "none" else f"{name}.conv"
    nodes = [helper.make_node("Conv", conv_in, [conv_out], name=f"{name}.Conv", kernel_shape=[kh, kw],
                              strides=list(attrs.get("strides", [1, 1])), pads=list(attrs.get("pads", [0, 0, 0, 0])),
                              dilations=list(attrs.get("dilations", [1, 1])))]
    if act == "relu":
        nodes.append(helper.make_node("Relu", [conv_out], [out], name=f"{name}.Relu"))
    elif act == "relu6":
        lo = numpy_helper.from_array(np.array(0.0, np.float32), f"{name}.clip_min")
        hi = numpy_helper.from_array(np.array(6.0, np.float32), f"{name}.clip_max")
        inits += [lo, hi]
        nodes.append(helper.make_node("Clip", [conv_out, lo.name, hi.name], [out], name=f"{name}.Clip"))
    elif act == "silu":
        nodes += [helper.make_node("Sigmoid", [conv_out], [f"{name}.sig"], name=f"{name}.Sigmoid"),
                  helper.make_node("Mul", [conv_out, f"{name}.sig"], [out], name=f"{name}.Mul")]
    elif act != "none":
        raise ValueError(f"unknown activation {act!r}")
    return nodes, inits


def core_densifies_conv(lib) -> bool:
    """Whether the registered library's densify already handles BlockSparseConv."""
    from edgesparse import kernels

    w = np.zeros((4, 4, 1, 1), np.float32)
    w[0, 0] = 1.0
    packed = kernels.pack_block_sparse_conv(w, 4)
    node, inits = kernels.make_block_sparse_conv("X", "Y", packed, 4, (1, 1), name="probe")
    arrays = {i.name: numpy_helper.to_array(i) for i in inits}
    try:
        lib.densify(node, arrays, {"X": [1, 4, 2, 2]})
        return True
    except Exception:  # noqa: BLE001 - the core raises EdgesparseError("no dense equivalent ...")
        return False


def ensure_conv_densify(registry) -> bool:
    """Install the BlockSparseConv densify into `registry` when its kernel library lacks one.
    Returns True when the shim was installed."""
    from edgesparse import kernels

    for key, lib in list(registry.kernels.items()):
        if lib.domain != kernels.DOMAIN or core_densifies_conv(lib):
            continue
        base = lib.densify

        def densify(node, arrays, shapes, _base=base):
            if node.op_type == "BlockSparseConv":
                return densify_block_sparse_conv(node, arrays, shapes)
            return _base(node, arrays, shapes)

        registry.kernels[key] = dataclasses.replace(lib, densify=densify)
        return True
    return False
