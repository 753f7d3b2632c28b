"""The `sparsebytenn` pass: SparseByteNN-style fine-grained group pruning for CNNs and transformers.

Between unstructured and structured pruning: weights are removed in groups of B consecutive output
channels x 1 input channel (x all taps of a conv), the unit edgesparse's BlockSparseConv and
BlockSparseMatMul kernels skip with one SIMD step, with a group pattern per operator type
(patterns.py). Before pruning, channels are permuted across the whole network (function unchanged,
checked numerically) so that the weight mass falls into fewer groups (permute.py). Per-layer
sparsities come from a global target, uniform or by measured sensitivity, and only where the
target's dispatch rule says the sparse kernel wins (allocate.py). Optional recovery by the user's
training loop or by distillation on calibration inputs, masks kept (the core's recovery service). After export the
pruned layers become group-sparse operators with pre-packed weights (rewrite.py); where the package
runs here, the whole model is then timed against the dense one, and it ships dense if it is slower.

Stages: transform_module (torch: allocate, rearrange, prune, recover) and rewrite_graph (ONNX).
"""
from __future__ import annotations

import time

import numpy as np

from edgesparse import EdgesparseError, Option, Pass, allocation, hookimpl, in_range
from edgesparse import kernels, recovery

from . import allocate as alloc
from . import patterns, permute, recover
from .patterns import DEFAULT_BLOCK, LayerInfo

__version__ = "0.1.0"

_BLOCKS = (4, 8, 16)


def _positive(v):
    return None if v >= 0 else "must be >= 0"


class SparseByteNN(Pass):
    name = "sparsebytenn"
    summary = ("fine-grained group pruning (B out x 1 in x taps) per operator type, with whole-network "
               "channel rearrangement and optional recovery, into BlockSparseConv/BlockSparseMatMul")
    options = (
        Option("sparsity", float, 0.5, "global target: fraction of the weight groups of the prunable layers set to zero; "
               "'auto': per-layer sparsities chosen for the most predicted speed within the build's --min-quality "
               "budget (edgesparse.allocation)", check=in_range(0.0, 1.0, hi_open=True), words=(allocation.AUTO,)),
        Option("allocation", str, "uniform", "per-layer sparsities: the target everywhere, or by measured sensitivity",
               choices=("uniform", "sensitivity")),
        Option("score", str, "l2", "group score: L2 or L1 norm, or activation-weighted L2 (needs calibration inputs)",
               choices=("l2", "l1", "activation")),
        Option("block_pointwise", int, DEFAULT_BLOCK["pointwise"], "output channels per group in 1x1 convs", choices=_BLOCKS),
        Option("block_conv", int, DEFAULT_BLOCK["conv"], "output channels per group in kxk convs (groups span all taps)",
               choices=_BLOCKS),
        Option("block_linear", int, DEFAULT_BLOCK["linear"], "output features per group in Linear/MatMul/Gemm", choices=_BLOCKS),
        Option("remainder", str, "pad", "when B does not divide the output channels: prune the last partial "
               "group like the others (zero-padded in the kernel) or leave it dense", choices=("pad", "dense")),
        Option("rearrange", bool, True, "permute channels across the network before pruning (function unchanged)"),
        Option("rearrange_iterations", int, 200, "rounds of pairwise group swaps per channel space", check=_positive),
        Option("recovery", str, "none", "after pruning: nothing, the model's own training loop, or distillation "
               "from the dense model on the calibration inputs", choices=("none", "train", "distill")),
        Option("bn_recalibration", bool, True, "re-estimate BatchNorm statistics on the calibration inputs after pruning"),
        Option("recovery_steps", int, 200, "training / distillation steps", check=_positive),
        Option("prune_stages", int, 1, "reach the sparsity in this many steps of a cubic schedule, each followed by "
               "an equal share of the recovery steps (gradual pruning; 1: prune once, then recover)",
               check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("recovery_seconds", float, 600.0, "time budget of the recovery (0: no limit)", check=_positive),
        Option("lr", float, 1e-4, "distillation learning rate (Adam)", check=in_range(0.0, 1.0)),
        Option("skip", tuple, (), "layers to leave dense: module-name substrings, ';'-separated"),
        Option("min_channels", int, 32, "leave layers with fewer input or output channels dense",
               check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("dispatch", str, "target", "'target': prune only layers the target's dispatch rule says get faster; "
               "'measure': time each layer's sparse kernel against ORT's dense op on this machine (targets that run "
               "here); 'off': prune every candidate (accuracy studies; the report says so)",
               choices=("target", "measure", "off")),
        Option("sensitivity_batches", int, 2, "calibration batches used to measure sensitivities (sparsity=auto: "
               "held-out batches)", check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("auto_probe_steps", int, 0, "sparsity=auto: recovery steps given to each allocation it checks against "
               "the budget (0: checked right after pruning and BatchNorm recalibration; the full recovery that follows "
               "the choice only adds quality)", check=_positive),
    )
    needs = "calibration"
    emits = (f"{kernels.DOMAIN}::BlockSparseConv", f"{kernels.DOMAIN}::BlockSparseMatMul",
             f"{kernels.DOMAIN}::BlockSparseConvAdd", f"{kernels.DOMAIN}::DepthwiseConv")

    def __init__(self, **values):
        super().__init__(**values)
        self._plan: dict = {}
        self._measurer = None

    # -- torch stage ------------------------------------------------------------------------------
    def _check_auto(self, ctx) -> None:
        """sparsity=auto: its budget and the options it works with, before any work."""
        if self.sparsity != allocation.AUTO:
            if self.auto_probe_steps:
                raise EdgesparseError("sparsebytenn: auto_probe_steps is for sparsity=auto")
            return
        if self.allocation != "uniform":
            raise EdgesparseError("sparsebytenn: sparsity=auto chooses per-layer sparsities itself; "
                                  "drop allocation=sensitivity")
        if self.dispatch == "measure":
            raise EdgesparseError("sparsebytenn: sparsity=auto predicts speed from the target's dispatch table; "
                                  "use dispatch=target (or off)")
        if self.auto_probe_steps and self.recovery == "none":
            raise EdgesparseError("sparsebytenn: auto_probe_steps recovers each checked allocation: it needs "
                                  "recovery=train or recovery=distill")
        allocation.require_budget(ctx, self.name)

    def transform_module(self, module, ctx):
        import torch

        self._check_auto(ctx)
        auto = self.sparsity == allocation.AUTO
        # sparsity=auto: a first guess that steers the rearrangement; the search decides after it
        target = 0.5 if auto else self.sparsity
        t_start = time.monotonic()
        blocks = {"pointwise": self.block_pointwise, "conv": self.block_conv, "linear": self.block_linear}
        layers = patterns.find_layers(module, blocks)
        if not any(l.kind in patterns.KERNEL_OP for l in layers):
            kinds = {}
            for l in layers:
                kinds[l.kind] = kinds.get(l.kind, 0) + 1
            found = ", ".join(f"{n} {k} conv{'s' if n > 1 else ''}" for k, n in kinds.items()) or \
                "module types " + ", ".join(sorted({type(m).__name__ for n, m in module.named_modules() if n})[:8])
            raise EdgesparseError("sparsebytenn: the model has no layer this pass can prune (Conv2d with groups=1, "
                                  f"Linear); found: {found or 'nothing'}")
        module.eval()
        batches = ctx.calibration_inputs()
        if not batches:
            raise EdgesparseError("sparsebytenn: no calibration inputs (the pass runs the model to check its rearrangement)")
        alloc.collect_stats(module, [l for l in layers if l.kind in patterns.KERNEL_OP], batches)

        # BatchNorm after a layer rescales each output channel: scores use the folded weights
        self._gm, self._trace_error = None, None
        try:
            self._gm = permute.trace(module, alloc.to_args(batches[0]))
            after = permute.batchnorm_after(self._gm)
            for info in layers:
                if info.name in after:
                    info.extra["bn"] = after[info.name]
        except Exception as exc:  # noqa: BLE001 - any tracing failure: no rearrangement, raw weights
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._trace_error = f"{type(exc).__name__}: {msg[:160]}"

        candidates = []
        for info in layers:
            info.reason = self._static_reason(info)
            if info.reason is None:
                candidates.append(info)
        if not candidates:
            ctx.warn("no layer can be pruned: every Conv2d/Linear stays dense (see kept_dense)")

        # per-layer sparsity (a first uniform guess steers the rearrangement; sensitivity is measured after it)
        for info in candidates:
            info.sparsity = target if self._fast_enough(info, target, ctx) else 0.0
        if self.allocation == "uniform" and not auto:
            for info in candidates:
                if info.sparsity == 0.0 and self.sparsity > 0:
                    info.reason = f"the sparse kernel would not beat dense on {ctx.target.name} at {self.sparsity:.0%}"

        rearrangement = {"enabled": bool(self.rearrange)}
        if self.rearrange and target > 0:
            rearrangement = self._rearrange(module, layers, batches, ctx)

        if auto and candidates:
            chosen = self._auto(module, candidates, batches, ctx)
            for info in candidates:
                info.sparsity = chosen.get(info.name, 0.0)
                if info.sparsity == 0.0:
                    info.reason = "sparsity=auto left it dense (see auto in the report)"
        elif auto:
            raise EdgesparseError("sparsebytenn: sparsity=auto found no layer it may prune")

        if self.allocation == "sensitivity" and self.sparsity > 0 and candidates:
            levels = {i.name: [s for s in alloc.LADDER if self._fast_enough(i, s, ctx)] for i in candidates}
            sens_batches = batches[: self.sensitivity_batches]
            curves = alloc.sensitivity(module, candidates, sens_batches, levels,
                                       lambda i, s: self._weight_mask(i, s))
            chosen = alloc.allocate(candidates, curves, self.sparsity)
            for info in candidates:
                info.sparsity = chosen[info.name]
                info.extra["sensitivity"] = {f"{k:.2f}": round(v, 6) for k, v in curves[info.name].items()}
                if info.sparsity == 0.0:
                    info.reason = ("the sparse kernel would not beat dense at any sparsity tried" if not levels[info.name]
                                   else "sensitivity allocation left it dense")

        pruned = [i for i in candidates if i.sparsity > 0]
        recovery = self._prune_and_recover(module, pruned, batches, ctx)

        self._plan = {}
        for info in pruned:
            w = info.module.weight.detach().cpu().numpy()
            self._plan[info.param] = {  # mask: the groups holding a non-zero (what the kernel keeps)
                "module": info.name, "kind": info.kind, "block": info.block, "shape": list(w.shape),
                "mask": patterns.weight_group_mask(w, info.block), "sparsity": info.sparsity,
            }

        self._report_torch(ctx, layers, pruned, rearrangement, recovery, time.monotonic() - t_start)
        self._gm = None
        return module

    def _auto(self, module, candidates: list[LayerInfo], batches, ctx) -> dict[str, float]:
        """sparsity=auto (edgesparse.allocation): levels from the dispatch rule, sensitivities on
        held-out batches, the greedy path, bisected by checking allocations as the pass will build
        them (pruned, BatchNorm recalibrated, `auto_probe_steps` of recovery) against the budget."""
        import torch

        held, where = allocation.held_out(ctx)
        layers, by_name = [], {}
        for info in candidates:
            shape = alloc.dispatch_shape(info)
            tokens = shape.get("M") or (shape["H"] * shape["W"] / shape["stride"] ** 2 if "H" in shape else 1)
            layer = allocation.Layer(info.name, info.op, shape, info.block, info.weight_count,
                                     float(info.weight_count) * float(tokens))
            layer.levels = allocation.levels(ctx, layer, lambda s, i=info: self._fast_enough(i, s, ctx))
            if layer.levels:
                layers.append(layer)
                by_name[info.name] = info
        if not layers:
            raise EdgesparseError(f"sparsebytenn: sparsity=auto found no layer that the target's dispatch rule says "
                                  f"would run faster sparse on {ctx.target.name}")

        def prune_alone(layer, s):
            w = by_name[layer.name].module.weight
            saved = w.data.clone()
            with torch.no_grad():
                w.data = saved * torch.from_numpy(self._weight_mask(by_name[layer.name], s)).to(saved.dtype)

            def restore():
                w.data = saved
            return restore

        module.eval()
        allocation.sensitivities(layers, allocation.torch_runner(module), held[: self.sensitivity_batches], prune_alone)
        teacher = recovery.teacher_copy(module) if self.auto_probe_steps else None

        def check(chosen: dict) -> dict:
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            try:
                masks = {}
                for name, s in chosen.items():
                    if s > 0:
                        info = by_name[name]
                        masks[info.module] = torch.from_numpy(self._weight_mask(info, s))
                        with torch.no_grad():
                            info.module.weight.mul_(masks[info.module].to(info.module.weight.dtype))
                if self.bn_recalibration and not _not_real_data(batches):
                    recover.recalibrate_batchnorm(module, batches)
                if self.auto_probe_steps:
                    ctx.recover(module, teacher, steps=self.auto_probe_steps, seconds=0, mode=self.recovery,
                                lr=self.lr, masks=masks, measure=(), label="sparsebytenn: auto probe recovery")
                module.eval()
                return ctx.measure_quality(allocation.torch_runner(module))
            finally:
                module.load_state_dict(state)
                module.eval()

        chosen = allocation.search(layers, check, self.name, ctx)
        ctx.reports[self.name]["auto"]["sensitivity_inputs"] = where
        ctx.reports[self.name]["auto"]["probe_recovery_steps"] = self.auto_probe_steps
        return chosen

    def _prune_and_recover(self, module, pruned: list[LayerInfo], batches, ctx) -> dict:
        """Zero the pruned groups (in `prune_stages` steps when recovering), re-estimate BatchNorm
        statistics after each, recover with the masks kept. Returns the report's `recovery`."""
        import torch

        # the teacher of the recovery (and what its loss is measured against): the dense network,
        # rearranged, before any pruning
        dense_reference = recovery.teacher_copy(module) if self.recovery != "none" and pruned else None
        if self.prune_stages > 1 and self.recovery == "none":
            ctx.warn("prune_stages is ignored without recovery: the sparsity is reached in one step")
        stages = recovery.stage_fractions(self.prune_stages if self.recovery != "none" else 1)
        shares = recovery.split_steps(self.recovery_steps, len(stages))
        report = {"mode": "none"}
        t_recovery = time.monotonic()
        weights = sum(i.weight_count for i in pruned)  # the target the stages reach (sparsity=auto: the mean chosen)
        target = sum(i.weight_count * i.sparsity for i in pruned) / weights if weights else 0.0
        for k, (fraction, steps) in enumerate(zip(stages, shares)):
            # a later stage scores the trained weights; the groups zeroed before score 0 and stay pruned
            masks = {}
            for info in pruned:
                masks[info.module] = torch.from_numpy(self._weight_mask(info, info.sparsity * fraction))
                with torch.no_grad():
                    info.module.weight.mul_(masks[info.module].to(info.module.weight.dtype))
            if self.bn_recalibration and pruned:
                problem = _not_real_data(batches)
                if problem:
                    if k == 0:
                        ctx.warn(f"BatchNorm statistics not recalibrated: {problem}")
                    report["batchnorm_recalibrated"] = 0
                else:
                    report["batchnorm_recalibrated"] = recover.recalibrate_batchnorm(module, batches)
                module.eval()
            if self.recovery == "none" or not pruned:
                continue
            seconds = self.recovery_seconds  # one budget for all the stages
            if seconds > 0:
                seconds = max(seconds - (time.monotonic() - t_recovery), 1e-3)
            done = ctx.recover(module, dense_reference, steps=steps, seconds=seconds, mode=self.recovery,
                               lr=self.lr, masks=masks)
            module.eval()
            report = recovery.merge(report, done, fraction * target, len(stages), self.recovery_seconds)
        if "cut_by_budget" in report:
            ctx.warn(f"recovery cut short by its time budget: {report['steps']} of {report['steps_requested']} "
                     f"steps in {report['seconds']:.0f} s (recovery_seconds={self.recovery_seconds:g}; 0 = no limit)")
        return report

    def _static_reason(self, info: LayerInfo) -> str | None:
        if info.kind == "depthwise":
            return "depthwise conv: stays dense by design (see the pattern table)"
        if info.kind == "grouped":
            return "grouped conv: no group-sparse kernel"
        if any(s and s in info.name for s in self.skip):
            return "skipped by option"
        if min(info.in_channels, info.out_channels) < self.min_channels:
            return f"fewer than {self.min_channels} channels"
        w = info.module.weight
        if str(w.dtype) != "torch.float32":
            return f"weights are {w.dtype}, the kernels take float32"
        if info.kind != "linear" and info.module.padding_mode != "zeros":
            return f"padding_mode={info.module.padding_mode}"
        if info.kind != "linear" and isinstance(info.module.padding, str) and info.module.padding != "valid" \
                and info.stride != (1, 1):
            return "string padding with stride"
        return None

    def _fast_enough(self, info: LayerInfo, sparsity: float, ctx) -> bool:
        if self.dispatch == "off":
            return True
        if self.dispatch == "measure":
            if self._measurer is None:
                if not ctx.target.runs_here():
                    raise EdgesparseError(f"sparsebytenn: dispatch=measure times kernels on this machine, but target "
                                          f"'{ctx.target.name}' runs elsewhere; use dispatch=target")
                from .measure import Measurer

                self._measurer = Measurer(ctx)
            return self._measurer.prefers_sparse(info, alloc.dispatch_shape(info), sparsity, ctx.threads)
        return bool(ctx.target.prefers_sparse(info.op, alloc.dispatch_shape(info), sparsity, info.block, ctx.threads))

    def _scale(self, info):
        return info.extra.get("input_rms") if self.score == "activation" else None

    @staticmethod
    def _effective(info: LayerInfo) -> np.ndarray:
        """The weight as the network applies it: times |gamma| / sqrt(var + eps) of a BatchNorm that
        directly follows (read now, so that it follows any rearrangement)."""
        w = info.module.weight.detach().cpu().numpy().astype(np.float64)
        bn = info.extra.get("bn")
        if bn is None:
            return w
        k = (bn.weight.detach().abs() if bn.weight is not None else 1.0) / (bn.running_var.detach() + bn.eps).sqrt()
        k = np.asarray(k.cpu().numpy() if hasattr(k, "numpy") else k, np.float64).reshape(-1, *([1] * (w.ndim - 1)))
        return w * k

    def _group_mask(self, info: LayerInfo, sparsity: float) -> np.ndarray:
        w = self._effective(info)
        norm = "l1" if self.score == "l1" else "l2"
        scores = patterns.group_scores(w, info.block, norm, self.remainder, self._scale(info))
        return patterns.group_mask(scores, sparsity)

    def _weight_mask(self, info: LayerInfo, sparsity: float) -> np.ndarray:
        w = info.module.weight
        return patterns.expand_mask(self._group_mask(info, sparsity), info.block, tuple(w.shape))

    def _rearrange(self, module, layers, batches, ctx) -> dict:
        """Permute channels; every space is checked on calibration inputs and rolled back if the
        outputs change."""
        import torch

        report = {"enabled": True, "spaces_permuted": [], "spaces_fixed": [], "spaces_at_output": [], "rolled_back": []}
        check = batches[:1]
        gm = self._gm
        if gm is None:
            ctx.warn(f"no rearrangement: torch.fx cannot trace the model ({self._trace_error})")
            report["skipped"] = f"torch.fx cannot trace the model: {self._trace_error}"
            return report
        by_name = {l.name: l for l in layers}
        spaces, _ = permute.build_spaces(gm, by_name)
        reference = alloc.outputs(module, check[0])
        scale = max((float(r.abs().max()) for r in reference if r.numel()), default=1.0)
        tolerance = 1e-4 * max(1.0, scale)
        roots = sorted({spaces.find(i) for i in range(len(spaces.parent))})
        before_total = after_total = 0.0
        for r in roots:
            info = spaces.info[r]
            prods = [by_name[n] for n, _ in info.producers if n in by_name]
            pruned = [p for p in prods if p.reason is None and p.sparsity > 0]
            if not pruned:
                continue
            names = [p.name for p in pruned]
            if info.fixed:
                reasons = sorted(set(info.fixed))
                entry = {"producers": names, "channels": info.size, "reason": "; ".join(reasons[:3])}
                # a model output keeps its channel order by definition: not a fallback
                report["spaces_at_output" if reasons == ["model output"] else "spaces_fixed"].append(entry)
                continue
            weights = [(self._effective(p), p.block, p.sparsity, self._scale(p)) for p in pruned]
            profiles = []
            for w, _, _, s in weights:
                per = patterns.channel_norms(w, "l2")
                if s is not None:
                    per = per * np.asarray(s, np.float64).reshape(1, -1) ** 2
                profiles.append(per / max(per.sum(), 1e-30))
            block = max(p.block for p in pruned)
            perm = permute.cluster(profiles, block, self.rearrange_iterations)
            before = permute.retained(weights, self.remainder)
            after = permute.retained([(w[perm], b, s, sc) for w, b, s, sc in weights], self.remainder)
            if after <= before + 1e-9:
                before_total += before
                after_total += before
                continue
            permute.apply(spaces, {r: perm})
            got = alloc.outputs(module, check[0])
            error = max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, reference))
            if not error <= tolerance:
                permute.apply(spaces, {r: permute.inverse(perm)})
                report["rolled_back"].append({"producers": names, "max_abs_error": error})
                ctx.warn(f"rearrangement of the channels written by {names[0]} changed the outputs "
                         f"(max abs error {error:.3g}): left unpermuted")
                before_total += before
                after_total += before
                continue
            before_total += before
            after_total += after
            report["spaces_permuted"].append({"producers": names, "channels": info.size, "block": block,
                                              "retained_before": round(before / len(weights), 6),
                                              "retained_after": round(after / len(weights), 6)})
        got = alloc.outputs(module, check[0])
        error = max((float((g.double() - w.double()).abs().max()) for g, w in zip(got, reference)), default=0.0)
        report["max_abs_error"] = error
        report["tolerance"] = tolerance
        report["retained_mass_before"] = before_total
        report["retained_mass_after"] = after_total
        if report["spaces_fixed"]:
            ctx.warn(f"{len(report['spaces_fixed'])} channel space(s) could not be permuted consistently "
                     "and are pruned without rearrangement (see rearrangement.spaces_fixed)")
        return report

    def _report_torch(self, ctx, layers, pruned, rearrangement, recovery, seconds) -> None:
        total = sum(i.weight_count for i in layers if i.kind in patterns.KERNEL_OP)
        zeroed = sum(i.weight_count * float((i.module.weight == 0).float().mean()) for i in pruned)
        cand = [i for i in layers if i.reason is None or i.sparsity > 0]
        cand_w = sum(i.weight_count for i in cand)
        ctx.report("layers", [{
            "layer": i.name, "kind": i.kind, "shape": [i.out_channels, i.in_channels, *i.kernel] if i.kind != "linear"
            else [i.out_channels, i.in_channels], "block": i.block, "sparsity": round(i.sparsity, 4),
            **({"kept_dense": i.reason} if i.sparsity == 0 else {}),
            **({"sensitivity": i.extra["sensitivity"]} if "sensitivity" in i.extra else {}),
            **({"partial_group": _partial(i, self.remainder)} if i.sparsity > 0 and i.out_channels % i.block else {}),
        } for i in layers])
        partial = [i.name for i in pruned if i.out_channels % i.block]
        if partial:
            how = ("pruned like full groups, zero-padded in the kernel" if self.remainder == "pad"
                   else "left dense")
            ctx.warn(f"{len(partial)} layer(s) have output channels that the group size does not divide "
                     f"({', '.join(partial[:4])}{', ...' if len(partial) > 4 else ''}): their last, partial "
                     f"groups are {how} (remainder={self.remainder})")
        ctx.report("target_sparsity", self.sparsity)
        ctx.report("achieved_sparsity_of_candidates", zeroed / cand_w if cand_w else 0.0)
        ctx.report("weight_sparsity_of_conv_linear", zeroed / total if total else 0.0)
        ctx.report("dispatch", self.dispatch if self.dispatch == "off" else f"{self.dispatch} ({ctx.target.name}, {ctx.threads} thread(s))")
        if self._measurer is not None:
            ctx.report("dispatch_measurements", self._measurer.records)
        if self.dispatch == "off":
            ctx.warn("dispatch=off: layers were pruned without asking the target whether the sparse kernel is faster")
        ctx.report("rearrangement", rearrangement)
        ctx.report("recovery", recovery)
        ctx.report("remainder", self.remainder)
        ctx.report("scores_fold_batchnorm", sorted(i.name for i in pruned if "bn" in i.extra))
        ctx.report("torch_stage_seconds", round(seconds, 2))
        if not pruned:
            ctx.warn("no layer was pruned")

    # -- ONNX stage -------------------------------------------------------------------------------
    def rewrite_graph(self, model, ctx) -> None:
        import onnx_ir as ir

        from .rewrite import rewrite

        if not self._plan:
            ctx.report("onnx", {"replaced": [], "not_replaced": []})
            return
        checked = self._whole_model_checked(ctx)
        dense_copy = ir.to_proto(model) if checked else None
        result = rewrite(model, self._plan, ctx)
        if result["replaced"]:
            self._nchw_layout(model, ctx)
        if dense_copy is not None and result["replaced"]:
            if not self._whole_model_faster(dense_copy, model, ctx):
                _restore(model, dense_copy)
                result["not_replaced"] += [{**r, "reason": "whole-model check: the sparse model was not faster"}
                                           for r in result.pop("replaced")]
                result["replaced"] = []
                if "nchw_layout" in ctx.reports.get(self.name, {}):
                    ctx.report("nchw_layout", {"reverted": "whole-model check: the sparse model was not faster"})
        for entry in result["not_replaced"]:
            ctx.warn(f"{entry['layer']} stays a dense op in the package: {entry['reason']}")
        ctx.report("onnx", result)


    def _nchw_layout(self, model, ctx) -> None:
        """Residual Adds after sparse convs -> BlockSparseConvAdd, depthwise convs next to sparse
        convs -> DepthwiseConv, in the NCHW16c layout where the target asks for it (layout.py), each
        where the target's dispatch rule asks for the op.
        Where the build times models here (dispatch=measure; dispatch=target on a target that
        times here) the depthwise rewrite is also tried where the rule does not ask for it, and each
        rewrite is kept only when the whole model, timed against the model without it
        (interleaved), runs faster."""
        import onnx_ir as ir

        from .layout import rewrite_layout

        def wanted(op):
            return bool(ctx.target.prefers_sparse(op, {}, 0.0, 16, ctx.threads))

        if not wanted("BlockSparseConvAdd"):  # the target runs neither op (no ORT kernel library)
            return
        report = {}
        steps = (("residual", True), ("depthwise", wanted("DepthwiseConv") or self._measurer is not None))
        nchw16c = wanted("NCHW16c")
        for kind, on in steps:
            if not on:
                report[kind] = {"applied": [], "reason": f"the target's dispatch rule does not ask for it "
                                f"({'DepthwiseConv' if kind == 'depthwise' else 'BlockSparseConvAdd'})"}
                continue
            before = ir.to_proto(model) if self._measurer is not None else None
            rewritten = rewrite_layout(model, depthwise=kind == "depthwise", residual=kind == "residual",
                                       nchw16c=nchw16c)
            done = rewritten[kind]
            entry = {"applied": done}
            if kind == "depthwise" and nchw16c:
                entry["nchw16c"] = rewritten["nchw16c"]
            if before is not None and done:
                from .measure import whole_model_speedup

                check = whole_model_speedup(before, ir.to_proto(model), ctx.calibration_inputs()[0],
                                            self._measurer.library(), ctx.threads, baseline_uses_library=True)
                entry["check_vs_without"] = check
                if check["speedup"] < 1.0:
                    _restore(model, before)
                    entry["applied"] = []
                    entry.pop("nchw16c", None)
                    entry["reason"] = f"whole model {check['speedup']:.2f}x of the model without it: not used"
            report[kind] = entry
        ctx.report("nchw_layout", report)

    def _whole_model_checked(self, ctx) -> bool:
        """Whether the rewritten model is timed whole against the dense one before it ships: with
        dispatch=measure always (it runs here), with dispatch=target where the package's devices
        run what this machine runs (Target.times_here); the report says when it could not be."""
        if self.dispatch == "off":
            return False
        if self.dispatch == "target" and not ctx.target.times_here():
            ctx.report("whole_model_check", {"skipped": f"target '{ctx.target.name}' ({ctx.target.isa}) does not run "
                                                        "here natively: the dispatch table's decisions stand"})
            return False
        if self._measurer is None:
            from .measure import Measurer

            self._measurer = Measurer(ctx)
        return True

    def _whole_model_faster(self, dense_proto, model, ctx) -> bool:
        """Per-layer decisions can still add up to a slower model (the layout reorders around
        sparse nodes, the residual adds dense convs fuse, ORT's per-node cost: at 30 % on the
        sample CNN every layer ran 1.06-1.35x in context and the whole model 0.91x). Time the whole
        rewritten model against the dense one; when it is slower, every layer stays dense (the
        weights stay pruned) and the report and a warning say so. dispatch=measure keeps the
        sparse model only MARGIN faster (its own per-layer timings decided); with dispatch=target
        the measured table decided and the whole-model timing vetoes it only when dense is faster."""
        import onnx_ir as ir

        from .measure import MARGIN, VETO, whole_model_speedup

        feed = ctx.calibration_inputs()[0]
        check = whole_model_speedup(dense_proto, ir.to_proto(model), feed, self._measurer.library(), ctx.threads)
        check["kept_sparse"] = check["speedup"] >= (MARGIN if self.dispatch == "measure" else VETO)
        ctx.report("whole_model_check", check)
        if not check["kept_sparse"]:
            ctx.warn(f"whole-model check: the sparse model ran at {check['speedup']:.2f}x of dense on this machine "
                     f"({ctx.threads} thread(s)): every layer left dense (weights stay pruned)")
        return check["kept_sparse"]


def _restore(model, proto) -> None:
    """Put the graph of `proto` back into the ir.Model `model` (in place: the core holds it)."""
    import onnx_ir as ir

    fresh = ir.from_proto(proto)
    model.graph = fresh.graph  # opset imports live on the graph
    functions = dict(fresh.functions)
    model.functions.clear()
    model.functions.update(functions)


def _partial(info: LayerInfo, remainder: str) -> str:
    rest = info.out_channels % info.block
    how = "zero-padded to a full group and pruned like the others" if remainder == "pad" else "kept dense"
    return f"last {rest} of {info.out_channels} output channels form a partial group of {info.block}: {how}"


def _not_real_data(batches: list[dict]) -> str | None:
    """Re-estimating statistics needs real, varied inputs: not the single example batch (or
    generated zeros) a build falls back to when the model factory gives no calibration data."""
    rows = sum(next(iter(b.values())).shape[0] if b and next(iter(b.values())).ndim else 0 for b in batches)
    if rows < 16:
        return f"only {rows} calibration sample(s) (give the TorchModel calibration= with real inputs)"
    for b in batches:
        for v in b.values():
            if np.issubdtype(v.dtype, np.floating) and float(np.std(v)) == 0.0:
                return "the calibration inputs are constant"
    return None


@hookimpl
def register_passes(register):
    register(SparseByteNN)
