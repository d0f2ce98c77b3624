"""Chunked PyTorch twin of the Triton kernels: the production path on CPU.

Per-token log-prob of a target under softmax(h @ W^T), never holding more than `rows` logit rows at once:

    z_n   = W h_n                                   (V,)      logits of token n
    lse_n = log sum_v exp(z_nv)                     (online per chunk: max, then sum of exp(z - max))
    lp_n  = z_n[t_n] - lse_n                        the token log-prob; 0 where t_n == ignore_index

    d lp_n / d z_nv = 1[v == t_n] - softmax(z_n)_v  so with upstream g_n = dL/d lp_n:
    dz_n  = g_n * (onehot(t_n) - exp(z_n - lse_n))  (V,)
    dh_n  = W^T dz_n,   dW = sum_n dz_n h_n^T

`rows` comes from a memory budget (bytes for one fp32 chunk of logits), not a constant: every op on the chunk is
in place, so the extra memory is about one [rows, V] fp32 buffer plus [rows, H] slices of the inputs.

Soft-capped logits (Gemma 2, `softcap` = c): z' = c tanh(z / c) replaces z everywhere above, and the gradient
through it is dz = dz' * (1 - (z'/c)^2); a backward chunk then holds that factor too (two [rows, V] buffers, so
`rows` is halved to stay in the budget).

Two algorithms live here:
- `ChunkedLinearLogprobs`: forward keeps only lse (N,); backward recomputes each chunk of logits (4 matmuls in all
  instead of naive's 3, the price of never storing [N, V]).
- `chunked_spin_fused`: the SPIN loss knows its upstream gradient as soon as a pair's two sums are known
  (g = +-dl/dm for every token of the pair, see `spin_fast.loss.pair_loss_margin_grad`). Tokens are grouped by
  pair, chunks hold whole pairs, and each chunk's gradient is formed while its logits are still live: 3 matmuls,
  like naive, and no recompute. A pair longer than one chunk falls back to two streaming passes.

On CPU every matmul runs in fp32 (bf16 matmul is hundreds of times slower there, and fp32 is more accurate);
on CUDA the matmuls run in the input dtype with fp32 softmax arithmetic.
"""
from __future__ import annotations

import torch

from .loss import pair_loss_margin_grad

DEFAULT_MEMORY_BUDGET_BYTES = 64 << 20


def chunk_rows(vocab_size: int, memory_budget_bytes: int | None, buffers: int = 1) -> int:
    """Logit rows per chunk: `buffers` fp32 [rows, V] buffers (plus a same-size input-dtype copy on CUDA) in the
    budget."""
    budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else int(memory_budget_bytes)
    if budget <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    return max(1, budget // (4 * vocab_size * buffers))


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); CPU computes in fp32; CUDA keeps bf16/fp16 for tensor cores."""
    if t.dtype == torch.float64:
        return torch.float64
    if t.device.type == "cpu":
        return torch.float32
    return t.dtype


def _softmax_dtype(mm_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if mm_dtype == torch.float64 else torch.float32


def _chunk_logits(h: torch.Tensor, w_mm: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """(C, H) x (V, H)^T -> (C, V) logits in fp32 (fp64 for fp64), soft-capped c tanh(z / c) if softcap = c."""
    logits = (h.to(w_mm.dtype) @ w_mm.t()).to(_softmax_dtype(w_mm.dtype))    # (C, V), a fresh buffer
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _softcap_grad_factor(capped: torch.Tensor, softcap: float | None):
    """dz'/dz = 1 - (z'/c)^2 for soft-capped logits z' (C, V); None without soft-capping. A second (C, V) buffer."""
    if softcap is None:
        return None
    factor = capped / softcap
    return factor.mul_(factor).neg_().add_(1.0)


def _rows_for(weight: torch.Tensor, memory_budget_bytes, softcap, backward: bool) -> int:
    return chunk_rows(weight.shape[0], memory_budget_bytes, 2 if backward and softcap is not None else 1)


def _lse_target_inplace(logits: torch.Tensor, safe_targets: torch.Tensor):
    """Return (lse (C,), target logit (C,)); leaves exp(z - rowmax) in `logits` and returns its row sums too."""
    target_logit = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1)   # (C,)
    row_max = logits.amax(dim=1)                                             # (C,)
    logits.sub_(row_max.unsqueeze(1)).exp_()                                 # (C, V) = exp(z - max)
    sum_exp = logits.sum(dim=1)                                              # (C,)
    return row_max + sum_exp.log(), target_logit, sum_exp


def _dlogits_from_exp_inplace(exp_shifted, sum_exp, grad_token, safe_targets):
    """exp(z - max) (C, V) and its row sums -> dz = g (onehot - softmax), in place."""
    exp_shifted.mul_((-grad_token / sum_exp).unsqueeze(1))                   # -g * softmax
    exp_shifted.scatter_add_(1, safe_targets.unsqueeze(1), grad_token.unsqueeze(1))
    return exp_shifted


def _accumulate_grads(dz, h, w_mm, rows_index, dhidden, dweight_acc):
    """dh[rows] = dz @ W ; dW_acc += dz^T @ h. dz (C, V), h (C, H)."""
    dz_mm = dz.to(w_mm.dtype)
    if dhidden is not None:
        dhidden.index_copy_(0, rows_index, (dz_mm @ w_mm).to(dhidden.dtype))   # (C, H)
    if dweight_acc is not None:
        h_mm = h.to(w_mm.dtype)
        if dweight_acc.dtype == w_mm.dtype:
            dweight_acc.addmm_(dz_mm.t(), h_mm)                              # (V, H)
        else:
            dweight_acc.add_(dz_mm.t() @ h_mm)


def _weight_for_matmul(weight: torch.Tensor) -> torch.Tensor:
    """The LM-head weight in the matmul dtype, converted once per call (no copy when it already is)."""
    return weight.detach().to(matmul_dtype(weight))


def chunked_logprobs_forward(hidden, weight, targets, ignore_index=-100, memory_budget_bytes=None, softcap=None):
    """(N, H), (V, H), (N,) -> token log-probs (N,) and lse (N,), both fp32 (fp64 for fp64 inputs)."""
    w_mm = _weight_for_matmul(weight)
    n = hidden.shape[0]
    rows = _rows_for(weight, memory_budget_bytes, softcap, backward=False)
    out_dtype = _softmax_dtype(w_mm.dtype)
    token_logps = torch.empty(n, dtype=out_dtype, device=hidden.device)     # (N,)
    lse = torch.empty(n, dtype=out_dtype, device=hidden.device)             # (N,)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        logits = _chunk_logits(hidden[sl].detach(), w_mm, softcap)          # (C, V)
        lse_c, tgt_c, _ = _lse_target_inplace(logits, safe_targets[sl])
        del logits
        lse[sl] = lse_c
        token_logps[sl] = torch.where(valid[sl], tgt_c - lse_c, 0.0)
    return token_logps, lse


def chunked_logprobs_backward(hidden, weight, targets, lse, grad_token, ignore_index=-100,
                              need_hidden_grad=True, need_weight_grad=True, memory_budget_bytes=None, softcap=None):
    """Recompute each chunk's logits and return (dhidden | None, dweight | None) in the inputs' dtypes."""
    w_mm = _weight_for_matmul(weight)
    n = hidden.shape[0]
    rows = _rows_for(weight, memory_budget_bytes, softcap, backward=True)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    grad_token = torch.where(valid, grad_token.to(lse.dtype), 0.0)
    dhidden = torch.zeros_like(hidden) if need_hidden_grad else None
    dweight_acc = torch.zeros(weight.shape, dtype=_softmax_dtype(w_mm.dtype), device=weight.device) \
        if need_weight_grad else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h = hidden[start:stop].detach()
        logits = _chunk_logits(h, w_mm, softcap)                             # (C, V)
        factor = _softcap_grad_factor(logits, softcap)                       # (C, V) or None
        # softmax = exp(z - lse) directly from the saved lse: one fewer reduction than the forward.
        logits.sub_(lse[start:stop].unsqueeze(1)).exp_()
        ones = torch.ones(stop - start, dtype=logits.dtype, device=logits.device)
        dz = _dlogits_from_exp_inplace(logits, ones, grad_token[start:stop], safe_targets[start:stop])
        if factor is not None:
            dz.mul_(factor)                                                  # through the soft cap
        rows_index = torch.arange(start, stop, device=hidden.device)
        _accumulate_grads(dz, h, w_mm, rows_index, dhidden, dweight_acc)
        del logits, dz, factor
    dweight = dweight_acc.to(weight.dtype) if dweight_acc is not None else None
    return dhidden, dweight


class ChunkedLinearLogprobs(torch.autograd.Function):
    """token_logps = log_softmax(hidden @ weight.T)[targets] with O(rows * V) extra memory, logits recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, memory_budget_bytes, softcap=None):
        token_logps, lse = chunked_logprobs_forward(hidden, weight, targets, ignore_index, memory_budget_bytes,
                                                    softcap)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.memory_budget_bytes = memory_budget_bytes
        ctx.softcap = softcap
        return token_logps.float() if hidden.dtype != torch.float64 else token_logps

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, lse = ctx.saved_tensors
        dhidden, dweight = chunked_logprobs_backward(
            hidden, weight, targets, lse, grad_output, ctx.ignore_index,
            need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1],
            memory_budget_bytes=ctx.memory_budget_bytes, softcap=ctx.softcap)
        return dhidden, dweight, None, None, None, None


# ------------------------------------------------------------------------------------------------------------
# The fused SPIN pass: gradients formed while each pair-aligned chunk of logits is live.
# ------------------------------------------------------------------------------------------------------------

def _pair_aligned_groups(pair_token_counts: list[int], rows: int):
    """Greedy cut of consecutive pairs into groups of at most `rows` tokens; a pair over `rows` is a group alone.

    Yields (first_pair, end_pair, first_token, end_token) in the pair-sorted token order.
    """
    first_pair, first_token, tokens_in_group, token_pos = 0, 0, 0, 0
    for pair, count in enumerate(pair_token_counts):
        if tokens_in_group and tokens_in_group + count > rows:
            yield first_pair, pair, first_token, token_pos
            first_pair, first_token, tokens_in_group = pair, token_pos, 0
        tokens_in_group += count
        token_pos += count
    if first_pair < len(pair_token_counts):
        yield first_pair, len(pair_token_counts), first_token, token_pos


def chunked_spin_fused(hidden, weight, targets, seq_index, chosen_index, rejected_index,
                       ref_chosen_logps, ref_rejected_logps, num_sequences, *, beta, loss_type, grad_scale,
                       ignore_index=-100, need_hidden_grad=True, need_weight_grad=True, memory_budget_bytes=None,
                       softcap=None, chosen_extra_grad=None):
    """Sequence log-prob sums (S,) and, if asked, dL/dhidden and dL/dweight of L = grad_scale * sum_p l(m_p).

    grad_scale: float or 0-d tensor (1/P for a mean, 1/global_pairs for a globally normalised sum).
    chosen_extra_grad: (P,) or None, a further upstream gradient on every token of pair p's chosen sequence (before
    grad_scale): RPO's -rpo_alpha/|y_p| (spin_fast.loss.rpo_nll).
    Tokens whose target is ignore_index, or whose sequence is in no pair, are skipped: no logits are computed
    for them (prompt tokens cost nothing). Builds the token order on the host: on CUDA that is a sync, which is
    why the Triton path (two passes, no sync) is the one used on GPU.
    """
    device = hidden.device
    w_mm = _weight_for_matmul(weight)
    acc_dtype = _softmax_dtype(w_mm.dtype)
    num_pairs = chosen_index.numel()
    want_grad = need_hidden_grad or need_weight_grad
    rows = _rows_for(weight, memory_budget_bytes, softcap, backward=want_grad)

    # Which pair, and which side (+1 chosen / -1 rejected), each sequence is on.
    pair_of_seq = torch.full((num_sequences,), -1, dtype=torch.long, device=device)       # (S,)
    pair_ids = torch.arange(num_pairs, device=device)
    pair_of_seq[chosen_index] = pair_ids
    pair_of_seq[rejected_index] = pair_ids
    side_of_seq = torch.zeros(num_sequences, dtype=acc_dtype, device=device)              # (S,)
    side_of_seq[chosen_index] = 1.0
    side_of_seq[rejected_index] = -1.0

    token_pair = pair_of_seq[seq_index]                                                   # (N,)
    active = (targets != ignore_index) & (token_pair >= 0)
    active_tokens = active.nonzero().squeeze(1)                                           # (A,)
    order = torch.argsort(token_pair[active_tokens], stable=True)
    tokens = active_tokens[order]                        # (A,) token ids, grouped by pair, pairs ascending
    counts = torch.bincount(token_pair[tokens], minlength=num_pairs).tolist()

    seq_logps = torch.zeros(num_sequences, dtype=acc_dtype, device=device)                # (S,)
    ref_chosen = ref_chosen_logps.to(acc_dtype)
    ref_rejected = ref_rejected_logps.to(acc_dtype)
    chosen_extra = chosen_extra_grad.to(acc_dtype) if chosen_extra_grad is not None else None              # (P,)
    dhidden = torch.zeros_like(hidden) if need_hidden_grad else None
    dweight_acc = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need_weight_grad else None

    def token_grads(tok, first_pair, end_pair):
        """g per token = grad_scale * dl/dm of its pair * its side; margins of these pairs are complete."""
        pairs = slice(first_pair, end_pair)
        margin = ((seq_logps[chosen_index[pairs]] - ref_chosen[pairs])
                  - (seq_logps[rejected_index[pairs]] - ref_rejected[pairs]))            # (p,)
        dl_dm = pair_loss_margin_grad(margin, beta, loss_type) * grad_scale              # (p,)
        local, side = token_pair[tok] - first_pair, side_of_seq[seq_index[tok]]           # (C,) (C,)
        g = dl_dm[local] * side                                                           # (C,)
        if chosen_extra_grad is not None:
            g = g + (chosen_extra[pairs] * grad_scale)[local] * (side > 0)
        return g

    for first_pair, end_pair, t0, t1 in _pair_aligned_groups(counts, rows):
        if t1 == t0:
            continue
        if t1 - t0 <= rows:
            # One pass: logits live once; the gradient is formed before they are dropped.
            tok = tokens[t0:t1]                                                           # (C,)
            h = hidden.detach().index_select(0, tok)                                      # (C, H)
            safe_t = targets[tok]
            logits = _chunk_logits(h, w_mm, softcap)                                      # (C, V)
            factor = _softcap_grad_factor(logits, softcap) if want_grad else None          # (C, V) or None
            lse, tgt, sum_exp = _lse_target_inplace(logits, safe_t)
            seq_logps.index_add_(0, seq_index[tok], tgt - lse)
            if want_grad:
                dz = _dlogits_from_exp_inplace(logits, sum_exp, token_grads(tok, first_pair, end_pair), safe_t)
                if factor is not None:
                    dz.mul_(factor)
                _accumulate_grads(dz, h, w_mm, tok, dhidden, dweight_acc)
            del logits, factor
            continue
        # A single pair longer than a chunk: stream it twice (sums first, then gradients from the saved lse).
        group = tokens[t0:t1]
        group_lse = torch.empty(group.numel(), dtype=acc_dtype, device=device)
        for s0 in range(0, group.numel(), rows):
            tok = group[s0:s0 + rows]
            logits = _chunk_logits(hidden.detach().index_select(0, tok), w_mm, softcap)
            lse, tgt, _ = _lse_target_inplace(logits, targets[tok])
            group_lse[s0:s0 + rows] = lse
            seq_logps.index_add_(0, seq_index[tok], tgt - lse)
            del logits
        if not want_grad:
            continue
        g_group = token_grads(group, first_pair, end_pair)
        for s0 in range(0, group.numel(), rows):
            tok = group[s0:s0 + rows]
            h = hidden.detach().index_select(0, tok)
            logits = _chunk_logits(h, w_mm, softcap)
            factor = _softcap_grad_factor(logits, softcap)
            logits.sub_(group_lse[s0:s0 + rows].unsqueeze(1)).exp_()
            ones = torch.ones(tok.numel(), dtype=acc_dtype, device=device)
            dz = _dlogits_from_exp_inplace(logits, ones, g_group[s0:s0 + rows], targets[tok])
            if factor is not None:
                dz.mul_(factor)
            _accumulate_grads(dz, h, w_mm, tok, dhidden, dweight_acc)
            del logits, dz, factor

    dweight = dweight_acc.to(weight.dtype) if dweight_acc is not None else None
    return seq_logps, dhidden, dweight
