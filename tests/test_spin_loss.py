"""spin_loss (spin_fast.loss): formulas, invariants, metrics, gradients."""
import math

import pytest
import torch

from spin_fast.loss import pair_loss_margin_grad, spin_loss


def pair_inputs(num_pairs, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(-50 * torch.rand(num_pairs, generator=g, dtype=torch.float64)).to(dtype) for _ in range(4)]


def expected_losses(pc, pr, rc, rr, beta, loss_type):
    """Scalar-by-scalar with the math module: an implementation independent of the one under test."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((a - c) - (b - d))
        if loss_type == "sigmoid":
            out.append(math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z)))
        else:
            out.append(max(0.0, 1.0 - z))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_values(loss_type, beta, reduction):
    pc, pr, rc, rr = pair_inputs(13, seed=int(beta * 100))
    loss, metrics = spin_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, reduction=reduction)
    per_pair = expected_losses(pc, pr, rc, rr, beta, loss_type)
    expected = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}[reduction]
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    rewards_c, rewards_r = beta * (pc - rc), beta * (pr - rr)
    torch.testing.assert_close(metrics["rewards/chosen"], rewards_c.float().mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/rejected"], rewards_r.float().mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/margins"], (rewards_c - rewards_r).float().mean(), rtol=1e-5,
                               atol=1e-6)
    assert metrics["rewards/accuracies"].item() == pytest.approx((rewards_c > rewards_r).double().mean().item())
    torch.testing.assert_close(metrics["logps/chosen"], pc.float().mean())
    torch.testing.assert_close(metrics["logps/rejected"], pr.float().mean())


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_policy_equal_to_reference_is_ln2_and_zero_rewards(beta):
    pc, pr, _, _ = pair_inputs(8, seed=1, dtype=torch.float32)
    loss, metrics = spin_loss(pc, pr, pc.clone(), pr.clone(), beta=beta)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == 0.0, key
    hinge, _ = spin_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx(1.0)


def test_metrics_are_tensors_without_host_sync():
    pc, pr, rc, rr = pair_inputs(4, seed=2, dtype=torch.float32)
    _, metrics = spin_loss(pc, pr, rc, rr)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_gradcheck(loss_type):
    pc, pr, rc, rr = [t.requires_grad_(True) for t in pair_inputs(6, seed=3)]
    # Keep hinge margins away from the kink so finite differences are valid there.
    fn = lambda a, b, c, d: spin_loss(a, b, c, d, beta=0.05, loss_type=loss_type)[0]
    assert torch.autograd.gradcheck(fn, (pc, pr, rc, rr))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_margin_grad_matches_autograd(loss_type):
    margin = torch.linspace(-40, 40, 41, dtype=torch.float64).requires_grad_(True)
    from spin_fast.loss import pair_losses
    pair_losses(margin, 0.1, loss_type).sum().backward()
    torch.testing.assert_close(pair_loss_margin_grad(margin.detach(), 0.1, loss_type), margin.grad)


@pytest.mark.parametrize("bad_beta", [float("nan"), float("inf"), 0.0, -0.1, "x", None])
def test_bad_beta(bad_beta):
    pc, pr, rc, rr = pair_inputs(3, seed=0)
    with pytest.raises(ValueError, match="beta"):
        spin_loss(pc, pr, rc, rr, beta=bad_beta)


def test_bad_shapes_and_options():
    pc, pr, rc, rr = pair_inputs(3, seed=0)
    with pytest.raises(ValueError, match=r"same shape.*\(4,\)"):
        spin_loss(pc, pr, rc, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        spin_loss(pc.reshape(3, 1), pr, rc, rr)
    with pytest.raises(ValueError, match="empty"):
        e = torch.zeros(0)
        spin_loss(e, e, e, e)
    with pytest.raises(ValueError, match="floating"):
        spin_loss(pc.long(), pr, rc, rr)
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="reduction"):
        spin_loss(pc, pr, rc, rr, reduction="avg")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_rpo_nll_term(loss_type):
    """Iterative RPO (Pang et al. 2024, eq. 1): l(m) + alpha * (-log pi(y|x) / |y|) per pair; alpha 0 is SPIN."""
    pc, pr, rc, rr = pair_inputs(7, seed=4)
    lengths = torch.tensor([1, 3, 5, 8, 2, 13, 4], dtype=torch.float64)
    plain, _ = spin_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, reduction="none")
    rpo, metrics = spin_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, reduction="none", rpo_alpha=0.5,
                             chosen_lengths=lengths)
    expected = expected_losses(pc, pr, rc, rr, 0.1, loss_type) + torch.tensor(
        [0.5 * -a / n for a, n in zip(pc.tolist(), lengths.tolist())], dtype=torch.float64)
    torch.testing.assert_close(rpo, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spin_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, reduction="none",
                                         rpo_alpha=0.0, chosen_lengths=lengths)[0], plain)
    assert metrics["rewards/margins"].item() == pytest.approx(spin_loss(pc, pr, rc, rr)[1]["rewards/margins"].item())
    fn = lambda a, b, c, d: spin_loss(a, b, c, d, beta=0.05, loss_type=loss_type, rpo_alpha=0.5,   # noqa: E731
                                      chosen_lengths=lengths)[0]
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)))


def test_rpo_bad_input():
    pc, pr, rc, rr = pair_inputs(3, seed=5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        spin_loss(pc, pr, rc, rr, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        spin_loss(pc, pr, rc, rr, rpo_alpha=1.0, chosen_lengths=torch.ones(4))
    for bad in (-1.0, float("nan"), float("inf"), "x", torch.tensor(1.0)):
        with pytest.raises(ValueError, match="rpo_alpha"):
            spin_loss(pc, pr, rc, rr, rpo_alpha=bad, chosen_lengths=torch.ones(3))
