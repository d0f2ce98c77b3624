"""Bad input to the kernel entry points: a ValueError naming the argument and the shapes, never a wrong answer."""
import pytest
import torch

from spin_fast.kernels import linear_logprobs, spin_loss_from_hidden

from helpers import random_packed_batch

IMPLS = ["torch", "reference", "auto"]


def good(n=6, h=4, v=10, dtype=torch.float32):
    return torch.randn(n, h, dtype=dtype), torch.randn(v, h, dtype=dtype), torch.randint(0, v, (n,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,match", [
    (lambda h, w, t: (h[:, :3], w, t), r"disagree on H.*hidden=\(6, 3\).*weight=\(10, 4\)"),
    (lambda h, w, t: (h, w, t[:5]), r"one entry per token.*targets=\(5,\)"),
    (lambda h, w, t: (h.reshape(2, 3, 4), w, t), r"hidden must be 2-D"),
    (lambda h, w, t: (h, w.reshape(-1), t), r"weight must be 2-D"),
    (lambda h, w, t: (h, w, t.reshape(2, 3)), r"targets must be 1-D"),
    (lambda h, w, t: (h[:0], w, t[:0]), r"empty"),
    (lambda h, w, t: (h, w[:0], t), r"V >= 1"),
    (lambda h, w, t: (h, w, t.float()), r"integer"),
    (lambda h, w, t: (h.int(), w, t), r"float32/bfloat16"),
    (lambda h, w, t: (h, w.double(), t), r"weight dtype torch.float64 must equal hidden dtype"),
    (lambda h, w, t: (h, w, torch.where(torch.arange(6) == 2, 10, t)), r"\[0, V=10\).*targets\[2\] = 10"),
    (lambda h, w, t: (h, w, torch.where(torch.arange(6) == 4, -5, t)), r"targets\[4\] = -5"),
    (lambda h, w, t: ("not a tensor", w, t), r"hidden must be a torch.Tensor"),
])
def test_linear_logprobs_rejects(impl, case, match):
    with pytest.raises(ValueError, match=match):
        linear_logprobs(*case(*good()), impl=impl)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_logprobs(*good(), impl="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_logprobs(*good(), impl="triton")


def fused_args():
    b = random_packed_batch(3, 0, 8, 4, 12, torch.float32, seed=0)
    ref = torch.zeros(3)
    return b, dict(ref_chosen_logps=ref, ref_rejected_logps=ref.clone())


def call(b, **kw):
    return spin_loss_from_hidden(b["hidden"], b["weight"], b["targets"], b["seq_index"], b["chosen_index"],
                                 b["rejected_index"], impl="torch", **kw)


def test_fused_rejects_bad_reference():
    b, ref = fused_args()
    with pytest.raises(ValueError, match="exactly one of the two"):
        call(b)
    with pytest.raises(ValueError, match="exactly one of the two"):
        call(b, ref_hidden=b["hidden"], ref_weight=b["weight"], **ref)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be a 1-D tensor \[P = 3\].*\(4,\)"):
        call(b, ref_chosen_logps=torch.zeros(4), ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_hidden must hold the same packed tokens"):
        call(b, ref_hidden=b["hidden"][:-1], ref_weight=b["weight"])
    with pytest.raises(ValueError, match="ref_weight must have the policy's vocabulary"):
        call(b, ref_hidden=b["hidden"], ref_weight=b["weight"][:-1])


def test_fused_rejects_bad_layout_and_options():
    b, ref = fused_args()
    with pytest.raises(ValueError, match="seq_index must have one entry per token"):
        call(dict(b, seq_index=b["seq_index"][:-1]), **ref)
    with pytest.raises(ValueError, match="same shape"):
        call(dict(b, rejected_index=b["rejected_index"][:2]), **ref)
    with pytest.raises(ValueError, match="only one pair"):
        call(dict(b, rejected_index=b["chosen_index"].clone()), **ref)
    with pytest.raises(ValueError, match=">= 0"):
        call(dict(b, chosen_index=torch.tensor([-1, 0, 1])), **ref)
    with pytest.raises(ValueError, match="no pairs"):
        e = torch.zeros(0, dtype=torch.long)
        call(dict(b, chosen_index=e, rejected_index=e), ref_chosen_logps=torch.zeros(0),
             ref_rejected_logps=torch.zeros(0))
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(b, reduction="none", **ref)
    with pytest.raises(ValueError, match="beta"):
        call(b, beta=float("nan"), **ref)
    with pytest.raises(ValueError, match="loss_type"):
        call(b, loss_type="ipo", **ref)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        call(b, normalizer=0, **ref)
    with pytest.raises(ValueError, match="cannot be combined"):
        call(b, normalizer=4, reduction="sum", **ref)
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        call(dict(b, targets=torch.full_like(b["targets"], 99)), **ref)


def test_fused_num_sequences_checked():
    b, ref = fused_args()
    with pytest.raises(ValueError, match="num_sequences = 2 but the indices name sequence 5"):
        call(b, num_sequences=2, **ref)
    with pytest.raises(ValueError, match="seq_index must have one entry per token"):
        call(dict(b, seq_index=b["seq_index"][:-1]), num_sequences=6, check_values=False, **ref)


@pytest.mark.parametrize("softcap,match", [(0.0, "finite and > 0"), (-3.0, "finite and > 0"),
                                           (float("inf"), "finite and > 0"), ("30", None),
                                           (torch.tensor(30.0), "Python float"), (True, "Python float")])
def test_softcap_must_be_positive_finite_number(softcap, match):
    if match is None:                                   # a number-like string is a number: accepted
        linear_logprobs(*good(), impl="torch", softcap=softcap)
        return
    with pytest.raises(ValueError, match=match):
        linear_logprobs(*good(), impl="torch", softcap=softcap)
    b, ref = fused_args()
    with pytest.raises(ValueError, match=match):
        call(b, softcap=softcap, **ref)
