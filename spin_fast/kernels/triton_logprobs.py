"""Triton kernels for per-token log-probabilities of an LM head, without ever materialising the (N, V) logits.

Problem
-------
Given final hidden states ``hidden`` (N, H), the LM-head weight ``weight`` (V, H) and integer ``targets`` (N,),
compute for every token n

    z[n, v]       = sum_h hidden[n, h] * weight[v, h]                      (the logits, never stored)
    lse[n]        = log sum_v exp(z[n, v])
    token_logp[n] = z[n, t_n] - lse[n]          (0 where t_n == ignore_index)

and, in the backward pass, given any upstream gradient g[n] = dL/d token_logp[n],

    dL/dz[n, v]   = g[n] * (1[v == t_n] - p[n, v]),    p[n, v] = exp(z[n, v] - lse[n])   (softmax)
    dhidden       = dz @ weight             (N, H)
    dweight       = dz^T @ hidden           (V, H)

with g[n] := 0 on ignored rows, so they contribute nothing. At real sizes (N ~ 16k tokens, V ~ 128k, H ~ 4k) the
fp32 logits alone are 8 GiB, which is what this file avoids: extra memory is O(N) plus the fp32 accumulation
buffers of the gradients that are asked for.

Forward: split-V online logsumexp
---------------------------------
Program (i, k) of the grid (cdiv(N, BLOCK_N), V_SPLITS) owns tokens [i*BLOCK_N, (i+1)*BLOCK_N) and the k-th
contiguous range of vocabulary columns. It walks that range BLOCK_V columns at a time; for each tile it builds the
(BLOCK_N, BLOCK_V) logits tile with ``tl.dot`` over H in BLOCK_H steps (fp32 accumulation), then updates the
running row maximum m and rescaled sum s (the "online softmax" recurrence)

    m' = max(m, max_v z[:, v]),     s' = s * exp(m - m') + sum_v exp(z[:, v] - m')

so s * exp(m) == sum_v exp(z) over the columns seen so far, without overflow. The target logit is picked out of
the tile it falls in (a masked row sum; exactly one tile of one split contains it). Each program writes its
partial (m_k, s_k, target-logit_k) to (V_SPLITS, N) buffers, and a handful of device-side torch ops combine them:

    M = max_k m_k,   lse = M + log(sum_k s_k * exp(m_k - M)),   z_t = sum_k target-logit_k

Splitting V gives the GPU enough programs when N is small (a short batch would otherwise fill a few SMs only);
nothing is synchronised with the host and no atomics are used, so the result is deterministic.

Backward: recompute, two atomic-free kernels
--------------------------------------------
The logits tiles are recomputed from hidden and weight (cheaper than storing them) in two kernels, each of which
owns disjoint output rows, so neither needs atomics:

(a) dhidden, grid cdiv(N, BLOCK_N): the program for an N tile walks every V tile, recomputes z, forms
    dz = g * (onehot - exp(z - lse)) and, looping over H blocks, adds dz @ weight[v_tile, h_block] into its own rows
    of an fp32 (N, H) buffer (read-modify-write of rows only it touches).
(b) dweight, grid cdiv(V, BLOCK_V): the program for a V tile walks every N tile, recomputes z and dz and adds
    dz^T @ hidden[n_tile, h_block] into its own rows of an fp32 (V, H) buffer.

dz is cast to the input dtype before the second ``tl.dot`` (bf16/fp16 tensor cores; the same rounding the
Liger kernels and a bf16 autograd graph make), and accumulated in fp32; the buffers are cast to the input dtype at
the end. A kernel is skipped when its gradient is not needed, and a whole N tile whose upstream gradient is zero
(e.g. every token of it is a prompt token with target == ignore_index) is skipped inside the kernels.

Cost (multiply-adds counted as 2 FLOPs): forward 2*N*H*V (+ N*V exp); backward 4*N*H*V per gradient kernel
(recompute 2NHV + gradient matmul 2NHV; + N*V exp each), i.e. 8*N*H*V for both gradients, against 2NHV + 4NHV for a
naive implementation that stores the logits.

Precision and portability notes
-------------------------------
* All address arithmetic is int64 (program ids / aranges are cast before multiplying by strides): N*H and V*H
  exceed 2^31 at real sizes.
* fp32 inputs use ``input_precision="ieee"`` by default (TritonConfig.fp32_precision): Triton's default for fp32
  ``tl.dot`` is TF32, whose 10-bit mantissa would make the "fp32" path much less accurate than torch's fp32 matmul.
  "tf32x3" is a faster option with nearly fp32 accuracy.
* Under ``TRITON_INTERPRET=1`` (CPU tests), bf16 ``tl.dot`` is unreliable, so the constexpr ``UPCAST`` casts the dot
  operands to fp32 there; every load and store is masked because the interpreter does not check bounds.
* The kernels use only APIs present in Triton 3.6 (the target: H200, torch 2.11).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "TritonConfig",
    "TritonLinearLogprobs",
    "triton_logprobs_forward",
    "triton_logprobs_backward",
    "aot_compile",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch parameters shared by the three kernels.

    block_n / block_v / block_h: tile sizes over tokens, vocabulary and hidden dimension (each >= 16: tl.dot's
        minimum; powers of two). The default 64 x 128 logits tile with 64-wide H steps fits Hopper's wgmma and keeps
        the fp32 logits tile (32 KiB) plus the gradient tile in registers at 8 warps.
    num_warps / num_stages: passed to every launch; 3 stages software-pipeline the H loop's loads.
    v_splits: how many programs share one N tile's vocabulary in the forward. None = choose on the device so that
        roughly two programs per SM are launched (splits only matter when N / block_n is small).
    fp32_precision: tl.dot input_precision for fp32 inputs ("ieee", "tf32x3" or "tf32"); ignored for bf16/fp16.
    upcast: cast tl.dot operands to fp32 (needed under TRITON_INTERPRET=1, where bf16 dots are unreliable).
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    v_splits: Optional[int] = None
    fp32_precision: str = "ieee"
    upcast: bool = False

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.v_splits is not None and self.v_splits < 1:
            raise ValueError(f"TritonConfig.v_splits must be None or >= 1, got {self.v_splits}")
        if self.fp32_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"TritonConfig.fp32_precision must be ieee, tf32x3 or tf32, got {self.fp32_precision!r}")

    @classmethod
    def for_hopper(cls) -> "TritonConfig":
        """The default for H100/H200 (sm_90); also a reasonable choice on sm_80."""
        return cls()

    @classmethod
    def for_interpreter(cls) -> "TritonConfig":
        """Small tiles for TRITON_INTERPRET=1 on CPU: 16 is tl.dot's minimum; 2 V splits exercise the combine."""
        return cls(block_n=16, block_v=16, block_h=16, num_warps=4, num_stages=1, v_splits=2, upcast=True)

    @classmethod
    def default(cls) -> "TritonConfig":
        """for_interpreter() when TRITON_INTERPRET=1, else the Hopper default."""
        return cls.for_interpreter() if _interpreting() else cls.for_hopper()


def _resolve_config(config: Optional[TritonConfig]) -> TritonConfig:
    if config is None:
        return TritonConfig.default()
    if _interpreting() and not config.upcast:
        # An explicit GPU config under the interpreter still needs fp32 dot operands to be correct.
        return replace(config, upcast=True)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr,
    offs_n, mask_n,          # (BLOCK_N,) int64 token rows and their validity
    offs_v, mask_v,          # (BLOCK_V,) int64 vocabulary rows and their validity
    H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """z = hidden[offs_n, :] @ weight[offs_v, :]^T as a (BLOCK_N, BLOCK_V) fp32 tile (0 in masked rows/cols)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)                     # (BLOCK_N, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)                                           # (BLOCK_H,)
    x_row = hidden_ptr + offs_n[:, None] * stride_hn                         # (BLOCK_N, 1) int64 offsets
    w_col = weight_ptr + offs_v[None, :] * stride_wv                         # (1, BLOCK_V)
    for h0 in range(0, H, BLOCK_H):
        cur_h = h0 + offs_h                                                  # (BLOCK_H,)
        mask_h = cur_h < H
        # Masked-out entries load as 0, so padded rows / columns / the H tail add nothing to the dot.
        x = tl.load(x_row + cur_h[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)   # (BLOCK_N, BLOCK_H)
        # weight[v_tile, h_block] read transposed, i.e. as the (K, N) = (BLOCK_H, BLOCK_V) operand of the dot.
        w = tl.load(w_col + cur_h[:, None], mask=mask_h[:, None] & mask_v[None, :], other=0.0)   # (BLOCK_H, BLOCK_V)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): never overflows, absolute error ~1e-7 in fp32.
    (libdevice's tanh would be one instruction on the GPU but does not exist in the interpreter.)"""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _softcap_tile(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """Gemma 2's soft-capped logits z' = c tanh(z / c) (identity without HAS_SOFTCAP)."""
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _softcap_grad(dz, z, softcap, HAS_SOFTCAP: tl.constexpr):
    """dL/dz = dL/dz' * (1 - (z'/c)^2) from the capped logits z' (identity without HAS_SOFTCAP)."""
    if HAS_SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def _logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_tgt_ptr,        # (V_SPLITS, N) fp32 each
    N, V, H, stride_hn, stride_wv, v_per_split, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)   # (BLOCK_N,)
    mask_n = offs_n < N
    # -1 for padding rows: never equal to a column index, so they pick no target logit.
    tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)                     # (BLOCK_N,) int64

    # This program's vocabulary range [v_lo, v_hi). The launcher guarantees it is non-empty.
    v_lo = pid_s.to(tl.int64) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)    # running max        (BLOCK_N,)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)                  # sum exp(z - m_i)    (BLOCK_N,)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)                  # target logit        (BLOCK_N,)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)                           # (BLOCK_V,)
        mask_v = offs_v < v_hi
        z = _logits_tile(hidden_ptr, weight_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION)      # (BLOCK_N, BLOCK_V)
        z = _softcap_tile(z, softcap, HAS_SOFTCAP)
        # Columns outside the range must not enter the softmax: exp(-inf) = 0. Every tile has >= 1 valid column,
        # so m_new is finite and exp(m_i - m_new) never sees (-inf) - (-inf).
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))                                 # (BLOCK_N,)
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        hit = offs_v[None, :] == tgt[:, None]                                      # (BLOCK_N, BLOCK_V)
        t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * N + offs_n                                          # row pid_s of (V_SPLITS, N)
    tl.store(part_max_ptr + out, m_i, mask=mask_n)
    tl.store(part_sum_ptr + out, s_i, mask=mask_n)
    tl.store(part_tgt_ptr + out, t_i, mask=mask_n)


@triton.jit
def _dlogits_tile(z, offs_v, mask_v, tgt, lse, g):
    """dz = g * (onehot(tgt) - exp(z - lse)) for a (BLOCK_N, BLOCK_V) fp32 logits tile; 0 in masked columns."""
    p = tl.exp(z - lse[:, None])                                                   # softmax, (BLOCK_N, BLOCK_V)
    onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - p)
    # Padded columns hold z = 0, i.e. p = exp(-lse) != 0: they must not leak into the gradients.
    return tl.where(mask_v[None, :], dz, 0.0)


@triton.jit
def _accumulate_rows(
    out_ptr, out_rows, out_mask,     # (R,) int64 rows of the fp32 (., H) output this program owns, and validity
    stride_out,
    lhs,                             # (R, K) the gradient tile (dz or dz^T), already in the dot's operand dtype
    src_ptr, src_rows, src_mask,     # (K,) rows of the (., H) input the tile multiplies (weight or hidden)
    stride_src, H,
    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out[out_rows, :] += lhs @ src[src_rows, :], H in BLOCK_H steps, fp32 read-modify-write.

    Only the calling program touches these output rows, so the read-modify-write needs no atomics.
    """
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        cur_h = h0 + offs_h                                                        # (BLOCK_H,)
        mask_h = cur_h < H
        src = tl.load(src_ptr + src_rows[:, None] * stride_src + cur_h[None, :],
                      mask=src_mask[:, None] & mask_h[None, :], other=0.0)         # (K, BLOCK_H)
        if UPCAST:
            src = src.to(tl.float32)
        d_ptrs = out_ptr + out_rows[:, None] * stride_out + cur_h[None, :]
        d_mask = out_mask[:, None] & mask_h[None, :]
        acc = tl.load(d_ptrs, mask=d_mask, other=0.0)                              # (R, BLOCK_H) fp32
        acc = tl.dot(lhs, src, acc, input_precision=INPUT_PRECISION)
        tl.store(d_ptrs, acc, mask=d_mask)


@triton.jit
def _load_token_rows(targets_ptr, lse_ptr, grad_ptr, offs_n, mask_n, ignore_index):
    """Per-token target (-1 on padding rows), lse and upstream gradient (0 on ignored and padding rows)."""
    tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)                     # (BLOCK_N,) int64
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)                        # (BLOCK_N,) fp32
    g = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)                         # (BLOCK_N,) fp32
    g = tl.where(tgt == ignore_index, 0.0, g)
    return tgt, lse, g


@triton.jit
def _logprobs_bwd_dhidden_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_ptr,
    dhidden_ptr,                                     # (N, H) fp32 accumulation buffer, zero-initialised
    N, V, H, stride_hn, stride_wv, stride_dn, ignore_index, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)   # (BLOCK_N,)
    mask_n = offs_n < N
    tgt, lse, g = _load_token_rows(targets_ptr, lse_ptr, grad_ptr, offs_n, mask_n, ignore_index)

    # A tile with no gradient at all (a run of prompt tokens) keeps its zero-initialised rows: skip ~4NHV/N_tiles.
    if tl.max(tl.abs(g), axis=0) > 0.0:
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)                       # (BLOCK_V,)
            mask_v = offs_v < V
            z = _logits_tile(hidden_ptr, weight_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_hn, stride_wv,
                             BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION)  # (BLOCK_N, BLOCK_V)
            z = _softcap_tile(z, softcap, HAS_SOFTCAP)
            dz = _dlogits_tile(z, offs_v, mask_v, tgt, lse, g)                     # (BLOCK_N, BLOCK_V) fp32
            dz = _softcap_grad(dz, z, softcap, HAS_SOFTCAP)
            if not UPCAST:
                dz = dz.to(weight_ptr.dtype.element_ty)    # bf16/fp16 tensor cores for the gradient matmul
            # dhidden[n_tile, :] += dz @ weight[v_tile, :]
            _accumulate_rows(dhidden_ptr, offs_n, mask_n, stride_dn, dz, weight_ptr, offs_v, mask_v, stride_wv, H,
                             BLOCK_H, UPCAST, INPUT_PRECISION)


@triton.jit
def _logprobs_bwd_dweight_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_ptr,
    dweight_ptr,                                     # (V, H) fp32 accumulation buffer, zero-initialised
    N, V, H, stride_hn, stride_wv, stride_dv, ignore_index, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)   # (BLOCK_V,)
    mask_v = offs_v < V
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)                           # (BLOCK_N,)
        mask_n = offs_n < N
        tgt, lse, g = _load_token_rows(targets_ptr, lse_ptr, grad_ptr, offs_n, mask_n, ignore_index)
        if tl.max(tl.abs(g), axis=0) > 0.0:          # an all-ignored N tile adds nothing to dweight
            z = _logits_tile(hidden_ptr, weight_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_hn, stride_wv,
                             BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION)  # (BLOCK_N, BLOCK_V)
            z = _softcap_tile(z, softcap, HAS_SOFTCAP)
            dz = _dlogits_tile(z, offs_v, mask_v, tgt, lse, g)                     # (BLOCK_N, BLOCK_V) fp32
            dz = _softcap_grad(dz, z, softcap, HAS_SOFTCAP)
            if not UPCAST:
                dz = dz.to(hidden_ptr.dtype.element_ty)
            # dweight[v_tile, :] += dz^T @ hidden[n_tile, :]
            _accumulate_rows(dweight_ptr, offs_v, mask_v, stride_dv, tl.trans(dz), hidden_ptr, offs_n, mask_n,
                             stride_hn, H, BLOCK_H, UPCAST, INPUT_PRECISION)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def _input_precision(dtype: torch.dtype, config: TritonConfig) -> str:
    # Only consulted by Triton for fp32 operands (and for the fp32 dz of the fp32 path).
    return config.fp32_precision if dtype == torch.float32 else "ieee"


class _on_device:
    """Launch on the tensors' CUDA device (Triton launches on torch's current device/stream); no-op on CPU."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _softcap_arg(softcap: Optional[float]) -> float:
    # The kernels read it only when HAS_SOFTCAP; 1.0 keeps the fp32 argument well defined otherwise.
    return 1.0 if softcap is None else float(softcap)


def _num_v_splits(n_tiles: int, v_tiles: int, device: torch.device, config: TritonConfig) -> int:
    if config.v_splits is not None:
        return max(1, min(config.v_splits, v_tiles))
    if device.type == "cuda":
        # Cached by torch after the first call; no synchronisation.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(v_tiles, triton.cdiv(2 * sms, n_tiles)))
    return 1


def triton_logprobs_forward(hidden, weight, targets, ignore_index: int = -100, config: "TritonConfig|None" = None,
                            softcap: Optional[float] = None):
    """hidden (N,H) fp32/bf16/fp16 contiguous, weight (V,H) same dtype, targets (N,) int64.
    Returns (token_logps (N,) fp32, lse (N,) fp32): log softmax(hidden @ weight.T)[target], 0 where target==ignore_index.
    softcap = c: the logits are c * tanh(z / c) (Gemma 2). Never materialises (N,V)."""
    config = _resolve_config(config)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone()

    n_tiles = triton.cdiv(N, config.block_n)
    v_tiles = triton.cdiv(V, config.block_v)
    splits = _num_v_splits(n_tiles, v_tiles, device, config)
    # Whole tiles per split, then drop splits that would be empty, so every program has >= 1 valid column.
    v_per_split = triton.cdiv(v_tiles, splits) * config.block_v
    splits = triton.cdiv(V, v_per_split)

    part_max = torch.empty((splits, N), dtype=torch.float32, device=device)   # (V_SPLITS, N)
    part_sum = torch.empty((splits, N), dtype=torch.float32, device=device)   # (V_SPLITS, N)
    part_tgt = torch.empty((splits, N), dtype=torch.float32, device=device)   # (V_SPLITS, N)
    with _on_device(device):
        _logprobs_fwd_kernel[(n_tiles, splits)](
            hidden, weight, targets, part_max, part_sum, part_tgt,
            N, V, H, hidden.stride(0), weight.stride(0), v_per_split, _softcap_arg(softcap),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h,
            UPCAST=config.upcast, INPUT_PRECISION=_input_precision(hidden.dtype, config),
            HAS_SOFTCAP=softcap is not None, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    if splits == 1:
        lse = part_max[0] + torch.log(part_sum[0])                                # (N,)
        target_logit = part_tgt[0]                                                # (N,)
    else:
        # Combine split partials: s_k * exp(m_k) are partial sums of exp(z); rescale them to the common max M.
        m = part_max.max(dim=0).values                                            # (N,)
        lse = m + torch.log((part_sum * torch.exp(part_max - m)).sum(dim=0))      # (N,)
        target_logit = part_tgt.sum(dim=0)                                        # (N,) one non-zero split
    token_logps = torch.where(targets != ignore_index, target_logit - lse, 0.0)  # (N,) fp32
    return token_logps, lse


def triton_logprobs_backward(hidden, weight, targets, lse, grad_token, ignore_index=-100, need_hidden_grad=True,
                             need_weight_grad=True, config=None, softcap=None):
    """grad_token (N,) fp32: upstream dL/d token_logp (arbitrary per token). Returns (dhidden or None, dweight or None)
    in hidden's / weight's dtype. dL/dlogits[n,v] = grad_token[n] * (1[v==target_n] - exp(logit[n,v] - lse[n])), zero rows
    where target==ignore_index. dhidden = dlogits @ weight, dweight = dlogits.T @ hidden, both accumulated in fp32."""
    config = _resolve_config(config)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    lse = lse.contiguous().to(torch.float32)
    grad_token = grad_token.contiguous().to(torch.float32)
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    meta = dict(
        BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h,
        UPCAST=config.upcast, INPUT_PRECISION=_input_precision(hidden.dtype, config),
        HAS_SOFTCAP=softcap is not None, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    dhidden = dweight = None
    with _on_device(device):
        if need_hidden_grad:
            dh = torch.zeros((N, H), dtype=torch.float32, device=device)            # (N, H) fp32 accumulator
            if N > 0:
                _logprobs_bwd_dhidden_kernel[(triton.cdiv(N, config.block_n),)](
                    hidden, weight, targets, lse, grad_token, dh,
                    N, V, H, hidden.stride(0), weight.stride(0), dh.stride(0), ignore_index, _softcap_arg(softcap),
                    **meta,
                )
            dhidden = dh.to(hidden.dtype)
        if need_weight_grad:
            dw = torch.zeros((V, H), dtype=torch.float32, device=device)            # (V, H) fp32 accumulator
            if N > 0:
                _logprobs_bwd_dweight_kernel[(triton.cdiv(V, config.block_v),)](
                    hidden, weight, targets, lse, grad_token, dw,
                    N, V, H, hidden.stride(0), weight.stride(0), dw.stride(0), ignore_index, _softcap_arg(softcap),
                    **meta,
                )
            dweight = dw.to(weight.dtype)
    return dhidden, dweight


class TritonLinearLogprobs(torch.autograd.Function):
    """token_logps = log softmax(hidden @ weight.T)[targets] with the Triton kernels; O(N) saved state.

    forward(ctx, hidden (N,H), weight (V,H), targets (N,) int64, ignore_index=-100, config=None, softcap=None)
    -> (N,) fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index=-100, config=None, softcap=None):
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        targets = targets.contiguous()
        token_logps, lse = triton_logprobs_forward(hidden, weight, targets, ignore_index, config, softcap)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.config = config
        ctx.softcap = softcap
        return token_logps

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, lse = ctx.saved_tensors
        dhidden, dweight = triton_logprobs_backward(
            hidden, weight, targets, lse, grad_output, ctx.ignore_index,
            need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1], config=ctx.config,
            softcap=ctx.softcap,
        )
        return dhidden, dweight, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): proves the kernels lower to PTX/cubin for sm_80 / sm_90.
# ----------------------------------------------------------------------------------------------------------------

_KERNELS = {
    "_logprobs_fwd_kernel": _logprobs_fwd_kernel,
    "_logprobs_bwd_dhidden_kernel": _logprobs_bwd_dhidden_kernel,
    "_logprobs_bwd_dweight_kernel": _logprobs_bwd_dweight_kernel,
}
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}   # opt-in max dynamic smem per block, bytes
# (input dtype, soft-capped logits): both dtypes plain, and bf16 with Gemma 2's soft-capping.
_AOT_VARIANTS = (("fp32", False), ("bf16", False), ("bf16", True))


def _aot_signature(name: str, dtype: str) -> dict:
    p = f"*{dtype}"
    if name == "_logprobs_fwd_kernel":
        return {"hidden_ptr": p, "weight_ptr": p, "targets_ptr": "*i64",
                "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_tgt_ptr": "*fp32",
                "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "v_per_split": "i32",
                "softcap": "fp32"}
    stride_out = "stride_dn" if name == "_logprobs_bwd_dhidden_kernel" else "stride_dv"
    out = "dhidden_ptr" if name == "_logprobs_bwd_dhidden_kernel" else "dweight_ptr"
    return {"hidden_ptr": p, "weight_ptr": p, "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
            out: "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32",
            stride_out: "i32", "ignore_index": "i32", "softcap": "fp32"}


def _aot_compile_report(capability: int, config: Optional[TritonConfig] = None) -> list:
    """Compile in this process (kernels must be JITFunctions, i.e. TRITON_INTERPRET unset at import)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = config or TritonConfig.for_hopper()
    target = GPUTarget("cuda", capability, 32)
    report = []
    for name, kernel in _KERNELS.items():
        for dtype, softcap in _AOT_VARIANTS:
            constexprs = {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_H": config.block_h,
                          "UPCAST": False, "INPUT_PRECISION": config.fp32_precision if dtype == "fp32" else "ieee",
                          "HAS_SOFTCAP": softcap}
            signature = _aot_signature(name, dtype)
            # What the JIT specialises at real shapes (H = 4096, 16-byte aligned torch allocations): pointers and
            # H / row strides divisible by 16. Without it the loads cannot become cp.async and are not pipelined.
            attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items())
                     if ty.startswith("*") or arg == "H" or arg.startswith("stride")}
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            shared = int(compiled.metadata.shared)
            limit = _SHARED_LIMIT.get(capability)
            if limit is not None and shared > limit:
                raise RuntimeError(f"{name}[{dtype}] needs {shared} B of shared memory on sm_{capability} "
                                   f"(limit {limit} B) with {config}")
            report.append({"name": f"{name}[{dtype}{',softcap' if softcap else ''}]", "shared": shared})
    return report


def aot_compile(capability: int) -> list[str]:
    """Compile every kernel of this file ahead of time for sm_{capability} (80, 90) for fp32 and bf16 inputs, no GPU
    needed: triton.compile(ASTSource(fn=kernel, signature={...}, constexprs={...}), target=GPUTarget("cuda", cap, 32)).
    Returns the names compiled. (Tested by tests/test_triton_aot.py for 80 and 90.)

    Uses the default (Hopper) TritonConfig and raises if a kernel needs more shared memory than the architecture
    allows. Under TRITON_INTERPRET=1 the kernels of this module are interpreter objects that cannot be compiled, so
    the compilation then runs in a fresh Python process with the interpreter switched off.
    """
    return [entry["name"] for entry in _aot_compile_report_anywhere(capability)]


def _aot_compile_report_anywhere(capability: int) -> list:
    if all(isinstance(k, triton.runtime.JITFunction) for k in _KERNELS.values()):
        return _aot_compile_report(int(capability))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from spin_fast.kernels import triton_logprobs as m; "
            f"sys.stdout.write('\\n' + json.dumps(m._aot_compile_report({int(capability)})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation for sm_{capability} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
