"""Forward+backward time and extra peak memory of the log-prob / SPIN-loss kernels vs what users run today.

    python -m benchmarks.bench_loss                      # CPU: N=4096, H=1024, V=32000 fp32, one process per impl
    python -m benchmarks.bench_loss --device cuda        # GPU: N in {8192, 32768}, H=4096, V in {32000, 128256}, bf16

Two ops, each timed as forward + backward to hidden and weight (median of --repeats, after one warm-up):
- `logprobs`: token log-probs with an arbitrary upstream gradient. naive (full logits, spin_fast.loss — the tests'
  oracle) | torch (chunked) | triton.
- `spin`: the SPIN loss of a packed batch of P pairs (chosen and rejected of T tokens each, reference log-probs
  precomputed). naive (full logits: what the official SPIN code / TRL do) | torch (fused, one pass) | triton |
  liger (`LigerFusedLinearDPOLoss(use_ref_model=False)`, compiled and eager), like for like.

Extra memory = peak - (memory before the timed loop) - (bytes of the hidden and weight gradients), i.e. counted
over inputs and their grad buffers. CPU: each impl runs in its own process; peak is VmHWM (= ru_maxrss), reset
after warm-up; glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed buffers go back to the OS the
same way for every impl. CUDA: torch.cuda.max_memory_allocated. FLOP convention: 6*N*H*V per forward+backward
(2 forward + 4 backward; recomputation not counted).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

from benchmarks.common import (markdown_table, median_time, peak_rss_bytes, reset_peak_rss, rss_bytes,
                               write_results)

MiB = 1 << 20
CPU_SHAPES = [(4096, 1024, 32000)]
GPU_SHAPES = [(n, 4096, v) for n in (8192, 32768) for v in (32000, 128256)]
SEQ_LEN = 256          # tokens per response in the `spin` op: N / (2 * SEQ_LEN) pairs


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    num_pairs = max(1, n // (2 * SEQ_LEN))
    seq_len = n // (2 * num_pairs)
    seq_index = torch.arange(2 * num_pairs).repeat_interleave(seq_len).to(device)
    # Liger's layout: chosen sequences first, then rejected; our packed batch uses the same order.
    chosen_index = torch.arange(num_pairs, device=device)
    rejected_index = torch.arange(num_pairs, 2 * num_pairs, device=device)
    ref = (-2.0 * seq_len + torch.randn(2, num_pairs, generator=g)).to(device)
    return dict(hidden=hidden, weight=weight, targets=targets, upstream=upstream, seq_index=seq_index,
                chosen_index=chosen_index, rejected_index=rejected_index, ref_chosen=ref[0], ref_rejected=ref[1],
                num_pairs=num_pairs, seq_len=seq_len)


def build_step(op, impl, x):
    """Return a closure running one forward + backward (grads land in x['hidden'].grad / x['weight'].grad)."""
    from spin_fast.kernels import linear_logprobs, spin_loss_from_hidden
    from spin_fast.loss import reference_spin_loss_from_hidden, reference_token_logprobs

    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    if op == "logprobs":
        def step():
            if impl == "naive":
                logps = reference_token_logprobs(hidden, weight, targets, upcast_inputs=False)
            else:
                logps = linear_logprobs(hidden, weight, targets, impl=impl, check_values=False)
            (logps * x["upstream"]).sum().backward()
        return step

    pair_args = (targets, x["seq_index"], x["chosen_index"], x["rejected_index"])
    if impl == "naive":
        def step():
            loss, _ = reference_spin_loss_from_hidden(hidden, weight, *pair_args, x["ref_chosen"], x["ref_rejected"],
                                                      upcast_inputs=False)
            loss.backward()
        return step
    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compute_nll_loss=False,
                                          compiled=(impl == "liger"))
        b2, t = 2 * x["num_pairs"], x["seq_len"]

        def step():
            out = loss_fn(weight, hidden.view(b2, t, -1), targets.view(b2, t))
            (out[0] if isinstance(out, tuple) else out).backward()
        return step
    num_sequences = 2 * x["num_pairs"]

    def step():
        loss, _ = spin_loss_from_hidden(hidden, weight, *pair_args, x["ref_chosen"], x["ref_rejected"], impl=impl,
                                        num_sequences=num_sequences, check_values=False)
        loss.backward()
    return step


def measure(op, impl, n, h, v, dtype, device, repeats):
    """One (op, impl, shape) measurement in this process."""
    x = make_inputs(n, h, v, dtype, device)
    x["hidden"].requires_grad_(True)
    x["weight"].requires_grad_(True)
    step = build_step(op, impl, x)
    is_cuda = device == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    def clean_step():
        x["hidden"].grad = None
        x["weight"].grad = None
        step()

    clean_step()                                   # warm-up: compile, autotune, allocator pools
    x["hidden"].grad = x["weight"].grad = None
    gc.collect()
    grad_bytes = (n * h + v * h) * x["hidden"].element_size()
    if is_cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset_peak_rss()
    seconds = median_time(clean_step, repeats, sync)
    peak = torch.cuda.max_memory_allocated() if is_cuda else peak_rss_bytes()
    flops = 6.0 * n * h * v
    return {"op": op, "impl": impl, "N": n, "H": h, "V": v, "dtype": str(dtype).replace("torch.", ""),
            "device": device, "time_s": seconds, "extra_mib": (peak - base - grad_bytes) / MiB,
            "tflops": flops / seconds / 1e12, "repeats": repeats}


def matmul_rate(dtype=torch.bfloat16, size=8192, repeats=10):
    """Measured dense matmul rate on this device (the roofline the kernels are judged against)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = median_time(lambda: a @ b, repeats, torch.cuda.synchronize)
    return 2.0 * size ** 3 / seconds / 1e12


def liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
        return True
    except Exception:                      # liger imports triton and may fail for reasons of its own
        return False


def plan(device):
    impls = {"logprobs": ["naive", "torch"], "spin": ["naive", "torch"]}
    if device == "cuda":
        impls = {op: v + ["triton"] for op, v in impls.items()}
    if liger_available():
        impls["spin"] += ["liger", "liger-eager"]
    return impls


def run_worker_subprocess(op, impl, shape, dtype, repeats):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "benchmarks.bench_loss", "--worker", "--op", op, "--impl", impl,
           "--shape", "x".join(map(str, shape)), "--dtype", dtype, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"op": op, "impl": impl, "N": shape[0], "H": shape[1], "V": shape[2], "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_ratios(rows):
    """time and memory of each row relative to the naive row of the same op and shape (side by side, one run)."""
    naive = {(r["op"], r["N"], r["H"], r["V"]): r for r in rows if r.get("impl") == "naive" and "error" not in r}
    for r in rows:
        base = naive.get((r["op"], r["N"], r["H"], r["V"]))
        if base and "error" not in r:
            r["time_vs_naive"] = r["time_s"] / base["time_s"]
            r["mem_vs_naive"] = r["extra_mib"] / base["extra_mib"] if base["extra_mib"] > 0 else float("nan")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations per process (median)")
    ap.add_argument("--rounds", type=int, default=2, help="CPU: interleaved rounds per impl (best kept)")
    ap.add_argument("--shape", help="NxHxV (default: the issue's shapes for the device)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--ops", default="logprobs,spin")
    ap.add_argument("--impls", help="comma list to restrict to (naive,torch,triton,liger,liger-eager)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--op", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    shapes = [tuple(int(s) for s in args.shape.split("x"))] if args.shape else \
        (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)

    if args.worker:
        print(json.dumps(measure(args.op, args.impl, *shapes[0], dtype, args.device, args.repeats)))
        return 0

    rows, extra = [], {}
    if args.device == "cuda":
        extra["bf16_matmul_tflops"] = matmul_rate()
    wanted = set(args.impls.split(",")) if args.impls else None
    for shape in shapes:
        for op, impls in plan(args.device).items():
            if op not in args.ops.split(","):
                continue
            impls = [i for i in impls if not wanted or i in wanted]
            if args.device == "cpu":
                # Interleave the impls over several rounds and keep each impl's best round: on a shared 2-core
                # machine a burst of outside load then hits one round, not one impl.
                by_impl = {impl: [] for impl in impls}
                for _ in range(args.rounds):
                    for impl in impls:
                        by_impl[impl].append(run_worker_subprocess(op, impl, shape, dtype_name, args.repeats))
                for impl, runs in by_impl.items():
                    ok = [r for r in runs if "error" not in r]
                    row = min(ok, key=lambda r: r["time_s"]) if ok else runs[0]
                    if ok:
                        row = dict(row, extra_mib=max(r["extra_mib"] for r in ok), rounds=len(ok),
                                   time_s_rounds=[r["time_s"] for r in ok])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                continue
            for impl in impls:
                try:
                    row = measure(op, impl, *shape, dtype, "cuda", args.repeats)
                except torch.OutOfMemoryError as exc:
                    row = {"op": op, "impl": impl, "N": shape[0], "H": shape[1], "V": shape[2],
                           "error": f"OOM: {exc}"[:300]}
                torch.cuda.empty_cache()
                if "bf16_matmul_tflops" in extra and "tflops" in row:
                    row["frac_of_matmul_rate"] = row["tflops"] / extra["bf16_matmul_tflops"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    add_ratios(rows)
    # A custom shape is a quick look, not the table: keep it out of the dated file of record.
    name = "bench_loss" if not args.shape else f"bench_loss-custom-{args.shape}"
    path = write_results(name, rows, extra)
    cols = ["op", "impl", "N", "H", "V", "dtype", "time_s", "extra_mib", "tflops", "time_vs_naive", "mem_vs_naive"]
    if args.device == "cuda":
        cols.append("frac_of_matmul_rate")
    print(markdown_table([r for r in rows if "error" not in r], cols))
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['op']}/{r['impl']}: {r['error']}")
    if extra:
        print(extra)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
