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

Backward: one pass, each logits tile recomputed once (Cut Cross-Entropy's scheme)
---------------------------------------------------------------------------------
One kernel, one program per (token tile, vocabulary tile), launched on a 1-D grid in a grouped order (GROUP_N token
tiles walk the vocabulary together, so a weight tile is read from HBM once per group and from L2 after, as in
Triton's grouped matmul). A program recomputes its logits tile z once (the lse saved by the forward is all it needs:
O(N) state), forms

    dz = g * (onehot - exp(z - lse))            (times 1 - (z'/c)^2 with soft-capping; g = 0 on ignored rows)

and, looping over H blocks, adds both gradient products straight from that tile:

    dhidden[n_tile, h] += dz @ weight[v_tile, h]          (BLOCK_N, BLOCK_H)
    dweight[v_tile, h] += dz^T @ hidden[n_tile, h]        (BLOCK_V, BLOCK_H)

Reduction across programs: fp32 ``tl.atomic_add`` (relaxed) into zero-initialised (N, H) / (V, H) buffers. Why
atomics and not split-K partial buffers: every dhidden row receives a contribution from each of the cdiv(V, BLOCK_V)
vocabulary tiles (1000 at V = 128k), so partials would need (V/BLOCK_V) x N x H floats, far beyond the O(N) extra
memory we promise; locks would serialise the programs of a row. Atomics resolve in L2, need no extra memory, and
their cost (N*H*V/BLOCK_V + V*H*N/BLOCK_N fp32 adds) is independent of the matmul shape. The price: the order of
the fp32 additions, hence the last bits of the gradients, is not deterministic run to run.

Gradient filtering (CCE): a tile whose max |dz| is <= filter_eps * max |g| (relative to the largest possible
|dz| of its rows, |g|) skips both gradient matmuls. Dropped per element: |d dhidden[n, h]| <= eps max|g| sum_v
|W[v, h]| over the skipped tiles (likewise dweight), a bound tested exactly. Default eps = 0: only tiles whose
gradient is exactly zero are skipped (e.g. a token tile of prompt tokens, which skips the recompute too). CCE's bf16
eps = 2^-12 (FILTER_BF16) is opt-in: on peaky softmaxes, where the gradient of a row is itself ~(1 - p_target) and
the dropped tail is of that order, it fails the elementwise criterion against torch bf16. An optional int32
counter buffer records [tiles skipped with g == 0, tiles filtered] for tests and the benchmark.

Cost (multiply-adds counted as 2 FLOPs): forward 2*N*H*V (+ N*V exp); backward 6*N*H*V (recompute 2NHV + dhidden
2NHV + dweight 2NHV), i.e. 8*N*H*V for forward + backward against 6NHV for an implementation that stores the
(N, V) logits (the only way to skip the recompute; O(N*V) memory). Filtered tiles save 4NHV x their fraction.

Precision and portability notes
-------------------------------
* All address arithmetic is int64 (program ids / aranges are cast before multiplying by strides): N*H and V*H
  exceed 2^31 at real sizes.
* fp32 inputs use ``input_precision="ieee"`` by default (TritonConfig.fp32_precision): Triton's default for fp32
  ``tl.dot`` is TF32, whose 10-bit mantissa would make the "fp32" path much less accurate than torch's fp32 matmul.
  "tf32x3" is a faster option with nearly fp32 accuracy.
* Under ``TRITON_INTERPRET=1`` (CPU tests) the constexpr ``UPCAST`` casts the dot operands to fp32 (see
  TritonConfig.upcast for why); the bf16 rounding of dz before the gradient matmuls is still applied, so the bf16
  branch's numerics are exercised. The interpreter does not check bounds: every load/store outside a tile is masked.
* ``@triton.heuristics`` sets EVEN_N / EVEN_V / EVEN_H when N, V, H are multiples of the blocks, which drops the
  masks of the 2-D loads and atomics (the common case at real sizes: V = 32000, 128256; H = 4096).
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

FILTER_BF16 = 2.0 ** -12    # Cut Cross-Entropy's gradient-filter threshold for bf16 (opt-in: TritonConfig.grad_filter)


@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch parameters shared by the kernels.

    block_n / block_v / block_h: tile sizes over tokens, vocabulary and hidden dimension (each >= 16: tl.dot's
        minimum; powers of two). The default 64 x 128 logits tile with 64-wide H steps fits Hopper's wgmma and keeps
        the fp32 logits tile (32 KiB) plus the gradient tile in registers at 8 warps.
    num_warps / num_stages: passed to every launch; 3 stages software-pipeline the H loop's loads.
    v_splits: how many programs share one N tile's vocabulary in the forward. None = choose on the device so that
        roughly two programs per SM are launched (splits only matter when N / block_n is small).
    group_n: token tiles per group of the backward's grouped launch order (weight tiles reused from L2).
    grad_filter: CCE's gradient filtering threshold eps, relative to the tile's max |upstream gradient| g: a
        backward tile with max |dz| <= eps * max |g| skips its two gradient matmuls. 0 (default) skips only tiles
        whose gradient is exactly zero (all-ignored token tiles): exact. CCE's bf16 value is 2^-12 (FILTER_BF16).
        What is dropped is bounded elementwise by |d dhidden[n, h]| <= eps * max|g| * sum_v |weight[v, h]| (and
        likewise for dweight), but on peaky softmaxes it fails our elementwise criterion against torch bf16 (errors
        20-800x torch's on the dropped tail, tests/test_triton_interpret.py), so it is opt-in.
    fp32_precision: tl.dot input_precision for fp32 inputs ("ieee", "tf32x3" or "tf32"); ignored for bf16/fp16.
    upcast: cast tl.dot operands to fp32. Needed under TRITON_INTERPRET=1: the interpreter (triton 3.6 and 3.9) holds
        bf16 tensors as raw 16-bit integers in numpy, and its tl.dot multiplies those bits (errors ~1e10 on randn
        inputs); loads, casts and the elementwise maths of bf16 are right (fp32 -> bf16 casts may differ from
        round-to-nearest-even by 1 ulp), so only the dot operands are upcast and dz is still rounded to bf16.
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    v_splits: Optional[int] = None
    group_n: int = 8
    grad_filter: float = 0.0
    fp32_precision: str = "ieee"
    upcast: bool = False

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.v_splits is not None and self.v_splits < 1:
            raise ValueError(f"TritonConfig.v_splits must be None or >= 1, got {self.v_splits}")
        if self.group_n < 1:
            raise ValueError(f"TritonConfig.group_n must be >= 1, got {self.group_n}")
        if not (0.0 <= self.grad_filter < 1.0):
            raise ValueError(f"TritonConfig.grad_filter must be in [0, 1), got {self.grad_filter}")
        if self.fp32_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"TritonConfig.fp32_precision must be ieee, tf32x3 or tf32, got {self.fp32_precision!r}")

    def filter_eps(self, dtype: torch.dtype) -> float:
        """The gradient-filter threshold used for inputs of this dtype (the same for all dtypes today)."""
        return float(self.grad_filter)

    @classmethod
    def for_hopper(cls) -> "TritonConfig":
        """The default for H100/H200 (sm_90); also a reasonable choice on sm_80."""
        return cls()

    @classmethod
    def for_interpreter(cls) -> "TritonConfig":
        """Small tiles for TRITON_INTERPRET=1 on CPU: 16 is tl.dot's minimum; 2 V splits exercise the combine;
        groups of 2 token tiles exercise the grouped order."""
        return cls(block_n=16, block_v=16, block_h=16, num_warps=4, num_stages=1, v_splits=2, group_n=2, upcast=True)

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

# EVEN_*: N, V, H multiples of the blocks -> no masks on the 2-D loads / atomics (set per launch, part of the
# compiled variant's key). The 1-D per-token loads stay masked: O(BLOCK_N) work per tile.
_EVEN = {
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    "EVEN_V": lambda a: a["V"] % a["BLOCK_V"] == 0,
    "EVEN_H": lambda a: a["H"] % a["BLOCK_H"] == 0,
    # Under the interpreter loops over runtime bounds are written as `while`: triton 3.6's interpreter holds scalar
    # arguments as 1-element numpy arrays and range() calls int() on them, which numpy >= 2.4 refuses ("only
    # 0-dimensional arrays can be converted to Python scalars"); `while` only needs bool(), still allowed. Compiled,
    # `for` loops are kept: only scf.for loops are software-pipelined (num_stages).
    "WHILE_LOOPS": lambda a: _interpreting(),
}


@triton.jit
def _load_2d(ptrs, mask_r, mask_c, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """tl.load of a (R, C) tile, 0 outside (mask_r x mask_c); masks only on the dimensions that need them."""
    if EVEN_R:
        if EVEN_C:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask_c[None, :], other=0.0)
    else:
        if EVEN_C:
            x = tl.load(ptrs, mask=mask_r[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    return x


@triton.jit
def _atomic_add_2d(ptrs, val, mask_r, mask_c, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Relaxed fp32 atomic add of a (R, C) tile (only the sum matters, no ordering with other memory)."""
    if EVEN_R:
        if EVEN_C:
            tl.atomic_add(ptrs, val, sem="relaxed")
        else:
            tl.atomic_add(ptrs, val, mask=mask_c[None, :], sem="relaxed")
    else:
        if EVEN_C:
            tl.atomic_add(ptrs, val, mask=mask_r[:, None], sem="relaxed")
        else:
            tl.atomic_add(ptrs, val, mask=mask_r[:, None] & mask_c[None, :], sem="relaxed")


@triton.jit
def _logits_step(acc, x_row, w_col, h0, offs_h, H, mask_n, mask_v, UPCAST: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, EVEN_N: tl.constexpr, EVEN_V: tl.constexpr, EVEN_H: tl.constexpr):
    """acc += hidden[n_tile, h0:h0+BLOCK_H] @ weight[v_tile, h0:h0+BLOCK_H]^T."""
    cur_h = h0 + offs_h                                                      # (BLOCK_H,)
    mask_h = cur_h < H
    # Masked-out entries load as 0, so padded rows / columns / the H tail add nothing to the dot.
    x = _load_2d(x_row + cur_h[None, :], mask_n, mask_h, EVEN_N, EVEN_H)                # (BLOCK_N, BLOCK_H)
    # weight[v_tile, h_block] read transposed, i.e. as the (K, N) = (BLOCK_H, BLOCK_V) operand of the dot.
    w = _load_2d(w_col + cur_h[:, None], mask_h, mask_v, EVEN_H, EVEN_V)                # (BLOCK_H, BLOCK_V)
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, w, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr,
    offs_n, mask_n,          # (BLOCK_N,) int64 token rows and their validity
    offs_v, mask_v,          # (BLOCK_V,) int64 vocabulary rows and their validity
    H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    """z = hidden[offs_n, :] @ weight[offs_v, :]^T as a (BLOCK_N, BLOCK_V) fp32 tile (0 in masked rows/cols)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)                     # (BLOCK_N, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)                                           # (BLOCK_H,)
    x_row = hidden_ptr + offs_n[:, None] * stride_hn                         # (BLOCK_N, 1) int64 offsets
    w_col = weight_ptr + offs_v[None, :] * stride_wv                         # (1, BLOCK_V)
    if WHILE_LOOPS:
        h0 = 0
        while h0 < H:
            acc = _logits_step(acc, x_row, w_col, h0, offs_h, H, mask_n, mask_v, UPCAST, INPUT_PRECISION,
                               EVEN_N, EVEN_V, EVEN_H)
            h0 += BLOCK_H
    else:
        for h0 in range(0, H, BLOCK_H):
            acc = _logits_step(acc, x_row, w_col, h0, offs_h, H, mask_n, mask_v, UPCAST, INPUT_PRECISION,
                               EVEN_N, EVEN_V, EVEN_H)
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
def _fwd_step(m_i, s_i, t_i, v0, hidden_ptr, weight_ptr, tgt, offs_n, mask_n, V, H, stride_hn, stride_wv, softcap,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_N: tl.constexpr, EVEN_V: tl.constexpr,
              EVEN_H: tl.constexpr, WHILE_LOOPS: tl.constexpr):
    """One vocabulary tile [v0, v0 + BLOCK_V) of the online logsumexp: (m, s, target logit) updated."""
    # Tiles past V (only in the last split) are skipped whole, so EVEN_V loads never leave the weight.
    if v0 < V:
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)                           # (BLOCK_V,)
        mask_v = offs_v < V
        z = _logits_tile(hidden_ptr, weight_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION,
                         EVEN_N, EVEN_V, EVEN_H, WHILE_LOOPS)                      # (BLOCK_N, BLOCK_V)
        z = _softcap_tile(z, softcap, HAS_SOFTCAP)
        # Columns outside V must not enter the softmax: exp(-inf) = 0. Every tile has >= 1 valid column, so
        # m_new is finite and exp(m_i - m_new) never sees (-inf) - (-inf).
        if not EVEN_V:
            z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))                                 # (BLOCK_N,)
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        hit = offs_v[None, :] == tgt[:, None]                                      # (BLOCK_N, BLOCK_V)
        t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
    return m_i, s_i, t_i


@triton.heuristics(_EVEN)
@triton.jit
def _logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_tgt_ptr,        # (V_SPLITS, N) fp32 each
    N, V, H, stride_hn, stride_wv, v_per_split, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)   # (BLOCK_N,)
    mask_n = offs_n < N
    # -1 for padding rows: never equal to a column index, so they pick no target logit.
    tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)                     # (BLOCK_N,) int64

    # This program's vocabulary range [v_lo, v_lo + v_per_split) clipped to V; v_per_split is a multiple of
    # BLOCK_V and the launcher guarantees the range is non-empty. The loop bounds are plain integer arguments (not
    # tensors): the interpreter of triton 3.6 with numpy >= 2.4 cannot turn a tensor bound into a Python int.
    v_lo = pid_s.to(tl.int64) * v_per_split

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)    # running max        (BLOCK_N,)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)                  # sum exp(z - m_i)    (BLOCK_N,)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)                  # target logit        (BLOCK_N,)
    if WHILE_LOOPS:
        dv = 0
        while dv < v_per_split:
            m_i, s_i, t_i = _fwd_step(m_i, s_i, t_i, v_lo + dv, hidden_ptr, weight_ptr, tgt, offs_n, mask_n,
                                      V, H, stride_hn, stride_wv, softcap, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST,
                                      INPUT_PRECISION, HAS_SOFTCAP, EVEN_N, EVEN_V, EVEN_H, WHILE_LOOPS)
            dv += BLOCK_V
    else:
        for dv in range(0, v_per_split, BLOCK_V):
            m_i, s_i, t_i = _fwd_step(m_i, s_i, t_i, v_lo + dv, hidden_ptr, weight_ptr, tgt, offs_n, mask_n,
                                      V, H, stride_hn, stride_wv, softcap, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST,
                                      INPUT_PRECISION, HAS_SOFTCAP, EVEN_N, EVEN_V, EVEN_H, WHILE_LOOPS)

    out = pid_s.to(tl.int64) * N + offs_n                                          # row pid_s of (V_SPLITS, N)
    tl.store(part_max_ptr + out, m_i, mask=mask_n)
    tl.store(part_sum_ptr + out, s_i, mask=mask_n)
    tl.store(part_tgt_ptr + out, t_i, mask=mask_n)


@triton.jit
def _load_token_rows(targets_ptr, lse_ptr, grad_ptr, offs_n, mask_n, ignore_index):
    """Per-token target (-1 on padding rows), lse and upstream gradient (0 on ignored and padding rows)."""
    tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)                     # (BLOCK_N,) int64
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)                        # (BLOCK_N,) fp32
    g = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)                         # (BLOCK_N,) fp32
    g = tl.where(tgt == ignore_index, 0.0, g)
    return tgt, lse, g


@triton.jit
def _bwd_step(dz_op, h0, offs_h, H, hidden_ptr, weight_ptr, dhidden_ptr, dweight_ptr, offs_n, mask_n, offs_v, mask_v,
              stride_hn, stride_wv, stride_dn, stride_dv, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              HAS_DH: tl.constexpr, HAS_DW: tl.constexpr, EVEN_N: tl.constexpr, EVEN_V: tl.constexpr,
              EVEN_H: tl.constexpr):
    """Both gradient products of one H block from the (BLOCK_N, BLOCK_V) dz tile, added atomically."""
    cur_h = h0 + offs_h                                                            # (BLOCK_H,)
    mask_h = cur_h < H
    if HAS_DH:
        # dhidden[n_tile, h] += dz @ weight[v_tile, h]
        w = _load_2d(weight_ptr + offs_v[:, None] * stride_wv + cur_h[None, :], mask_v, mask_h,
                     EVEN_V, EVEN_H)                                               # (BLOCK_V, BLOCK_H)
        if UPCAST:
            w = w.to(tl.float32)
        dh = tl.dot(dz_op, w, input_precision=INPUT_PRECISION)                     # (BLOCK_N, BLOCK_H) fp32
        _atomic_add_2d(dhidden_ptr + offs_n[:, None] * stride_dn + cur_h[None, :], dh, mask_n, mask_h,
                       EVEN_N, EVEN_H)
    if HAS_DW:
        # dweight[v_tile, h] += dz^T @ hidden[n_tile, h]
        x = _load_2d(hidden_ptr + offs_n[:, None] * stride_hn + cur_h[None, :], mask_n, mask_h,
                     EVEN_N, EVEN_H)                                               # (BLOCK_N, BLOCK_H)
        if UPCAST:
            x = x.to(tl.float32)
        dw = tl.dot(tl.trans(dz_op), x, input_precision=INPUT_PRECISION)           # (BLOCK_V, BLOCK_H) fp32
        _atomic_add_2d(dweight_ptr + offs_v[:, None] * stride_dv + cur_h[None, :], dw, mask_v, mask_h,
                       EVEN_V, EVEN_H)


@triton.jit
def _round_like(x, dtype: tl.constexpr):
    """fp32 x rounded to dtype (round to nearest even) and kept in fp32, for UPCAST (interpreter) runs. The
    interpreter's own fp32 -> bf16 cast truncates (measured: triton 3.6 and 3.9), a bias that accumulates over V
    in the gradient matmuls; so bf16 is rounded here on the bits: add 0x7FFF + the lowest kept bit, clear 16 bits."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float32:
        y = x
    else:
        y = x.to(dtype).to(tl.float32)
    return y


@triton.heuristics(_EVEN)
@triton.jit
def _logprobs_bwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_ptr,
    dhidden_ptr, dweight_ptr,                        # (N, H) / (V, H) fp32 accumulation buffers, zero-initialised
    skipped_ptr,                                     # (2,) int32 [tiles with g == 0, tiles filtered] if COUNT_SKIPPED
    N, V, H, stride_hn, stride_wv, stride_dn, stride_dv, ignore_index, softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DH: tl.constexpr, HAS_DW: tl.constexpr, COUNT_SKIPPED: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_V: tl.constexpr, EVEN_H: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    # Grouped order over the (n_tiles, v_tiles) grid: consecutive programs take GROUP_N token tiles x one vocab
    # tile, then the next vocab tile, so the GROUP_N hidden tiles stay in L2 while the weight streams past them.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    v_tiles = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_tiles
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_tiles - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)     # (BLOCK_N,)
    mask_n = offs_n < N
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)     # (BLOCK_V,)
    mask_v = offs_v < V
    tgt, lse, g = _load_token_rows(targets_ptr, lse_ptr, grad_ptr, offs_n, mask_n, ignore_index)
    g_max = tl.max(tl.abs(g), axis=0)                  # the largest |dz| any entry of these rows can have

    if g_max > 0.0:                                    # else: all prompt / ignored tokens, no recompute at all
        z = _logits_tile(hidden_ptr, weight_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION,
                         EVEN_N, EVEN_V, EVEN_H, WHILE_LOOPS)                      # (BLOCK_N, BLOCK_V) fp32
        z = _softcap_tile(z, softcap, HAS_SOFTCAP)
        p = tl.exp(z - lse[:, None])                                               # softmax  (BLOCK_N, BLOCK_V)
        onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
        dz = g[:, None] * (onehot - p)
        dz = _softcap_grad(dz, z, softcap, HAS_SOFTCAP)
        if not EVEN_V:
            # Padded columns hold z = 0, i.e. p = exp(-lse) != 0: they must not leak into the gradients.
            dz = tl.where(mask_v[None, :], dz, 0.0)
        # Gradient filtering: |dz| <= filter_eps * max|g| everywhere -> below the dtype's resolution, skip.
        if tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > filter_eps * g_max:
            # bf16/fp16 tensor cores for the gradient matmuls (the rounding a bf16 autograd graph makes too);
            # under UPCAST the same rounding is applied and the operands stay fp32.
            if UPCAST:
                dz_op = _round_like(dz, hidden_ptr.dtype.element_ty)
            else:
                dz_op = dz.to(hidden_ptr.dtype.element_ty)
            offs_h = tl.arange(0, BLOCK_H)
            if WHILE_LOOPS:
                h0 = 0
                while h0 < H:
                    _bwd_step(dz_op, h0, offs_h, H, hidden_ptr, weight_ptr, dhidden_ptr, dweight_ptr, offs_n,
                              mask_n, offs_v, mask_v, stride_hn, stride_wv, stride_dn, stride_dv, UPCAST,
                              INPUT_PRECISION, HAS_DH, HAS_DW, EVEN_N, EVEN_V, EVEN_H)
                    h0 += BLOCK_H
            else:
                for h0 in range(0, H, BLOCK_H):
                    _bwd_step(dz_op, h0, offs_h, H, hidden_ptr, weight_ptr, dhidden_ptr, dweight_ptr, offs_n,
                              mask_n, offs_v, mask_v, stride_hn, stride_wv, stride_dn, stride_dv, UPCAST,
                              INPUT_PRECISION, HAS_DH, HAS_DW, EVEN_N, EVEN_V, EVEN_H)
        else:
            if COUNT_SKIPPED:
                tl.atomic_add(skipped_ptr + 1, 1)
    else:
        if COUNT_SKIPPED:
            tl.atomic_add(skipped_ptr, 1)


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
                             need_weight_grad=True, config=None, softcap=None, skipped=None):
    """grad_token (N,) fp32: upstream dL/d token_logp (arbitrary per token). Returns (dhidden or None, dweight or None)
    in hidden's / weight's dtype. dL/dlogits[n,v] = grad_token[n] * (1[v==target_n] - exp(logit[n,v] - lse[n])), zero rows
    where target==ignore_index. dhidden = dlogits @ weight, dweight = dlogits.T @ hidden, both accumulated in fp32 by
    one kernel that recomputes each logits tile once. skipped: optional (2,) int32 tensor on the device, incremented
    by [tiles skipped because their rows have no gradient, tiles skipped by the gradient filter] (debug/benchmark;
    the total number of tiles is cdiv(N, block_n) * cdiv(V, block_v))."""
    config = _resolve_config(config)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    lse = lse.contiguous().to(torch.float32)
    grad_token = grad_token.contiguous().to(torch.float32)
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if skipped is not None and (skipped.dtype != torch.int32 or skipped.numel() != 2 or skipped.device != device):
        raise ValueError("skipped must be a (2,) int32 tensor on the inputs' device")
    dh = torch.zeros((N, H), dtype=torch.float32, device=device) if need_hidden_grad else None   # (N, H) fp32
    dw = torch.zeros((V, H), dtype=torch.float32, device=device) if need_weight_grad else None   # (V, H) fp32
    if N > 0 and (need_hidden_grad or need_weight_grad):
        # Absent buffers are never touched (HAS_DH / HAS_DW are constexpr); any tensor fills their pointer slots.
        dh_arg = dh if dh is not None else dw
        dw_arg = dw if dw is not None else dh
        grid = (triton.cdiv(N, config.block_n) * triton.cdiv(V, config.block_v),)
        with _on_device(device):
            _logprobs_bwd_kernel[grid](
                hidden, weight, targets, lse, grad_token, dh_arg, dw_arg,
                skipped if skipped is not None else lse,
                N, V, H, hidden.stride(0), weight.stride(0), dh_arg.stride(0), dw_arg.stride(0), ignore_index,
                _softcap_arg(softcap), config.filter_eps(hidden.dtype),
                BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h, GROUP_N=config.group_n,
                UPCAST=config.upcast, INPUT_PRECISION=_input_precision(hidden.dtype, config),
                HAS_SOFTCAP=softcap is not None, HAS_DH=need_hidden_grad, HAS_DW=need_weight_grad,
                COUNT_SKIPPED=skipped is not None, num_warps=config.num_warps, num_stages=config.num_stages,
            )
    dhidden = dh.to(hidden.dtype) if dh is not None else None
    dweight = dw.to(weight.dtype) if dw is not None else None
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
    "_logprobs_bwd_kernel": _logprobs_bwd_kernel,
}
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}   # opt-in max dynamic smem per block, bytes
# (input dtype, soft-capped logits, even shapes): both dtypes plain at even shapes (what real models hit), and bf16
# with Gemma 2's soft-capping at ragged shapes (the masked loads / atomics).
_AOT_VARIANTS = (("fp32", False, True), ("bf16", False, True), ("bf16", True, False))


def _jit_function(kernel):
    """The JITFunction under @triton.heuristics (its .fn); the kernel itself otherwise."""
    while not isinstance(kernel, triton.runtime.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _aot_signature(name: str, dtype: str) -> dict:
    p = f"*{dtype}"
    if name == "_logprobs_fwd_kernel":
        return {"hidden_ptr": p, "weight_ptr": p, "targets_ptr": "*i64",
                "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_tgt_ptr": "*fp32",
                "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "v_per_split": "i32",
                "softcap": "fp32"}
    return {"hidden_ptr": p, "weight_ptr": p, "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
            "dhidden_ptr": "*fp32", "dweight_ptr": "*fp32", "skipped_ptr": "*i32",
            "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32",
            "stride_dn": "i32", "stride_dv": "i32", "ignore_index": "i32", "softcap": "fp32", "filter_eps": "fp32"}


def _aot_compile_report(capability: int, config: Optional[TritonConfig] = None) -> list:
    """Compile in this process (kernels must be JITFunctions, i.e. TRITON_INTERPRET unset at import)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = config or TritonConfig.for_hopper()
    target = GPUTarget("cuda", capability, 32)
    report = []
    for name, kernel in _KERNELS.items():
        for dtype, softcap, even in _AOT_VARIANTS:
            constexprs = {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_H": config.block_h,
                          "UPCAST": False, "INPUT_PRECISION": config.fp32_precision if dtype == "fp32" else "ieee",
                          "HAS_SOFTCAP": softcap, "EVEN_N": even, "EVEN_V": even, "EVEN_H": even,
                          "WHILE_LOOPS": False}
            if name == "_logprobs_bwd_kernel":
                constexprs.update(GROUP_N=config.group_n, HAS_DH=True, HAS_DW=True, COUNT_SKIPPED=not even)
            signature = _aot_signature(name, dtype)
            # What the JIT specialises at real shapes (H = 4096, 16-byte aligned torch allocations): pointers and
            # H / row strides divisible by 16. Without it the loads cannot become cp.async and are not pipelined.
            attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items())
                     if ty.startswith("*") or arg == "H" or arg.startswith("stride")}
            src = ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            shared = int(compiled.metadata.shared)
            limit = _SHARED_LIMIT.get(capability)
            if limit is not None and shared > limit:
                raise RuntimeError(f"{name}[{dtype}] needs {shared} B of shared memory on sm_{capability} "
                                   f"(limit {limit} B) with {config}")
            tag = dtype + (",softcap" if softcap else "") + ("" if even else ",ragged")
            report.append({"name": f"{name}[{tag}]", "shared": shared})
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
    if all(isinstance(_jit_function(k), triton.runtime.JITFunction) for k in _KERNELS.values()):
        return _aot_compile_report(int(capability))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from spin_fast.kernels import triton_logprobs as m; "
            f"sys.stdout.write('\\n' + json.dumps(m._aot_compile_report({int(capability)})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation for sm_{capability} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
