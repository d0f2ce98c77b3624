"""linear_logprobs: every impl against an fp64 oracle, forward and both gradients, over ugly shapes and dtypes."""
import pytest
import torch

from spin_fast.kernels import chunk_rows, linear_logprobs
from spin_fast.loss import reference_token_logprobs

from helpers import assert_elementwise_close, max_err, needs_triton, on_impl_device

# (N, H, V): N=1, N=47, H=31, V=123 not a multiple of any block, 3x47 tokens (B x T flattened), V > a block.
SHAPES = [(1, 16, 16), (47, 31, 123), (141, 31, 123), (64, 32, 200), (5, 7, 3)]
IMPLS = ["torch", pytest.param("triton", marks=needs_triton), "reference"]


def make_inputs(n, h, v, dtype, seed, ignore_fraction=0.25, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * 2.0
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2.0
    targets = torch.randint(0, v, (n,), generator=g)
    targets[-1] = v - 1                                          # the last vocab column
    targets[torch.rand(n, generator=g) < ignore_fraction] = -100
    if all_ignored:
        targets[:] = -100
    upstream = torch.randn(n, generator=g, dtype=torch.float64)  # arbitrary dL/dlogp per token
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def value_and_grads(fn, hidden, weight, targets, upstream):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logps = fn(hidden, weight, targets)
    (logps.double() * upstream).sum().backward()
    return logps.detach(), hidden.grad, weight.grad


def torch_same_dtype(hidden, weight, targets):
    """What users run today in that dtype: matmul in the input dtype, log_softmax in fp32 (TRL's upcast)."""
    return reference_token_logprobs(hidden, weight, targets, upcast_inputs=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_oracle(impl, dtype, shape):
    n, h, v = shape
    hidden, weight, targets, upstream = make_inputs(n, h, v, dtype, seed=n * 1000 + h + v)
    # A tiny budget forces many chunks in the torch path (rows = 4 here), so chunk edges are exercised.
    budget = 4 * 4 * v
    assert chunk_rows(v, budget) == 4

    def ours(hd, wt, tg):
        return linear_logprobs(hd, wt, tg, impl=impl, memory_budget_bytes=budget)
    ours = on_impl_device(impl, ours)

    out, dh, dw = value_and_grads(ours, hidden, weight, targets, upstream)
    ref, ref_dh, ref_dw = value_and_grads(
        lambda hd, wt, tg: reference_token_logprobs(hd, wt, tg, compute_dtype=torch.float64),
        hidden.double(), weight.double(), targets, upstream)
    base, base_dh, base_dw = value_and_grads(torch_same_dtype, hidden, weight, targets, upstream)

    out = out.cpu()
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert (out[targets == -100] == 0).all()
    assert_elementwise_close("logps", out, base, ref, dtype)
    assert_elementwise_close("dhidden", dh, base_dh, ref_dh, dtype)
    assert_elementwise_close("dweight", dw, base_dw, ref_dw, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(47, 31, 123), (5, 7, 3)], ids=lambda s: "x".join(map(str, s)))
def test_softcap_matches_fp64_oracle(impl, dtype, shape):
    """Soft-capped logits c tanh(z / c) with c = 3 against logits of std ~4: most of them in tanh's curved range,
    so a missing or wrong (1 - (z'/c)^2) factor in either gradient cannot pass."""
    n, h, v = shape
    softcap = 3.0
    hidden, weight, targets, upstream = make_inputs(n, h, v, dtype, seed=7 * n + v)
    budget = 4 * 4 * v

    def ours(hd, wt, tg):
        return linear_logprobs(hd, wt, tg, impl=impl, memory_budget_bytes=budget, softcap=softcap)

    out, dh, dw = value_and_grads(on_impl_device(impl, ours), hidden, weight, targets, upstream)
    ref, ref_dh, ref_dw = value_and_grads(
        lambda hd, wt, tg: reference_token_logprobs(hd, wt, tg, compute_dtype=torch.float64, softcap=softcap),
        hidden.double(), weight.double(), targets, upstream)
    base, base_dh, base_dw = value_and_grads(
        lambda hd, wt, tg: reference_token_logprobs(hd, wt, tg, upcast_inputs=False, softcap=softcap),
        hidden, weight, targets, upstream)
    uncapped = reference_token_logprobs(hidden.double(), weight.double(), targets, compute_dtype=torch.float64)
    assert max_err(uncapped, ref) > 0.1               # the cap changes the answer by far more than the tolerance
    assert_elementwise_close("logps", out.cpu(), base, ref, dtype)
    assert_elementwise_close("dhidden", dh, base_dh, ref_dh, dtype)
    assert_elementwise_close("dweight", dw, base_dw, ref_dw, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_targets_ignored_gives_zeros(impl):
    hidden, weight, targets, upstream = make_inputs(9, 16, 40, torch.float32, seed=3, all_ignored=True)
    out, dh, dw = value_and_grads(on_impl_device(impl, lambda a, b, c: linear_logprobs(a, b, c, impl=impl)),
                                  hidden, weight, targets, upstream)
    out = out.cpu()
    assert torch.equal(out, torch.zeros(9))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_custom_ignore_index():
    hidden, weight, targets, upstream = make_inputs(20, 8, 30, torch.float64, seed=5, ignore_fraction=0.0)
    targets[:6] = 7                        # 7 is now the ignored value, though a valid vocab id
    out = linear_logprobs(hidden, weight, targets, ignore_index=7, impl="torch")
    ref = reference_token_logprobs(hidden, weight, targets, ignore_index=7, compute_dtype=torch.float64)
    assert (out[:6] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_chunked_gradcheck_fp64():
    hidden, weight, targets, _ = make_inputs(7, 5, 11, torch.float64, seed=11)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda hd, wt: linear_logprobs(hd, wt, targets, impl="torch", memory_budget_bytes=3 * 8 * 11)
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7)


def test_chunk_rows_follow_the_budget():
    assert chunk_rows(32000, 64 << 20) == (64 << 20) // (4 * 32000)
    assert chunk_rows(128256, 1) == 1                      # never zero rows
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        chunk_rows(100, 0)


def test_budget_does_not_change_the_answer():
    hidden, weight, targets, upstream = make_inputs(50, 12, 77, torch.float32, seed=2)
    results = [value_and_grads(lambda a, b, c: linear_logprobs(a, b, c, impl="torch", memory_budget_bytes=bud),
                               hidden, weight, targets, upstream) for bud in (4 * 77, 4 * 77 * 13, 1 << 30)]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
