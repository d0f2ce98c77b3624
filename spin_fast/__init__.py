"""spin_fast: a performance-engineered trainer for SPIN (Self-Play fIne-tuNing, Chen et al. 2024).

Subpackages: `spin_fast.kernels` (fused log-prob + SPIN loss kernels, Triton and chunked PyTorch).
Modules: `spin_fast.loss` (the reference SPIN loss and log-probs, the oracle of every test).
"""
__version__ = "0.1.0"
