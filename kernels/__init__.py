"""spin_fast.kernels: per-token log-probs from final hidden states and the LM-head weight, and the fused SPIN loss."""
