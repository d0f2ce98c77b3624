"""Computed (not measured) attention memory per layer for a packed micro-batch on CUDA, before / after issue 9
item 5: the old masked SDPA call (math kernel: grouped KV heads + a mask admit no fused kernel) vs the per-sequence
causal SDPA split (flash in bf16; memory-efficient with repeated KV heads in fp32) and FlexAttention.

    python -m benchmarks.attn_memory [--tokens 16384]

Counts only what the attention call adds beyond its q/k/v inputs and (N, H, D) output, forward, one layer:
  math:  bool (N, N) mask + its fp32 additive copy + fp32 (H, N, N) scores + fp32 (H, N, N) probabilities (kept
         for backward; math upcasts bf16 to fp32). Backward adds one more (H, N, N) gradient: a lower bound.
  split: flash keeps the (H, N) fp32 log-sum-exp; fp32 (memory-efficient) also repeats K and V to H heads.
  flex:  the block mask, (N/128)^2 int32 indices + counts, forward and transposed (backward), plus the log-sum-exp.
"""
from __future__ import annotations

import argparse

MODELS = {  # name: (query heads, KV heads, head_dim)
    "stories260K": (8, 4, 8),
    "SmolLM2-135M": (9, 3, 64),
    "Llama-3-8B": (32, 8, 128),
}


def per_layer_bytes(n: int, h: int, kv: int, d: int) -> dict[str, int]:
    math = n * n + 4 * n * n + 2 * 4 * h * n * n
    lse = 4 * h * n
    split_bf16 = lse
    split_fp32 = lse + 2 * 4 * n * (h - kv) * d          # repeated K and V (the extra heads), fp32
    nb = -(-n // 128)
    flex = 2 * 2 * 4 * (nb * nb + nb) + lse
    return {"math (before)": math, "split bf16 (flash)": split_bf16, "split fp32 (mem-efficient)": split_fp32,
            "flex": flex}


def human(b: int) -> str:
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= s:
            return f"{b / s:.3g} {unit}"
    return f"{b} B"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args(argv)
    rows = {m: per_layer_bytes(a.tokens, *shape) for m, shape in MODELS.items()}
    cols = list(next(iter(rows.values())))
    print(f"| model (H/KV/D), N={a.tokens} | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m, r in rows.items():
        h, kv, d = MODELS[m]
        print(f"| {m} ({h}/{kv}/{d}) | " + " | ".join(human(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
