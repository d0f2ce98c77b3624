"""SPIN vs continued SFT on the hmm demo task (exact p_data), over seeds and loss settings.

    nice -n 10 python benchmarks/demo_sweep.py --seeds 0 1 2 --arms sigmoid0.1 hinge1 --iterations 1

Each (arm, seed) is one built-in demo run (`torchrun --nproc_per_node=NPROC -m spin_fast.train --demo.task hmm
--seed S ...`, its own SFT from scratch and its own continued-SFT baseline at equal tokens); the script collects
every run's demo.json and writes benchmarks/results/demo-sweep-<date>-<commit>.json and a markdown table of
mean +- standard error over the seeds, per iteration and arm (continued SFT is reported once per arm: it does not
depend on the SPIN loss, but is rerun per arm so that each row is a self-contained, reproducible demo run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "sigmoid0.1": ["--train.loss_type", "sigmoid", "--train.beta", "0.1"],       # the paper's setting
    "sigmoid0.03": ["--train.loss_type", "sigmoid", "--train.beta", "0.03"],
    "sigmoid0.3": ["--train.loss_type", "sigmoid", "--train.beta", "0.3"],
    "sigmoid1": ["--train.loss_type", "sigmoid", "--train.beta", "1.0"],
    "sigmoid0.1_lr1e-3": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", "--train.lr", "1e-3"],
    "hinge1": ["--train.loss_type", "hinge", "--train.beta", "1.0"],
    "sigmoid0.1_rpo1": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", "--train.rpo_alpha", "1.0"],
    "sigmoid0.1_mix": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", "--loop.mix_previous", "true"],
}
METRICS = ("forward_kl", "reverse_kl_valid", "quality", "validity", "coverage")


def mean_se(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None
    return m, se


def run_one(out: Path, arm: str, seed: int, args) -> dict:
    cmd = ["torchrun", f"--nproc_per_node={args.nproc}", "--master_port", str(29600 + seed), "-m", "spin_fast.train",
           "--output", str(out), "--demo.task", "hmm", "--seed", str(seed), "--loop.iterations", str(args.iterations),
           "--train.progress", "false", *ARMS[arm], *args.extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return {"arm": arm, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1), "command": " ".join(cmd),
            "demo": json.loads((out / "demo.json").read_text())}


def table(runs: list[dict]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    models = [row["model"] for row in runs[0]["demo"]["rows"]]
    head = "| arm | model | " + " | ".join(f"{m} SPIN | {m} cont. SFT" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(METRICS))]
    fmt = lambda m, s: "-" if m is None else (f"{m:.3f}" + ("" if s is None else f" ± {s:.3f}"))  # noqa: E731
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        for i, model in enumerate(models):
            cells = []
            for k in METRICS:
                for side in ("spin", "continued_sft"):
                    cells.append(fmt(*mean_se([r["demo"]["rows"][i][side].get(k) for r in rs])))
            lines.append(f"| {arm} (n={len(rs)}) | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["sigmoid0.1", "hinge1"], choices=list(ARMS))
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_sweep"))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more config flags for every run")
    args = ap.parse_args(argv)
    runs = []
    for arm in args.arms:
        for seed in args.seeds:
            out = args.work / f"{arm}_s{seed}"
            runs.append(run_one(out, arm, seed, args))
            print(f"{arm} seed {seed}: {runs[-1]['wall_s']} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    md = table(runs)
    res = {"benchmark": "demo_sweep", "date": date, "commit": commit, "argv": sys.argv[1:],
           "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared, loaded)",
           "metrics": "held-out prompts, 2 samples each of p_data and p_theta; see spin_fast/hmm_task.py",
           "table_md": md, "runs": runs}
    path = ROOT / "benchmarks" / "results" / f"demo-sweep-{date}-{commit}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
