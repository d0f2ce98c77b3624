"""`python -m spin_fast.report OUTPUT [--out DIR]`: PNG plots and a markdown table of a SPIN run folder.

Reads what spin_fast/loop.py and the demo (demo_run.py) leave in OUTPUT: iter{t}/summary.json + metrics.jsonl per
finished iteration (not iter{t}.tmp / .work), and, when there, sft/summary.json, continued_sft{t}/summary.json and
demo.json. Writes into DIR (default OUTPUT/report): training.png (per-step loss, reward margins and accuracies,
log-probs over the global step), throughput.png (tokens/s per phase and end to end), wall_time.png (seconds per
phase, stacked), heldout.png (the held-out discriminator check), eval.png (exact match: SFT start, SPIN, the
continued-SFT baseline), distance.png (the hmm demo: (a) quality and validity of the model's samples, (b)
coverage, (c) forward and reverse KL to p_data, SPIN vs continued SFT) and summary.md (one row per iteration). A plot without data is skipped and said so.
matplotlib draws on its Agg canvas without pyplot, leaving the process-wide backend alone.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from .errors import InputError

ITER_DIR = re.compile(r"iter(\d+)")
PHASES = ("generate", "cache", "train")


# --- reading the run folder ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; blank lines and a torn last line (a killed run) are skipped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise InputError(f"{path}:{i + 1}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise InputError(f"{path}:{i + 1}: a metrics row is an object with an integer 'step'")
        rows.append(row)
    return rows


def load_run(folder: Path) -> dict:
    """{"iterations": [(t, summary, metrics rows)] sorted by t, "sft", "continued": {t: summary}, "demo"}."""
    if not folder.is_dir():
        raise InputError(f"run folder {folder} does not exist")
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := ITER_DIR.fullmatch(p.name)) and (p / "summary.json").is_file()]
    if not found:
        raise InputError(f"run folder {folder} holds no finished SPIN iteration (no iter{{t}}/summary.json)")
    iterations = [(t, _read_json(p / "summary.json"), _read_metrics(p / "metrics.jsonl")) for t, p in sorted(found)]
    continued = {t: s for t, _, _ in iterations
                 if (s := _read_json(folder / f"continued_sft{t}" / "summary.json")) is not None}
    return {"iterations": iterations, "sft": _read_json(folder / "sft" / "summary.json"), "continued": continued,
            "demo": _read_json(folder / "demo.json")}


def _get(d: dict | None, *keys):
    """d[k0][k1]... or None where a level is missing or null."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


# --- plots ---------------------------------------------------------------------------------------------------------

def _figure(nrows=1, ncols=1, size=(8, 4.5)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("spin_fast.report needs the matplotlib package (pip install matplotlib)") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def global_steps(run: dict) -> tuple[list, list]:
    """([(global steps, rows)] per iteration, [(first global step - 1, t)]): iteration t's steps come after the
    train.steps of the earlier ones (or their last logged step, where a summary lacks train.steps)."""
    series, bounds, offset = [], [], 0
    for t, s, rows in run["iterations"]:
        bounds.append((offset, t))
        series.append(([offset + r["step"] for r in rows], rows))
        offset += int(_get(s, "train", "steps") or max((r["step"] for r in rows), default=0))
    return series, bounds


def plot_training(run: dict):
    """Per-step curves over the global step, a dotted line where each iteration starts."""
    series, bounds = global_steps(run)
    if not any(rows for _, rows in series):
        return "every metrics.jsonl is empty or missing"
    fig, axes = _figure(2, 2, size=(12, 7))
    panels = [("loss", ["loss"]), ("reward margin", ["rewards/margins"]), ("reward accuracy", ["rewards/accuracies"]),
              ("log-prob", ["logps/chosen", "logps/rejected"])]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            for n, (xs, rows) in enumerate(series):
                ax.plot(xs, [_num(r.get(key)) for r in rows], color=f"C{keys.index(key)}",
                        label=key if n == 0 and len(keys) > 1 else None)
        for x, t in bounds:
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.annotate(f"iter{t}", (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="grey")
        ax.set(title=title, xlabel="global optimizer step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("SPIN training across iterations")
    return fig


def _bar_plot(run: dict, groups: dict[str, list[float]], *, stacked: bool, title: str, ylabel: str):
    """Bars per iteration: one per group side by side, or the groups stacked."""
    if not any(v > 0 for vs in groups.values() for v in vs):
        return f"no {ylabel} in any summary.json"
    iters = [t for t, _, _ in run["iterations"]]
    fig, axes = _figure()
    ax, width, bottom = axes[0, 0], 0.8 if stacked else 0.8 / len(groups), [0.0] * len(iters)
    for i, (label, values) in enumerate(groups.items()):
        xs = range(len(iters)) if stacked else [x - 0.4 + width * (i + 0.5) for x in range(len(iters))]
        ax.bar(xs, values, width, bottom=bottom if stacked else None, label=label)
        bottom = [b + (0 if math.isnan(v) else v) for b, v in zip(bottom, values)]
    positive = [v for vs in groups.values() for v in vs if v > 0]
    if not stacked and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    ax.set_xticks(range(len(iters)), [str(t) for t in iters])
    ax.set(title=title, xlabel="iteration", ylabel=ylabel)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _per_phase(run: dict, key: str) -> dict[str, list[float]]:
    return {p: [_num(_get(s, p, key)) for _, s, _ in run["iterations"]] for p in PHASES}


def plot_throughput(run: dict):
    groups = _per_phase(run, "tokens_per_s")
    groups["iteration (end to end)"] = [_num(s.get("iteration_tokens_per_s")) for _, s, _ in run["iterations"]]
    return _bar_plot(run, groups, stacked=False, title="throughput per phase", ylabel="tokens/s")


def plot_wall_time(run: dict):
    """Generation, cache, training, and the rest of iteration_wall_s (saving, held-out check, eval)."""
    groups = _per_phase(run, "wall_s")
    total = [_num(s.get("iteration_wall_s")) for _, s, _ in run["iterations"]]
    phases = [sum(v for v in col if not math.isnan(v)) for col in zip(*groups.values())]
    groups["other (save, held-out check, eval)"] = [w - p if w > p else 0.0 for w, p in zip(total, phases)]
    return _bar_plot(run, groups, stacked=True, title="wall time per phase", ylabel="seconds")


def plot_heldout(run: dict):
    pts = [(t, s["heldout"]) for t, s, _ in run["iterations"] if isinstance(s.get("heldout"), dict)]
    if not pts:
        return "no held-out discriminator check (heldout is null in every iteration)"
    fig, axes = _figure(1, 2, size=(10, 4))
    xs = [t for t, _ in pts]
    for ax, key, ref, label in ((axes[0, 0], "accuracy", 0.5, "accuracy (margin > 0)"),
                                (axes[0, 1], "mean_margin", 0.0, "mean margin")):
        ax.plot(xs, [_num(h.get(key)) for _, h in pts], "o-")
        ax.axhline(ref, color="grey", ls="--", lw=1)
        ax.set(title=f"held-out {label}", xlabel="iteration", xticks=xs)
    axes[0, 0].set_ylim(0, 1.05)
    fig.suptitle("held-out discriminator: human answer vs the opponent's")
    return fig


def _eval_series(run: dict, key: str = "accuracy") -> tuple[list, list]:
    """(SPIN points, continued-SFT points) as (x, eval[key]), the SFT start at x = -1 in both."""
    start = _get(run["sft"], "eval", key)
    demo_rows = {r.get("model"): r for r in _get(run["demo"], "rows") or []}
    spin = [(t, _get(s, "eval", key)) for t, s, _ in run["iterations"]]
    cont = []
    for t, _, _ in run["iterations"]:
        v = _get(run["continued"].get(t), "eval", key)
        if v is None:
            row = demo_rows.get(f"iteration {t}")
            v = _get(row, "continued_sft", key) if key != "accuracy" else _get(row, "continued_sft_em")
        cont.append((t, v))
    head = [(-1, start)] if start is not None else []
    return ([(x, v) for x, v in head + spin if v is not None], [(x, v) for x, v in head + cont if v is not None])


def plot_eval(run: dict):
    spin, cont = _eval_series(run)
    if not any(x >= 0 for x, _ in spin + cont):
        return "no eval in any iteration or continued-SFT summary"
    fig, axes = _figure()
    ax = axes[0, 0]
    if any(x >= 0 for x, _ in spin):
        ax.plot(*zip(*spin), "o-", label="SPIN")
    if any(x >= 0 for x, _ in cont):
        ax.plot(*zip(*cont), "s--", label="continued SFT (same tokens)")
    xs = sorted({x for x, _ in spin + cont})
    ax.set_xticks(xs, ["SFT" if x < 0 else str(x) for x in xs])
    ax.set(title="held-out exact match", xlabel="iteration", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.legend()
    return fig


DISTANCES = (("quality", "(a) E_{y~p_theta} log p_data(y|x)  (quality)"),
             ("validity", "(a) validity of the model's samples"),
             ("coverage", "(b) E_{y~p_data} log p_theta(y|x)  (coverage)"),
             ("forward_kl", "(c) KL(p_data || p_theta)"),
             ("reverse_kl_valid", "(c) KL(p_theta | valid || p_data)"))


def plot_distance(run: dict):
    """The hmm demo's distances to p_data per iteration, SPIN vs continued SFT, with +-1 standard error bars."""
    if _eval_series(run, "forward_kl") == ([], []):
        return "no distance-to-p_data eval (the hmm demo task) in any summary"
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title) in zip(axes, DISTANCES):
        for arm, (pts, se), style in (("SPIN", (_eval_series(run, key)[0], _eval_series(run, key + "_se")[0]), "o-"),
                                      ("continued SFT", (_eval_series(run, key)[1],
                                                         _eval_series(run, key + "_se")[1]), "s--")):
            if pts:
                errs = dict(se)
                ax.errorbar([x for x, _ in pts], [v for _, v in pts], yerr=[_num(errs.get(x)) for x, _ in pts],
                            fmt=style, capsize=3, label=arm)
        xs = sorted({x for x, _ in sum(_eval_series(run, key), [])})
        ax.set_xticks(xs, ["SFT" if x < 0 else str(x) for x in xs])
        ax.set(title=title, xlabel="iteration")
        ax.legend()
    axes[-1].axis("off")
    fig.suptitle("distance to the exact data distribution, held-out prompts")
    return fig


# --- table and entry point -----------------------------------------------------------------------------------------

def _fmt(v, spec: str) -> str:
    return "-" if not isinstance(v, (int, float)) or math.isnan(v) else format(v, spec)


def summary_table(run: dict) -> str:
    head = ["iteration", "generate tok/s", "cache tok/s", "train tok/s", "iteration wall s", "iteration tok/s",
            "final loss", "held-out acc", "margin", "eval acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, s, _ in run["iterations"]:
        cells = [str(t)] + [_fmt(_get(s, p, "tokens_per_s"), ".0f") for p in PHASES] + [
            _fmt(s.get("iteration_wall_s"), ".1f"), _fmt(s.get("iteration_tokens_per_s"), ".0f"),
            _fmt(_get(s, "train", "final", "loss"), ".4f"), _fmt(_get(s, "heldout", "accuracy"), ".3f"),
            _fmt(_get(s, "heldout", "mean_margin"), ".4f"), _fmt(_get(s, "eval", "accuracy"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    sft = run["sft"]
    if sft is not None:
        lines += ["", f"SFT: {sft.get('steps', '-')} steps, {_fmt(sft.get('tokens_per_s'), '.0f')} tok/s, "
                  f"final loss {_fmt(_get(sft, 'final', 'loss'), '.4f')}, "
                  f"eval acc {_fmt(_get(sft, 'eval', 'accuracy'), '.3f')}"]
        if (es := sft.get("early_stopping")) is not None:
            lines.append(f"SFT held-out loss per epoch: {' '.join(_fmt(v, '.4f') for v in es['heldout_loss'])}; "
                         f"kept epoch {es['best_epoch']}" + (" (stopped early)" if es.get("stopped_early") else ""))
    return "\n".join(lines) + "\n"


PLOTS = {"training.png": plot_training, "throughput.png": plot_throughput, "wall_time.png": plot_wall_time,
         "heldout.png": plot_heldout, "eval.png": plot_eval, "distance.png": plot_distance}


def report(folder: Path, out: Path | None = None) -> dict:
    """Writes the plots and summary.md; returns {"written": [paths], "skipped": {name: reason}}."""
    run = load_run(folder)
    out = out or folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], {}
    for name, plot in PLOTS.items():
        fig = plot(run)
        if isinstance(fig, str):
            skipped[name] = fig
            (out / name).unlink(missing_ok=True)                     # a stale plot of an earlier report
        else:
            fig.savefig(out / name, dpi=100)
            written.append(out / name)
    notes = "".join(f"\nskipped {name}: {reason}" for name, reason in skipped.items())
    (out / "summary.md").write_text(f"# SPIN run {folder}\n\n" + summary_table(run) + notes + "\n" * bool(notes))
    written.append(out / "summary.md")
    return {"written": written, "skipped": skipped}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m spin_fast.report", description=__doc__.split("\n")[0])
    ap.add_argument("output", type=Path, help="the SPIN run folder (the loop's `output`)")
    ap.add_argument("--out", type=Path, default=None, help="where the plots go (default OUTPUT/report)")
    args = ap.parse_args(argv)
    result = report(args.output, args.out)
    for path in result["written"]:
        print(f"wrote {path}")
    for name, reason in result["skipped"].items():
        print(f"skipped {name}: {reason}")
    return result


if __name__ == "__main__":
    from .runtime import run_main
    run_main(main)
