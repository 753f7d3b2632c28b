"""The `deltallm` pass: training-free temporal sparsity in the attention of decoder LLMs
(DeltaLLM, papers.md section 3), for edge CPUs.

Each attention block of the exported model (Q.K^T MatMul, scale, mask, Softmax, P.V MatMul) is
replaced by one DeltaAttention node from this plugin's own kernel library
(domain com.edgesparse.deltallm): exact attention inside a window of recent tokens (and on
optional sink tokens), and outside it a delta approximation that skips work wherever the query,
or a key's softmax weight, barely changed since it was last used. The window and the thresholds
are chosen from the calibration inputs for a requested sparsity or accuracy budget. The design
(what is compared with what, the thresholds, the memory bound) is in README.md.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir

from edgesparse import EdgesparseError, Option, Pass, hookimpl, in_range

from . import calibrate, masks, rewrite
from .rewrite import DOMAIN, OP

__version__ = "0.1.0"

WINDOW_CANDIDATES = (16, 32)
THETA_V_CANDIDATES = (0.01, 0.03)
MAX_CALIBRATION_BATCHES = 4


def _nonnegative(v):
    return None if v >= 0 else "must be >= 0"


class DeltaLLM(Pass):
    name = "deltallm"
    summary = "temporal sparsity in LLM attention: exact local window, delta approximation outside (no fine-tuning)"
    options = (
        Option("target", str, "sparsity", "calibrate for a sparsity target or for an accuracy budget",
               choices=("sparsity", "accuracy")),
        Option("sparsity", float, 0.6, "target attention sparsity (skipped / dense causal MACs) on the calibration inputs",
               check=in_range(0.0, 1.0, hi_open=True)),
        Option("budget", float, 0.02, "target=accuracy: largest relative perplexity increase allowed on the calibration inputs",
               check=in_range(0.0, 10.0)),
        Option("window", int, 0, "exact local window in tokens; 0: chosen by calibration among 16 and 32",
               check=_nonnegative),
        Option("sinks", int, 0, "first tokens of the sequence always attended exactly", check=_nonnegative),
        Option("theta_q", float, -1.0, "query threshold as a multiple of the median query change (see theta_q_per); "
               "-1: calibrate"),
        Option("theta_q_per", str, "auto", "what theta_q's median is taken over: each query 'dimension' (RoPE turns "
               "dimensions at very different rates), each 'head', or 'auto': calibration tries both",
               choices=("auto", "dimension", "head")),
        Option("theta_v", float, -1.0, "value-side threshold as a fraction of the softmax denominator; -1: calibrate"),
        Option("decode_steps", int, 16, "decode steps measured at build time for the decode sparsity report",
               check=_nonnegative),
    )
    needs = "calibration"
    emits = (f"{DOMAIN}::{OP}",)
    targets = ("x86", "snapdragon")  # jetson: no DeltaAttention kernel in the tvm backend yet

    def rewrite_graph(self, model: ir.Model, ctx) -> None:
        misses: list = []
        found = rewrite.find_attention(model, misses)
        if not found:
            raise rewrite.not_found_error(model)
        partial = rewrite.partial_error(misses, len(found))
        if partial is not None:
            raise partial
        for option in ("theta_q", "theta_v"):
            value = getattr(self, option)
            if value < 0 and value != -1.0:
                raise EdgesparseError(f"option {self.name}.{option}={value}: must be >= 0, or -1 to calibrate")
        dense = self._proto(model)
        batches = ctx.calibration_inputs()[:MAX_CALIBRATION_BATCHES]
        spans = masks.read_spans(dense, found, batches[0], ctx.threads)
        rewrite.apply(model, window=max(self.window, 1), sinks=self.sinks, carry=True, spans=spans)
        delta = self._proto(model)
        library = ctx.kernel_library(DOMAIN).build(ctx.target.toolchain())
        ctx.log(f"[deltallm] {len(found)} attention blocks replaced; calibrating on {len(batches)} batch(es)")
        local = [(i, s) for i, s in enumerate(spans) if s]
        if local:
            ctx.log(f"[deltallm] sliding-window layers (delta attention inside their window): "
                    + ", ".join(f"{i} ({s} keys)" for i, s in local))
        capped = sorted({a.softcap for a in found if a.softcap})
        if capped:
            ctx.log(f"[deltallm] attention logits soft-capped at {', '.join(f'{c:g}' for c in capped)}")
        cal = calibrate.Calibrator(dense, delta, batches, str(library), ctx.threads, ctx.log)
        context = cal.context

        windows = (self.window,) if self.window else tuple(w for w in WINDOW_CANDIDATES if w < context // 2) or (max(1, context // 4),)
        theta_vs = (self.theta_v,) if self.theta_v >= 0 else THETA_V_CANDIDATES
        alpha = self.theta_q if self.theta_q >= 0 else None
        exact = self.window >= context
        if exact:
            ctx.warn(f"window {self.window} >= the calibration context ({context} tokens): attention stays exact for "
                     f"sequences up to {self.window} tokens, so the pass skips nothing there")
            chosen = cal.evaluate(calibrate.Setting(self.window, self.sinks, alpha or 0.0,
                                                    theta_vs[0] if self.theta_v >= 0 else 0.0))
            tried = [chosen]
        else:
            pers = ("dimension", "head") if self.theta_q_per == "auto" else (self.theta_q_per,)
            chosen, tried = cal.search(target=self.target, sparsity=self.sparsity, budget=self.budget,
                                       windows=windows, sinks=self.sinks, theta_vs=theta_vs, alpha=alpha, pers=pers)
        setting = chosen.setting
        theta_q, theta_v = cal.thresholds(setting)
        self._apply(model, setting, theta_q, theta_v, chosen)

        # decode: the same text continued one token at a time, when the model has a KV cache
        final = self._proto(model)
        plan = calibrate.decode_plan(final, batches[0], cal.tokens)
        layers = [{"layer": i, "node": l.node, "prefill": round(s, 4), "sliding_window": spans[i] or None,
                   "softcap": found[i].softcap or None}
                  for i, (l, s) in enumerate(zip(cal.layers, chosen.layer_sparsity))]
        sparsity = {"prefill": round(chosen.sparsity, 4), "decode": None, "overall": None,
                    "qk_prefill": round(chosen.qk_sparsity, 4), "pv_prefill": round(chosen.pv_sparsity, 4)}
        if plan is not None and self.decode_steps > 0:
            pre, dec = calibrate.measure_decode(final, plan, batches[0], str(library), ctx.threads,
                                                theta_q, theta_v, self.decode_steps)
            both = pre + dec
            for row, d in zip(layers, dec):
                row["decode"] = round(float(1 - (d[1] + d[2]) / d[0]), 4) if d[0] else None
            sparsity["decode"] = round(float(1 - dec[:, 1:].sum() / dec[:, 0].sum()), 4) if dec[:, 0].sum() else None
            sparsity["overall"] = round(float(1 - both[:, 1:].sum() / both[:, 0].sum()), 4)
            sparsity["decode_steps"] = int(self.decode_steps)
        else:
            sparsity["note"] = "decode not measured: the model has no past/present KV-cache inputs and outputs"

        ctx.report("attention_sparsity", sparsity)
        ctx.report("layers", layers)
        ctx.report("setting", {"window": setting.window, "sinks": setting.sinks, "theta_q_scale": setting.alpha,
                               "theta_q_per": setting.per, "theta_v": setting.theta_v, "exact": exact})
        calibration = {"context": context, "batches": len(batches), "error": round(chosen.error, 5),
                       "error_kind": "relative perplexity increase" if cal.tokens else "relative RMS error of the first output",
                       "evaluations": [e.row() for e in tried]}
        if cal.tokens:
            calibration["perplexity_dense"] = round(float(np.exp(cal.dense_nll)), 4)
            calibration["perplexity_delta"] = round(float(np.exp(cal.dense_nll) * (1 + chosen.error)), 4)
        ctx.report("calibration", calibration)
        ctx.log(f"[deltallm] window {setting.window}, theta_q {setting.alpha:.3g} x median query change per {setting.per}, "
                f"theta_v {setting.theta_v}: prefill sparsity {chosen.sparsity:.3f}, error {chosen.error:+.4f}")
        if chosen.sparsity < 0.01 and not exact:
            ctx.warn(f"the thresholds skip nothing on the calibration inputs ({100 * chosen.sparsity:.1f}% attention "
                     "sparsity): raise theta_q / theta_v or let the pass calibrate them")
        searched = self.theta_q < 0 or self.theta_v < 0  # both thresholds given: no target was pursued
        if self.target == "sparsity" and searched and chosen.sparsity < self.sparsity and not exact:
            ctx.warn(f"sparsity {chosen.sparsity:.3f} stays below the target {self.sparsity} on the calibration inputs")
        # the build verifies the package against the op's reference implementation (the same
        # approximation); what the approximation costs against the original model is in the
        # manifest's quality section and in `calibration` above

    @staticmethod
    def _proto(model: ir.Model) -> onnx.ModelProto:
        proto = ir.to_proto(model)
        if all(o.domain != DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
        return proto

    @staticmethod
    def _apply(model: ir.Model, setting, theta_q, theta_v, chosen) -> None:
        nodes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP]
        for i, node in enumerate(nodes):
            node.attributes["window"] = ir.AttrInt64("window", int(setting.window))
            node.attributes["sinks"] = ir.AttrInt64("sinks", int(setting.sinks))
            heads = theta_q[i].shape[0]
            dims = node.inputs[3].const_value.numpy().shape[-1] if node.inputs[3].const_value is not None else 1
            per_head = theta_q[i].reshape(heads, -1)  # [H, D] per dimension, or [H, 1] per head
            tq = np.ascontiguousarray(np.broadcast_to(per_head, (heads, max(dims, per_head.shape[1]))), np.float32)
            node.inputs[3].const_value = ir.tensor(tq, name=node.inputs[3].name)
            node.inputs[4].const_value = ir.tensor(np.asarray(theta_v[i], np.float32), name=node.inputs[4].name)
            node.doc_string = json.dumps({"calibration_sparsity": round(chosen.layer_sparsity[i], 4)})


@hookimpl
def register_passes(register):
    register(DeltaLLM)


@hookimpl
def register_kernels(register):
    from .library import kernel_library

    register(kernel_library())
