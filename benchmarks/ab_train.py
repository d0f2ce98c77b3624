"""Training throughput of two checkouts side by side: the same model, pairs and settings, runs alternated
(A, B, A, B, ...) so that load on a shared machine hits both alike; only ratios are meaningful there.

    python -m benchmarks.ab_train --a ../main_at_base --b . --pairs 32 --repeats 2

Each run is bench_train's single-process spin_fast row (reference cache + training, fresh output folder), launched
from that checkout (its own spin_fast on PYTHONPATH). Reports train tokens/s (tokens / train wall time) and total
tokens/s (tokens / (cache + train)), the median per checkout and B/A. Results: benchmarks/results/ab_train-DATE-MACHINE.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_train import TRAIN_ARGS, ours_argv, workload
from benchmarks.common import markdown_table, write_results


def commit_of(tree: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=tree)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=tree).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def one_run(tree: Path, tmp: Path, model: Path, pairs: Path, tokens_per_step: int, threads: int, tag: str) -> dict:
    out, result = tmp / tag, tmp / f"{tag}.json"
    argv = ours_argv(model, pairs, out, tokens_per_step)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--_ours", str(result), "--threads", str(threads),
           "--", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads(Path(f"{result}.rank0").read_text())["summary"]
    tok, ref_s, train_s = s["train"]["tokens"], s["cache"]["wall_s"], s["train"]["wall_s"]
    return {"tokens": tok, "ref_s": ref_s, "train_s": train_s, "train_tokens_per_s": tok / train_s,
            "tokens_per_s": tok / (ref_s + train_s), "final_loss": s["train"]["final"].get("loss")}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_train", description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", default=".", help="checkout B (the change)")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    trees = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, pairs, total, num_pairs, steps, tokens_per_step = workload(tmp, args.pairs)
        for i in range(args.repeats):
            for name, tree in trees.items():
                row = {"checkout": name, "commit": commit_of(tree), "repeat": i,
                       **one_run(tree, tmp, model, pairs, tokens_per_step, args.threads, f"{name}{i}")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    med = {n: {k: statistics.median(r[k] for r in rows if r["checkout"] == n)
               for k in ("train_tokens_per_s", "tokens_per_s")} for n in trees}
    ratio = {k: med["B"][k] / med["A"][k] for k in med["A"]}
    print(markdown_table(rows, ["checkout", "commit", "repeat", "tokens", "ref_s", "train_s", "train_tokens_per_s",
                                "tokens_per_s", "final_loss"]))
    print("median", json.dumps(med), "B/A", json.dumps(ratio))
    path = write_results("ab_train", rows, extra={"median": med, "b_over_a": ratio, "setup": {
        "a": commit_of(trees["A"]), "b": commit_of(trees["B"]), "pairs": num_pairs, "tokens": total,
        "threads": args.threads, **TRAIN_ARGS, "tokens_per_step": tokens_per_step,
        "command": "python -m benchmarks.ab_train " + " ".join(argv if argv is not None else sys.argv[1:])}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
