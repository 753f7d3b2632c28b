"""Build-time checks of the CoreInfer graphs: ORT against the torch reference engine, and what
CoreInfer costs in accuracy and saves in FLOPs on the calibration text."""
from __future__ import annotations

import math

import numpy as np
import torch

from .engine import Engine
from .settings import Settings


def _session(proto, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def engine_reproduces(lm, ids: torch.Tensor) -> float:
    """The engine's own layer loop with nothing pruned must give transformers' logits on a
    calibration prompt; a family it misreads stops the build here with one line."""
    from edgesparse import EdgesparseError

    want = lm(input_ids=ids).logits
    _, got = Engine(lm, Settings(keep=1.0)).prefill(lm.model.embed_tokens(ids), keep_logits=True)
    err = float((got - want).abs().max())
    if not err <= 1e-3 * max(1.0, float(want.abs().max())):
        raise EdgesparseError(f"corematching: its layer loop does not reproduce this {type(lm).__name__} (max logit "
                              f"difference {err:.3g} on the calibration prompt); it knows Llama, Mistral, Qwen2/3, "
                              "Gemma 2/3 and Phi-3 layouts")
    return err


@torch.no_grad()
def against_engine(lm, settings: Settings, prefill, decode, ids: torch.Tensor, steps: int, threads: int) -> dict:
    """Prefill a calibration prompt and greedily decode `steps` tokens in ORT and in the engine."""
    pre, dec = _session(prefill, threads), _session(decode, threads)
    names = [o.name for o in pre.get_outputs()]
    logits, keys, values, neurons, *weights = pre.run(None, {"input_ids": ids.numpy()})
    weights = dict(zip(names[4:], weights))
    engine = Engine(lm, settings)
    state, ref = engine.prefill(lm.model.embed_tokens(ids), keep_logits=True)
    errors = [float(np.abs(logits - ref.numpy()).max())]
    chosen = [n for n in state.neurons if n is not None]
    same_neurons = all(np.array_equal(neurons[i], n.numpy()) for i, n in enumerate(chosen))
    token = logits[:, -1:].argmax(-1).astype(np.int64)
    for _ in range(steps):
        logits, keys, values = dec.run(None, {"input_ids": token, "past_keys": keys, "past_values": values, **weights})
        ref = engine.decode(state, torch.tensor(token))
        errors.append(float(np.abs(logits - ref.numpy()).max()))
        token = logits[:, -1:].argmax(-1).astype(np.int64)
    return {"max_abs_error": max(errors), "max_abs_logit": float(np.abs(ref.numpy()).max()),
            "same_core_neurons": bool(same_neurons), "decode_steps": steps, "prompt_tokens": int(ids.shape[1])}


@torch.no_grad()
def calibration_quality(lm, settings: Settings, prompts: list[torch.Tensor]) -> dict:
    """Each prompt's first half picks the core neurons, its second half is scored in decode mode."""
    dense, core = Engine(lm, Settings(keep=1.0)), Engine(lm, settings)
    nll = {"dense": 0.0, "core": 0.0}
    count = 0
    report = None
    for ids in prompts:
        half = ids.shape[1] // 2
        if half < 2:
            continue
        head, tail = ids[:, :half], ids[:, half:]
        states = {}
        for name, engine in (("dense", dense), ("core", core)):
            state, last = engine.prefill(lm.model.embed_tokens(head))
            out = torch.cat([last[:, None], engine.decode(state, tail[:, :-1])], 1)
            nll[name] += float(torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tail.reshape(-1), reduction="sum"))
            states[name] = state
        count += tail.numel()
        report = core.report(states["core"], states["dense"])
    return {"tokens_scored": count,
            "perplexity_dense": round(math.exp(nll["dense"] / count), 4),
            "perplexity_coreinfer": round(math.exp(nll["core"] / count), 4),
            "decode_flops_reduction": report["flops_reduction"]["decode"],
            "layers": [{k: r[k] for k in ("layer", "neurons_kept", "decode_macs_vs_dense")} for r in report["layers"]]}


@torch.no_grad()
def matching_against_engine(lm, settings: Settings, prefill, decode, embeds: torch.Tensor, image_mask: torch.Tensor,
                            threads: int) -> tuple[dict, dict]:
    """The CoreMatching (VLM) graphs in ORT against the engine on one prompt given as embeddings:
    the tokens each layer keeps, the prefill logits and one decode step. Returns (check, engine report)."""
    pre, dec = _session(prefill, threads), _session(decode, threads)
    out = pre.run(None, {"inputs_embeds": embeds.numpy(), "image_mask": image_mask.numpy()})
    n = len(lm.model.layers)
    engine = Engine(lm, settings)
    state, last = engine.prefill(embeds, prunable=image_mask)
    kept_graph = [int(out[2 + 2 * i].shape[2]) for i in range(n)]
    kept_engine = [int(c.valid.sum()) for c in state.caches]
    token = np.array([[int(out[0][0].argmax())]], np.int64)
    names = [o.name for o in dec.get_inputs()]
    pasts = dict(zip([nm for nm in names if nm.startswith("past_")], out[2:2 + 2 * n]))
    weights = {o.name: v for o, v in zip(pre.get_outputs()[2 + 2 * n:], out[2 + 2 * n:])}
    step = dec.run(None, {"input_ids": token, "position": out[1], **pasts, **weights})
    ref_step = engine.decode(state, torch.tensor(token))
    errors = [float(np.abs(out[0] - last.numpy()).max()), float(np.abs(step[0] - ref_step.numpy()).max())]
    dense = Engine(lm, Settings(keep=1.0))
    dense_state, _ = dense.prefill(embeds)
    dense.decode(dense_state, torch.tensor(token))
    check = {"max_abs_error": max(errors), "max_abs_logit": float(np.abs(ref_step.numpy()).max()),
             "tokens_per_layer": kept_graph, "same_tokens_as_engine": kept_graph == kept_engine,
             "prompt_tokens": int(embeds.shape[1]), "image_tokens": int(image_mask.sum())}
    return check, engine.report(state, dense_state)
