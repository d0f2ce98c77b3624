"""SPIN vs continued SFT on the hmm demo task (exact p_data), over seeds and loss settings, from one
early-stopped (plateaued) SFT model per seed.

    nice -n 10 python benchmarks/demo_sweep.py --seeds 0 1 2 --iterations 2      # every arm (~30-40 min, 2 cores)

Each (arm, seed) is one built-in demo run (`torchrun --nproc_per_node=NPROC -m spin_fast.train --demo.task hmm
--seed S ...`). The first arm of a seed runs from scratch: its HMM, data and tiny model, SFT early-stopped on a
held-out plateau (the demo's sft.* defaults), then SPIN and continued SFT at equal tokens. Every other arm of the
seed starts from a copy of that run's demo_assets/, data/, sft/ and manifest.json (`--resume-force`: only the
SPIN / baseline keys differ, so the SFT phase is finished and reused, bit for bit the same start), then trains its
own SPIN iterations and its own continued-SFT baseline (equal tokens to its own SPIN run). A finished run
(demo.json present) is reused, so an interrupted sweep continues. Writes
benchmarks/results/demo-sweep-<date>-<commit>.json with two markdown tables: absolute values and the paired
change from the SFT start (mean +- standard error over the seeds).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LR = ["--train.lr", "1e-4"]        # SPIN's lr in every arm but the one that names its own (the demo's default is 1e-3)
ARMS = {
    "sigmoid0.1": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", *LR],       # the paper's setting
    "sigmoid0.03": ["--train.loss_type", "sigmoid", "--train.beta", "0.03", *LR],
    "sigmoid0.3": ["--train.loss_type", "sigmoid", "--train.beta", "0.3", *LR],
    "sigmoid1": ["--train.loss_type", "sigmoid", "--train.beta", "1.0", *LR],
    "hinge1": ["--train.loss_type", "hinge", "--train.beta", "1.0", *LR],
    "sigmoid0.1_rpo1": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", "--train.rpo_alpha", "1.0", *LR],
    "sigmoid0.1_mix": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", "--loop.mix_previous", "true", *LR],
    # the equal-lr comparison: SPIN as sigmoid0.1, continued SFT at SPIN's lr (train.lr) instead of sft.lr
    "sigmoid0.1_csft_at_spin_lr": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", *LR,
                                   "--loop.continued_sft_lr", "1e-4"],
    "sigmoid0.1_lr1e-3": ["--train.loss_type", "sigmoid", "--train.beta", "0.1", "--train.lr", "1e-3"],
}
SHARED = ("demo_assets", "data", "sft", "manifest.json")      # what a seed's later arms copy from its first
METRICS = ("forward_kl", "reverse_kl_valid", "quality", "validity", "coverage")


def mean_se(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None
    return m, se


def run_one(out: Path, arm: str, seed: int, args, base: Path | None) -> dict:
    cmd = ["torchrun", f"--nproc_per_node={args.nproc}", "--master_port", str(args.port + seed), "-m", "spin_fast.train",
           "--output", str(out), "--demo.task", "hmm", "--seed", str(seed), "--loop.iterations", str(args.iterations),
           "--train.progress", "false", *ARMS[arm], *args.extra]
    if (out / "demo.json").is_file():                            # finished earlier: reuse
        prev = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        return {"arm": arm, "seed": seed, "wall_s": prev.get("wall_s"), "command": " ".join(cmd),
                "demo": json.loads((out / "demo.json").read_text()), "shared_sft_from": prev.get("shared_sft_from")}
    shutil.rmtree(out, ignore_errors=True)
    if base is not None:                                         # the seed's SFT start, reused
        out.mkdir(parents=True)
        for name in SHARED:
            src = base / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / name)
        cmd.append("--resume-force")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    res = {"arm": arm, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1), "command": " ".join(cmd),
           "shared_sft_from": str(base) if base else None}
    (out / "run.json").write_text(json.dumps(res) + "\n")
    return {**res, "demo": json.loads((out / "demo.json").read_text())}


def _fmt(m, s):
    return "-" if m is None else (f"{m:+.3f}" if s is not None else f"{m:.3f}") + ("" if s is None else f" ± {s:.3f}")


def table(runs: list[dict]) -> str:
    """Absolute values, mean ± SE over the seeds, per arm and model (SFT start, iteration t)."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    head = "| arm | model | " + " | ".join(f"{m} SPIN | {m} cont. SFT" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(METRICS))]
    fmt = lambda m, s: "-" if m is None else (f"{m:.3f}" + ("" if s is None else f" ± {s:.3f}"))  # noqa: E731
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        for i, row in enumerate(rs[0]["demo"]["rows"]):
            cells = []
            for k in METRICS:
                for side in ("spin", "continued_sft"):
                    cells.append(fmt(*mean_se([r["demo"]["rows"][i][side].get(k) for r in rs])))
            lines.append(f"| {arm} (n={len(rs)}) | {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DELTA = ("forward_kl", "reverse_kl_valid", "quality", "validity")


def delta_table(runs: list[dict]) -> str:
    """Change from the seed's SFT start (paired per seed), mean ± SE over the seeds; SPIN − cSFT: the paired
    difference of the forward-KL changes (negative: SPIN closer to p_data than continued SFT)."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    head = ("| arm | iteration | " + " | ".join(f"Δ {m} SPIN | Δ {m} cSFT" for m in DELTA)
            + " | Δ fwd KL SPIN − cSFT | disc. acc |")
    lines = [head, "|" + "---|" * (4 + 2 * len(DELTA))]
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        for i, row in enumerate(rs[0]["demo"]["rows"][1:], start=1):
            rows = [r["demo"]["rows"] for r in rs]
            d = lambda side, k: [x[i][side].get(k) - x[0][side].get(k) for x in rows  # noqa: E731
                                 if x[i][side].get(k) is not None and x[0][side].get(k) is not None]
            cells = [_fmt(*mean_se(d(side, k))) for k in DELTA for side in ("spin", "continued_sft")]
            gap = [x[i]["spin"]["forward_kl"] - x[i]["continued_sft"]["forward_kl"] for x in rows
                   if x[i]["spin"].get("forward_kl") is not None and x[i]["continued_sft"].get("forward_kl") is not None]
            acc = mean_se([x[i].get("heldout_acc") for x in rows])
            lines.append(f"| {arm} (n={len(rs)}) | {row['model']} | " + " | ".join(cells)
                         + f" | {_fmt(*mean_se(gap))} | {'-' if acc[0] is None else f'{acc[0]:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--no-share-sft", action="store_true", help="every run trains its own SFT (same result, slower)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--port", type=int, default=29600, help="torchrun --master_port of seed 0 (seed S: PORT + S)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_sweep"))
    ap.add_argument("--tag", default="", help="suffix of the results file name (e.g. -sft15)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more config flags for every run")
    args = ap.parse_args(argv)
    runs, bases = [], {}
    for arm in args.arms:
        for seed in args.seeds:
            out = args.work / f"{arm}_s{seed}"
            runs.append(run_one(out, arm, seed, args, None if args.no_share_sft else bases.get(seed)))
            bases.setdefault(seed, out)
            print(f"{arm} seed {seed}: {runs[-1]['wall_s']} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    md, dmd = table(runs), delta_table(runs)
    sft = {seed: next(r for r in runs if r["seed"] == seed)["demo"].get("sft_early_stopping") for seed in args.seeds}
    res = {"benchmark": "demo_sweep", "date": date, "commit": commit, "argv": sys.argv[1:],
           "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared, loaded)",
           "metrics": "held-out prompts, 2 samples each of p_data and p_theta; see spin_fast/hmm_task.py",
           "sft_early_stopping": sft, "table_md": md, "delta_table_md": dmd, "runs": runs}
    path = ROOT / "benchmarks" / "results" / f"demo-sweep-{date}-{commit}{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(md)
    print(dmd)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
