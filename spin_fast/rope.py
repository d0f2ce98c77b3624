"""Rotary position embeddings: inverse frequencies (default, linear, llama3, Phi-3's longrope short factors),
cos/sin tables in fp32 as transformers computes them, and the rotate-half application (the HF q/k layout)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import ModelConfig


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies, with linear, llama3 or longrope scaling applied.
    local: those of the sliding-window layers (their own base / scaling where the config has one)."""
    d = cfg.head_dim
    theta, s = cfg.rope_theta, cfg.rope_scaling
    if local and cfg.local_rope_theta is not None:
        theta, s = cfg.local_rope_theta, cfg.local_rope_scaling
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))     # (D/2,)
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    if s["rope_type"] == "longrope":  # Phi-3: per-frequency divisors (the short set: context <= the original)
        return inv / torch.tensor(s["short_factor"], dtype=torch.float32)
    if s["rope_type"] == "llama3":  # Llama 3.1: long wavelengths slowed by `factor`, smooth blend between
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(mid, blended, scaled)
    raise ValueError(f"unsupported rope_type {s['rope_type']!r}")  # hf_io refuses these earlier


def rope_attention_factor(scaling: dict | None) -> float:
    """cos and sin are multiplied by this (longrope's attention factor; 1 otherwise)."""
    return float(scaling.get("attention_factor", 1.0)) if scaling else 1.0


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    """cos, sin: (N, D) for positions (N,), computed in fp32 like transformers, then cast."""
    # .float(): load_model keeps inv_freq fp32, but a model.to(bf16) would have cast the buffer
    freqs = position_ids.float()[:, None] * inv_freq.float()[None, :]                  # (N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                            # (N, D)
    if factor != 1.0:
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, D); rotate-half convention (the HF checkpoints' q/k layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)                                                 # (N, heads, D)
    return x * cos[:, None, :] + rot * sin[:, None, :]
