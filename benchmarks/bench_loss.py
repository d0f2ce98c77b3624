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
same way for every impl. CUDA: torch.cuda.max_memory_allocated.

FLOPs and bytes (columns; see benchmarks/README.md, "FLOPs and bytes"):
- `tflops` = 6*N*H*V / time: the naive count (2 forward + 4 backward), the same yardstick for every impl.
- `fwd_gflop` / `bwd_gflop`: the matmul FLOPs the impl really issues (multiply-add = 2): naive 2NHV + 4NHV; torch
  chunked logprobs and triton 2NHV + 6NHV (the backward recomputes the logits: 2 + dhidden 2 + dweight 2); torch
  fused spin and liger 6NHV + 0 (gradients formed in the forward). `eff_bwd_gflop`: triton's backward minus the
  tiles its kernel skipped (all-ignored token tiles: 6NHV x fraction; gradient-filtered tiles: 4NHV x fraction),
  counted by the kernel's debug counter in one extra run; `skip_frac`, `filter_frac` are those fractions.
- `io_mib`: compulsory bytes to/from memory for forward + backward: hidden and weight read once per pass, the
  gradients written (fp32 accumulators + the cast to the input dtype: read 4 B, write b), O(N) per-token vectors
  (targets, lse, log-probs, upstream). `saved_mib`: state kept from forward to backward beyond the inputs: naive the
  (N, V) fp32 logits/softmax, the others O(N). `atomic_gib` (triton): the fp32 atomic read-modify-writes of its
  backward, N*H*cdiv(V, block_v) + V*H*cdiv(N, block_n) adds of 4 B, resolved in L2.
- `frac_of_matmul_rate` (CUDA): `tflops` / the measured dense bf16 matmul rate of the device.
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


def build_step(op, impl, x, triton_config=None):
    """Return a closure running one forward + backward (grads land in x['hidden'].grad / x['weight'].grad)."""
    from spin_fast.kernels import linear_logprobs, spin_loss_from_hidden
    from spin_fast.loss import reference_spin_loss_from_hidden, reference_token_logprobs

    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    if op == "logprobs":
        def step():
            if impl == "naive":
                logps = reference_token_logprobs(hidden, weight, targets, upcast_inputs=False)
            else:
                logps = linear_logprobs(hidden, weight, targets, impl=impl, check_values=False,
                                        triton_config=triton_config)
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
                                        num_sequences=num_sequences, check_values=False, triton_config=triton_config)
        loss.backward()
    return step


def nominal_counts(op, impl, n, h, v, dtype):
    """Matmul FLOPs actually issued (fwd, bwd) and bytes (io, saved, atomics) of one forward + backward."""
    nhv = float(n) * h * v
    fwd, bwd = {"naive": (2, 4), "triton": (2, 6), "liger": (6, 0), "liger-eager": (6, 0)}.get(
        impl, (2, 6) if op == "logprobs" else (6, 0))          # torch: chunked logprobs recompute; fused spin not
    b = torch.finfo(dtype).bits // 8
    io = 2 * (n * h + v * h) * b + (n * h + v * h) * (4 + b) + 4 * n * 8
    saved = n * v * 4 if impl == "naive" else n * 4
    row = {"fwd_gflop": fwd * nhv / 1e9, "bwd_gflop": bwd * nhv / 1e9, "io_mib": io / MiB, "saved_mib": saved / MiB}
    if impl == "triton":
        from spin_fast.kernels.triton_logprobs import TritonConfig
        block_n, block_v = TritonConfig.default().block_n, TritonConfig.default().block_v
        row["atomic_gib"] = 4.0 * (n * h * -(-v // block_v) + v * h * -(-n // block_n)) / (1 << 30)
    return row


def triton_skip_fractions(x, config=None):
    """(fraction of backward tiles skipped for zero gradient, fraction gradient-filtered), from the kernel's counter
    on the logprobs op's upstream gradient (one extra, untimed backward)."""
    from spin_fast.kernels.triton_logprobs import TritonConfig, triton_logprobs_backward, triton_logprobs_forward
    config = config or TritonConfig.default()
    with torch.no_grad():
        hidden, weight = x["hidden"].detach(), x["weight"].detach()
        _, lse = triton_logprobs_forward(hidden, weight, x["targets"], config=config)
        skipped = torch.zeros(2, dtype=torch.int32, device=hidden.device)
        triton_logprobs_backward(hidden, weight, x["targets"], lse, x["upstream"], config=config, skipped=skipped)
    tiles = -(-hidden.shape[0] // config.block_n) * -(-weight.shape[0] // config.block_v)
    zero, filtered = skipped.tolist()
    return zero / tiles, filtered / tiles


def _triton_config(grad_filter):
    if not grad_filter:
        return None
    from dataclasses import replace

    from spin_fast.kernels.triton_logprobs import TritonConfig
    return replace(TritonConfig.default(), grad_filter=grad_filter)


def measure(op, impl, n, h, v, dtype, device, repeats, grad_filter=0.0):
    """One (op, impl, shape) measurement in this process."""
    x = make_inputs(n, h, v, dtype, device)
    x["hidden"].requires_grad_(True)
    x["weight"].requires_grad_(True)
    config = _triton_config(grad_filter)
    step = build_step(op, impl, x, config)
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
    row = {"op": op, "impl": impl, "N": n, "H": h, "V": v, "dtype": str(dtype).replace("torch.", ""),
           "device": device, "time_s": seconds, "extra_mib": (peak - base - grad_bytes) / MiB,
           "tflops": flops / seconds / 1e12, "repeats": repeats}
    row.update(nominal_counts(op, impl, n, h, v, dtype))
    row["eff_bwd_gflop"] = row["bwd_gflop"]
    if impl == "triton":
        zero, filtered = triton_skip_fractions(x, config)
        nhv = float(n) * h * v
        row.update(skip_frac=zero, filter_frac=filtered,
                   eff_bwd_gflop=(row["bwd_gflop"] - (6 * zero + 4 * filtered) * nhv / 1e9))
    row["tflops_issued"] = (row["fwd_gflop"] + row["eff_bwd_gflop"]) * 1e9 / seconds / 1e12
    return row


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
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        # On CPU only under the interpreter and only if asked for by --impls (see main): a plumbing check.
        impls = {op: v + ["triton"] for op, v in impls.items()}
    if liger_available():
        impls["spin"] += ["liger", "liger-eager"]
    return impls


def run_worker_subprocess(op, impl, shape, dtype, repeats, grad_filter=0.0):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "benchmarks.bench_loss", "--worker", "--op", op, "--impl", impl,
           "--shape", "x".join(map(str, shape)), "--dtype", dtype, "--repeats", str(repeats),
           "--grad-filter", str(grad_filter)]
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
    ap.add_argument("--impls", help="comma list to restrict to (naive,torch,triton,liger,liger-eager); triton on "
                    "CPU only with TRITON_INTERPRET=1 (a plumbing check, not a speed measurement)")
    ap.add_argument("--grad-filter", type=float, default=0.0,
                    help="triton: CCE gradient-filter threshold (TritonConfig.grad_filter; 2^-12 = 0.000244)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--op", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    shapes = [tuple(int(s) for s in args.shape.split("x"))] if args.shape else \
        (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)

    if args.worker:
        print(json.dumps(measure(args.op, args.impl, *shapes[0], dtype, args.device, args.repeats,
                                 args.grad_filter)))
        return 0

    rows, extra = [], {}
    if args.device == "cuda":
        extra["bf16_matmul_tflops"] = matmul_rate()
    wanted = set(args.impls.split(",")) if args.impls else None
    for shape in shapes:
        for op, impls in plan(args.device).items():
            if op not in args.ops.split(","):
                continue
            impls = [i for i in impls if (not wanted and (i != "triton" or args.device == "cuda"))
                     or (wanted and i in wanted)]
            if args.device == "cpu":
                # Interleave the impls over several rounds and keep each impl's best round: on a shared 2-core
                # machine a burst of outside load then hits one round, not one impl.
                by_impl = {impl: [] for impl in impls}
                for _ in range(args.rounds):
                    for impl in impls:
                        by_impl[impl].append(run_worker_subprocess(op, impl, shape, dtype_name, args.repeats,
                                                                   args.grad_filter))
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
                    row = measure(op, impl, *shape, dtype, "cuda", args.repeats, args.grad_filter)
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
    cols = ["op", "impl", "N", "H", "V", "dtype", "time_s", "extra_mib", "tflops", "time_vs_naive", "mem_vs_naive",
            "fwd_gflop", "bwd_gflop", "eff_bwd_gflop", "tflops_issued", "io_mib", "saved_mib"]
    if args.device == "cuda":
        cols += ["atomic_gib", "skip_frac", "filter_frac", "frac_of_matmul_rate"]
    print(markdown_table([r for r in rows if "error" not in r], cols))
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['op']}/{r['impl']}: {r['error']}")
    if extra:
        print(extra)
    if args.grad_filter:
        print(f"triton grad_filter = {args.grad_filter}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
