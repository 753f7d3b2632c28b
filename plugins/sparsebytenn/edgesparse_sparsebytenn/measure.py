"""dispatch=measure: time a layer's sparse kernel against ONNX Runtime's dense op on this machine.

For targets that build where they run (x86 verifies natively), this answers the dispatch question
for the layer's exact shape, thread count, block and sparsity, with the same random group-sparse
weights on both sides, interleaved timing, medians.

Convs are timed *in context*: depthwise conv -> layer -> depthwise conv, the neighbourhood of a
1x1 conv in MobileNet-style networks. ONNX Runtime runs dense convs in its blocked NCHWc layout;
a sparse (NCHW) node between them forces a ReorderOutput before it and a ReorderInput after it.
A one-node benchmark charges those reorders to the *dense* side (its input and output are NCHW),
which is why one-node speedups of 1.1-1.4x at 30 % sparsity turned into 1.0x for the whole model;
in context they land on the sparse side, where they belong. Where the target asks for the NCHW16c
layout and the layer can take it (1x1, stride 1, no padding, 16 x 1 blocks, channels multiples of
16), the sparse side's context is what the layout rewrite will build: edgesparse's depthwise convs
and the layer all in NCHW16c, one conversion at each end (as the dense side's NCHWc reorders). A
layer stays sparse when the
context model gets at least MARGIN faster. Results are cached per (shape, sparsity, block,
threads) for the build.

On a shared machine set EDGESPARSE_TIMING_LOCK to a lock file (e.g. /tmp/edgesparse-timing.lock):
each measurement (well under a second) then holds it, so builds never time while a benchmark runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time

import numpy as np

MARGIN = 1.02  # dispatch=measure: a layer (and then the whole model) stays sparse only this much faster
VETO = 1.0     # dispatch=target: the table's choice ships unless the whole model runs slower than dense


class Measurer:
    def __init__(self, ctx, budget_s: float = 0.25):
        self.ctx = ctx
        self.budget_s = budget_s
        self.cache: dict = {}
        self.records: list[dict] = []
        self._lib = None

    def library(self):
        if self._lib is None:
            from edgesparse import kernels

            lib = self.ctx.kernel_library(kernels.DOMAIN)
            self._lib = lib.build(self.ctx.target.toolchain())
        return self._lib

    def prefers_sparse(self, info, shape: dict, sparsity: float, threads: int) -> bool:
        key = (info.kind, tuple(sorted((k, str(v)) for k, v in shape.items())), round(sparsity, 4), info.block, threads)
        if key not in self.cache:
            dense_ms, sparse_ms, layout = self._time(info, shape, sparsity, threads)
            speedup = dense_ms / sparse_ms
            self.cache[key] = speedup >= MARGIN
            self.records.append({"layer": info.name, "kind": info.kind, "sparsity": round(sparsity, 4), "block": info.block,
                                 "threads": threads, "dense_ms": round(dense_ms, 5), "sparse_ms": round(sparse_ms, 5),
                                 "speedup": round(speedup, 3), "layout": layout})
        return self.cache[key]

    def _time(self, info, shape: dict, sparsity: float, threads: int) -> tuple[float, float, str]:
        """(dense ms, sparse ms, the sparse side's layout: 'NCHW' or 'NCHW16c')."""
        from onnx import TensorProto, helper, numpy_helper

        from edgesparse import kernels

        rng = np.random.default_rng(0)
        o, c = info.out_channels, info.in_channels
        kh, kw = info.kernel
        nb = -(-o // info.block)
        keep = np.ones(nb * c, bool)
        keep[rng.choice(nb * c, int(round(sparsity * nb * c)), replace=False)] = False
        groups = np.repeat(keep.reshape(nb, 1, c), info.block, axis=1).reshape(nb * info.block, c)[:o]
        blocked = False
        if info.kind == "linear":
            m = int(shape.get("M") or 1)
            w = (rng.standard_normal((c, o)) * groups.T).astype(np.float32)  # [K, N]
            x = rng.standard_normal((m, c)).astype(np.float32)
            xi = helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, c])
            yi = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, o])
            dense_nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
            inits = [numpy_helper.from_array(w, "W")]
            node, sparse_inits = kernels.make_block_sparse_matmul("X", "Y", kernels.pack_block_sparse(w, info.block), o,
                                                                  name="sparse")
        else:
            h, wd = int(shape.get("H") or 14), int(shape.get("W") or 14)
            w = (rng.standard_normal((o, c, kh, kw)) * groups[:, :, None, None]).astype(np.float32)
            pads = [int(p) for p in info.extra.get("pads", (kh // 2, kw // 2, kh // 2, kw // 2))]
            sh, sw = info.stride
            oh, ow = (h + pads[0] + pads[2] - kh) // sh + 1, (wd + pads[1] + pads[3] - kw) // sw + 1
            x = rng.standard_normal((1, c, h, wd)).astype(np.float32)
            xi = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, h, wd])
            yi = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, o, oh, ow])
            context = [numpy_helper.from_array(rng.standard_normal((c, 1, 3, 3)).astype(np.float32) / 3, "DW_IN"),
                       numpy_helper.from_array(rng.standard_normal((o, 1, 3, 3)).astype(np.float32) / 3, "DW_OUT")]
            before = helper.make_node("Conv", ["X", "DW_IN"], ["A"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c)
            after = helper.make_node("Conv", ["B", "DW_OUT"], ["Y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=o)
            dense_nodes = [before, helper.make_node("Conv", ["A", "W"], ["B"], kernel_shape=[kh, kw], strides=[sh, sw],
                                                    pads=pads), after]
            inits = [numpy_helper.from_array(w, "W"), *context]
            blocked = self._blocked(info, pads)
            node, sparse_inits = kernels.make_block_sparse_conv(
                "A", "B", kernels.pack_block_sparse_conv(w, info.block), o, (kh, kw), name="sparse", strides=(sh, sw),
                pads=tuple(pads), x_channel_block=16 if blocked else 1, y_channel_block=16 if blocked else 1)
        opset = [helper.make_opsetid("", 18)]
        dense = helper.make_model(helper.make_graph(dense_nodes, "d", [xi], [yi], inits), opset_imports=opset)
        sparse_nodes = [node] if info.kind == "linear" else [before, node, after]
        sparse_inits = sparse_inits if info.kind == "linear" else [*sparse_inits, *context]
        if info.kind != "linear" and blocked:
            sparse_nodes, sparse_inits = _nchw16c_context(node, sparse_inits, c, o, h, wd)
        sparse = helper.make_model(helper.make_graph(sparse_nodes, "s", [xi], [yi], sparse_inits), opset_imports=opset)
        kernels.attach_functions(sparse)

        sd, ss = _session(dense, threads), _session(sparse, threads, self.library())
        feed = {"X": x}
        with _timing_lock():
            dense_ms, sparse_ms = _interleaved(lambda: sd.run(None, feed), lambda: ss.run(None, feed), self.budget_s)
        return dense_ms, sparse_ms, "NCHW16c" if blocked else "NCHW"


    def _blocked(self, info, pads) -> bool:
        """Whether the layout rewrite will put this conv in NCHW16c (see layout.py)."""
        return (self.ctx.target.prefers_sparse("NCHW16c", {}, 0.0, 16, self.ctx.threads)
                and tuple(info.kernel) == (1, 1) and tuple(info.stride) == (1, 1) and not any(pads)
                and info.block == 16 and info.in_channels % 16 == 0 and info.out_channels % 16 == 0)


def _nchw16c_context(node, sparse_inits, c: int, o: int, h: int, w: int):
    """X (NCHW) -> NCHW16c -> DepthwiseConv -> the sparse node -> DepthwiseConv -> NCHW -> Y."""
    from onnx import helper, numpy_helper

    from edgesparse import kernels

    rng = np.random.default_rng(1)
    dw_in, i1 = kernels.make_depthwise_conv("Xb", "A", rng.standard_normal((c, 1, 3, 3)).astype(np.float32) / 3,
                                            name="dw_in", pads=(1, 1, 1, 1), y_channel_block=16)
    dw_out, i2 = kernels.make_depthwise_conv("B", "Yb", rng.standard_normal((o, 1, 3, 3)).astype(np.float32) / 3,
                                             name="dw_out", pads=(1, 1, 1, 1), y_channel_block=16)
    shapes = [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("to5", [1, c // 16, 16, h, w]), ("to4", [1, o, h, w]))]
    nodes = [helper.make_node("Reshape", ["X", "to5"], ["X5"]),
             helper.make_node("Transpose", ["X5"], ["Xb"], perm=[0, 1, 3, 4, 2]),
             dw_in, node, dw_out,
             helper.make_node("Transpose", ["Yb"], ["Y5"], perm=[0, 1, 4, 2, 3]),
             helper.make_node("Reshape", ["Y5", "to4"], ["Y"])]
    return nodes, [*sparse_inits, *i1, *i2, *shapes]


def whole_model_speedup(dense_proto, sparse_proto, feed: dict, library, threads: int, budget_s: float = 2.0,
                        baseline_uses_library: bool = False) -> dict:
    """The rewritten model against the dense one, whole, on one calibration batch: the check that
    per-layer decisions add up (residual adds the dense convs fuse, ORT's per-node cost and the
    layout reorders are only visible here). baseline_uses_library: the baseline holds edgesparse
    ops too (one rewrite compared with the model before it)."""
    from edgesparse import kernels

    kernels.attach_functions(sparse_proto)
    if baseline_uses_library:
        kernels.attach_functions(dense_proto)
    sd = _session(dense_proto, threads, library if baseline_uses_library else None)
    ss = _session(sparse_proto, threads, library)
    with _timing_lock():
        dense_ms, sparse_ms = _interleaved(lambda: sd.run(None, feed), lambda: ss.run(None, feed), budget_s)
    return {"dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4), "speedup": round(dense_ms / sparse_ms, 3),
            "threads": threads, "batch": {k: list(v.shape) for k, v in feed.items()}}


def _session(model, threads: int, library=None):
    """An ORT session for timing: fixed threads, no spinning between runs (spinning threads steal
    the other side's time in interleaved runs), the kernel library when the model needs it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _timing_lock():
    path = os.environ.get("EDGESPARSE_TIMING_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _interleaved(a, b, budget_s: float) -> tuple[float, float]:
    for _ in range(3):
        a(), b()
    t0 = time.perf_counter()
    a()
    reps = max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))
    ta, tb = [], []
    start = time.perf_counter()
    r = 0
    while r < 7 or time.perf_counter() - start < budget_s:
        for fn, out in (((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t) / reps * 1e3)
        r += 1
        if r >= 60:
            break
    return float(np.median(ta)), float(np.median(tb))
