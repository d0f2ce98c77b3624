"""Packing throughput: plan + collate every micro-batch, C++ (spin_fast._C) vs the pure-Python reference.

    python -m benchmarks.bench_packing                          # 200k pairs, budget 16384, world sizes 1 and 8
    python -m benchmarks.bench_packing --pairs 20000 --repeats 1

The data set is synthetic with a fixed seed: prompt 20-512, chosen response 20-700, rejected response 20-256
tokens (uniform), each sequence stored as prompt + response in one flat int32 array, as spin_fast.packing reads
it. One timed run = plan_micro_batches over all pairs + collate of every micro-batch of every rank (what one
training epoch's data path costs on one host); C++ gets one untimed warm-up run, then the median of --repeats.
The two backends' plans must be equal, and a sample of their collated micro-batches too, or the run fails.
Rows go to benchmarks/results/packing-<date>-<machine>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import commit, machine, markdown_table, today, write_results
from spin_fast import packing as pk


def synthetic_pairs(npairs: int, seed: int, vocab: int = 32000):
    """tokens (T,) int32, seq_offsets (2P+1,) int64, prompt_lens (2P,) int64, lengths (P, 2) int64."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(20, 513, npairs)
    chosen = rng.integers(20, 701, npairs)
    rejected = rng.integers(20, 257, npairs)
    lengths = np.stack([prompt + chosen, prompt + rejected], axis=1).astype(np.int64)   # (P, 2)
    offsets = np.zeros(2 * npairs + 1, dtype=np.int64)
    np.cumsum(lengths.reshape(-1), out=offsets[1:])
    tokens = rng.integers(0, vocab, size=int(offsets[-1]), dtype=np.int32)
    return tokens, offsets, np.repeat(prompt, 2).astype(np.int64), lengths


def run_once(backend, lengths, tokens, offsets, prompt_lens, budget, world_size):
    """(plan seconds, collate seconds, plan) of one epoch's packing on `backend`."""
    t0 = time.perf_counter()
    plan = pk.plan_micro_batches(lengths, budget, world_size, backend=backend)
    t1 = time.perf_counter()
    for rank in plan:
        for mb in rank:
            pk.collate(mb, tokens, offsets, prompt_lens, backend=backend)
    return t1 - t0, time.perf_counter() - t1, plan


def check_agree(plan_cpp, plan_py, tokens, offsets, prompt_lens, samples: int = 16):
    assert plan_cpp == plan_py, "C++ and Python plans differ"
    mbs = [mb for rank in plan_cpp for mb in rank]
    for i in np.linspace(0, len(mbs) - 1, min(samples, len(mbs))).astype(int):
        a = pk.collate(mbs[i], tokens, offsets, prompt_lens, backend="cpp")
        b = pk.collate(mbs[i], tokens, offsets, prompt_lens, backend="python")
        assert all(np.array_equal(a[k], b[k]) for k in a), f"collated micro-batch {i} differs"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the C++ backend (median)")
    ap.add_argument("--python-repeats", type=int, default=1, help="timed runs of the Python reference (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not pk.cpp_available():
        raise SystemExit("spin_fast._C is not built: run `pip install --no-deps --no-build-isolation -e .`")

    tokens, offsets, prompt_lens, lengths = synthetic_pairs(args.pairs, args.seed)
    costs = lengths.sum(axis=1)
    print(f"{args.pairs} pairs, {tokens.size / 1e6:.1f}M tokens ({costs.mean():.0f} per pair), "
          f"budget {args.budget}")
    rows = []
    for world_size in args.world_sizes:
        results = {}
        run_once("cpp", lengths, tokens, offsets, prompt_lens, args.budget, world_size)      # warm-up: allocator
        for backend, repeats in (("cpp", args.repeats), ("python", args.python_repeats)):
            runs = [run_once(backend, lengths, tokens, offsets, prompt_lens, args.budget, world_size)
                    for _ in range(max(1, repeats))]
            results[backend] = runs
        plan = results["cpp"][0][2]
        check_agree(plan, results["python"][0][2], tokens, offsets, prompt_lens)
        totals = [int(sum(costs[mb].sum() for mb in rank)) for rank in plan]
        nmb = sum(len(rank) for rank in plan)
        stats = {}
        for backend, runs in results.items():
            plan_s = statistics.median(r[0] for r in runs)
            collate_s = statistics.median(r[1] for r in runs)
            total_s = statistics.median(r[0] + r[1] for r in runs)
            stats[backend] = total_s
            rows.append({
                "backend": backend, "world_size": world_size, "pairs": args.pairs, "tokens": int(tokens.size),
                "budget": args.budget, "micro_batches": nmb, "per_rank": len(plan[0]),
                "plan_s": round(plan_s, 4), "collate_s": round(collate_s, 4), "total_s": round(total_s, 4),
                "mtokens_per_s": round(tokens.size / total_s / 1e6, 2), "repeats": len(runs),
                "fill": round(float(costs.sum()) / (nmb * args.budget), 4),
                "rank_spread_tokens": max(totals) - min(totals),
                "plan_speedup": None, "collate_speedup": None, "speedup": None,
            })
        cpp_row, py_row = rows[-2], rows[-1]
        cpp_row["plan_speedup"] = round(py_row["plan_s"] / max(cpp_row["plan_s"], 1e-9), 1)
        cpp_row["collate_speedup"] = round(py_row["collate_s"] / cpp_row["collate_s"], 1)
        cpp_row["speedup"] = round(stats["python"] / stats["cpp"], 1)
    for r in rows:
        r.update(commit=commit(), date=today(), machine=machine())
    print(markdown_table(rows, ["backend", "world_size", "micro_batches", "per_rank", "plan_s", "collate_s",
                                "total_s", "mtokens_per_s", "fill", "rank_spread_tokens", "plan_speedup",
                                "collate_speedup", "speedup"]))
    path = write_results("packing", rows, extra={"config": vars(args),
                                                 "lengths": "prompt U[20,512], chosen U[20,700], rejected U[20,256]"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
