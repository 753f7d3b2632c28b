"""The `blockffn` pass: chunk-level activation sparsity for transformer FFNs (BlockFFN, papers.md
section 2).

Two kinds of models:
- a trained BlockFFN model in the authors' released format, built by `checkpoint_factory(path)`:
  its routers and experts are used as they are (no training, no conversion);
- a dense model (conversion, below; see the README for what conversion cannot do).

Conversion, torch stage: each FFN's intermediate neurons are grouped into E experts by co-activation on the
calibration text, a ReLU + RMSNorm router is added and trained by layer-wise distillation from
the dense FFN with the activation-locality and chunk-sparsification losses (FFN weights frozen).
ONNX stage: each converted FFN becomes the router in standard ops plus one RoutedFFN node of the
core kernel library, which computes per chunk of tokens only the experts some token of the chunk
routes to. Reports TLS and CLS(1, 8, 32, 64) per layer and the FFN FLOPs executed.
"""
from __future__ import annotations

from edgesparse import EdgesparseError, Option, Pass, hookimpl, in_range
from edgesparse.kernels import DOMAIN

# torch, convert and rewrite are imported inside the methods: loading the plugin must stay light.
from .factory import checkpoint_factory  # noqa: E402,F401  (imports torch only when called)
from .generate import generate  # noqa: E402,F401  (numpy only: what an app runs)

__version__ = "0.1.0"

# RoutedFFN vs ORT's dense MatMuls on SmolLM2's FFN shape (samples/blockffn/results/bench_ffn*.json):
# 2.0-6.6x faster at 70.8% chunk sparsity, 1.15-1.35x at 50%, 2-10x slower with every expert on.
# Below this chunk sparsity an FFN keeps the dense kernels.
BREAK_EVEN_CLS = 0.5


def _positive(v):
    return None if v > 0 else "must be > 0"


def _nonnegative(v):
    return None if v >= 0 else "must be >= 0"


class BlockFFN(Pass):
    name = "blockffn"
    summary = "BlockFFN: ReLU + RMSNorm routers over FFN experts, trained for chunk-level sparsity; RoutedFFN kernel"
    options = (
        Option("experts", int, 0, "experts per FFN (must divide the intermediate size); 0: intermediate size / 64",
               check=_nonnegative),
        Option("chunk", int, 8, "tokens per chunk: the kernel computes the union of the chunk's experts "
               "(1: decode, 8-64: prefill / speculative drafts); also the chunk of the sparsity target and loss",
               check=_positive),
        Option("sparsity", float, 0.7, "target chunk-level sparsity CLS(chunk) on the calibration text",
               check=in_range(0.0, 1.0, hi_open=True)),
        Option("steps", int, 200, "router training steps per FFN (0: least-squares initialisation only)",
               check=_nonnegative),
        Option("lr", float, 3e-3, "router learning rate (Adam)", check=_positive),
        Option("locality", float, 2e-3, "weight of the activation-locality loss", check=_nonnegative),
        Option("time_budget", float, 0.0, "seconds of router training for all FFNs together (0: no limit)",
               check=_nonnegative),
        Option("state", str, "", "a conversion saved by samples/blockffn (routers and expert orders): "
               "apply it instead of training"),
        Option("seed", int, 0, "seed of the clustering and the training batches"),
        Option("min_cls", float, BREAK_EVEN_CLS, "an FFN whose CLS(chunk) on the calibration text is below this "
               "keeps ORT's dense kernels (0: every FFN on RoutedFFN)", check=in_range(0.0, 1.0)),
    )
    needs = "calibration"
    emits = (f"{DOMAIN}::RoutedFFN",)
    targets = ("x86",)

    def settings(self) -> convert.Settings:
        from . import convert

        return convert.Settings(experts=self.experts, chunk=self.chunk, sparsity=self.sparsity, steps=self.steps,
                                lr=self.lr, locality=self.locality, time_budget_s=self.time_budget, seed=self.seed)

    def transform_module(self, module, ctx):
        import torch

        from . import checkpoint, convert

        torch.manual_seed(self.seed)
        batches = ctx.calibration_inputs()
        module.eval()
        self.layers = checkpoint.trained_layers(module)
        self.trained = bool(self.layers)
        if self.trained:
            if self.state or self.experts:
                raise EdgesparseError("blockffn: the model is a trained BlockFFN checkpoint: its experts and routers "
                                      "are used as trained, so the conversion options state/experts do not apply")
            source = getattr(module, "calibration_source", "given")
            ctx.log(f"[blockffn] trained BlockFFN checkpoint: {len(self.layers)} FFNs used as they are")
            ctx.report("checkpoint", {"ffns": len(self.layers), "calibration": source})
            if source == "random token ids":
                ctx.warn("calibrated on random token ids (the checkpoint has no tokenizer that loads "
                         "offline): the sparsity report and the dense/RoutedFFN choice do not reflect real text; "
                         "pass calibration=... to checkpoint_factory")
        elif self.state:
            self.layers = convert.load(module, self.state)
        else:
            self.layers = convert.convert(module, batches, self.settings(), ctx.log)
        routes = convert.measure(module, self.layers, batches)
        per_layer = []
        for layer, r in zip(self.layers, routes):
            row = {"name": layer.site.name, "experts": int(layer.router.weight.shape[0]), **convert.sparsity_report(r)}
            if "trained" in layer.report:
                row["relative_mse_teacher_forced"] = layer.report["trained"]["relative_mse"]
                row["train_steps"] = layer.report.get("steps")
            per_layer.append(row)
        self.layer_cls = [convert.chunk_sparsity(r, self.chunk) for r in routes]
        mean = lambda key: round(sum(row[key] for row in per_layer) / len(per_layer), 4)
        ctx.report("sparsity", {"tls": mean("tls"), **{f"cls{s}": mean(f"cls{s}") for s in convert.CLS_SIZES},
                                "tokens": sum(q.shape[0] for q in routes[0])})
        ctx.report("layers", per_layer)
        ctx.report("ffn_flops", {f"chunk{s}": convert.ffn_flops(self.layers, routes, s) for s in convert.CLS_SIZES})
        achieved = mean(f"cls{self.chunk}") if self.chunk in convert.CLS_SIZES else None
        if not self.trained and achieved is not None and achieved < self.sparsity - 0.05:
            ctx.warn(f"CLS({self.chunk}) on the calibration text is {achieved:.3f}, below the target {self.sparsity}: "
                     "train longer (steps, time_budget) or give more calibration text")
        return module

    def rewrite_graph(self, model, ctx) -> None:
        from . import rewrite

        layers = getattr(self, "layers", None)
        if not layers:
            raise EdgesparseError("blockffn: the ONNX stage needs the torch stage of the same build (a model.py:build factory)")
        chosen, dense, unfit = [], [], []
        for layer, cls in zip(layers, self.layer_cls):
            site = layer.site
            if (site.hidden // layer.router.weight.shape[0]) % 4 or site.down.out_features % 4:
                unfit.append(layer)  # a trained checkpoint may have any expert size; the kernel's panels need 4s
            else:
                (chosen if cls >= self.min_cls else dense).append(layer)
        if unfit:
            ctx.warn(f"{len(unfit)} FFN(s) keep ORT's dense kernels: {rewrite.OP} needs an expert size and a model "
                     f"width that are multiples of 4 ({unfit[0].site.name}: expert size "
                     f"{unfit[0].site.hidden // unfit[0].router.weight.shape[0]}, width {unfit[0].site.down.out_features})")
        if dense:
            ctx.warn(f"{len(dense)} FFN(s) keep ORT's dense kernels (router and expert scaling as standard ops): their "
                     f"CLS({self.chunk}) on the calibration text is below {self.min_cls}, where {rewrite.OP} is not "
                     f"faster than dense ({', '.join(l.site.name for l in dense[:3])}{', ...' if len(dense) > 3 else ''})")
        names = rewrite.apply(model, chosen, self.chunk) if chosen else []
        dense += unfit
        ctx.log(f"[blockffn] {len(names)} FFNs -> router + {rewrite.OP} (chunk {self.chunk}), {len(dense)} left dense")
        ctx.report("nodes", names)
        ctx.report("dense_layers", [l.site.name for l in dense])


@hookimpl
def register_passes(register):
    register(BlockFFN)
