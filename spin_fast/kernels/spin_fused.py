"""The fused SPIN loss on a packed micro-batch: hidden states + LM-head weight -> loss, metrics, dhidden, dweight.

A packed micro-batch holds S sequences back to back (no padding): `seq_index[n]` says which sequence token n is in,
`targets[n]` is the next token (ignore_index on prompt tokens and at sequence ends), and pair p is the sequences
(chosen_index[p], rejected_index[p]). The reference log-probs are either given per pair (the reference cache) or
computed here, without grad, from the reference model's hidden states of the same batch.

    logp_s = sum_{n in s} log softmax(W h_n)[t_n]                      sequence sums              (S,)
    m_p    = (logp_chosen_p - ref_chosen_p) - (logp_rejected_p - ref_rejected_p)                    (P,)
    L      = sum_p [l(m_p) + alpha * (-logp_chosen_p / |y_p|)] / D
             D = P ("mean"), 1 ("sum") or a given global pair count (normalizer); alpha = rpo_alpha (iterative
             RPO's NLL of the human answer, 0 by default), |y_p| its response tokens

dL/dlogp_n = (+l'(m_p) - alpha/|y_p|)/D on the chosen tokens of pair p, -l'(m_p)/D on its rejected tokens: one
scalar per sequence. The gradient is therefore complete once the pair's sums are, and it is formed during the
forward (the loss has no learnable consumer between it and the optimizer: its upstream gradient is a scalar). Backward only scales the stored dhidden / dweight by that
scalar. Memory: dweight (V, H) and dhidden (N, H) are held from forward to backward instead of the activations a
separate backward would recompute from.

- impl "torch": `chunked_spin_fused`, one pass over pair-aligned chunks (3 matmuls, like naive).
- impl "triton": the Triton forward (sums), then the one-pass Triton backward kernel with per-token upstream
  gradients (two launches, no host sync, O(N) extra memory besides the gradients).
- impl "reference": naive full logits and autograd, the oracle.
"""
from __future__ import annotations

import torch

from .loss import (check_beta, check_loss_type, check_reduction, check_rpo_alpha, pair_loss_margin_grad,
                   pair_losses, reference_response_lengths, reference_spin_loss_from_hidden, rpo_nll, spin_metrics)

from .checks import check_linear_inputs, check_packed_layout, check_softcap
from .chunked import chunked_logprobs_forward, chunked_spin_fused
from .dispatch import resolve_impl


def _sequence_sums(token_logps, seq_index, num_sequences):
    return torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add_(
        0, seq_index, token_logps)


def _forward_only_logps(impl, hidden, weight, targets, ignore_index, memory_budget_bytes, triton_config, softcap):
    """Token log-probs without autograd (reference log-probs computed in the same pass)."""
    if impl == "triton":
        from .triton_logprobs import triton_logprobs_forward
        return triton_logprobs_forward(hidden, weight, targets, ignore_index, triton_config, softcap)[0]
    return chunked_logprobs_forward(hidden, weight, targets, ignore_index, memory_budget_bytes, softcap)[0]


def _triton_two_pass(hidden, weight, targets, seq_index, chosen_index, rejected_index, ref_chosen, ref_rejected,
                     num_sequences, *, beta, loss_type, grad_scale, ignore_index, need_hidden_grad, need_weight_grad,
                     chosen_extra_grad=None, triton_config=None, softcap=None):
    """Pass 1: Triton forward -> sequence sums. Pass 2: the Triton backward kernel with g_n = +-l'(m_p) * grad_scale
    (+ chosen_extra_grad[p] * grad_scale on the chosen tokens)."""
    from .triton_logprobs import triton_logprobs_backward, triton_logprobs_forward

    token_logps, lse = triton_logprobs_forward(hidden, weight, targets, ignore_index, triton_config,
                                               softcap)                                               # (N,) (N,)
    seq_logps = _sequence_sums(token_logps, seq_index, num_sequences)                                 # (S,)
    dhidden = dweight = None
    if need_hidden_grad or need_weight_grad:
        margin = ((seq_logps[chosen_index] - ref_chosen) - (seq_logps[rejected_index] - ref_rejected))  # (P,)
        dl_dm = pair_loss_margin_grad(margin, beta, loss_type) * grad_scale                           # (P,)
        # Per-sequence upstream gradient: +dl/dm on the chosen side, -dl/dm on the rejected side, 0 if unpaired.
        seq_grad = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device)              # (S,)
        chosen_grad = dl_dm if chosen_extra_grad is None else dl_dm + chosen_extra_grad * grad_scale
        seq_grad[chosen_index] = chosen_grad.float()
        seq_grad[rejected_index] = -dl_dm.float()
        grad_token = seq_grad[seq_index]                                                               # (N,)
        dhidden, dweight = triton_logprobs_backward(hidden, weight, targets, lse, grad_token, ignore_index,
                                                    need_hidden_grad, need_weight_grad, triton_config, softcap)
    return seq_logps, dhidden, dweight


class FusedSpinLoss(torch.autograd.Function):
    """forward -> (loss, policy_chosen_logps (P,), policy_rejected_logps (P,)); gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, seq_index, chosen_index, rejected_index, ref_chosen, ref_rejected,
                opts):
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1]
        grad_scale = opts["grad_scale"]
        lengths = opts["chosen_lengths"]                                          # (P,) or None (no RPO term)
        chosen_extra = -opts["rpo_alpha"] / lengths.clamp_min(1.0) if lengths is not None else None      # (P,)
        common = dict(beta=opts["beta"], loss_type=opts["loss_type"], grad_scale=grad_scale,
                      ignore_index=opts["ignore_index"], need_hidden_grad=need_hidden_grad,
                      need_weight_grad=need_weight_grad, softcap=opts["softcap"], chosen_extra_grad=chosen_extra)
        if opts["impl"] == "triton":
            seq_logps, dhidden, dweight = _triton_two_pass(
                hidden, weight, targets, seq_index, chosen_index, rejected_index, ref_chosen, ref_rejected,
                opts["num_sequences"], triton_config=opts["triton_config"], **common)
        else:
            seq_logps, dhidden, dweight = chunked_spin_fused(
                hidden, weight, targets, seq_index, chosen_index, rejected_index, ref_chosen, ref_rejected,
                opts["num_sequences"], memory_budget_bytes=opts["memory_budget_bytes"], **common)
        policy_chosen = seq_logps[chosen_index]                                                        # (P,)
        policy_rejected = seq_logps[rejected_index]                                                    # (P,)
        margin = (policy_chosen - ref_chosen.to(seq_logps.dtype)) - (policy_rejected - ref_rejected.to(seq_logps.dtype))
        losses = pair_losses(margin, opts["beta"], opts["loss_type"])                                   # (P,)
        if lengths is not None:
            losses = losses + opts["rpo_alpha"] * rpo_nll(policy_chosen, lengths)
        loss = losses.sum() * grad_scale
        # Held as attributes, not save_for_backward: backward scales them in place and gives them away.
        ctx.dhidden, ctx.dweight = dhidden, dweight
        ctx.consumed = False
        ctx.mark_non_differentiable(policy_chosen, policy_rejected)
        return loss, policy_chosen, policy_rejected

    @staticmethod
    def backward(ctx, grad_loss, _grad_chosen, _grad_rejected):
        if ctx.consumed:
            raise RuntimeError("spin_loss_from_hidden forms its gradients in the forward pass and hands them over "
                               "in backward: backpropagating through the same call twice (retain_graph) is not "
                               "supported; call it again instead")
        ctx.consumed = True
        dhidden, dweight = ctx.dhidden, ctx.dweight
        # Drop ctx's references, so autograd can take these buffers as .grad instead of cloning them (a clone of
        # dweight is a second (V, H) buffer: 2 GiB in fp32 at V=128k, H=4k).
        ctx.dhidden = ctx.dweight = None
        # Scale in place; always multiply: a `grad_loss == 1` test would be a host sync. One pass over (V, H).
        if dhidden is not None:
            dhidden.mul_(grad_loss.to(dhidden.dtype))
        if dweight is not None:
            dweight.mul_(grad_loss.to(dweight.dtype))
        return dhidden, dweight, None, None, None, None, None, None, None


def _check_ref_inputs(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, num_pairs, hidden, weight):
    have_logps = ref_chosen_logps is not None or ref_rejected_logps is not None
    have_hidden = ref_hidden is not None or ref_weight is not None
    if have_logps == have_hidden:
        raise ValueError("give the reference either as ref_chosen_logps + ref_rejected_logps (precomputed, [P] each) "
                         "or as ref_hidden + ref_weight (computed in this pass), exactly one of the two")
    if have_logps:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != num_pairs:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 1-D tensor [P = {num_pairs}] (one per pair); got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.device != hidden.device:
                raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
        return
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ref_hidden and ref_weight must be given together")
    if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.dim() != 2 or ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden must hold the same packed tokens as hidden: ref_hidden "
                         f"{tuple(getattr(ref_hidden, 'shape', ()))} vs hidden {tuple(hidden.shape)}")
    if isinstance(ref_weight, torch.Tensor) and ref_weight.dim() == 2 and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the policy's vocabulary V = {weight.shape[0]}; "
                         f"got {tuple(ref_weight.shape)}")


def spin_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    seq_index: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    num_sequences: int | None = None,
    check_values: bool = True,
    memory_budget_bytes: int | None = None,
    triton_config=None,
    softcap: float | None = None,
    rpo_alpha: float = 0.0,
):
    """SPIN loss of a packed micro-batch straight from final hidden states. Returns (loss, metrics).

    hidden (N, H) fp32/bf16/fp16 and weight (V, H): the policy's; targets (N,) int64 (ignore_index where no loss);
    seq_index (N,) int64 in [0, S); chosen_index, rejected_index (P,) int64 sequence ids of each pair.
    Reference: ref_chosen_logps + ref_rejected_logps (P,) each, OR ref_hidden (N, H') + ref_weight (V, H').
    reduction: "mean" (over the P pairs, or over `normalizer` pairs if given: e.g. the global number of pairs of the
    optimizer step, so micro-batches and ranks add up to one mean) or "sum". "none" is not offered: the gradient is
    formed in the forward pass, which needs a scalar loss; use `linear_logprobs` + `spin_fast.loss.spin_loss` then.
    num_sequences: S, if the caller knows it (saves a host sync on CUDA); check_values=False skips the value checks
    (targets and indices in range), which are host syncs on CUDA, for callers that validated on the host.
    softcap: None, or c > 0 for soft-capped logits c * tanh(z / c) (Gemma 2), for the policy and for a
    reference given as hidden states.
    rpo_alpha > 0: each pair also pays rpo_alpha * (-log pi_theta(y|x) / |y|) on its human answer (iterative RPO,
    Pang et al. 2024; |y| = the chosen sequence's tokens with a target, counted on the device).
    metrics: as `spin_fast.loss.spin_loss` (0-d tensors, no host sync).
    """
    beta = check_beta(beta)
    rpo_alpha = check_rpo_alpha(rpo_alpha)
    check_loss_type(loss_type)
    check_reduction(reduction, allowed=("mean", "sum"))
    targets = check_linear_inputs(hidden, weight, targets, ignore_index, check_values=check_values)
    softcap = check_softcap(softcap)
    impl = resolve_impl(impl, hidden, weight, softcap)
    num_sequences = check_packed_layout(hidden.shape[0], seq_index, chosen_index, rejected_index, hidden.device,
                                        num_sequences=num_sequences, check_values=check_values)
    seq_index, chosen_index, rejected_index = seq_index.long(), chosen_index.long(), rejected_index.long()
    num_pairs = chosen_index.numel()
    _check_ref_inputs(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, num_pairs, hidden, weight)
    if ref_hidden is not None:
        check_linear_inputs(ref_hidden, ref_weight, targets, ignore_index, check_values=False, prefix="ref_")

    if normalizer is not None:
        if reduction != "mean":
            raise ValueError("normalizer replaces P in the 'mean' reduction; it cannot be combined with 'sum'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
            grad_scale = 1.0 / normalizer.to(device=hidden.device, dtype=torch.float32).reshape(())
        else:
            if not float(normalizer) > 0:
                raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
            grad_scale = 1.0 / float(normalizer)
    else:
        grad_scale = 1.0 / num_pairs if reduction == "mean" else 1.0

    if impl == "reference":
        loss_sum, metrics = reference_spin_loss_from_hidden(
            hidden, weight, targets, seq_index, chosen_index, rejected_index, ref_chosen_logps, ref_rejected_logps,
            ref_hidden=ref_hidden, ref_weight=ref_weight, beta=beta, loss_type=loss_type, reduction="sum",
            ignore_index=ignore_index, softcap=softcap, rpo_alpha=rpo_alpha,
            compute_dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        return loss_sum * grad_scale, metrics

    if ref_hidden is not None:
        with torch.no_grad():
            ref_tokens = _forward_only_logps(impl, ref_hidden.detach(), ref_weight.detach(), targets, ignore_index,
                                             memory_budget_bytes, triton_config, softcap)             # (N,)
            ref_seq = _sequence_sums(ref_tokens, seq_index, num_sequences)                             # (S,)
            ref_chosen_logps, ref_rejected_logps = ref_seq[chosen_index], ref_seq[rejected_index]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ref_chosen = ref_chosen_logps.detach().to(acc_dtype)
    ref_rejected = ref_rejected_logps.detach().to(acc_dtype)

    chosen_lengths = None
    if rpo_alpha > 0:
        chosen_lengths = reference_response_lengths(targets, seq_index, num_sequences, ignore_index)[chosen_index]
        chosen_lengths = chosen_lengths.to(acc_dtype)                                                 # (P,)
    opts = dict(impl=impl, beta=beta, loss_type=loss_type, grad_scale=grad_scale, ignore_index=ignore_index,
                num_sequences=num_sequences, memory_budget_bytes=memory_budget_bytes, triton_config=triton_config,
                softcap=softcap, rpo_alpha=rpo_alpha, chosen_lengths=chosen_lengths)
    loss, policy_chosen, policy_rejected = FusedSpinLoss.apply(
        hidden, weight, targets, seq_index, chosen_index, rejected_index, ref_chosen, ref_rejected, opts)
    metrics = spin_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return loss, metrics
