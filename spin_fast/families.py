"""Per-family translation of a Hugging Face config.json into ModelConfig, and checkpoint tensor names.

One decoder (model.py) with options; each family here says which options its config means, exactly as the
installed transformers computes it (defaults of its config classes for keys a config.json may omit, both the
transformers-4 and -5 spellings). Anything we would compute differently is refused, naming the folder's
config.json and listing what is supported.

| model_type          | what it turns on                                                                  |
|---------------------|-----------------------------------------------------------------------------------|
| llama               | attention_bias (q/k/v/o), rope linear / llama3                                    |
| mistral             | sliding_window on every layer                                                     |
| qwen2               | q/k/v bias; use_sliding_window + layer_types / max_window_layers                  |
| qwen3               | qk_norm; attention_bias (q/k/v/o); sliding layers as qwen2                        |
| phi3                | fused qkv_proj / gate_up_proj in the checkpoint; sliding_window; longrope ("su")  |
| gemma2              | (1+w) norms, post norms, GeGLU, sqrt(hidden) embedding scale, query_pre_attn_scalar, |
|                     | attention + final logit soft-capping, alternating sliding layers                  |
| gemma3_text         | gemma2's without soft-capping, plus qk_norm and a local RoPE base for sliding layers |
"""
from __future__ import annotations

import math

import torch

from .errors import InputError
from .model import ACTIVATIONS, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope (phi3)")
GEMMA = ("gemma2", "gemma3_text")
# transformers' config-class defaults for keys a config.json may omit
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "phi3": 4096,
                         "gemma2": 8192, "gemma3_text": 131072}
DEFAULT_TIED = {"gemma2": True, "gemma3_text": True}             # every other family defaults to untied
# checkpoint tensors that are several of our parameters, stacked by rows (Phi-3): fused -> parts
FUSED = {"phi3": {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}}


def unsupported(source, what: str) -> InputError:
    return InputError(f"{source}: {what}. Supported: model_type in {SUPPORTED_MODEL_TYPES}, rope_type in "
                      f"{SUPPORTED_ROPE_TYPES}, hidden_act in {tuple(ACTIVATIONS)}, causal attention (full or "
                      f"sliding window), mlp_bias false, partial_rotary_factor 1.0")


def _rope(params: dict, source, hf: dict, head_dim: int, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from one rope parameter dict (transformers-5 `rope_parameters`, or
    the transformers-4 rope_theta + rope_scaling merged into one by the caller)."""
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":                   # the old name of longrope (transformers maps it the same way)
        rope_type = "longrope"
    if rope_type not in ("default", "linear", "llama3") and not (rope_type == "longrope" and hf["model_type"] == "phi3"):
        raise unsupported(source, f"rope_type {rope_type!r}")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise unsupported(source, "partial_rotary_factor != 1.0")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        if "factor" not in params:
            raise unsupported(source, "rope_scaling 'linear' without 'factor'")
        return float(theta), {"rope_type": "linear", "factor": float(params["factor"])}
    orig = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                 hf.get("max_position_embeddings")))
    if rope_type == "longrope":
        short = params.get("short_factor")
        if not isinstance(short, list) or len(short) != head_dim // 2 or orig is None:
            raise unsupported(source, f"rope_scaling 'longrope' needs short_factor of {head_dim // 2} numbers "
                                      f"and original_max_position_embeddings")
        # transformers: factor = max_pos / original unless given; attention factor sqrt(1 + ln f / ln original)
        factor = params.get("factor") or hf.get("max_position_embeddings", orig) / orig
        af = params.get("attention_factor")
        if af is None:
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return float(theta), {"rope_type": "longrope", "short_factor": [float(x) for x in short],
                              "attention_factor": float(af), "original_max_position_embeddings": int(orig)}
    need = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [k for k in need if k not in params]
    if missing:
        raise unsupported(source, f"rope_scaling 'llama3' is missing {missing}")
    return float(theta), {"rope_type": "llama3", **{k: float(params[k]) for k in need},
                          "original_max_position_embeddings": int(orig)}


def _windows(hf: dict, mt: str, n: int) -> list:
    """Per layer: None (full causal) or the sliding window, as transformers' attention modules decide."""
    sw = hf.get("sliding_window", 4096 if mt in ("mistral", *GEMMA) else None)
    if mt in ("mistral", "phi3"):                          # every layer, when set
        return [None if sw is None else int(sw)] * n
    if mt in ("qwen2", "qwen3"):
        sw = sw if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types") or ["sliding_attention" if sw is not None and i >= hf.get("max_window_layers",
                                          28) else "full_attention" for i in range(n)]
    elif mt in GEMMA:
        every = 2 if mt == "gemma2" else int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention"
                                          for i in range(n)]
    else:
        return [None] * n
    if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise InputError(f"layer_types must be {n} entries of 'sliding_attention' / 'full_attention', got {types!r}")
    return [int(sw) if t == "sliding_attention" and sw is not None else None for t in types]


def config_from_hf(hf: dict, source="config.json") -> ModelConfig:
    """Validate a Hugging Face config dict and translate it; `source` names the file in errors."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        hint = " (the multimodal Gemma 3; its text-only checkpoints are gemma3_text)" if mt == "gemma3" else ""
        raise unsupported(source, f"model_type {mt!r}{hint}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise InputError(f"{source}: field {key!r} must be a positive int, got {hf.get(key)!r}")
    gemma = mt in GEMMA
    act = hf.get("hidden_activation") or ("gelu_pytorch_tanh" if gemma else hf.get("hidden_act", "silu"))
    if act not in ACTIVATIONS:
        raise unsupported(source, f"hidden_act {act!r}")
    if hf.get("mlp_bias", False):
        raise unsupported(source, "mlp_bias true")
    if hf.get("use_bidirectional_attention"):
        raise unsupported(source, "use_bidirectional_attention true (not a causal LM)")
    if not gemma:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key):
                raise unsupported(source, f"{key}={hf[key]!r} for model_type {mt!r}")
    max_pos = int(hf.get("max_position_embeddings", DEFAULT_MAX_POSITIONS[mt]))
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    kv = hf.get("num_key_value_heads") or heads
    head_dim = int(hf.get("head_dim") or (256 if gemma else hf["hidden_size"] // heads))
    rp = dict(hf.get("rope_parameters") or {})
    local_theta = local_scaling = None
    if mt == "gemma3_text":   # per layer type: global (full) and local (sliding) RoPE
        if "full_attention" in rp:
            glob, loc = dict(rp["full_attention"] or {}), dict(rp.get("sliding_attention") or {})
        else:                 # transformers 4: rope_theta + rope_scaling (global), rope_local_base_freq
            glob = {"rope_theta": hf.get("rope_theta", 1e6), **dict(hf.get("rope_scaling") or {})}
            loc = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
        theta, scaling = _rope(glob, source, {**hf, "rope_theta": 1e6}, head_dim, 1e6)
        local_theta, local_scaling = _rope(loc, source, {**hf, "rope_theta": 1e4}, head_dim, 1e4)
    else:
        theta, scaling = _rope({**dict(hf.get("rope_scaling") or {}), **rp}, source, hf, head_dim, 10000.0)
    if scaling is not None and scaling["rope_type"] == "longrope":
        # only the short factors are implemented, exact up to the original context: the usable context is that
        max_pos = min(max_pos, scaling["original_max_position_embeddings"])
    bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=layers, num_heads=heads, num_kv_heads=int(kv), head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", DEFAULT_TIED.get(mt, False))),
            qkv_bias=mt == "qwen2" or bias, o_bias=mt != "qwen2" and bias,
            hidden_act=act, norm_plus_one=gemma, qk_norm=mt in ("qwen3", "gemma3_text"), post_norms=gemma,
            embed_scale=hf["hidden_size"] ** 0.5 if gemma else None,
            attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            attn_softcap=_opt_float(hf.get("attn_logit_softcapping", 50.0)) if mt == "gemma2" else None,
            final_softcap=_opt_float(hf.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None)),
            layer_windows=_windows(hf, mt, layers), local_rope_theta=local_theta, local_rope_scaling=local_scaling,
            model_type=mt, bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos, hf_config=dict(hf))
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def _opt_float(x):
    return None if x is None else float(x)


# ---- checkpoint tensor names ------------------------------------------------------------------------------

def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (ours are HF's minus the "model." prefix)."""
    return name if name.startswith("lm_head.") else "model." + name


def checkpoint_sources(cfg: ModelConfig, names) -> dict[str, tuple[str, int, int]]:
    """For each of our parameter names: (checkpoint tensor name, first row, end row) it is read from;
    rows (0, -1) = the whole tensor. Fused tensors (Phi-3) are split by rows: q | k | v and gate | up."""
    fused = FUSED.get(cfg.model_type, {})
    rows = {"self_attn.q_proj": cfg.num_heads * cfg.head_dim, "self_attn.k_proj": cfg.num_kv_heads * cfg.head_dim,
            "self_attn.v_proj": cfg.num_kv_heads * cfg.head_dim, "mlp.gate_proj": cfg.intermediate_size,
            "mlp.up_proj": cfg.intermediate_size}
    part_of = {p: (f, parts) for f, parts in fused.items() for p in parts}
    out = {}
    for name in names:
        prefix, _, rest = name.partition("layers.")
        layer, _, sub = rest.partition(".")
        mod, _, attr = sub.rpartition(".")
        if prefix == "" and mod in part_of:
            f, parts = part_of[mod]
            start = sum(rows[p] for p in parts[: parts.index(mod)])
            out[name] = (hf_name(f"layers.{layer}.{f}.{attr}"), start, start + rows[mod])
        else:
            out[name] = (hf_name(name), 0, -1)
    return out


def to_checkpoint(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our named tensors -> checkpoint-named ones, fusing back what the family stores fused (in order)."""
    out = {}
    srcs = checkpoint_sources(cfg, list(tensors))
    groups: dict[str, list] = {}
    for name, t in tensors.items():
        ck, start, end = srcs[name]
        if end == -1:
            out[ck] = t
        else:
            groups.setdefault(ck, []).append((start, t))
    for ck, parts in groups.items():
        out[ck] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    return out
