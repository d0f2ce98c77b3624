"""The SPIN loss and log-probabilities in plain PyTorch: the formulas, and the oracle for tests and benchmarks.

SPIN (Chen et al. 2024) trains the main player pi_theta against a frozen opponent pi_t with a DPO-style
objective in which the human response y is "chosen" and the opponent's own sample y' is "rejected":

    m    = (log pi_theta(y|x) - log pi_t(y|x)) - (log pi_theta(y'|x) - log pi_t(y'|x))     (the margin)
    loss = -log sigmoid(beta * m)          loss_type="sigmoid"  (the paper's logistic loss)
    loss = relu(1 - beta * m)              loss_type="hinge"

where log pi(y|x) is the SUM of per-token log-probabilities over the response tokens. Optionally (rpo_alpha > 0)
each pair also pays the human answer's per-token negative log-likelihood, as iterative RPO (Pang et al. 2024,
"Iterative Reasoning Preference Optimization", eq. 1; their alpha = 1):

    loss_p += rpo_alpha * (-log pi_theta(y|x) / |y|)          |y| = the human answer's response tokens (>= 1)

Everything the fused kernels need from the loss (its derivative w.r.t. the margin) lives here too, so the
Triton and chunked paths share one statement of the maths.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge")
REDUCTIONS = ("mean", "sum", "none")


def check_beta(beta: float) -> float:
    """beta must be a finite positive number: it scales the implicit reward beta * log(pi_theta / pi_t)."""
    if isinstance(beta, torch.Tensor):
        raise ValueError(f"beta must be a Python float, got a tensor of shape {tuple(beta.shape)}")
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number, got {beta!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"beta must be finite and > 0, got {beta!r}")
    return value


def check_rpo_alpha(rpo_alpha: float) -> float:
    """The RPO NLL weight: a finite number >= 0 (0: SPIN's loss alone)."""
    if isinstance(rpo_alpha, torch.Tensor):
        raise ValueError(f"rpo_alpha must be a Python float, got a tensor of shape {tuple(rpo_alpha.shape)}")
    try:
        value = float(rpo_alpha)
    except (TypeError, ValueError):
        raise ValueError(f"rpo_alpha must be a number, got {rpo_alpha!r}") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"rpo_alpha must be finite and >= 0, got {rpo_alpha!r}")
    return value


def check_loss_type(loss_type: str) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return loss_type


def check_reduction(reduction: str, allowed=REDUCTIONS) -> str:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def _check_pair_vectors(**vectors: torch.Tensor) -> int:
    """All four per-pair inputs must be 1-D floating tensors of one length P >= 1 on one device."""
    shapes = {name: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for name, v in vectors.items()}
    for name, v in vectors.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {shapes}")
        if v.dim() != 1:
            raise ValueError(f"{name} must be 1-D [P] (one value per pair); got shapes {shapes}")
        if not v.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {v.dtype}")
    lengths = {tuple(v.shape) for v in vectors.values()}
    if len(lengths) != 1:
        raise ValueError(f"per-pair inputs must all have the same shape [P]; got {shapes}")
    devices = {v.device for v in vectors.values()}
    if len(devices) != 1:
        raise ValueError(f"per-pair inputs must be on one device; got {sorted(map(str, devices))}")
    num_pairs = next(iter(lengths))[0]
    if num_pairs == 0:
        raise ValueError(f"per-pair inputs are empty (P = 0); got shapes {shapes}")
    return num_pairs


def pair_losses(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair loss l(m) for margins m [P] (any float dtype; computed in fp32 or better)."""
    z = beta * margin
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)          # stable for large |z|: log(1 + exp(-z))
    return torch.relu(1.0 - z)


def pair_loss_margin_grad(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """dl/dm per pair.

    sigmoid: l = -log sigmoid(beta m)  ->  dl/dm = -beta * sigmoid(-beta m)
    hinge:   l = relu(1 - beta m)      ->  dl/dm = -beta * [beta m < 1]   (subgradient 0 at the kink, as autograd's)

    Since m = (sum_chosen logp - ref) - (sum_rejected logp - ref), every token of the chosen response gets the
    upstream gradient +dl/dm and every rejected token -dl/dm: one scalar per sequence, which the fused kernels use.
    """
    z = beta * margin
    if loss_type == "sigmoid":
        return -beta * torch.sigmoid(-z)
    return torch.where(z < 1.0, -beta, 0.0).to(margin.dtype)


def rpo_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per pair -log pi_theta(y|x) / |y| (P,): RPO's length-normalised NLL of the human answer. Its derivative
    w.r.t. log pi_theta(y|x) is -1/|y|: with weight rpo_alpha, an extra upstream gradient -rpo_alpha/|y| on every
    token of the chosen sequence, the one term the fused kernels add to +-l'(m)."""
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp_min(1.0)


def spin_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRL-style metrics, means over the pairs given, as 0-d tensors (no host sync)."""
    with torch.no_grad():
        rewards_chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())      # (P,)
        rewards_rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())  # (P,)
        margins = rewards_chosen - rewards_rejected
        return {
            "rewards/chosen": rewards_chosen.mean(),
            "rewards/rejected": rewards_rejected.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean(),
            "logps/chosen": policy_chosen_logps.detach().float().mean(),
            "logps/rejected": policy_rejected_logps.detach().float().mean(),
        }


def spin_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    reduction: str = "mean",
    rpo_alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
):
    """SPIN loss from summed sequence log-probs, each [P]. Returns (loss, metrics).

    rpo_alpha > 0 adds rpo_alpha * rpo_nll per pair (iterative RPO); chosen_lengths [P] (the human answers'
    response token counts) is then required.

    loss is a 0-d tensor for reduction "mean"/"sum" and [P] for "none"; it is computed in fp32 (fp64 if the
    inputs are fp64). metrics: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
    `logps/chosen`, `logps/rejected`, each a 0-d tensor (means over pairs; rewards = beta * (policy - ref)).
    """
    beta = check_beta(beta)
    check_loss_type(loss_type)
    check_reduction(reduction)
    rpo_alpha = check_rpo_alpha(rpo_alpha)
    _check_pair_vectors(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    compute_dtype = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    margin = ((policy_chosen_logps.to(compute_dtype) - ref_chosen_logps.to(compute_dtype))
              - (policy_rejected_logps.to(compute_dtype) - ref_rejected_logps.to(compute_dtype)))  # (P,)
    losses = pair_losses(margin, beta, loss_type)                                                  # (P,)
    if rpo_alpha > 0:
        if not isinstance(chosen_lengths, torch.Tensor) or tuple(chosen_lengths.shape) != tuple(margin.shape):
            shape = tuple(chosen_lengths.shape) if isinstance(chosen_lengths, torch.Tensor) else chosen_lengths
            raise ValueError(f"rpo_alpha > 0 needs chosen_lengths [P = {margin.shape[0]}] (response tokens of each "
                             f"human answer); got {shape}")
        losses = losses + rpo_alpha * rpo_nll(policy_chosen_logps.to(compute_dtype), chosen_lengths)
    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    metrics = spin_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Naive references: full [N, V] logits. The oracle for tests and the "what users run today" row of benchmarks.
# ----------------------------------------------------------------------------------------------------------------

def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping z' = c * tanh(z / c) (identity for softcap None); dz'/dz = 1 - (z'/c)^2."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def reference_token_logprobs(hidden, weight, targets, ignore_index: int = -100, compute_dtype=torch.float32,
                             upcast_inputs: bool = True, softcap: float | None = None):
    """log softmax(hidden @ weight.T)[target] per token, 0 where target == ignore_index. Materialises [N, V].

    This is what the official SPIN code and TRL do (fp32 logits, log_softmax, gather).
    hidden (N, H), weight (V, H), targets (N,) int64 -> (N,) float32 (or compute_dtype).
    upcast_inputs=False runs the matmul in the inputs' dtype and upcasts the logits (TRL's bf16 recipe).
    softcap: c of the soft-capped logits c * tanh(z / c) (Gemma 2's final_logit_softcapping), applied in
    compute_dtype; None = plain logits.
    """
    if upcast_inputs:
        logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()      # (N, V)
    else:
        logits = (hidden @ weight.t()).to(compute_dtype)                      # (N, V)
    logits = softcap_logits(logits, softcap)                                  # (N, V)
    logprobs = torch.log_softmax(logits, dim=-1)                              # (N, V)
    valid = targets != ignore_index                                           # (N,)
    safe_targets = torch.where(valid, targets, 0)
    token_logps = logprobs.gather(1, safe_targets.unsqueeze(1)).squeeze(1)    # (N,)
    return torch.where(valid, token_logps, 0.0)


def reference_response_lengths(targets, seq_index, num_sequences: int, ignore_index: int = -100):
    """Scored tokens (targets != ignore_index) per sequence: (N,) + (N,) -> (S,) float32."""
    valid = (targets != ignore_index).float()
    return torch.zeros(num_sequences, dtype=torch.float32, device=targets.device).index_add_(0, seq_index, valid)


def reference_sequence_logps(token_logps: torch.Tensor, seq_index: torch.Tensor, num_sequences: int):
    """Sum of token log-probs per sequence: (N,) + (N,) int64 in [0, S) -> (S,)."""
    out = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, seq_index, token_logps)


def reference_spin_loss_from_hidden(
    hidden, weight, targets, seq_index, chosen_index, rejected_index,
    ref_chosen_logps=None, ref_rejected_logps=None, *, ref_hidden=None, ref_weight=None,
    beta=0.1, loss_type="sigmoid", reduction="mean", ignore_index=-100, compute_dtype=torch.float32,
    upcast_inputs=True, softcap=None, rpo_alpha=0.0,
):
    """The naive packed SPIN loss: full logits for policy (and reference, if given as hidden states).

    Same contract as `spin_fast.kernels.spin_loss_from_hidden`; used as its oracle and as the benchmark's
    naive row.
    """
    num_sequences = int(max(chosen_index.max(), rejected_index.max()).item()) + 1 if chosen_index.numel() else 0
    num_sequences = max(num_sequences, int(seq_index.max().item()) + 1 if seq_index.numel() else 0)
    token_logps = reference_token_logprobs(hidden, weight, targets, ignore_index, compute_dtype, upcast_inputs,
                                           softcap)
    seq_logps = reference_sequence_logps(token_logps, seq_index, num_sequences)
    if ref_chosen_logps is None:
        with torch.no_grad():
            ref_token = reference_token_logprobs(ref_hidden, ref_weight, targets, ignore_index, compute_dtype,
                                                 upcast_inputs, softcap)
            ref_seq = reference_sequence_logps(ref_token, seq_index, num_sequences)
        ref_chosen_logps, ref_rejected_logps = ref_seq[chosen_index], ref_seq[rejected_index]
    lengths = reference_response_lengths(targets, seq_index, num_sequences, ignore_index)[chosen_index]    # (P,)
    return spin_loss(seq_logps[chosen_index], seq_logps[rejected_index],
                     ref_chosen_logps.to(seq_logps.dtype), ref_rejected_logps.to(seq_logps.dtype),
                     beta=beta, loss_type=loss_type, reduction=reduction, rpo_alpha=rpo_alpha,
                     chosen_lengths=lengths)
