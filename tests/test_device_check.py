"""benchmarks/device_check.sh's plumbing, on CPU (--dry-run): the budget check, lines written to $OUT as steps end,
a failed / timed-out step recorded with its rc and log tail while the rest still run."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def dry_run(out: Path, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OUT=str(out), **env))
    path = out / "device_check.jsonl"
    return r, [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_dry_run_records_every_step_in_order_within_budget(tmp_path):
    r, rows = dry_run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [row["step"] for row in rows]
    assert steps == ["plan", "selftest_fail", "selftest_ok", "selftest_timeout", "env", "kernels", "bench_loss",
                     "loop", "sampler"]
    by = {row["step"]: row for row in rows}
    cuda_steps = [by[s] for s in ("env", "kernels", "bench_loss", "loop", "sampler")]
    assert sum(s["timeout_s"] for s in cuda_steps) == by["plan"]["timeout_s"] <= 480       # 8 minutes in all
    assert all(s["status"] == "skipped" and "dry run" in s["why"] for s in cuda_steps)
    fail = by["selftest_fail"]
    assert fail["status"] == "failed" and fail["rc"] == 3 and "fails on purpose" in fail["log_tail"]
    assert by["selftest_timeout"]["status"] == "timeout" and by["selftest_timeout"]["rc"] == 124
    assert by["selftest_ok"]["status"] == "ok"                  # rc 5 accepted where asked (pytest: none collected)
    table = (tmp_path / "device_check.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and "| selftest_fail | failed | 3 |" in table[3]
    assert (tmp_path / "logs" / "selftest_fail.log").read_text().startswith("this step fails on purpose")


def test_a_plan_over_budget_is_refused_before_anything_runs(tmp_path):
    r, rows = dry_run(tmp_path, T_LOOP="400")
    assert r.returncode == 1
    assert [row["step"] for row in rows] == ["plan"] and rows[0]["status"] == "failed"
    assert "> 480 s" in rows[0]["log_tail"]
