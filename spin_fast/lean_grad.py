"""Autograd functions that keep fewer activations for backward than the ops they replace (training only).

Why: without activation checkpointing, a training micro-batch keeps every tensor autograd saves in every block
until backward. Composed of plain ops, two small pieces save more than their backward needs:

- RMSNorm, y = w * (x * r) with r = rsqrt(mean(x^2) + eps): autograd keeps x, r and the normalised x * r (N, H).
  Backward needs only x and r (x * r is recomputed, one elementwise op):
      n = x r,  g_n = g_y w,  g_x = r (g_n - n mean(g_n n)),  g_w = sum_rows(g_y n).
- The gated activation a(g) * u (SwiGLU, GeGLU): autograd keeps g, a(g) and u (3 (N, I)) besides the product the
  down projection saves. Backward needs only g and u: g_g = a'(g) (g_out u), g_u = g_out a(g), a(g) recomputed.

Per token and decoder block this drops 2H + I floats (measured with saved_tensors_hooks on SmolLM2-135M, fp32, a
2019-token micro-batch: a block kept 7 (N, H) + 4 (N, I) + attention's q/k/v/out, 2719 MiB over 30 blocks; this
removes 2688 floats a token and block, ~620 MiB) with the same arithmetic as autograd's (tests/test_lean_grad.py).
RoPE needs nothing of the kind: with constant tables autograd already keeps only cos and sin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps: float, plus_one: bool):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)                       # (..., 1) fp32
        n = xf * r                                                                     # (..., H) fp32
        ctx.save_for_backward(x, w, r)
        ctx.plus_one = plus_one
        if plus_one:         # Gemma: the product in fp32, then cast
            return (n * (1.0 + w.float())).to(x.dtype)
        return w * n.to(x.dtype)                                                       # Llama: cast, then scale

    @staticmethod
    def backward(ctx, gy):
        x, w, r = ctx.saved_tensors
        n = x.float() * r                                                              # (..., H) recomputed
        rows = tuple(range(gy.dim() - 1))
        if ctx.plus_one:
            gyf = gy.float()
            gw = (gyf * n).sum(rows).to(w.dtype) if ctx.needs_input_grad[1] else None
            gn = gyf * (1.0 + w.float())
        else:
            gw = (gy * n.to(x.dtype)).sum(rows).to(w.dtype) if ctx.needs_input_grad[1] else None
            gn = (gy * w).float()
        gx = r * (gn - n * (gn * n).mean(-1, keepdim=True)) if ctx.needs_input_grad[0] else None
        return (gx.to(x.dtype) if gx is not None else None), gw, None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim keeping only x and the (..., 1) rsqrt for backward (model.RMSNorm's maths)."""
    return _RMSNorm.apply(x, w, eps, plus_one)


_ACT_BACKWARD = {
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "gelu_pytorch_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x),
}
_ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class _GatedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act: str):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return _ACT[act](gate) * up                                                    # (N, I)

    @staticmethod
    def backward(ctx, go):
        gate, up = ctx.saved_tensors
        g_gate = _ACT_BACKWARD[ctx.act](go * up, gate) if ctx.needs_input_grad[0] else None
        g_up = go * _ACT[ctx.act](gate) if ctx.needs_input_grad[1] else None
        return g_gate, g_up, None


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up keeping only gate and up for backward. act: a key of model.ACTIVATIONS."""
    return _GatedAct.apply(gate, up, act)
