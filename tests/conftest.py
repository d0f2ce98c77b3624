"""Test configuration: run Triton kernels in the interpreter when there is no GPU, and locate ../shared/data."""
import os
from pathlib import Path

import pytest
import torch

# Must happen before triton is first imported anywhere: the interpreter is chosen at import/launch time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: the project ships no third-party data."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
