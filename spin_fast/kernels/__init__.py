"""spin_fast.kernels: per-token log-probs straight from final hidden states and the LM-head weight, and the SPIN
loss fused on top, without ever materialising the [tokens, vocab] logits.

    linear_logprobs(hidden, weight, targets)        -> (N,) fp32 log softmax(hidden @ weight.T)[targets]
    spin_loss_from_hidden(hidden, weight, ...)      -> (loss, metrics) for a packed micro-batch of pairs

Both take `softcap=c` for soft-capped logits c * tanh(hidden @ weight.T / c) (Gemma 2's final_logit_softcapping).

Implementations (`impl=`): "triton" (triton_logprobs.py; CUDA, or CPU under TRITON_INTERPRET=1),
"torch" (chunked.py; the production path on CPU), "reference" (naive full logits, loss.py), and
"auto" = triton on CUDA tensors, torch otherwise.

The subpackage is self-contained: the SPIN maths and the naive references it is tested against live in its own
loss.py (spin_fast.loss re-exports them); nothing here imports the rest of spin_fast.
"""
from __future__ import annotations

import torch

from .loss import reference_token_logprobs

from .checks import check_linear_inputs, check_softcap
from .chunked import ChunkedLinearLogprobs, chunk_rows
from .dispatch import loss_impl_report, resolve_impl
from .spin_fused import spin_loss_from_hidden

__all__ = ["linear_logprobs", "spin_loss_from_hidden", "chunk_rows", "loss_impl_report"]


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                    impl: str = "auto", memory_budget_bytes: int | None = None, check_values: bool = True,
                    triton_config=None, softcap: float | None = None) -> torch.Tensor:
    """Per-token log-probs log softmax(hidden @ weight.T)[targets], differentiable w.r.t. hidden and weight.

    hidden (N, H) fp32/bf16/fp16, weight (V, H) same dtype, targets (N,) int64 -> (N,) float32, 0 where
    targets == ignore_index. memory_budget_bytes: the chunked path's logits buffer (default 64 MiB).
    check_values=False skips the targets-in-range check (a host sync on CUDA) for callers that checked on the host.
    softcap: None, or c > 0 for soft-capped logits c * tanh(z / c); gradients flow through the cap.
    """
    targets = check_linear_inputs(hidden, weight, targets, ignore_index, check_values=check_values)
    softcap = check_softcap(softcap)
    impl = resolve_impl(impl, hidden, weight, softcap)
    if impl == "reference":
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return reference_token_logprobs(hidden, weight, targets, ignore_index, compute_dtype, softcap=softcap)
    if impl == "triton":
        from .triton_logprobs import TritonLinearLogprobs
        return TritonLinearLogprobs.apply(hidden, weight, targets, ignore_index, triton_config, softcap)
    return ChunkedLinearLogprobs.apply(hidden, weight, targets, ignore_index, memory_budget_bytes, softcap)
