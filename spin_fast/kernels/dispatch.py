"""Which implementation runs: Triton on CUDA, the chunked PyTorch twin on CPU, the naive reference on request."""
from __future__ import annotations

import importlib.util
import os

import torch

from .checks import check_impl


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors (when triton is installed), else 'torch'. Validates explicit choices."""
    check_impl(impl)
    if impl == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install 'spin_fast[triton]')")
        if not tensor.is_cuda and not triton_interpreting():
            raise ValueError(f"impl='triton' needs CUDA tensors (got {tensor.device}); on CPU set TRITON_INTERPRET=1 "
                             "to run the kernels in Triton's interpreter, or use impl='torch'")
        if tensor.dtype == torch.float64:
            raise ValueError("impl='triton' supports float32/bfloat16/float16; use impl='torch' for float64")
    return impl
