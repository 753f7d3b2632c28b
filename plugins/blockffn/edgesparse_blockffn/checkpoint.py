"""The authors' released BlockFFN checkpoint format (a directory with config.json and
*.safetensors, or the pytorch_model.bin their converter writes; the Hugging Face layout of their
MiniCPM-based code): reading it into model.BlockFFNForCausalLM with every problem refused in one
line, writing it back (save), and the pass's view of a loaded model's blocks (trained_layers).
factory.py turns a checkpoint into a build's model.

Format (config.json keys; the training-side spelling in parentheses is accepted too):
  ffn_type "block" (experts [E, S, D] / [E, D, S]) or "block_linear" ([E*S, D] / [D, E*S]);
  num_experts (num_expert), expert_size (dim_expert); expert_gated must be false (the released
  BlockMLP has no expert gate; ffn_gated only concerns dense FFNs and is ignored);
  hidden_act (ffn_activate_fn) silu | relu | gelu; router_act (router_activate_fn) relu;
  norm_after_router rms | sum | none; attention_type "mla" with q_lora_rank, kv_lora_rank,
  qk_nope_head_dim, qk_rope_head_dim (the value head is hidden_size / num_attention_heads, as in
  the released code); scale_emb, scale_depth, dim_model_base; rms_norm_eps, rope_theta,
  rope_scaling (none or linear), tie_word_embeddings, attention_bias. Missing keys take the
  defaults of the released configuration class.
Tensors (per layer i, under model.layers.i.): input_layernorm.weight, post_attention_layernorm.weight,
  self_attn.{q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj}.weight (+ .bias of
  q_a/kv_a/o with attention_bias), self_attn.{q_a_layernorm, kv_a_layernorm}.weight,
  mlp.router_proj.weight [E, D], mlp.router_norm.weight [E] (norm rms), mlp.up_proj, mlp.down_proj
  (no ".weight": plain parameters); and model.embed_tokens.weight, model.norm.weight,
  lm_head.weight (absent when tied).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgesparse import EdgesparseError

ACTS = ("silu", "relu", "gelu")
NORMS = ("rms", "sum", "none")
# Key defaults of the released configuration class (MiniCPMConfig) where a config.json is silent.
DEFAULTS = {"norm_after_router": "sum", "norm_scale": 1.0, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "scale_emb": 1.0, "scale_depth": 1.0, "dim_model_base": 1.0, "tie_word_embeddings": True,
            "attention_bias": False, "q_lora_rank": 768, "kv_lora_rank": 256, "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 32, "attention_type": "vanilla", "block_implementation": "torch",
            "pretraining_tp": 1}


def _fail(where: Path, problem: str):
    raise EdgesparseError(f"blockffn: checkpoint {where}: {problem}")


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        _fail(path, "not a directory (expected config.json and *.safetensors)")
    file = path / "config.json"
    if not file.is_file():
        _fail(path, "no config.json")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        _fail(path, f"config.json is not valid JSON ({type(exc).__name__})")
    if not isinstance(raw, dict):
        _fail(path, "config.json is not a JSON object")
    return raw


def parse_config(raw: dict, where: Path):
    """config.json -> model.Config, or a one-line EdgesparseError naming the problem."""
    from .model import Config

    def get(*names, default=None, required=False):
        for n in names:
            if n in raw:
                return raw[n]
        if required:
            _fail(where, f"config.json has no {' / '.join(names)}")
        return DEFAULTS.get(names[0], default)

    ffn_type = raw.get("ffn_type")
    if ffn_type not in ("block", "block_linear"):
        found = "has no ffn_type" if ffn_type is None else f"has ffn_type {ffn_type!r}"
        _fail(where, f"not a BlockFFN model: config.json {found} (a BlockFFN checkpoint has ffn_type \"block\")")
    if get("expert_gated", "expert_gated", default=False):
        _fail(where, "expert_gated is true: the released BlockFFN format has no expert gate weights")
    if get("block_implementation") not in ("torch", "kernel"):
        _fail(where, f"block_implementation {get('block_implementation')!r} stores its experts under other names "
                     "(supported: torch, kernel)")
    if get("pretraining_tp") != 1:
        _fail(where, "pretraining_tp > 1 is not supported (nor by the released BlockFFN code)")
    if get("attention_type") != "mla":
        _fail(where, f"attention_type {get('attention_type')!r} is not supported (the released BlockFFN models use \"mla\")")
    act = get("hidden_act", "ffn_activate_fn", default="silu")
    if act not in ACTS:
        _fail(where, f"expert activation {act!r} is not supported ({', '.join(ACTS)})")
    router_act = get("router_act", "router_activate_fn", default="relu")
    if router_act != "relu":
        _fail(where, f"router activation {router_act!r}: BlockFFN routers are ReLU (the zeros are the sparsity)")
    norm = get("norm_after_router")
    if norm not in NORMS:
        _fail(where, f"norm_after_router {norm!r} is not one of {', '.join(NORMS)}")
    scaling = raw.get("rope_scaling")
    factor = 1.0
    if scaling is not None:
        if not isinstance(scaling, dict) or scaling.get("type") != "linear":
            _fail(where, f"rope_scaling {scaling!r} is not supported (none, or type linear)")
        factor = float(scaling["factor"])
    ints = {}
    for key, names in {"vocab_size": ("vocab_size",), "hidden_size": ("hidden_size", "dim_model"),
                       "layers": ("num_hidden_layers", "num_layers"), "heads": ("num_attention_heads", "num_heads"),
                       "experts": ("num_experts", "num_expert"), "expert_size": ("expert_size", "dim_expert")}.items():
        ints[key] = get(*names, required=True)
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
        ints[key] = get(key)
    for key, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            _fail(where, f"config.json: {key} must be a positive integer, got {v!r}")
    if ints["hidden_size"] % ints["heads"]:
        _fail(where, f"hidden_size {ints['hidden_size']} is not a multiple of num_attention_heads {ints['heads']}")
    v_head = ints["hidden_size"] // ints["heads"]
    given_v = raw.get("v_head_dim")
    if given_v is not None and given_v != v_head:
        _fail(where, f"v_head_dim {given_v} disagrees with hidden_size / num_attention_heads = {v_head}, the value "
                     "head size of the released code")
    if ints["qk_rope_head_dim"] % 2:
        _fail(where, f"qk_rope_head_dim {ints['qk_rope_head_dim']} must be even (rotary embedding)")
    return Config(v_head_dim=v_head, hidden_act=act, norm_after_router=norm,
                  norm_scale=float(get("norm_scale")), rms_norm_eps=float(get("rms_norm_eps", "eps")),
                  rope_theta=float(get("rope_theta")), rope_linear_factor=factor,
                  scale_emb=float(get("scale_emb")), scale_depth=float(get("scale_depth")),
                  dim_model_base=float(get("dim_model_base")),
                  tie_word_embeddings=bool(get("tie_word_embeddings", "tie_lm_head")),
                  attention_bias=bool(get("attention_bias")), **ints)


def expected_tensors(cfg, ffn_type: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Released tensor name -> (shape, name in model.BlockFFNForCausalLM)."""
    d, h, e, s = cfg.hidden_size, cfg.heads, cfg.experts, cfg.expert_size
    nope, rope, v, ql, kvl = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    out = {"model.embed_tokens.weight": ((cfg.vocab_size, d), "embed_tokens.weight"),
           "model.norm.weight": ((d,), "norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((cfg.vocab_size, d), "lm_head.weight")
    blocked = ffn_type == "block"
    for i in range(cfg.layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        attn = {"q_a_proj.weight": (ql, d), "q_a_layernorm.weight": (ql,), "q_b_proj.weight": (h * (nope + rope), ql),
                "kv_a_proj_with_mqa.weight": (kvl + rope, d), "kv_a_layernorm.weight": (kvl,),
                "kv_b_proj.weight": (h * (nope + v), kvl), "o_proj.weight": (d, h * v)}
        if cfg.attention_bias:
            attn |= {"q_a_proj.bias": (ql,), "kv_a_proj_with_mqa.bias": (kvl + rope,), "o_proj.bias": (d,)}
        out |= {f"{p}self_attn.{k}": (shape, f"{q}self_attn.{k}") for k, shape in attn.items()}
        out[f"{p}input_layernorm.weight"] = ((d,), f"{q}input_layernorm.weight")
        out[f"{p}post_attention_layernorm.weight"] = ((d,), f"{q}post_attention_layernorm.weight")
        out[f"{p}mlp.router_proj.weight"] = ((e, d), f"{q}mlp.router.weight")
        if cfg.norm_after_router == "rms":
            out[f"{p}mlp.router_norm.weight"] = ((e,), f"{q}mlp.router.gain")
        out[f"{p}mlp.up_proj"] = ((e, s, d) if blocked else (e * s, d), f"{q}mlp.up.weight")
        out[f"{p}mlp.down_proj"] = ((e, d, s) if blocked else (d, e * s), f"{q}mlp.down.weight")
    return out


def _read_tensors(path: Path) -> dict:
    """All tensors of the checkpoint: *.safetensors (shards merged), else pytorch_model*.bin (the
    authors' converter writes that; read with weights_only, so no code runs)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        _fail(path, "no *.safetensors file (nor pytorch_model.bin)")
    tensors = {}
    for f in files:
        try:
            if f.suffix == ".bin":
                part = torch.load(str(f), map_location="cpu", weights_only=True)
                if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                    _fail(path, f"{f.name} does not hold a flat dict of tensors")
            else:
                part = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _fail(path, f"{f.name} is not a readable {'PyTorch' if f.suffix == '.bin' else 'safetensors'} file ({first})")
        clash = set(part) & set(tensors)
        if clash:
            _fail(path, f"tensor {sorted(clash)[0]} appears in more than one weights file")
        tensors |= part
    return tensors


def _to_model_layout(name: str, t, cfg, ffn_type: str):
    """The released expert layouts -> model.BlockMLP's Linear weights ([E*S, D] up, [D, E*S] down)."""
    if ffn_type == "block" and name.endswith("mlp.up_proj"):
        return t.reshape(cfg.experts * cfg.expert_size, cfg.hidden_size)
    if ffn_type == "block" and name.endswith("mlp.down_proj"):
        return t.permute(1, 0, 2).reshape(cfg.hidden_size, cfg.experts * cfg.expert_size)
    return t


def load(path) -> "BlockFFNForCausalLM":  # noqa: F821
    """A checkpoint directory -> model.BlockFFNForCausalLM (float32, eval mode). Refuses, in one
    line and before building anything, a config that is not BlockFFN or tensors that disagree with it."""
    import torch

    from .model import BlockFFNForCausalLM

    path = Path(path)
    raw = read_config(path)
    cfg = parse_config(raw, path)
    want = expected_tensors(cfg, raw["ffn_type"])
    tensors = _read_tensors(path)
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:  # some exports keep the tied copy: it must agree
        if not torch.equal(tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight", torch.empty(0))):
            _fail(path, "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    for name, (shape, _) in want.items():
        if name not in tensors:
            _fail(path, f"tensor {name} is missing (config.json: ffn_type {raw['ffn_type']}, "
                        f"norm_after_router {cfg.norm_after_router}, {cfg.layers} layers)")
        got = tuple(tensors[name].shape)
        if got != shape:
            _fail(path, f"tensor {name} has shape {list(got)}, config.json implies {list(shape)}")
        if not tensors[name].is_floating_point():
            _fail(path, f"tensor {name} is {tensors[name].dtype}, not floating point")
    extra = sorted(set(tensors) - set(want))
    if extra:
        _fail(path, f"unexpected tensor {extra[0]}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: "
                    "not part of a BlockFFN checkpoint of this config")
    module = BlockFFNForCausalLM(cfg)
    state = {ours: _to_model_layout(name, tensors[name].float(), cfg, raw["ffn_type"]) for name, (_, ours) in want.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if cfg.norm_after_router != "rms":  # no router_norm in the file: the gain is unused (kept at 1)
        state |= {f"layers.{i}.mlp.router.gain": torch.ones(cfg.experts) for i in range(cfg.layers)}
    module.load_state_dict(state, strict=True)
    return module.eval()


def save(module, path, extra: dict | None = None) -> Path:
    """model.BlockFFNForCausalLM -> a checkpoint directory in the released format (config.json with
    the released key names, ffn_type "block"; model.safetensors), which load() reads back."""
    from safetensors.torch import save_file

    cfg, path = module.config, Path(path)
    config = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "num_key_value_heads": cfg.heads, "attention_type": "mla", "q_lora_rank": cfg.q_lora_rank,
              "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
              "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "ffn_type": "block",
              "ffn_gated": False, "expert_gated": False, "hidden_act": cfg.hidden_act, "router_act": "relu",
              "num_experts": cfg.experts, "expert_size": cfg.expert_size, "norm_after_router": cfg.norm_after_router,
              "norm_scale": cfg.norm_scale, "block_implementation": "torch", "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": cfg.rope_theta,
              "rope_scaling": None if cfg.rope_linear_factor == 1 else {"type": "linear", "factor": cfg.rope_linear_factor},
              "scale_emb": cfg.scale_emb, "scale_depth": cfg.scale_depth, "dim_model_base": cfg.dim_model_base,
              "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
              "torch_dtype": "float32", **(extra or {})}
    state = module.state_dict()
    e, s, d = cfg.experts, cfg.expert_size, cfg.hidden_size
    tensors = {}
    for name, (_, ours) in expected_tensors(cfg, "block").items():
        t = state[ours].detach().float()
        if name.endswith("mlp.up_proj"):
            t = t.reshape(e, s, d)
        elif name.endswith("mlp.down_proj"):
            t = t.reshape(d, e, s).permute(1, 0, 2)
        tensors[name] = t.contiguous().clone()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"))
    return path


def trained_layers(module) -> list:
    """The BlockFFN blocks of a loaded checkpoint as the pass's convert.Layer records (router and
    experts as trained: identity expert order, nothing to convert); [] for any other model."""
    import torch

    from .convert import Layer
    from .ffn import FfnSite
    from .model import BlockMLP

    layers = []
    for name, m in module.named_modules():
        if isinstance(m, BlockMLP):
            site = FfnSite(name, m, "", m.up, None, m.down, m.activation)
            experts = m.router.weight.shape[0]
            layers.append(Layer(site, torch.arange(site.hidden), m.router,
                                {"name": name, "experts": experts, "expert_size": site.hidden // experts}))
    return layers
