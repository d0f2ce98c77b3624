"""The SPIN loss and the naive log-prob references, for callers outside the kernels.

The maths lives in `spin_fast.kernels.loss` so that `spin_fast.kernels` is self-contained (it imports nothing of
the rest of the package, like Liger's `ops/`); this module re-exports it under the name the trainer, the tests and
the benchmarks use.
"""
from .kernels.loss import (LOSS_TYPES, REDUCTIONS, check_beta, check_loss_type, check_reduction,  # noqa: F401
                           pair_loss_margin_grad, pair_losses, reference_sequence_logps,
                           reference_spin_loss_from_hidden, reference_token_logprobs, spin_loss, spin_metrics)

__all__ = ["LOSS_TYPES", "REDUCTIONS", "check_beta", "check_loss_type", "check_reduction", "pair_loss_margin_grad",
           "pair_losses", "reference_sequence_logps", "reference_spin_loss_from_hidden", "reference_token_logprobs",
           "spin_loss", "spin_metrics"]
