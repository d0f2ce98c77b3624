#!/usr/bin/env bash
# One prepared GPU session (H200, torch >= 2.11, triton >= 3.6): build, check the kernels on CUDA, time them.
# Run from the repo root on the device machine; results land in benchmarks/results/ and are copied to $OUT.
#   bash benchmarks/device_check.sh            (about 8 minutes on one H200; run with timeout_s=600)
set -euo pipefail
export PYTHONPATH=.
python3 -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed; using PYTHONPATH"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
# Correctness first: the same oracle tests as CI, with impl="triton" now on CUDA tensors (compiled, not interpreted).
timeout 300 python3 -m pytest -q -x tests/test_triton_interpret.py tests/test_linear_logprobs.py \
    tests/test_spin_fused.py -k "triton" 2>&1 | tail -15 || echo "KERNEL TESTS FAILED ON CUDA"
# The model and sampler tests on the GPU machine (CUDA graphs, flash-attn if present, SDPA otherwise).
timeout 240 python3 -m pytest -q -x tests/test_model.py tests/test_sampler.py 2>&1 | tail -5 || echo "MODEL/SAMPLER TESTS FAILED ON CUDA"
# Then speed and memory at the GPU shapes, side by side with naive, chunked torch and Liger (if installed).
timeout 400 python3 -m benchmarks.bench_loss --device cuda --repeats 5
# Sampler: ~1B random Llama, bf16, batch 64-256, tokens/s and fraction of the HBM roofline.
timeout 240 python3 -m benchmarks.bench_sampler --device cuda
mkdir -p "${OUT:-/tmp/out}"
cp benchmarks/results/*.json "${OUT:-/tmp/out}/"
