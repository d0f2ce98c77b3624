"""Run the benchmark suite, combine its results into one dated file and refresh the README's "latest" table.

    python -m benchmarks.run --suite cpu            # bench_loss, bench_sampler, bench_train, bench_iteration (~1 h)
    python -m benchmarks.run --suite cpu --quick    # small shapes: a smoke run of the whole pipeline (~10 min)
    python -m benchmarks.run --suite gpu            # one H200: bench_loss + bench_sampler on CUDA, < 8 min
    python -m benchmarks.run --suite cpu --only bench_iteration,bench_train     # a subset
    python -m benchmarks.run --suite cpu --no-run   # only combine the result files already written today

Each benchmark runs as its own subprocess (`python -m benchmarks.X ...`, in its own process group, killed at its
timeout) and writes its own dated file in benchmarks/results/ (NAME-DATE-MACHINE.json); this script reads the ones
written during the run and combines them into benchmarks/results/DATE-MACHINE.json (date, commit, machine, suite,
per-benchmark status and payload, a summary table: spin_fast vs the baseline each benchmark compares with), prints
the table and writes it between `<!-- latest:begin -->` / `<!-- latest:end -->` in benchmarks/README.md (the
markers are appended when absent). The comparisons themselves (same model, data and settings on both sides, one
process per system) are each benchmark's own; see their docstrings.

--quick: small shapes (fixed costs dominate, so ratios are NOT the benchmarks' numbers). It must not replace the
dated files of record: each benchmark's file of today is restored to what it was before (or removed) after being
read, the combined file is DATE-MACHINE-quick.json and the README is left alone unless --readme is given.
--suite gpu: bench_train and bench_iteration compare against TRL on CPU only (trl_baseline runs with use_cpu=True
and bench_train has no device option), so they are skipped there with that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS_DIR, commit, machine, markdown_table, today

ROOT = Path(__file__).resolve().parents[1]
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- latest:begin -->", "<!-- latest:end -->"


@dataclass
class Bench:
    name: str                         # module benchmarks.<name>
    result: str                       # prefix of its results file: <result>-DATE-MACHINE.json
    args: list[str] = field(default_factory=list)
    timeout_s: int = 3600
    skip: str = ""                    # non-empty: not run in this suite, and why


def suite(name: str, quick: bool) -> list[Bench]:
    if name == "cpu" and quick:
        shape = "512x256x4096"
        return [Bench("bench_loss", f"bench_loss-custom-{shape}", ["--shape", shape, "--repeats", "1", "--rounds",
                                                                   "1"], 600),
                Bench("bench_sampler", "sampler", ["--n-prompts", "8", "--max-new-tokens", "16", "--repeats", "1",
                                                   "--skip-stories", "--skip-smollm2"], 600),
                Bench("bench_train", "train", ["--pairs", "8", "--skip-trl-gc"], 1200),
                Bench("bench_iteration", "iteration", ["--rows", "8", "--max-new-tokens", "16", "--skip-trl-gc",
                                                       "--no-torchrun"], 1200)]
    if name == "cpu":
        return [Bench("bench_loss", "bench_loss", [], 2400), Bench("bench_sampler", "sampler", ["--hf-single"], 2400),
                Bench("bench_train", "train", [], 5400), Bench("bench_iteration", "iteration", [], 5400)]
    why = "compares with TRL on CPU only (trl_baseline: use_cpu=True; no --device option): run it in --suite cpu"
    # GPU budget, 8 min in all on one H200: bench_loss's 4 shapes x 2 ops (naive/torch/triton/liger) + the ~1B sampler
    loss = ["--device", "cuda"] + (["--shape", "8192x4096x32000", "--repeats", "2"] if quick else ["--repeats", "3"])
    sampler = ["--device", "cuda"] + (["--batch-sizes", "64", "--repeats", "1"] if quick else ["--repeats", "2"])
    return [Bench("bench_loss", "bench_loss-custom-8192x4096x32000" if quick else "bench_loss", loss, 280),
            Bench("bench_sampler", "sampler", sampler, 170),
            Bench("bench_train", "train", skip=why), Bench("bench_iteration", "iteration", skip=why)]


def run_bench(b: Bench, mach: str, quick: bool, execute: bool) -> dict:
    path = RESULTS_DIR / f"{b.result}-{today()}-{mach}.json"
    if b.skip:
        print(f"== {b.name}: skipped ({b.skip})", flush=True)
        return {"status": "skipped", "reason": b.skip}
    cmd = [sys.executable, "-m", f"benchmarks.{b.name}", *b.args]
    rec = {"command": " ".join(["python", *cmd[1:]]), "file": path.name}
    if not execute:
        if not path.is_file():
            return {**rec, "status": "missing", "reason": f"no {path.name}"}
        return {**rec, "status": "ok", "result": json.loads(path.read_text())}
    # a smoke run never replaces a file of record, nor merges with it (bench_sampler merges into today's file)
    before = path.read_bytes() if quick and path.is_file() else None
    print(f"== {rec['command']}  (timeout {b.timeout_s} s)", flush=True)
    t0 = time.time()
    try:
        if quick:
            path.unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=b.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)      # the bench and every process it started
            proc.wait()
            rc = "timeout"
        rec["wall_s"] = round(time.time() - t0, 1)
        fresh = path.is_file() and path.stat().st_mtime >= t0 - 1
        if fresh:
            rec["result"] = json.loads(path.read_text())
    finally:
        if quick:
            path.unlink(missing_ok=True)
            if before is not None:
                path.write_bytes(before)
    if rc != 0 or not fresh:
        rec.update(status="failed", reason=f"exit {rc}" + ("" if fresh else f"; no fresh {path.name}"))
    else:
        rec["status"] = "ok"
    print(f"== {b.name}: {rec['status']} in {rec['wall_s']} s {rec.get('reason', '')}", flush=True)
    return rec


# --- the summary table: spin_fast vs each benchmark's baseline, one line per case --------------------------------

def _line(bench, case, ours, base, metric, ours_v, base_v, speedup, mem="") -> dict:
    return {"bench": bench, "case": case, "spin_fast": ours, "baseline": base, "metric": metric,
            "spin_fast_value": ours_v, "baseline_value": base_v, "speedup": speedup, "mem_vs_baseline": mem}


def summarize(name: str, result: dict) -> list[dict]:
    rows, out = [r for r in result.get("rows", []) if "error" not in r], []
    if name == "bench_loss":
        for r in rows:
            base = next((b for b in rows if b["op"] == r["op"] and b["impl"] == "naive" and
                         (b["N"], b["H"], b["V"]) == (r["N"], r["H"], r["V"])), None)
            if base and r["impl"] != "naive":
                out.append(_line(name, f"{r['op']} N{r['N']} H{r['H']} V{r['V']} {r.get('dtype', '')}", r["impl"],
                                 "naive (full logits)", "fwd+bwd s", r["time_s"], base["time_s"],
                                 base["time_s"] / r["time_s"], r.get("mem_vs_naive")))
    elif name == "bench_sampler":
        for r in rows:
            if r["impl"] != "ours":
                continue
            hf = next((h for h in rows if h["impl"] == "hf_generate" and
                       (h["model"], h["batch"], h["device"]) == (r["model"], r["batch"], r["device"])), None)
            if hf:
                out.append(_line(name, f"{r['model']} b={r['batch']} {r['device']}", "sampler", "HF generate",
                                 "gen tokens/s", r["tokens_per_s"], hf["tokens_per_s"],
                                 r["tokens_per_s"] / hf["tokens_per_s"]))
    elif name == "bench_train":
        trl = [r for r in rows if r["system"].startswith("TRL")]
        best = max(trl, key=lambda r: r["tokens_per_s"]) if trl else None
        for r in rows:
            if r["system"] == "spin_fast" and best:
                out.append(_line(name, f"{r['tokens']} train tokens, {r['setting']}", "spin_fast.train",
                                 f"{best['system']}, {best['setting']}", "train tokens/s", r["tokens_per_s"],
                                 best["tokens_per_s"], r["tokens_per_s"] / best["tokens_per_s"],
                                 r["peak_rss_mib"] / best["peak_rss_mib"]))
    elif name == "bench_iteration":
        for r in rows:
            if r["system"] != "spin_fast":
                continue
            base = next(b for b in rows if b["system"] == "seed" and b["phase"] == r["phase"] and
                        b["setting"] == result.get("seed_best"))
            out.append(_line(name, f"{r['phase']}, {r['setting']}", "spin_fast loop", "HF generate + TRL",
                             f"{r['phase']} tokens/s", r["tokens_per_s"], base["tokens_per_s"],
                             r["tokens_per_s"] / base["tokens_per_s"], r["peak_rss_mib"] / base["peak_rss_mib"]))
    return out


COLS = ["bench", "case", "spin_fast", "baseline", "metric", "spin_fast_value", "baseline_value", "speedup",
        "mem_vs_baseline"]


def update_readme(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + block + "\n" + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Latest suite run (`python -m benchmarks.run`)\n\n" + BEGIN + "\n" + \
               block + "\n" + END + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run (files of record untouched)")
    ap.add_argument("--only", default=None, help="comma list of benchmarks to run (bench_loss,bench_sampler,...)")
    ap.add_argument("--no-run", action="store_true", help="run nothing: combine today's existing result files")
    ap.add_argument("--readme", default=None, help=f"README to update (default {README.name} unless --quick)")
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args(argv)
    mach, sha, t0 = machine(), commit(), time.time()
    if a.suite == "gpu" and mach.startswith("cpu-"):
        print("warning: --suite gpu on a machine without CUDA: the CUDA benchmarks will fail", flush=True)
    benches = suite(a.suite, a.quick)
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - {b.name for b in benches}
        if unknown:
            sys.exit(f"--only: unknown benchmark(s) {sorted(unknown)}")
        benches = [b for b in benches if b.name in wanted]
    results = {b.name: run_bench(b, mach, a.quick, not a.no_run) for b in benches}
    lines = [line for name, rec in results.items() if rec.get("result") for line in summarize(name, rec["result"])]
    table = markdown_table(lines, COLS)
    notes = [f"- {n}: {r['status']} ({r['reason']})" for n, r in results.items() if r["status"] != "ok"]
    notes.append("- result files: " + ", ".join(f"`{r['file']}` ({r['result'].get('commit', '?')})"
                                                  for r in results.values() if r.get("result")))
    suffix = "-quick" if a.quick else ""
    path = RESULTS_DIR / f"{today()}-{mach}{suffix}.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "suite", "suite": a.suite, "quick": a.quick, "date": today(),
                                "commit": sha, "machine": mach, "wall_s": round(time.time() - t0, 1),
                                "summary": lines, "benches": results}, indent=2) + "\n")
    cmd = f"python -m benchmarks.run --suite {a.suite}" + (" --quick" if a.quick else "") + \
          (f" --only {a.only}" if a.only else "") + (" --no-run" if a.no_run else "")
    block = (f"Machine `{mach}`, commit `{sha}`, {today()}: `{cmd}` (`results/{path.name}`). speedup = baseline "
             f"time / ours (bench_loss) or our tokens/s / the baseline's; mem_vs_baseline = peak memory ratio.\n\n"
             + table + "\n" + "\n".join(notes) + "\n")
    print("\n" + block)
    readme = None if a.no_readme else (Path(a.readme) if a.readme else (None if a.quick else README))
    if readme is not None:
        update_readme(readme, block)
        print(f"updated {readme}")
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
