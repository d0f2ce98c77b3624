"""Input validation for the kernel entry points: a clear ValueError naming the argument and the shapes.

Everything here runs before any kernel launches, so a bad call never reaches a Triton kernel (which would read out
of bounds silently) or a chunked loop (which would fail half-way). Value checks that need a reduction over a tensor
(targets in range, indices in range) are a host sync on CUDA; callers that validated on the host already (the
trainer's collator) pass `check_values=False`.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IMPLS = ("auto", "triton", "torch", "reference")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_softcap(softcap) -> float | None:
    """None (plain logits) or a finite c > 0 for the soft-capped logits c * tanh(z / c), as a Python float."""
    if softcap is None:
        return None
    if isinstance(softcap, torch.Tensor) or isinstance(softcap, bool):
        raise ValueError(f"softcap must be None or a Python float > 0, got {softcap!r}")
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"softcap must be None or finite and > 0, got {softcap!r}")
    return value


def check_linear_inputs(hidden, weight, targets, ignore_index: int, *, check_values: bool = True,
                        prefix: str = "") -> torch.Tensor:
    """Validate hidden (N, H), weight (V, H), targets (N,) integer. Returns targets as int64."""
    names = {f"{prefix}hidden": hidden, f"{prefix}weight": weight, "targets": targets}
    shapes = ", ".join(f"{k}={_shape(v)}" for k, v in names.items())
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor ({shapes})")
    hname, wname = f"{prefix}hidden", f"{prefix}weight"
    if hidden.dim() != 2:
        raise ValueError(f"{hname} must be 2-D [N, H] (flatten batch and time first); got {shapes}")
    if weight.dim() != 2:
        raise ValueError(f"{wname} must be 2-D [V, H] (the LM-head weight); got {shapes}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [N]; got {shapes}")
    n, h = hidden.shape
    v, hw = weight.shape
    if n == 0:
        raise ValueError(f"{hname} is empty (N = 0); got {shapes}")
    if v == 0 or h == 0:
        raise ValueError(f"{wname} and {hname} must have V >= 1 and H >= 1; got {shapes}")
    if hw != h:
        raise ValueError(f"{hname} [N, H] and {wname} [V, H] disagree on H ({h} vs {hw}); got {shapes}")
    if targets.shape[0] != n:
        raise ValueError(f"targets must have one entry per token of {hname} (N = {n}); got {shapes}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{hname} must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{wname} dtype {weight.dtype} must equal {hname} dtype {hidden.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{hname}, {wname} and targets must be on one device; got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    targets = targets.long()
    if check_values:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets must lie in [0, V={v}) or equal ignore_index={ignore_index}; "
                             f"targets[{first}] = {int(targets[first])} ({int(bad.sum())} bad of {n})")
    return targets


def check_packed_layout(num_tokens: int, seq_index, chosen_index, rejected_index, device, *,
                        num_sequences: int | None = None, check_values: bool = True) -> int:
    """Validate the packed-batch description. Returns the number of sequences S.

    seq_index (N,) int: the sequence each token belongs to, in [0, S).
    chosen_index, rejected_index (P,) int: sequence ids of pair p's chosen and rejected response.
    Each sequence belongs to at most one pair, on one side only.
    Shape checks always run (no sync). S is derived from the indices unless given, and the value checks (range,
    uniqueness) run only with check_values: both read tensor values, a host sync on CUDA.
    """
    names = {"seq_index": seq_index, "chosen_index": chosen_index, "rejected_index": rejected_index}
    shapes = ", ".join(f"{k}={_shape(v)}" for k, v in names.items())
    for name, t in names.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor; got {shapes}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if seq_index.shape[0] != num_tokens:
        raise ValueError(f"seq_index must have one entry per token (N = {num_tokens}); got {shapes}")
    if chosen_index.shape != rejected_index.shape:
        raise ValueError(f"chosen_index and rejected_index must have the same shape [P]; got {shapes}")
    if chosen_index.numel() == 0:
        raise ValueError(f"no pairs: chosen_index is empty; got {shapes}")
    if num_sequences is not None and num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    if num_sequences is None or check_values:
        derived = int(torch.stack([seq_index.max(), chosen_index.max(), rejected_index.max()]).max()) + 1
        if num_sequences is not None and derived > num_sequences:
            raise ValueError(f"num_sequences = {num_sequences} but the indices name sequence {derived - 1}")
        num_sequences = num_sequences or derived
    if check_values:
        lo = int(torch.stack([seq_index.min(), chosen_index.min(), rejected_index.min()]).min())
        if lo < 0:
            raise ValueError(f"sequence indices must be >= 0; found {lo} ({shapes})")
        both = torch.cat([chosen_index, rejected_index])
        if torch.unique(both).numel() != both.numel():
            raise ValueError("each sequence may appear in only one pair, on one side: chosen_index and "
                             "rejected_index together repeat a sequence id")
    return num_sequences
