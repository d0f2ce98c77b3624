"""`python -m spin_fast.report`: plots and summary.md of a hand-written SPIN run folder (loop.py's layout)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from spin_fast import report

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ["training.png", "throughput.png", "wall_time.png", "heldout.png", "eval.png"]


def _metrics_row(step: int, t: int) -> dict:
    return {"step": step, "epoch": 0, "loss": 0.69 - 0.05 * step - 0.1 * t, "rewards/chosen": 0.01 * step,
            "rewards/rejected": -0.01 * step, "rewards/margins": 0.02 * step, "rewards/accuracies": 0.5 + 0.1 * step,
            "logps/chosen": -40.0 + step, "logps/rejected": -45.0 - step, "grad_norm": 1.0, "lr": 3e-4,
            "pairs": 8, "tokens": 1000, "tokens_per_s": 5000.0, "elapsed_s": 0.2 * step}


def _summary(t: int, steps: int, heldout=True, evaluated=True) -> dict:
    s = {"phase": "spin", "iteration": t, "opponent": f"out/iter{t - 1}", "pairs": 32,
         "generate": {"prompts": 32, "new_tokens": 640 + t, "wall_s": 2.0, "tokens_per_s": 320.0 + t,
                      "finish_reasons": {"stop": 32}, "resumed_rows": 0},
         "cache": {"status": "built", "reason": "", "tokens": 4000, "wall_s": 0.5, "tokens_per_s": 8000.0 + t},
         "train": {"steps": steps, "tokens": 1000 * steps, "wall_s": 1.0, "dropped_pairs": 0,
                   "tokens_per_s": 3000.0 + t, "final": _metrics_row(steps, t)},
         "save_s": 0.1,
         "heldout": {"pairs": 30, "accuracy": 0.9 - 0.1 * t, "mean_margin": 0.5 - 0.1 * t} if heldout else None,
         "iteration_wall_s": 4.0 + t, "iteration_tokens_per_s": 1000 * steps / (4.0 + t), "bad_rows": 0}
    if evaluated:
        s["eval"] = {"accuracy": 0.3 + 0.1 * t, "n": 30, "by_kind": {"reverse": 0.5}}
    return s


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_run(root, iterations=(0, 1, 2), steps=3, heldout=True, evaluated=True, extras=True):
    """A run folder as loop.py + demo_run.py leave it (models left out: the report does not read them)."""
    for t in iterations:
        _write(root / f"iter{t}" / "summary.json", _summary(t, steps, heldout, evaluated))
        rows = [_metrics_row(i, t) for i in range(1, steps + 1)]
        (root / f"iter{t}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if extras:
            _write(root / f"continued_sft{t}" / "summary.json",
                   {"phase": "continued_sft", "iteration": t, "steps": 2, "tokens": 3000, "wall_s": 1.0,
                    "tokens_per_s": 3000.0, "final": {"loss": 0.5}, "eval": {"accuracy": 0.25 + 0.05 * t}})
    if extras:
        _write(root / "sft" / "summary.json", {"phase": "sft", "sequences": 100, "steps": 20, "tokens": 20000,
                                               "wall_s": 5.0, "tokens_per_s": 4000.0, "final": {"loss": 1.2},
                                               "eval": {"accuracy": 0.2, "n": 30, "by_kind": {}},
                                               "early_stopping": {"heldout_loss": [2.0, 1.5, 1.6, 1.7],
                                                                  "best_epoch": 1, "stopped_early": True}})
    return root


def _table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")][1:]      # drop the header row
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1024, path


@needs_mpl
def test_full_run_writes_every_plot_and_the_table(tmp_path, capsys):
    run = make_run(tmp_path / "out")
    result = report.main([str(run)])
    out = run / "report"
    for name in ALL_PLOTS:
        _assert_png(out / name)
    assert set(result["skipped"]) == {"distance.png"}          # exact-match evals: no distances to plot
    printed = capsys.readouterr().out
    assert all(f"wrote {out / name}" in printed for name in ALL_PLOTS + ["summary.md"])
    rows = _table_rows((out / "summary.md").read_text())
    assert [r[0] for r in rows] == ["0", "1", "2"]
    # iteration 1: generate 321, cache 8001, train 3001 tok/s; 5.0 s; 3000/5 tok/s; final loss 0.69-0.15-0.1
    assert rows[1] == ["1", "321", "8001", "3001", "5.0", "600", "0.4400", "0.800", "0.4000", "0.400"]
    assert "SFT: 20 steps" in (out / "summary.md").read_text()
    assert ("SFT held-out loss per epoch: 2.0000 1.5000 1.6000 1.7000; kept epoch 1 (stopped early)"
            in (out / "summary.md").read_text())


@needs_mpl
def test_out_dir_and_global_steps(tmp_path):
    run = make_run(tmp_path / "out", iterations=(0, 1), steps=3)
    report.main([str(run), "--out", str(tmp_path / "plots")])
    _assert_png(tmp_path / "plots" / "training.png")
    assert not (run / "report").exists()
    series, bounds = report.global_steps(report.load_run(run))
    assert [xs for xs, _ in series] == [[1, 2, 3], [4, 5, 6]]
    assert bounds == [(0, 0), (3, 1)]


def test_iterations_sort_numerically_and_unfinished_are_ignored(tmp_path):
    run = make_run(tmp_path / "out", iterations=(2, 9, 10), extras=False)
    (run / "iter11.tmp").mkdir()
    _write(run / "iter11.tmp" / "summary.json", _summary(11, 3))               # half-published: not finished
    (run / "iter11.work").mkdir()
    (run / "iter12").mkdir()                                                   # no summary.json
    assert [t for t, _, _ in report.load_run(run)["iterations"]] == [2, 9, 10]
    assert [r[0] for r in _table_rows(report.summary_table(report.load_run(run)))] == ["2", "9", "10"]


def test_no_finished_iteration_is_a_value_error_naming_the_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "empty_run"
    _write(run / "iter0.tmp" / "summary.json", _summary(0, 3))
    with pytest.raises(ValueError, match="empty_run"):
        report.main([str(run)])
    with pytest.raises(ValueError, match="does not exist"):
        report.main([str(tmp_path / "nowhere")])
    from spin_fast.runtime import run_main                                  # the __main__ path: exit 2
    monkeypatch.setattr(sys, "argv", ["spin_fast.report", str(run)])
    with pytest.raises(SystemExit) as e:
        run_main(report.main)
    assert e.value.code == 2 and "empty_run" in capsys.readouterr().err


@needs_mpl
def test_null_heldout_and_missing_optional_files_skip_their_plots(tmp_path, capsys):
    run = make_run(tmp_path / "out", iterations=(0, 1), heldout=False, evaluated=False, extras=False)
    result = report.main([str(run)])
    out = run / "report"
    assert set(result["skipped"]) == {"heldout.png", "eval.png", "distance.png"}
    assert not (out / "heldout.png").exists() and not (out / "eval.png").exists()
    for name in ["training.png", "throughput.png", "wall_time.png"]:
        _assert_png(out / name)
    printed = capsys.readouterr().out
    assert "skipped heldout.png" in printed and "skipped eval.png" in printed
    rows = _table_rows((out / "summary.md").read_text())
    assert [r[-3:] for r in rows] == [["-", "-", "-"]] * 2


@needs_mpl
def test_eval_only_from_the_baseline_and_demo_json(tmp_path):
    """SPIN iterations without eval, but the continued-SFT baseline known from demo.json: eval.png is drawn."""
    run = make_run(tmp_path / "out", iterations=(0,), evaluated=False, extras=False)
    _write(run / "demo.json", {"rows": [{"model": "SFT start", "spin_em": 0.2, "continued_sft_em": 0.2},
                                        {"model": "iteration 0", "spin_em": None, "continued_sft_em": 0.3}]})
    report.plot_eval(report.load_run(run)).savefig(tmp_path / "eval.png")
    _assert_png(tmp_path / "eval.png")


@needs_mpl
def test_empty_metrics(tmp_path):
    run = make_run(tmp_path / "out", iterations=(0, 1), extras=False)
    (run / "iter0" / "metrics.jsonl").write_text("")
    report.plot_training(report.load_run(run)).savefig(tmp_path / "t.png")    # iteration 1 still has rows
    _assert_png(tmp_path / "t.png")
    (run / "iter1" / "metrics.jsonl").write_text("\n")
    (run / "report").mkdir()
    (run / "report" / "training.png").write_bytes(b"stale")
    result = report.main([str(run)])
    assert "metrics.jsonl" in result["skipped"]["training.png"]
    assert not (run / "report" / "training.png").exists()                   # no stale plot left behind
    assert "skipped training.png" in (run / "report" / "summary.md").read_text()
    assert len(_table_rows((run / "report" / "summary.md").read_text())) == 2


def test_torn_last_metrics_line_is_skipped_a_bad_middle_line_is_an_error(tmp_path):
    run = make_run(tmp_path / "out", iterations=(0,), extras=False)
    path = run / "iter0" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "lo')
    assert len(report.load_run(run)["iterations"][0][2]) == 3
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        report.load_run(run)


def test_missing_matplotlib_names_the_package(tmp_path, monkeypatch):
    run = make_run(tmp_path / "out", iterations=(0,), extras=False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ValueError, match="matplotlib"):
        report.main([str(run)])


@needs_mpl
def test_distance_plot_from_hmm_evals(tmp_path):
    """The hmm demo's evals (distances to p_data) in SPIN and continued-SFT summaries: distance.png is drawn."""
    run = make_run(tmp_path / "out", iterations=(0, 1), evaluated=False, extras=False)
    ev = lambda t: {k: v if k.endswith("_se") else v - 0.1 * t for k, v in {"forward_kl": 0.9, "forward_kl_se": 0.04, "coverage": -7.0,  # noqa
                    "coverage_se": 0.2, "quality": -7.1, "quality_se": 0.2, "validity": 0.7, "validity_se": 0.02,
                    "reverse_kl_valid": 0.8, "reverse_kl_valid_se": 0.07}.items()}
    for t in (0, 1):
        s = json.loads((run / f"iter{t}" / "summary.json").read_text())
        _write(run / f"iter{t}" / "summary.json", {**s, "eval": ev(t)})
        _write(run / f"continued_sft{t}" / "summary.json", {"phase": "continued_sft", "iteration": t, "eval": ev(2 * t)})
    _write(run / "sft" / "summary.json", {"phase": "sft", "eval": ev(-1)})
    loaded = report.load_run(run)
    spin, cont = report._eval_series(loaded, "forward_kl")
    assert spin == [(-1, 1.0), (0, 0.9), (1, 0.8)] and cont[-1] == (1, 0.9 - 0.2)
    result = report.main([str(run)])
    assert "distance.png" not in result["skipped"]
    _assert_png(run / "report" / "distance.png")
