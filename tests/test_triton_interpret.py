"""Correctness of the Triton log-prob kernels against an fp64 naive oracle, with Cut Cross-Entropy's elementwise
criterion |kernel - fp64| <= |torch same dtype - fp64| + tol on the log-probs and on every gradient element.

Under the Triton interpreter (CPU) the shapes are small; the bf16 branch runs with bf16 inputs and the bf16 rounding
of the softmax gradient, only the tl.dot operands are upcast (the interpreter's bf16 dot multiplies raw bits: see
TritonConfig.upcast). TRITON_INTERPRET must be set before triton is first imported (the @triton.jit decorator reads
it), hence the top-of-module environment set-up. On a CUDA machine the same tests run the compiled kernels, and the
`cuda`-marked tests add Liger's real shapes (skipped without a GPU).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from helpers import TOL, assert_elementwise_close  # noqa: E402
from spin_fast.kernels.triton_logprobs import (  # noqa: E402
    FILTER_BF16,
    TritonConfig,
    TritonLinearLogprobs,
    triton_logprobs_backward,
    triton_logprobs_forward,
)
from spin_fast.loss import reference_token_logprobs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, H, V): one tile; 3 x 47 tokens with H = 31, V = 123 (no dimension a multiple of a block or a power of two);
# a 64 x 32 x 128 shape that is a multiple of every interpreter block (the EVEN_* mask-free variants).
SHAPES = [(1, 16, 16), (141, 31, 123), (64, 32, 128)]
IGNORE = -100
# The default config's V splits (2) and token-tile groups (2) do not divide the tile counts of the ugly shape.


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


def make_inputs(n, h, v, dtype, pattern, seed=0, peaky=0.0):
    """peaky > 0: the hidden state of each token is pulled towards its target's weight row, so the softmax puts
    almost all mass on the target (what a trained LM does on most tokens; where gradient filtering pays)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    targets = make_targets(n, v, pattern, gen)
    if peaky:
        valid = targets != IGNORE
        hidden[valid] = hidden[valid] * 0.1 + peaky * weight[targets[valid]] / weight[targets[valid]].norm(
            dim=1, keepdim=True)
    grad = torch.randn(n, generator=gen)                       # arbitrary upstream dL/d token_logp
    return hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), targets.to(DEVICE), grad.to(DEVICE)


def run_triton(hidden, weight, targets, grad, config=None, softcap=None):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = TritonLinearLogprobs.apply(h, w, targets, IGNORE, config, softcap)
    (out * grad).sum().backward()
    return out.detach(), h.grad, w.grad


def run_reference(hidden, weight, targets, grad, compute_dtype, softcap=None):
    """compute_dtype fp64: the oracle. Otherwise torch in the inputs' dtype (matmuls in that dtype, log_softmax in
    fp32, TRL's recipe): the error budget the kernel is allowed."""
    same_dtype = compute_dtype != torch.float64
    h = (hidden.clone() if same_dtype else hidden.clone().to(compute_dtype)).requires_grad_()
    w = (weight.clone() if same_dtype else weight.clone().to(compute_dtype)).requires_grad_()
    out = reference_token_logprobs(h, w, targets, IGNORE, compute_dtype=torch.float32 if same_dtype else
                                   compute_dtype, upcast_inputs=not same_dtype, softcap=softcap)
    (out * grad.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


def check_all(mine, hidden, weight, targets, grad, dtype, softcap=None, tol=None):
    oracle = run_reference(hidden, weight, targets, grad, torch.float64, softcap)
    baseline = run_reference(hidden, weight, targets, grad, dtype, softcap)
    for name, m, o, b in zip(("logps", "dhidden", "dweight"), mine, oracle, baseline):
        assert_elementwise_close(name, m, b, o, dtype, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["mixed", "all_ignored", "tile_ignored"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference_elementwise(shape, pattern, dtype):
    n, h, v = shape
    hidden, weight, targets, grad = make_inputs(n, h, v, dtype, pattern, seed=n + v)
    out, dh, dw = run_triton(hidden, weight, targets, grad)
    assert out.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    check_all((out, dh, dw), hidden, weight, targets, grad, dtype)
    ignored = (targets == IGNORE).cpu()
    assert torch.all(out.cpu()[ignored] == 0)
    assert torch.all(dh.cpu()[ignored] == 0)            # ignored rows get exactly zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softcap_elementwise(dtype):
    hidden, weight, targets, grad = make_inputs(141, 31, 123, dtype, "mixed", seed=4)
    hidden = hidden * 3                                  # logits of std ~8 against c = 3: tanh's curved range
    mine = run_triton(hidden, weight, targets, grad, softcap=3.0)
    check_all(mine, hidden, weight, targets, grad, dtype, softcap=3.0)


def test_gradient_filter_skips_tiles_within_its_bound():
    """Peaky softmax (p_target ~ 0.99): CCE's filter (eps = 2^-12) must skip tiles (counted by the kernel, not
    timed), and what it drops must respect its bound elementwise: |d dhidden[n, h]| <= eps max|g| sum_v |W[v, h]|,
    |d dweight[v, h]| <= eps max|g| sum_n |hidden[n, h]| (+ the bf16 rounding of the stored gradients). With eps = 0
    nothing is filtered."""
    n, h, v = 64, 32, 256
    hidden, weight, targets, grad = make_inputs(n, h, v, torch.bfloat16, "mixed", seed=5, peaky=7.0)
    logps, lse = triton_logprobs_forward(hidden, weight, targets, IGNORE)
    assert logps[targets != IGNORE].exp().median() > 0.99    # really peaky
    tiles = (n // 16) * (v // 16)
    results = {}
    for eps in (0.0, FILTER_BF16):
        skipped = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        grads = triton_logprobs_backward(hidden, weight, targets, lse, grad, IGNORE,
                                         config=replace_config(grad_filter=eps), skipped=skipped)
        results[eps] = grads, skipped.cpu()
    (dh0, dw0), skip0 = results[0.0]
    (dh1, dw1), skip1 = results[FILTER_BF16]
    assert skip0.tolist() == [0, 0]                      # no token tile is fully ignored; eps 0 filters nothing
    assert skip1[0] == 0 and skip1[1] >= tiles // 4, f"only {int(skip1[1])} of {tiles} tiles filtered"
    g_max = grad.cpu().double().abs().max()
    bound_dh = FILTER_BF16 * g_max * weight.cpu().double().abs().sum(0)[None, :]       # (1, H)
    bound_dw = FILTER_BF16 * g_max * hidden.cpu().double().abs().sum(0)[None, :]       # (1, H)
    ulp = torch.finfo(torch.bfloat16).eps
    for name, a, b, bound in (("dhidden", dh0, dh1, bound_dh), ("dweight", dw0, dw1, bound_dw)):
        a, b = a.cpu().double(), b.cpu().double()
        allowed = bound + ulp * (a.abs() + b.abs())
        assert ((a - b).abs() <= allowed).all(), f"{name}: filtered result outside the filter's bound"
        assert not torch.equal(a, b)                     # the filter did change something (an honest test)


def test_skip_counter_counts_ignored_token_tiles():
    n, h, v = 64, 16, 48
    hidden, weight, targets, grad = make_inputs(n, h, v, torch.float32, "tile_ignored", seed=6)
    _, lse = triton_logprobs_forward(hidden, weight, targets, IGNORE)
    skipped = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    triton_logprobs_backward(hidden, weight, targets, lse, grad, IGNORE, skipped=skipped)
    assert skipped.cpu().tolist() == [v // 16, 0]        # tokens 16..31: one token tile x 3 vocab tiles, no filter


def replace_config(**kw):
    from dataclasses import replace
    return replace(TritonConfig.default(), **kw)


@pytest.mark.parametrize("v_splits", [1, 3, 50])
def test_forward_v_splits_and_lse(v_splits):
    n, h, v = 47, 31, 123
    hidden, weight, targets, _ = make_inputs(n, h, v, torch.float32, "mixed", seed=2)
    config = TritonConfig(block_n=16, block_v=16, block_h=16, num_warps=4, num_stages=1, v_splits=v_splits)
    logps, lse = triton_logprobs_forward(hidden, weight, targets, IGNORE, config)
    logits = hidden.double() @ weight.double().t()
    torch.testing.assert_close(lse.double().cpu(), torch.logsumexp(logits, dim=-1).cpu(), rtol=1e-5, atol=1e-5)
    ref = reference_token_logprobs(hidden, weight, targets, IGNORE, compute_dtype=torch.float64)
    torch.testing.assert_close(logps.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_n", [1, 3])
def test_backward_flags_group_order_and_noncontiguous_inputs(group_n):
    n, h, v = 70, 24, 40
    config = replace_config(group_n=group_n)
    hidden, weight, targets, grad = make_inputs(n, h, v, torch.float32, "mixed", seed=3)
    hidden_nc = torch.stack([hidden, -hidden], dim=2)[:, :, 0]      # non-contiguous view, same values
    assert not hidden_nc.is_contiguous()
    logps, lse = triton_logprobs_forward(hidden_nc, weight, targets, IGNORE)
    _, ref_dh, ref_dw = run_reference(hidden, weight, targets, grad, torch.float64)
    _, base_dh, base_dw = run_reference(hidden, weight, targets, grad, torch.float32)
    dh, dw = triton_logprobs_backward(hidden_nc, weight, targets, lse, grad, IGNORE, need_weight_grad=False,
                                      config=config)
    assert dw is None
    assert_elementwise_close("dhidden", dh, base_dh, ref_dh, torch.float32)
    dh, dw = triton_logprobs_backward(hidden, weight, targets, lse, grad, IGNORE, need_hidden_grad=False,
                                      config=config)
    assert dh is None
    assert_elementwise_close("dweight", dw, base_dw, ref_dw, torch.float32)
    # Autograd only asks for what requires grad.
    w = weight.clone().requires_grad_()
    TritonLinearLogprobs.apply(hidden, w, targets, IGNORE, None).sum().backward()
    ones = torch.ones(n, device=DEVICE)
    assert_elementwise_close("dweight", w.grad, run_reference(hidden, weight, targets, ones, torch.float32)[2],
                             run_reference(hidden, weight, targets, ones, torch.float64)[2], torch.float32)


def test_config_validation_and_filter_defaults():
    assert TritonConfig().filter_eps(torch.bfloat16) == 0.0           # exact by default
    assert TritonConfig(grad_filter=FILTER_BF16).filter_eps(torch.bfloat16) == 2.0 ** -12
    for bad in (dict(grad_filter=-1.0), dict(grad_filter=1.0), dict(group_n=0), dict(block_n=24)):
        with pytest.raises(ValueError):
            TritonConfig(**bad)


def test_interpreter_config_is_default_under_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    assert TritonConfig.default() == TritonConfig.for_interpreter()
    assert TritonConfig.for_interpreter().block_n == 16 and TritonConfig.for_interpreter().upcast


# ----------------------------------------------------------------------------------------------------------------
# Real shapes on a GPU (Liger's test shapes: N x H x V), peaky targets, bf16 and fp32. Skipped without CUDA.
# ----------------------------------------------------------------------------------------------------------------

CUDA_SHAPES = [(2048, 4096, 32000), (1001, 4104, 32003), (4096, 4096, 128256)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_real_shapes_elementwise(shape, dtype):
    n, h, v = shape
    hidden, weight, targets, grad = make_inputs(n, h, v, dtype, "mixed", seed=n, peaky=40.0)
    hidden, weight = hidden / h ** 0.25, weight / h ** 0.25          # target logit ~20, the others ~N(0, 0.3)
    mine = run_triton(hidden, weight, targets, grad, config=TritonConfig.for_hopper())
    check_all(mine, hidden, weight, targets, grad, dtype)
    torch.cuda.empty_cache()
