"""Which implementation runs: Triton on CUDA, the chunked PyTorch twin on CPU, the naive reference on request.

impl="auto" on CUDA must never be the first place a Triton failure shows up to a user (a ptxas / driver / arch
problem, out of shared memory for a config): at the first auto call per (dtype, H, V, softcap) it launches the
kernels once, forward and backward, on a few rows with the real weight (so the same specialisations compile), and
synchronises. If that raises, it warns once, records why (`loss_impl_report`, in summary.json) and every later
auto call in the process takes the chunked torch path. Explicit impl="triton" is never caught: it raises.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .checks import check_impl


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# Process state, set at run time (never at import): why Triton failed (then auto sticks with torch), and the
# (dtype, H, V, softcapped) keys whose probe passed.
_fallback_reason: str | None = None
_probed_ok: set = set()
PROBE_ROWS = 8


def _auto_wants_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and triton_available()


def _probe_triton(hidden: torch.Tensor, weight: torch.Tensor, softcap) -> None:
    """One forward + backward of the Triton kernels on PROBE_ROWS rows; raises what they raise."""
    from .triton_logprobs import TritonLinearLogprobs
    rows = min(PROBE_ROWS, max(hidden.shape[0], 1))
    with torch.enable_grad():
        h = torch.randn(rows, hidden.shape[1], dtype=hidden.dtype, device=hidden.device, requires_grad=True)
        w = weight.detach().requires_grad_(True)                  # the real (V, H): same compiled specialisation
        t = torch.arange(rows, device=hidden.device) % weight.shape[0]
        out = TritonLinearLogprobs.apply(h, w, t, -100, None, softcap)                           # (rows,)
        torch.autograd.grad(out.sum(), (h, w))
    if hidden.is_cuda:
        torch.cuda.synchronize(hidden.device)                     # launch errors are asynchronous: surface them here


def _triton_usable(hidden: torch.Tensor, weight: torch.Tensor | None, softcap) -> bool:
    global _fallback_reason
    if _fallback_reason is not None:
        return False
    if weight is None:
        return True
    key = (hidden.dtype, hidden.shape[1], weight.shape[0], softcap is not None)
    if key in _probed_ok:
        return True
    try:
        _probe_triton(hidden, weight, softcap)
    except Exception as e:                                        # noqa: BLE001 - any compile/launch failure
        _fallback_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        warnings.warn(f"spin_fast: the Triton loss kernels failed to compile or launch ({_fallback_reason}); "
                      "impl='auto' uses the chunked torch path for the rest of this process (slower, same "
                      "results). impl='triton' would raise instead.", RuntimeWarning, stacklevel=3)
        return False
    _probed_ok.add(key)
    return True


def loss_impl_report(requested: str, device) -> dict:
    """What summary.json records: the requested impl, the one used on `device`, and the fallback reason if any."""
    device = torch.device(device)
    used = requested
    if requested == "auto":
        used = "triton" if device.type == "cuda" and triton_available() and _fallback_reason is None else "torch"
    out = {"requested": requested, "used": used}
    if requested == "auto" and _fallback_reason is not None:
        out["fallback_reason"] = _fallback_reason
    return out


def resolve_impl(impl: str, tensor: torch.Tensor, weight: torch.Tensor | None = None, softcap=None) -> str:
    """'auto' -> 'triton' for CUDA tensors (when triton is installed and its kernels run here), else 'torch'.
    weight / softcap: what the probe of the first auto call launches with. Validates explicit choices."""
    check_impl(impl)
    if impl == "auto":
        return "triton" if _auto_wants_triton(tensor) and _triton_usable(tensor, weight, softcap) else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install 'spin_fast[triton]')")
        if not tensor.is_cuda and not triton_interpreting():
            raise ValueError(f"impl='triton' needs CUDA tensors (got {tensor.device}); on CPU set TRITON_INTERPRET=1 "
                             "to run the kernels in Triton's interpreter, or use impl='torch'")
        if tensor.dtype == torch.float64:
            raise ValueError("impl='triton' supports float32/bfloat16/float16; use impl='torch' for float64")
    return impl
