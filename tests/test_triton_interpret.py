"""Correctness of the Triton log-prob kernels under the Triton interpreter (CPU), against an fp64 naive oracle.

TRITON_INTERPRET must be set before triton is first imported (the @triton.jit decorator reads it), hence the
top-of-module environment set-up. On a CUDA machine the same tests run the compiled kernels on the GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from spin_fast.kernels.triton_logprobs import (  # noqa: E402
    TritonConfig,
    TritonLinearLogprobs,
    triton_logprobs_backward,
    triton_logprobs_forward,
)
from spin_fast.loss import reference_token_logprobs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 16, 16), (47, 31, 123), (64, 32, 200)]
IGNORE = -100


def make_targets(n, v, pattern, gen):
    """mixed: some ignored rows, last row on the last vocab column; all_ignored: every target is -100;
    tile_ignored: a whole 16-row tile ignored (exercises the skip of zero-gradient N tiles)."""
    targets = torch.randint(0, v, (n,), generator=gen)
    if pattern == "all_ignored":
        return torch.full((n,), IGNORE, dtype=torch.int64)
    targets[::5] = IGNORE
    targets[-1] = v - 1
    if n > 2:
        targets[1] = v - 1
    if pattern == "tile_ignored":
        targets[16:32] = IGNORE
    return targets


def make_inputs(n, h, v, dtype, pattern, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype)
    targets = make_targets(n, v, pattern, gen)
    grad = torch.randn(n, generator=gen)                       # arbitrary upstream dL/d token_logp
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), grad.to(DEVICE)


def run_triton(hidden, weight, targets, grad, config=None):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = TritonLinearLogprobs.apply(h, w, targets, IGNORE, config)
    (out * grad).sum().backward()
    return out.detach(), h.grad, w.grad


def run_reference(hidden, weight, targets, grad, compute_dtype):
    h = hidden.clone().to(compute_dtype).requires_grad_()
    w = weight.clone().to(compute_dtype).requires_grad_()
    out = reference_token_logprobs(h, w, targets, IGNORE, compute_dtype=compute_dtype)
    (out * grad.to(compute_dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


def rel_err(x, ref):
    """max |x - ref| / max |ref| (absolute error if ref is identically zero)."""
    ref = ref.double().cpu()
    diff = (x.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def check_fp32(x, ref):
    ref = ref.double().cpu()
    scale = max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(x.double().cpu(), ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("pattern", ["mixed", "all_ignored", "tile_ignored"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_reference(shape, pattern):
    n, h, v = shape
    hidden, weight, targets, grad = make_inputs(n, h, v, torch.float32, pattern)
    out, dh, dw = run_triton(hidden, weight, targets, grad)
    ref, ref_dh, ref_dw = run_reference(hidden, weight, targets, grad, torch.float64)
    assert out.dtype == torch.float32 and dh.dtype == torch.float32 and dw.dtype == torch.float32
    check_fp32(out, ref)
    check_fp32(dh, ref_dh)
    check_fp32(dw, ref_dw)
    ignored = (targets == IGNORE).cpu()
    assert torch.all(out.cpu()[ignored] == 0)
    assert torch.all(dh.cpu()[ignored] == 0)            # ignored rows get exactly zero gradient


@pytest.mark.parametrize("pattern", ["mixed", "all_ignored"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_no_worse_than_torch_bf16(shape, pattern):
    n, h, v = shape
    hidden, weight, targets, grad = make_inputs(n, h, v, torch.bfloat16, pattern, seed=1)
    out, dh, dw = run_triton(hidden, weight, targets, grad)
    assert out.dtype == torch.float32 and dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    ref = run_reference(hidden, weight, targets, grad, torch.float64)
    naive = run_reference(hidden, weight, targets, grad, torch.bfloat16)
    for name, mine, oracle, baseline in zip(("logps", "dhidden", "dweight"), (out, dh, dw), ref, naive):
        err, base = rel_err(mine, oracle), rel_err(baseline, oracle)
        assert err <= base + 2e-3, f"{name}: triton err {err:.3g} > torch-bf16 err {base:.3g} + 2e-3"


@pytest.mark.parametrize("v_splits", [1, 3, 50])
def test_forward_v_splits_and_lse(v_splits):
    n, h, v = 47, 31, 123
    hidden, weight, targets, _ = make_inputs(n, h, v, torch.float32, "mixed", seed=2)
    config = TritonConfig(block_n=16, block_v=16, block_h=16, num_warps=4, num_stages=1, v_splits=v_splits)
    logps, lse = triton_logprobs_forward(hidden, weight, targets, IGNORE, config)
    logits = hidden.double() @ weight.double().t()
    check_fp32(lse, torch.logsumexp(logits, dim=-1))
    check_fp32(logps, reference_token_logprobs(hidden, weight, targets, IGNORE, compute_dtype=torch.float64))


def test_backward_flags_and_noncontiguous_inputs():
    n, h, v = 20, 24, 40
    hidden, weight, targets, grad = make_inputs(n, h, v, torch.float32, "mixed", seed=3)
    hidden_nc = torch.stack([hidden, -hidden], dim=2)[:, :, 0]      # non-contiguous view, same values
    assert not hidden_nc.is_contiguous()
    logps, lse = triton_logprobs_forward(hidden_nc, weight, targets, IGNORE)
    _, ref_dh, ref_dw = run_reference(hidden, weight, targets, grad, torch.float64)
    dh, dw = triton_logprobs_backward(hidden_nc, weight, targets, lse, grad, IGNORE, need_weight_grad=False)
    assert dw is None
    check_fp32(dh, ref_dh)
    dh, dw = triton_logprobs_backward(hidden, weight, targets, lse, grad, IGNORE, need_hidden_grad=False)
    assert dh is None
    check_fp32(dw, ref_dw)
    # Autograd only asks for what requires grad.
    w = weight.clone().requires_grad_()
    TritonLinearLogprobs.apply(hidden, w, targets, IGNORE, None).sum().backward()
    check_fp32(w.grad, run_reference(hidden, weight, targets, torch.ones(n), torch.float64)[2])


def test_interpreter_config_is_default_under_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    assert TritonConfig.default() == TritonConfig.for_interpreter()
    assert TritonConfig.for_interpreter().block_n == 16 and TritonConfig.for_interpreter().upcast
