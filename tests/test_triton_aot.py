"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 (fp32 and bf16, and bf16 with soft-capped logits); needs no GPU.

It proves the kernels type-check, lower through the NVIDIA backend and fit the shared-memory limit of each
architecture with the default config (aot_compile raises otherwise). Under TRITON_INTERPRET=1 aot_compile compiles
in a subprocess with the interpreter switched off.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Keep the process-wide triton mode consistent with tests/test_triton_interpret.py whichever is imported first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
pytest.importorskip("triton.compiler")

from spin_fast.kernels.triton_logprobs import aot_compile  # noqa: E402

KERNELS = ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel")


@pytest.mark.parametrize("capability", [90, 80])
def test_aot_compile_every_kernel(capability):
    names = aot_compile(capability)
    expected = {f"{k}[{d}]" for k in KERNELS for d in ("fp32", "bf16", "bf16,softcap,ragged")}
    assert set(names) == expected
    assert len(names) == len(expected)
