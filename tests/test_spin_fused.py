"""spin_loss_from_hidden on packed batches: every impl vs the fp64 naive oracle, loss, metrics and both gradients."""
import math

import pytest
import torch

from spin_fast.kernels import spin_loss_from_hidden
from spin_fast.loss import reference_spin_loss_from_hidden, reference_sequence_logps, reference_token_logprobs

from helpers import TOL, assert_elementwise_close, needs_triton, on_impl_device, random_packed_batch

IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def ref_logps_for(batch, shift=0.3, seed=7):
    """Reference log-probs of a slightly different model, per pair, computed in fp64."""
    g = torch.Generator().manual_seed(seed)
    ref_weight = batch["weight"].double() + shift * torch.randn(batch["weight"].shape, generator=g,
                                                                dtype=torch.float64) / batch["weight"].shape[1] ** 0.5
    ref_hidden = batch["hidden"].double() + shift * torch.randn(batch["hidden"].shape, generator=g,
                                                                dtype=torch.float64)
    tok = reference_token_logprobs(ref_hidden, ref_weight, batch["targets"], compute_dtype=torch.float64)
    seq = reference_sequence_logps(tok, batch["seq_index"], batch["num_sequences"])
    return ref_hidden, ref_weight, seq[batch["chosen_index"]], seq[batch["rejected_index"]]


def run(fn, batch, **kwargs):
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    loss, metrics = fn(hidden, weight, batch["targets"], batch["seq_index"], batch["chosen_index"],
                       batch["rejected_index"], **kwargs)
    loss.backward()
    return loss.detach(), metrics, hidden.grad, weight.grad


def oracle(batch, ref_c, ref_r, **kw):
    b64 = dict(batch, hidden=batch["hidden"].double(), weight=batch["weight"].double())
    return run(lambda *a, **k: reference_spin_loss_from_hidden(*a, compute_dtype=torch.float64, **k), b64,
               ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, **kw)


def same_dtype_torch(batch, ref_c, ref_r, **kw):
    """Naive full logits in the input dtype (fp32 softmax), as users run it today."""
    return run(lambda *a, **k: reference_spin_loss_from_hidden(*a, upcast_inputs=False, **k),
               batch, ref_chosen_logps=ref_c.float(), ref_rejected_logps=ref_r.float(), **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("layout", [
    # (pairs, unpaired sequences, max_len, H, V, long first pair, a sequence with every target ignored)
    (1, 0, 9, 16, 37, 0, False),
    (5, 2, 23, 31, 123, 0, True),
    (4, 1, 12, 24, 70, 61, False),       # one pair far longer than a chunk: the two-pass fallback
], ids=["one-pair", "ugly", "long-pair"])
def test_matches_fp64_oracle(impl, dtype, loss_type, layout):
    check_against_oracle(impl, dtype, loss_type, layout, rpo_alpha=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type, layout", [
    ("sigmoid", (5, 2, 23, 31, 123, 0, True)),   # ugly, with a chosen sequence that may have no scored token
    ("hinge", (4, 1, 12, 24, 70, 61, False)),    # the long pair streamed twice
], ids=["sigmoid-ugly", "hinge-long-pair"])
def test_rpo_nll_term_matches_fp64_oracle(impl, dtype, loss_type, layout):
    """Iterative RPO's alpha * (-log pi(y|x) / |y|) on the human answer: loss and both gradients vs fp64."""
    check_against_oracle(impl, dtype, loss_type, layout, rpo_alpha=1.0)


def check_against_oracle(impl, dtype, loss_type, layout, rpo_alpha):
    pairs, unpaired, max_len, h, v, long_len, all_ignored = layout
    batch = random_packed_batch(pairs, unpaired, max_len, h, v, dtype, seed=pairs * 31 + v,
                                long_pair_len=long_len, all_ignored_sequence=all_ignored)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    # The reference log-probs are inputs: every implementation gets the same dtype-rounded values.
    ref_c, ref_r = ref_c.to(dtype).double(), ref_r.to(dtype).double()
    beta = 0.5 if loss_type == "sigmoid" else 0.05
    kw = dict(beta=beta, loss_type=loss_type, rpo_alpha=rpo_alpha)
    # 16 rows per chunk in the torch path: several pairs per chunk, pairs cut between chunks, long pair streamed.
    loss, metrics, dh, dw = run(on_impl_device(impl, spin_loss_from_hidden), batch, ref_chosen_logps=ref_c.to(dtype),
                                ref_rejected_logps=ref_r.to(dtype), impl=impl, memory_budget_bytes=16 * 4 * v, **kw)
    o_loss, o_metrics, o_dh, o_dw = oracle(batch, ref_c, ref_r, **kw)
    b_loss, b_metrics, b_dh, b_dw = same_dtype_torch(batch, ref_c.to(dtype), ref_r.to(dtype), **kw)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert_elementwise_close("loss", loss, b_loss, o_loss, dtype)
    assert_elementwise_close("dhidden", dh, b_dh, o_dh, dtype)
    assert_elementwise_close("dweight", dw, b_dw, o_dw, dtype)
    for key in METRIC_KEYS:
        assert_elementwise_close(key, metrics[key], b_metrics[key], o_metrics[key], dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [(5, 2, 23, 31, 123, 0, True), (4, 1, 12, 24, 70, 61, False)],
                         ids=["ugly", "long-pair"])
def test_softcap_matches_fp64_oracle(impl, dtype, layout):
    """Soft-capped logits (c = 1.5 against logits of std ~1.4): one pass, and the long pair's two-pass fallback."""
    pairs, unpaired, max_len, h, v, long_len, all_ignored = layout
    batch = random_packed_batch(pairs, unpaired, max_len, h, v, dtype, seed=pairs * 37 + v,
                                long_pair_len=long_len, all_ignored_sequence=all_ignored)
    batch["weight"] = batch["weight"] * 1.4
    _, _, ref_c, ref_r = ref_logps_for(batch)
    ref_c, ref_r = ref_c.to(dtype).double(), ref_r.to(dtype).double()
    kw = dict(beta=0.5, loss_type="sigmoid", softcap=1.5)
    loss, metrics, dh, dw = run(on_impl_device(impl, spin_loss_from_hidden), batch, ref_chosen_logps=ref_c.to(dtype),
                                ref_rejected_logps=ref_r.to(dtype), impl=impl, memory_budget_bytes=16 * 4 * v, **kw)
    o_loss, o_metrics, o_dh, o_dw = oracle(batch, ref_c, ref_r, **kw)
    b_loss, b_metrics, b_dh, b_dw = same_dtype_torch(batch, ref_c.to(dtype), ref_r.to(dtype), **kw)
    plain = oracle(batch, ref_c, ref_r, beta=0.5, loss_type="sigmoid")
    assert abs(plain[0].item() - o_loss.item()) > 1e-3                 # the cap matters at this scale
    assert_elementwise_close("loss", loss, b_loss, o_loss, dtype)
    assert_elementwise_close("dhidden", dh, b_dh, o_dh, dtype)
    assert_elementwise_close("dweight", dw, b_dw, o_dw, dtype)
    for key in METRIC_KEYS:
        assert_elementwise_close(key, metrics[key], b_metrics[key], o_metrics[key], dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_in_pass_reference_equals_precomputed(impl):
    batch = random_packed_batch(4, 1, 20, 16, 50, torch.float32, seed=4)
    ref_hidden, ref_weight, ref_c, ref_r = ref_logps_for(batch)
    fused = on_impl_device(impl, spin_loss_from_hidden)
    pre = run(fused, batch, ref_chosen_logps=ref_c.float(), ref_rejected_logps=ref_r.float(),
              impl=impl)
    inpass = run(fused, batch, ref_hidden=ref_hidden.float(), ref_weight=ref_weight.float(),
                 impl=impl)
    torch.testing.assert_close(pre[0], inpass[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre[2], inpass[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pre[3], inpass[3], rtol=1e-4, atol=1e-6)
    for key in METRIC_KEYS:
        torch.testing.assert_close(pre[1][key], inpass[1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_policy_equal_to_reference_gives_ln2(impl):
    batch = random_packed_batch(3, 0, 15, 16, 40, torch.float32, seed=9)
    loss, metrics = on_impl_device(impl, spin_loss_from_hidden)(
        batch["hidden"], batch["weight"], batch["targets"], batch["seq_index"], batch["chosen_index"],
        batch["rejected_index"], ref_hidden=batch["hidden"], ref_weight=batch["weight"], impl=impl)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == 0.0, key


def test_pair_order_does_not_matter():
    batch = random_packed_batch(5, 0, 14, 12, 33, torch.float64, seed=12)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    base = run(spin_loss_from_hidden, batch, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, impl="torch",
               memory_budget_bytes=10 * 8 * 33)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    shuffled = dict(batch, chosen_index=batch["chosen_index"][perm], rejected_index=batch["rejected_index"][perm])
    other = run(spin_loss_from_hidden, shuffled, ref_chosen_logps=ref_c[perm], ref_rejected_logps=ref_r[perm],
                impl="torch", memory_budget_bytes=10 * 8 * 33)
    torch.testing.assert_close(base[0], other[0])
    torch.testing.assert_close(base[2], other[2])
    torch.testing.assert_close(base[3], other[3])


@pytest.mark.parametrize("impl", IMPLS)
def test_sum_mean_and_global_normalizer(impl):
    """Micro-batches normalised by the global pair count add up to the full-batch mean (grad accumulation)."""
    batch = random_packed_batch(4, 0, 10, 8, 29, torch.float32, seed=21)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    kw = dict(ref_chosen_logps=ref_c.float(), ref_rejected_logps=ref_r.float(), impl=impl)
    fused = on_impl_device(impl, spin_loss_from_hidden)
    mean = run(fused, batch, **kw)
    total = run(fused, batch, reduction="sum", **kw)
    normed = run(fused, batch, normalizer=torch.tensor(8.0), **kw)
    torch.testing.assert_close(total[0], mean[0] * 4)
    torch.testing.assert_close(normed[0], mean[0] / 2)
    torch.testing.assert_close(total[3], mean[3] * 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normed[2], mean[2] / 2, rtol=1e-5, atol=1e-7)


def test_upstream_gradient_scales_stored_gradients():
    batch = random_packed_batch(2, 0, 10, 8, 21, torch.float64, seed=5)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    one = run(spin_loss_from_hidden, batch, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, impl="torch")
    three = run(lambda *a, **k: tuple([spin_loss_from_hidden(*a, **k)[0] * 3.0, None]), batch,
                ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, impl="torch")
    torch.testing.assert_close(three[2], one[2] * 3)
    torch.testing.assert_close(three[3], one[3] * 3)


@pytest.mark.parametrize("loss_type, rpo_alpha", [("sigmoid", 0.0), ("hinge", 0.0), ("sigmoid", 0.8)])
def test_finite_differences_fused_torch_fp64(loss_type, rpo_alpha):
    """Directional derivatives <grad, d> against central differences (L(x + eps d) - L(x - eps d)) / 2 eps.

    (torch.autograd.gradcheck cannot be used: it backpropagates twice through one graph, which the fused loss
    refuses because it hands its forward-formed gradients over to .grad.)"""
    batch = random_packed_batch(2, 1, 6, 5, 9, torch.float64, seed=8)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    args = (batch["targets"], batch["seq_index"], batch["chosen_index"], batch["rejected_index"])

    def loss_of(hidden, weight):
        return spin_loss_from_hidden(hidden, weight, *args, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                     beta=0.7 if loss_type == "sigmoid" else 0.05, loss_type=loss_type,
                                     impl="torch", memory_budget_bytes=4 * 8 * 9, rpo_alpha=rpo_alpha)[0]

    _, _, dh, dw = run(lambda h, w, *a, **k: (loss_of(h, w), None), batch)
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        d_h = torch.randn(batch["hidden"].shape, generator=g, dtype=torch.float64)
        d_w = torch.randn(batch["weight"].shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            plus = loss_of(batch["hidden"] + eps * d_h, batch["weight"] + eps * d_w)
            minus = loss_of(batch["hidden"] - eps * d_h, batch["weight"] - eps * d_w)
        numeric = ((plus - minus) / (2 * eps)).item()
        analytic = ((dh * d_h).sum() + (dw * d_w).sum()).item()
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_no_grad_forward_only():
    batch = random_packed_batch(3, 0, 10, 8, 21, torch.float32, seed=6)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    with torch.no_grad():
        loss, _ = spin_loss_from_hidden(batch["hidden"], batch["weight"], batch["targets"], batch["seq_index"],
                                        batch["chosen_index"], batch["rejected_index"], ref_c.float(), ref_r.float())
    o_loss = oracle(batch, ref_c, ref_r)[0]
    assert abs(loss.item() - o_loss.item()) <= TOL[torch.float32] * 10 + 1e-6


def test_second_backward_is_refused_clearly():
    batch = random_packed_batch(2, 0, 8, 8, 21, torch.float64, seed=3)
    _, _, ref_c, ref_r = ref_logps_for(batch)
    hidden = batch["hidden"].clone().requires_grad_(True)
    loss, _ = spin_loss_from_hidden(hidden, batch["weight"], batch["targets"], batch["seq_index"],
                                    batch["chosen_index"], batch["rejected_index"], ref_c, ref_r)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
