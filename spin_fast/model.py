"""The decoder of every supported family (Llama 2/3, Mistral, Qwen2/3, Gemma 2/3, Phi-3): token ids in,
FINAL HIDDEN STATES out.

One block class with options, not one per family (families.py translates each config.json into them):
  * norm_plus_one: RMSNorm scales by (1 + w) (Gemma); qk_norm: RMSNorm over head_dim of q and k before RoPE
    (Qwen3, Gemma 3); post_norms: Gemma's sandwich (the attention and MLP outputs are normed before their
    residual add, the MLP input by pre_feedforward_layernorm);
  * hidden_act: SwiGLU (silu) or GeGLU (gelu tanh); embed_scale: embeddings times sqrt(hidden) (Gemma);
  * attn_scale (query_pre_attn_scalar ** -0.5), attn_softcap (scores c tanh(s / c), Gemma 2), final_softcap
    (the logits likewise; `model.logit_softcap` is what the loss kernels' `softcap=` take);
  * layer_windows: per layer None (full causal) or a sliding window W (the last W positions, itself included),
    honoured in the packed path and the KV-cache decode mask; sliding layers may have their own RoPE base
    (local_rope_theta, Gemma 3).

The forward stops after the last RMSNorm and does not apply the LM head: the fused loss kernels take
`hidden` and `model.lm_head_weight` (the [V, H] weight, tied or not) and never materialise [N, V]
logits. `model.logits(hidden)` is there for sampling and tests.

Two modes, both padding-free:
  * packed varlen: input_ids (N,), position_ids (N,), cu_seqlens (S+1,) int32 -> hidden (N, H).
    With a KVCache and `slots` (S,), the keys/values of sequence s are also written into cache slot
    slots[s] at their positions (prefill for the sampler).
  * decode: input_ids (B,), position_ids (B,) and a KVCache with `slots` (B,): one new token per slot,
    attending to that slot's cache -> hidden (B, H).

Parameter names equal the Hugging Face names minus the "model." prefix (families.py maps the exceptions,
e.g. Phi-3's fused q/k/v), so hf_io.py maps by string.

`with model.cpu_prepacked():` (used by the sampler on CPU) runs inference on oneDNN-prepacked fp32
weights with q/k/v and gate/up fused into one GEMM each: same maths, fewer and faster kernels.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import lean_grad
from .attention import check_backend, prepare_varlen, resolve_backend, varlen_attention
from .rope import apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq  # noqa: F401 (re-exported)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # None | {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False                    # Qwen2 (or Llama with attention_bias=True)
    o_bias: bool = False                      # Llama attention_bias=True also biases o_proj
    hidden_act: str = "silu"                  # "silu" (SwiGLU) | "gelu_pytorch_tanh" (GeGLU, Gemma) | "gelu"
    norm_plus_one: bool = False               # Gemma: RMSNorm weight applied as (1 + w)
    qk_norm: bool = False                     # Qwen3 / Gemma 3: RMSNorm of each q and k head before RoPE
    post_norms: bool = False                  # Gemma 2/3: post-attention, pre/post-feedforward norms
    embed_scale: float | None = None          # Gemma: sqrt(hidden_size), in the compute dtype
    attn_scale: float | None = None           # scale of q.k; None: head_dim ** -0.5
    attn_softcap: float | None = None         # Gemma 2: attention scores c * tanh(s / c)
    final_softcap: float | None = None        # Gemma 2: logits c * tanh(z / c)
    layer_windows: list | None = None         # per layer: None (full causal) or the sliding window size
    local_rope_theta: float | None = None     # RoPE base of sliding layers, None: rope_theta (Gemma 3: 10k)
    local_rope_scaling: dict | None = None    # their scaling (Gemma 3: none while global layers are scaled)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict = field(default_factory=dict, repr=False)  # the raw config.json, written back on save

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.layer_windows is None:
            self.layer_windows = [None] * self.num_layers
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{len(self.layer_windows)} layer windows for {self.num_layers} layers")

    def is_local(self, layer: int) -> bool:
        """A sliding-window layer: it uses the local RoPE tables."""
        return self.layer_windows[layer] is not None


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def cpu_prepack_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# below this many weight elements the plain (MKL) GEMM beats oneDNN's packed one for a few rows: the
# packed call has ~10 us of fixed overhead (measured on 2 AVX-512 cores: 16x64 @ 64x128 packed 14.5 us vs
# plain 8.9 us; 64x512 15.0 vs 17.8; 576x960 50 vs 139). Tiny models (stories260K) keep plain weights.
PREPACK_MIN_NUMEL = 32768


def _prepack(weight: torch.Tensor, batch_hint: int):
    """The oneDNN-packed weight, or None where the plain GEMM is faster (tiny weights)."""
    if weight.numel() < PREPACK_MIN_NUMEL:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def _packed_linear(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that, inside Transformer.cpu_prepacked(), runs on a oneDNN-prepacked copy of its weight.

    Why: on CPU, fp32 GEMMs with a few rows (decode: one row per slot) run ~5x faster from oneDNN's
    blocked weight layout than from the plain [out, in] layout (measured on AVX-512). Still fp32.
    Used only without autograd; the copy is dropped when the context exits, so it is never stale.
    """
    packed = None

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lora = None            # a lora.LoraAdapter when LoRA targets this layer (lora.attach)

    def forward(self, x):
        if self.lora is not None:   # W x + b + (alpha/r) B A dropout(x); never prepacked (cpu_prepacked refuses)
            return self.lora.add_to(super().forward(x), x)
        if self.packed is not None and not torch.is_grad_enabled():
            return _packed_linear(x, self.packed, self.bias)
        return super().forward(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. plus_one (Gemma): scale by (1 + w), the product taken in fp32 and then
    cast (Gemma's order); otherwise w * x_normed.to(dtype) (Llama's order): equal in fp32."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            # inference in fp32: the fused kernel (one op instead of six; same fp32 maths)
            return F.rms_norm(x, self.weight.shape, 1.0 + self.weight if self.plus_one else self.weight, self.eps)
        if torch.is_grad_enabled():   # training: the same maths keeping only x and rsqrt for backward
            return lean_grad.rms_norm(x, self.weight, self.eps, self.plus_one)
        # statistics in fp32 whatever the compute dtype, as in the reference implementations
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Keys/values per layer, [slots, kv_heads, capacity, head_dim] each (head-major, as in transformers): one
    slot's keys for one KV head are contiguous, so decode attention reads a layer's cache over all slots as a
    (slots * kv_heads, len, head_dim) view, with no copy. k[i] / v[i]: layer i.

    Fixed slots: the sampler owns which prompt lives in which slot and how long it is; the cache is only storage,
    reused across generate() calls. Capacity (`max_len`) grows in chunks (`grow`) as the longest live sequence
    needs it, instead of slots x (longest prompt + max_new_tokens) up front; one layer is reallocated at a time,
    so growing costs one layer's copy in memory, not a second cache. The CUDA-graph path allocates its whole
    capacity once (a captured graph reads fixed addresses).
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device, dtype):
        shape = (slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        """K + V bytes of one position of one slot over all layers."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def grow(self, max_len: int) -> None:
        """Capacity >= max_len (positions [0, old capacity) kept; the new tail zero), layer by layer."""
        if max_len <= self.max_len:
            return
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = old.new_zeros(old.shape[:2] + (max_len,) + old.shape[3:])         # (SLOTS, KV, M', D)
                new[:, :, : self.max_len].copy_(old)
                buf[i] = new
                del old
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class CacheArgs:
    """Where a forward reads/writes the cache. slots: (S,) packed prefill or (B,) decode, int64.
    kv_len (decode only): how many cache positions to attend over, >= max position + 1 of any slot;
    a Python int so the slice is static (the sampler passes max_len under CUDA graphs).
    all_slots: slots is arange(cache.slots), so decode reads the cache as a view instead of gathering."""
    cache: KVCache
    slots: torch.Tensor
    decode: bool
    kv_len: int | None = None
    all_slots: bool = False
    mask: torch.Tensor | None = None    # (B, 1, 1, kv_len) additive decode mask, built once per forward


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.h, self.kv, self.d = h, kv, d
        self.q_proj = Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:   # one (D,) weight shared by all heads, applied to each head's vector
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_plus_one)
        else:
            self.q_norm = self.k_norm = None
        self.scale, self.softcap, self.window = cfg.attn_scale, cfg.attn_softcap, cfg.layer_windows[layer]
        # set inside Transformer.cpu_prepacked(): the fused q/k/v weight, prepacked (or plain when tiny)
        self.qkv_packed = self.qkv_weight = self.qkv_bias = None

    def project(self, x: torch.Tensor, cos, sin):
        """q (N, H, D), k (N, KV, D) normed (qk_norm) and rotated, v (N, KV, D)."""
        n, h, kv, d = x.shape[0], self.h, self.kv, self.d
        if (self.qkv_packed is not None or self.qkv_weight is not None) and not torch.is_grad_enabled():
            qkv = self.qkv(x)                                                          # (N, (H+2KV)*D)
            qk = qkv[:, : (h + kv) * d].view(n, h + kv, d)
            v = qkv[:, (h + kv) * d:].view(n, kv, d)                                   # (N, KV, D)
            if self.q_norm is None:   # one RoPE call for q and k together
                qk = apply_rope(qk, cos, sin)                                          # (N, H+KV, D)
                return qk[:, :h], qk[:, h:], v
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = self.q_proj(x).view(n, h, d)                                           # (N, H, D)
            k = self.k_proj(x).view(n, kv, d)                                          # (N, KV, D)
            v = self.v_proj(x).view(n, kv, d)                                          # (N, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, layer: int, cu_seqlens, max_seqlen, position_ids, cache: CacheArgs | None,
                backend: str, prepared):
        n = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        if cache is not None and not cache.decode:
            # prefill: every sequence starts an empty slot, so its own K/V are its whole context
            tok_slot = cache.slots.repeat_interleave(cu_seqlens.diff().long(), output_size=n)  # (N,)
            cache.cache.k[layer][tok_slot, :, position_ids] = k                        # (N, KV, D) rows
            cache.cache.v[layer][tok_slot, :, position_ids] = v
        elif cache is not None:
            raise AssertionError("decode runs through Transformer._decode_forward")
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend, prepared, scale=self.scale,
                               window=self.window, softcap=self.softcap)               # (N, H, D)
        return self.o_proj(out.reshape(n, self.h * self.d))                            # (N, hidden)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(N, (H + 2 KV) * D): q, k, v side by side (one prepacked GEMM inside cpu_prepacked())."""
        if not torch.is_grad_enabled():
            if self.qkv_packed is not None:
                return _packed_linear(x, self.qkv_packed, self.qkv_bias)
            if self.qkv_weight is not None:
                return F.linear(x, self.qkv_weight, self.qkv_bias)
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class MLP(nn.Module):
    """act(gate(x)) * up(x) -> down: SwiGLU (silu) or GeGLU (gelu)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act, self.act_name = ACTIVATIONS[cfg.hidden_act], cfg.hidden_act
        self.gate_up_packed = self.gate_up_weight = None   # set inside Transformer.cpu_prepacked()

    def forward(self, x):
        if (self.gate_up_packed is not None or self.gate_up_weight is not None) and not torch.is_grad_enabled():
            gu = (_packed_linear(x, self.gate_up_packed, None) if self.gate_up_packed is not None
                  else F.linear(x, self.gate_up_weight))                                 # (N, 2I)
            gate, up = gu.chunk(2, dim=-1)                                             # (N, I) each
            return self.down_proj.forward(self.act(gate).mul_(up))
        if torch.is_grad_enabled():   # training: act(g) * u keeping only g and u for backward (lean_grad)
            return self.down_proj(lean_grad.gated_act(self.gate_proj(x), self.up_proj(x), self.act_name))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block. Without post_norms (Llama):  x += attn(in_norm(x));  x += mlp(post_attention_norm(x)).
    With post_norms (Gemma; the names are HF's): x += post_attention_norm(attn(in_norm(x)));
    x += post_feedforward_norm(mlp(pre_feedforward_norm(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm()
        if cfg.post_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.post_norms = cfg.post_norms
        self.mlp = MLP(cfg)
        # training: recompute this block in backward instead of keeping its activations (set by the trainer;
        # a flag, not a wrapper module, so parameter names stay the HF ones)
        self.checkpoint_activations = False

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, position_ids, cache, backend, prepared):
        if self.checkpoint_activations and torch.is_grad_enabled() and cache is None:
            return checkpoint(self._forward, x, cos, sin, cu_seqlens, max_seqlen, position_ids, cache, backend,
                              prepared, use_reentrant=False)
        return self._forward(x, cos, sin, cu_seqlens, max_seqlen, position_ids, cache, backend, prepared)

    def _forward(self, x, cos, sin, cu_seqlens, max_seqlen, position_ids, cache, backend, prepared):
        a = self.self_attn(self.input_layernorm(x), cos, sin, self.layer, cu_seqlens, max_seqlen,
                           position_ids, cache, backend, prepared)
        return self.add_mlp(self.add_attn(x, a))

    # the residual adds, shared with the decode path (submodules called through .forward: no hooks on them)
    def add_attn(self, x, a):
        return x + (self.post_attention_layernorm.forward(a) if self.post_norms else a)

    def add_mlp(self, x):
        if self.post_norms:
            return x + self.post_feedforward_layernorm.forward(self.mlp.forward(self.pre_feedforward_layernorm.forward(x)))
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = cfg
        self.attn_backend = check_backend(attn_backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        # tied: no separate parameter, lm_head_weight is the embedding (one tensor, one gradient)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # buffers, so .to(device) moves them; not persistent: derived from the config
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True), persistent=False)

    def init_rope(self, device=None):
        """(Re)compute the RoPE buffers in fp32 (after a meta-device build, or a cast of the model)."""
        device = device or self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [V, H] output projection, tied or not."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def logit_softcap(self) -> float | None:
        """c of the final logits c * tanh(z / c) (Gemma 2), or None: pass it as the loss kernels' softcap=."""
        return self.config.final_softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._packed_lm_head is not None and not torch.is_grad_enabled():
            z = _packed_linear(hidden, self._packed_lm_head, None)                     # (N, V)
        else:
            z = F.linear(hidden, self.lm_head_weight)                                  # (N, V)
        c = self.config.final_softcap
        return z if c is None else torch.tanh(z / c) * c

    _packed_lm_head = None

    @contextmanager
    def cpu_prepacked(self, batch_hint: int = 16):
        """Inference on CPU with prepacked fp32 weights (see Linear). A no-op off CPU or without oneDNN.
        Holds a second copy of the weights while active: for sampling, not for training."""
        if self.lm_head_weight.device.type != "cpu" or not cpu_prepack_available() \
                or self.lm_head_weight.dtype != torch.float32 \
                or any(getattr(m, "lora", None) is not None for m in self.modules()):
            # (with LoRA adapters the fused q/k/v and gate/up paths would skip them: plain forward instead)
            yield self
            return
        attns = [blk.self_attn for blk in self.layers]
        mlps = [blk.mlp for blk in self.layers]
        try:
            for a in attns:
                w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()  # ((H+2KV)*D, hidden)
                a.qkv_packed = _prepack(w, batch_hint)
                a.qkv_weight = w if a.qkv_packed is None else None
                if a.q_proj.bias is not None:
                    a.qkv_bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
                a.o_proj.packed = _prepack(a.o_proj.weight, batch_hint)
            for m in mlps:
                w = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
                m.gate_up_packed = _prepack(w, batch_hint)
                m.gate_up_weight = w if m.gate_up_packed is None else None
                m.down_proj.packed = _prepack(m.down_proj.weight, batch_hint)
            self._packed_lm_head = _prepack(self.lm_head_weight, batch_hint)
            yield self
        finally:
            for a in attns:
                a.qkv_packed = a.qkv_weight = a.qkv_bias = a.o_proj.packed = None
            for m in mlps:
                m.gate_up_packed = m.gate_up_weight = m.down_proj.packed = None
            self._packed_lm_head = None

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens.weight)                           # (N, hidden)
        if self.config.embed_scale is not None:   # the scale rounded to the compute dtype, as transformers does
            x = x * torch.full((), self.config.embed_scale, dtype=x.dtype, device=x.device)
        return x

    def _rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """{False: (cos, sin) of full layers, True: of sliding layers} for the positions, each (N, D)."""
        cfg = self.config
        tables = {False: rope_cos_sin(self.inv_freq, position_ids, dtype, rope_attention_factor(cfg.rope_scaling))}
        if any(cfg.is_local(i) for i in range(cfg.num_layers)):
            if cfg.local_rope_theta is None:
                tables[True] = tables[False]
            else:
                tables[True] = rope_cos_sin(self.inv_freq_local, position_ids, dtype,
                                            rope_attention_factor(cfg.local_rope_scaling))
        return tables

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, cache: CacheArgs | None = None, cu_seqlens_host=None) -> torch.Tensor:
        """input_ids, position_ids: (N,). cu_seqlens (S+1,) int32 for packed/prefill (None: one sequence,
        or decode); cu_seqlens_host: the same offsets on the host (numpy / list), which spares the sdpa backend a
        device sync on CUDA. Returns final hidden states (N, hidden_size), after the last norm."""
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"input_ids and position_ids must be 1-D and equal-shaped (packed, no padding); "
                             f"got input_ids {tuple(input_ids.shape)}, position_ids {tuple(position_ids.shape)}")
        if cache is not None and cache.decode:
            return self._decode_forward(input_ids, position_ids, cache)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, input_ids.numel()], dtype=torch.int32, device=input_ids.device)
        # the sequence bounds (sdpa: per-sequence causal SDPA, O(sum T_s^2), never an (N, N) mask) or the block
        # mask (flex), built once per distinct sliding window and shared by the layers with it
        backend = resolve_backend(self.attn_backend, input_ids.device)
        prepared = {w: prepare_varlen(cu_seqlens, input_ids.numel(), backend, cu_seqlens_host, window=w)
                    for w in set(self.config.layer_windows)}
        x = self._embed(input_ids)                                                     # (N, hidden)
        rope = self._rope_tables(position_ids, x.dtype)                                # (N, D) each
        for blk in self.layers:
            cos, sin = rope[self.config.is_local(blk.layer)]
            x = blk(x, cos, sin, cu_seqlens, max_seqlen, position_ids, cache, backend,
                    prepared[self.config.layer_windows[blk.layer]])
        return self.norm(x)

    def _decode_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: CacheArgs) -> torch.Tensor:
        """One new token per slot against the KV cache: (B,) ids and positions -> (B, hidden).

        Host-overhead-lean (a decode step of a small model is bound by per-op dispatch, not FLOPs):
        everything position-dependent (RoPE cos/sin, the additive masks, the cache rows to write) is
        computed once per step for all layers; per layer there is one q/k/v GEMM, RoPE on q and k
        together, two index_copy_ into the cache, and attention as baddbmm + softmax + bmm straight
        on views of the head-major cache (GQA: the G query heads of a KV head are G rows of one bmm).
        Sliding-window layers get their own mask (positions p > pos - W only). Submodules are called
        through .forward: no hooks run here (no FSDP/autograd in decode).
        Ops only (no host syncs), so the step stays capturable in a CUDA graph.
        """
        cfg, c = self.config, cache.cache
        b, h, kv, d = input_ids.numel(), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g, m, dev = h // kv, c.max_len, input_ids.device
        L = cache.kv_len or m
        dtype = self.embed_tokens.weight.dtype
        ar = torch.arange(L, device=dev)
        if cache.mask is not None:                       # a caller's (B, 1, 1, L) mask: bool or additive
            mask = cache.mask.reshape(b, -1)
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill_(~mask, float("-inf"))
        else:
            mask = torch.zeros((b, L), dtype=dtype, device=dev).masked_fill_(ar > position_ids[:, None], float("-inf"))
        masks = {}
        for w in set(cfg.layer_windows):                 # (B*KV, 1, L) per distinct window
            mw = mask if w is None else mask.masked_fill(ar <= position_ids[:, None] - w, float("-inf"))
            masks[w] = mw.to(dtype)[:, None, :].expand(b, kv, L).reshape(b * kv, 1, L)
        ropes = {}
        for local, (cos, sin) in self._rope_tables(position_ids, dtype).items():
            # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi] (negation is exact)
            ropes[local] = (cos[:, None, :], torch.cat((-sin[:, : d // 2], sin[:, d // 2:]), dim=-1)[:, None, :])
        # flat rows of one layer's cache viewed as (SLOTS*KV*M, D): slot s, head j, position p
        rows = ((cache.slots[:, None] * kv + torch.arange(kv, device=dev)) * m + position_ids[:, None]).reshape(-1)
        scale = d ** -0.5 if cfg.attn_scale is None else cfg.attn_scale
        x = self._embed(input_ids)                                                     # (B, hidden)
        for i, blk in enumerate(self.layers):
            a = blk.self_attn
            cos, sin = ropes[cfg.is_local(i)]
            qkv = a.qkv(blk.input_layernorm.forward(x))                                # (B, (H+2KV)*D)
            qk = qkv[:, : (h + kv) * d].view(b, h + kv, d)
            if a.q_norm is not None:
                qk = torch.cat([a.q_norm.forward(qk[:, :h]), a.k_norm.forward(qk[:, h:])], dim=1)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)                     # RoPE, (B, H+KV, D)
            ck, cv = c.k[i], c.v[i]                                                    # (SLOTS, KV, M, D)
            ck.view(-1, d).index_copy_(0, rows, qk[:, h:].reshape(b * kv, d))
            cv.view(-1, d).index_copy_(0, rows, qkv[:, (h + kv) * d:].reshape(b * kv, d))
            if cache.all_slots:
                ck, cv = ck[:, :, :L], cv[:, :, :L]                                    # views, no copy
            else:
                ck, cv = ck[cache.slots, :, :L], cv[cache.slots, :, :L]                # (B, KV, L, D) gathers
            ck, cv = ck.reshape(b * kv, L, d), cv.reshape(b * kv, L, d)
            q = qk[:, :h].reshape(b * kv, g, d)
            if a.softcap is None:
                s = torch.baddbmm(masks[a.window], q, ck.transpose(1, 2), alpha=scale)  # (B*KV, G, L)
            else:   # Gemma 2: the cap applies to the scaled scores, before the mask
                s = torch.tanh(torch.bmm(q, ck.transpose(1, 2)) * (scale / a.softcap)) * a.softcap + masks[a.window]
            o = torch.bmm(s.softmax(-1), cv)                                           # (B*KV, G, D)
            x = blk.add_mlp(blk.add_attn(x, a.o_proj.forward(o.view(b, h * d))))
        return self.norm.forward(x)
