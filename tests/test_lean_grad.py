"""lean_grad's autograd functions: outputs and gradients equal autograd of the plain ops, and they save less."""
import pytest
import torch
import torch.nn.functional as F

from spin_fast import lean_grad
from spin_fast.model import ACTIVATIONS

# RMSNorm takes its statistics in fp32 whatever the dtype (model.RMSNorm), so fp64 inputs agree to fp32 rounding
TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def plain_rms(x, w, eps, plus_one):
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (n * (1.0 + w.float())).to(x.dtype) if plus_one else w * n.to(x.dtype)


def grads(fn, *inputs):
    """(output, grads of (output * fixed random weights).sum() w.r.t. inputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in leaves]


def check(ours, ref, dtype):
    tol = TOL[dtype]
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.double().abs().max().clamp_min(1.0)
        assert (a.double() - b.double()).abs().max() <= tol * scale, (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (7, 13), (3, 5, 64)])
@pytest.mark.parametrize("plus_one", [False, True])
def test_rms_norm_matches_autograd(dtype, shape, plus_one):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    w = (torch.randn(shape[-1], dtype=torch.float64) * 0.5 + (0 if plus_one else 1)).to(dtype)
    y, g = grads(lambda a, b: lean_grad.rms_norm(a, b, 1e-6, plus_one), x, w)
    y_ref, g_ref = grads(lambda a, b: plain_rms(a, b, 1e-6, plus_one), x, w)
    check([y, *g], [y_ref, *g_ref], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(1, 3), (17, 33)])
def test_gated_act_matches_autograd(dtype, act, shape):
    torch.manual_seed(1)
    gate, up = (torch.randn(shape, dtype=torch.float64) * 2).to(dtype), torch.randn(shape).to(dtype)
    y, g = grads(lambda a, b: lean_grad.gated_act(a, b, act), gate, up)
    y_ref, g_ref = grads(lambda a, b: ACTIVATIONS[act](a) * b, gate, up)
    check([y, *g], [y_ref, *g_ref], dtype)


def saved_bytes(fn, *inputs):
    """Bytes of the distinct storages autograd saves for backward of fn(*inputs), inputs excluded."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_they_save_less_than_the_plain_ops():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    # plain RMSNorm keeps the (64, 32) normalised x besides the (64, 1) rsqrt; ours only the rsqrt
    assert saved_bytes(lambda a, b: lean_grad.rms_norm(a, b, 1e-6), x, w) == 64 * 4
    assert saved_bytes(lambda a, b: plain_rms(a, b, 1e-6, False), x, w) >= 64 * 32 * 4
    # plain SwiGLU keeps silu(g) (64, 32); ours nothing besides its inputs
    u = torch.randn(64, 32, requires_grad=True)
    assert saved_bytes(lambda a, b: lean_grad.gated_act(a, b, "silu"), x, u) == 0
    assert saved_bytes(lambda a, b: F.silu(a) * b, x, u) >= 64 * 32 * 4
