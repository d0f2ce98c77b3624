"""Attention kernels for the decoder: packed variable-length (training, prefill) and KV-cache decode.

Two entry points, both taking GQA-shaped tensors (fewer KV heads than query heads):

  varlen_attention(q, k, v, cu_seqlens, max_seqlen)  packed sequences, no padding, causal within each
  decode_attention(q, k_cache, v_cache, lengths)     one new query per slot against that slot's cache

Backends for the packed path:
  "sdpa"  torch scaled_dot_product_attention, one plain causal call per run of equal-length sequences
          (O(sum T_s^2) work, no mask; the sequence bounds are read on the host, free when the caller passes
          them, as the trainer, SFT and the reference cache do).
  "flex"  FlexAttention with a document block mask (O(N) mask storage, skips empty blocks); compiled
          on CUDA, eager (slow, for tests) on CPU.
  "flash" flash-attn's varlen kernel; CUDA only, optional import.
"auto" picks flash, then flex, on CUDA; sdpa on CPU. What runs is decided by the pure function
`choose_attention_path` (device, dtype, heads, mask kind) and is the same for every layer.

No CUDA path takes SDPA's math kernel (it materialises fp32 (H, N, N) scores: out of memory at 16k tokens):
flash takes no mask and needs fp16/bf16; memory-efficient takes fp32 but no grouped KV heads
(torch's sdp_utils: check_batch_size_and_num_heads_dense<false> for it). So SDPA on CUDA is only ever called
without a mask (is_causal), and with the KV heads repeated to the query heads where flash cannot run
(fp32, or head_dim beyond flash's). The dense (N, N) mask (`block_causal_mask`) is a test reference only.
Decode always uses SDPA-equivalent maths: one query per slot is bandwidth-bound on reading the cache.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .errors import InputError

BACKENDS = ("auto", "sdpa", "flex", "flash")

try:  # optional: flash-attn is not a dependency, and is never installed on CPU machines
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build raising at import
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    flex_attention = create_block_mask = None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # built on first use, not at import; dynamic: packs of different token counts share one graph
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, block_mask, enable_gqa, scale=None, softcap=None):
    """FlexAttention, compiled once per process on CUDA (eager flex is a slow reference).
    softcap: scores c * tanh(s / c), as a score_mod (Gemma 2)."""
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                enable_gqa=enable_gqa)
    with warnings.catch_warnings():  # eager on CPU is deliberate (tests); silence only this call's warning
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash" and flash_attn_varlen_func is None:
        raise InputError("attention backend 'flash' requested but flash_attn is not importable; "
                         "use 'sdpa', 'flex' or 'auto'")
    if backend == "flex" and flex_attention is None:
        raise InputError("attention backend 'flex' requested but this torch has no FlexAttention; use 'sdpa'")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("sdpa", "flex" or "flash") for tensors on `device`."""
    check_backend(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "flash" if flash_attn_varlen_func is not None else ("flex" if flex_attention is not None else "sdpa")
    if backend == "flash" and device.type != "cuda":
        raise InputError(f"attention backend 'flash' needs CUDA tensors, got device {device}")
    return backend


def block_causal_mask(cu_seqlens: torch.Tensor, n: int, window: int | None = None) -> torch.Tensor:
    """The test reference (no model path uses it: a masked SDPA is the math kernel on CUDA): (N, N) bool mask,
    True where token i may attend to token j: same sequence and j <= i (and, with a sliding window W,
    i - j < W: the last W positions, itself included, as transformers' sliding layers)."""
    idx = torch.arange(n, device=cu_seqlens.device)                                  # (N,)
    seq = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)                 # (N,) sequence of each token
    same = seq[:, None] == seq[None, :]                                              # (N, N)
    keep = same & (idx[None, :] <= idx[:, None])                                     # causal: j <= i
    if window is not None:
        keep &= idx[:, None] - idx[None, :] < window                                 # (N, N) band
    return keep


HALF = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def choose_attention_path(device_type: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                          packed: bool, backend: str) -> tuple[str, bool]:
    """(kind, expand_kv): how varlen attention runs. A pure function of the call's static properties.

    backend: a resolved one ("sdpa" | "flex" | "flash"); packed: more than one sequence in the call.
    kind: "flash_varlen" (flash-attn), "flex" (block mask), "causal" (one SDPA is_causal call), "split" (one
    SDPA is_causal call per run of equal-length sequences). Never a masked SDPA: on CUDA that is the math kernel.
    expand_kv: repeat the KV heads to num_heads before SDPA, so CUDA's memory-efficient kernel (no GQA) can take a
    call flash cannot (fp32, or a head_dim flash does not support); CPU keeps SDPA's own enable_gqa.
    """
    if backend == "flash":
        return "flash_varlen", False
    if backend == "flex" and packed:
        return "flex", False
    flash_ok = dtype in HALF and head_dim <= FLASH_MAX_HEAD_DIM and head_dim % 8 == 0
    expand = device_type == "cuda" and num_kv_heads != num_heads and not flash_ok
    return ("split" if packed else "causal"), expand


def prepare_varlen(cu_seqlens: torch.Tensor, n: int, backend: str, cu_host=None, window: int | None = None):
    """What every layer's varlen_attention reuses: SplitBounds for sdpa (None for one sequence), the block mask
    for flex, nothing for flash. backend: a resolved one ("sdpa" | "flex" | "flash"). cu_host: the same offsets
    on the host (list / numpy), so the sdpa split needs no device sync; read from cu_seqlens when None.
    One sequence needs no mask at all (None): both sdpa and flex then run SDPA's plain causal kernel.
    window: the sliding window of the layers this is for (None: full causal); one per distinct window."""
    if window is not None and window >= n:
        window = None                                   # no sequence is longer than the window: plain causal
    if cu_seqlens.numel() == 2 and backend != "flash" and window is None:
        return None
    if backend == "sdpa":
        cu = cu_seqlens.tolist() if cu_host is None else [int(c) for c in cu_host]
        return SplitBounds(cu)
    if backend == "flex":
        idx = torch.arange(n, device=cu_seqlens.device)
        doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)              # (N,) sequence id

        def causal_same_doc(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        def windowed(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi) & (qi - ki < window)
        # _compile on CUDA: builds the block mask without materialising the dense (N, N) mask first
        return create_block_mask(causal_same_doc if window is None else windowed, None, None, n, n,
                                 device=cu_seqlens.device, _compile=cu_seqlens.device.type == "cuda")
    return None


class SplitBounds:
    """`prepared` for sdpa: the host cu_seqlens, one causal SDPA per run of equal-length sequences
    (O(sum T_s^2) work and memory, no (N, N) mask)."""

    def __init__(self, cu: list[int]):
        self.cu = cu


def _causal(qt, kt, vt, expand: bool, scale: float | None = None):
    """One plain causal SDPA over (B, H, T, D) q and (B, KV, T, D) k/v: no mask, so CUDA runs flash or
    memory-efficient, never math (expand: repeat KV heads, for memory-efficient, which has no GQA)."""
    h, kv = qt.shape[1], kt.shape[1]
    if expand and kv != h:
        g = h // kv
        kt = kt.repeat_interleave(g, dim=1)                                            # (B, H, T, D)
        vt = vt.repeat_interleave(g, dim=1)
        kv = h
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=kv != h)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                   scale: float | None, softcap: float | None) -> torch.Tensor:
    """Attention with tanh soft-capped scores (Gemma 2), which SDPA cannot do: scores = c * tanh(s / c)
    with s = scale * q.k, then the mask, softmax in fp32 (as transformers' eager path). O(T^2) scores: the
    CPU / sdpa fallback; on CUDA "auto" takes flash (softcap=) or flex (a score_mod).
    q: (B, H, T, D); k/v: (B, KV, S, D); keep: bool broadcastable to (B, H, T, S), or None for causal."""
    h, kv, d = q.shape[1], k.shape[1], q.shape[-1]
    if kv != h:                                                                      # GQA: repeat KV heads
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)   # (B, H, T, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if keep is None:
        t, n = s.shape[-2:]
        keep = torch.ones(t, n, dtype=torch.bool, device=q.device).tril_(n - t)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(s.softmax(-1, dtype=torch.float32).to(q.dtype), v)         # (B, H, T, D)


def _run(qt, kt, vt, expand, scale, window, softcap):
    """One run of equal-length sequences (B, H, T, D): plain causal SDPA unless a window shorter than T
    (a band mask: on CUDA the math kernel, so "auto" takes flash or flex there) or soft-capped scores."""
    t = qt.shape[2]
    keep = None
    if window is not None and t > window:
        i = torch.arange(t, device=qt.device)
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)       # (T, T)
    if softcap is not None:
        return math_attention(qt, kt, vt, keep, scale, softcap)
    if keep is None:
        return _causal(qt, kt, vt, expand, scale)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, scale=scale, enable_gqa=kt.shape[1] != qt.shape[1])


# eager inside torch.compile'd blocks: the Python loop over host bounds would otherwise specialise (and
# recompile) the block's graph on every pack's sequence lengths. The bounds object is passed whole: a list
# argument would still be guarded on (its length) by the caller's graph.
@torch.compiler.disable
def _split_causal(q, k, v, bounds: SplitBounds, expand: bool = False, scale=None, window=None,
                  softcap=None) -> torch.Tensor:
    """varlen causal attention as batched plain-causal SDPA calls, one per run of equal lengths."""
    cu = bounds.cu
    n, h, d = q.shape
    kv = k.shape[1]
    outs = []
    i, s = 0, len(cu) - 1
    while i < s:
        ln, j = cu[i + 1] - cu[i], i + 1
        while j < s and cu[j + 1] - cu[j] == ln:
            j += 1
        a, b, r = cu[i], cu[j], j - i
        qt = q[a:b].reshape(r, ln, h, d).transpose(1, 2)                               # (R, H, T, D)
        kt = k[a:b].reshape(r, ln, kv, d).transpose(1, 2)                              # (R, KV, T, D)
        vt = v[a:b].reshape(r, ln, kv, d).transpose(1, 2)
        o = _run(qt, kt, vt, expand, scale, window, softcap)                           # (R, H, T, D)
        outs.append(o.transpose(1, 2).reshape(b - a, h, d))
        i = j
    # one cat rather than slice writes into a buffer: autograd then keeps no chain of CopySlices nodes
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None, backend: str = "auto", prepared=None, *, scale: float | None = None,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention over packed sequences.

    q: (N, H, D), k/v: (N, KV, D) with H % KV == 0; cu_seqlens: (S+1,) int32 offsets, cu_seqlens[-1] == N.
    prepared: prepare_varlen(cu_seqlens, N, resolved backend, window=window), to build the mask once for all
    layers of that window. scale: of q.k (None: 1/sqrt(D)); window: sliding window (None: full causal);
    softcap: c for scores c * tanh(s / c) (Gemma 2). Returns (N, H, D).
    """
    n, h, d = q.shape
    kv = k.shape[1]
    backend = resolve_backend(backend, q.device)
    if prepared is None and backend != "flash":
        prepared = prepare_varlen(cu_seqlens, n, backend, window=window)
    packed = prepared is not None or backend == "flash"
    kind, expand = choose_attention_path(q.device.type, q.dtype, h, kv, d, packed, backend)
    if kind == "flash_varlen":
        if max_seqlen is None:  # one host sync; callers that know it (the packer) pass it in
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(torch.int32)
        # flash's window (left, right) counts positions besides the query's own: W - 1 to the left
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, softmax_scale=scale,
                                      window_size=(-1, -1) if window is None else (window - 1, 0),
                                      softcap=0.0 if softcap is None else softcap)  # (N, H, D)
    if kind == "split":
        if not isinstance(prepared, SplitBounds):
            raise TypeError(f"the sdpa path takes SplitBounds (prepare_varlen), got {type(prepared).__name__}")
        return _split_causal(q, k, v, prepared, expand, scale, window, softcap)
    qt = q.transpose(0, 1).unsqueeze(0)                                              # (1, H, N, D)
    kt = k.transpose(0, 1).unsqueeze(0)                                              # (1, KV, N, D)
    vt = v.transpose(0, 1).unsqueeze(0)                                              # (1, KV, N, D)
    if kind == "flex":
        out = _flex(qt, kt, vt, prepared, enable_gqa=kv != h, scale=scale, softcap=softcap)
    else:  # "causal": a single sequence within the window, the plain causal kernel, no O(N^2) mask
        out = _run(qt, kt, vt, expand, scale, None, softcap)
    return out.squeeze(0).transpose(0, 1)                                            # (N, H, D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per slot against the first lengths[b] cached positions of that slot.

    q: (B, H, D); k_cache/v_cache: (B, L, KV, D) (a view of one layer's cache for these slots);
    lengths: (B,) int, number of valid cached positions (the new token's own K/V already written).
    mask: optional precomputed (B, 1, 1, L) mask equivalent to arange(L) < lengths (bool, or additive
    0 / -inf in q's dtype), shared by all layers.
    Returns (B, H, D).
    """
    b, h, d = q.shape
    L, kv = k_cache.shape[1], k_cache.shape[2]
    g = h // kv
    # GQA without repeating the cache: the G query heads sharing a KV head become G "query positions"
    qg = q.view(b, kv, g, d)                                                         # (B, KV, G, D)
    kt = k_cache.transpose(1, 2)                                                     # (B, KV, L, D)
    vt = v_cache.transpose(1, 2)                                                     # (B, KV, L, D)
    if mask is None:
        valid = torch.arange(L, device=q.device)[None, :] < lengths[:, None]         # (B, L)
        mask = valid[:, None, None, :]                                               # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask)                 # (B, KV, G, D)
    return out.reshape(b, h, d)
