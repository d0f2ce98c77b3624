"""The SPIN loop end to end (`-m spin_fast.train` with data.sft): iterations, resume after SIGKILL in each phase
(generation, reference cache, training) equals an uninterrupted run, finished iterations load in transformers, the
built-in demo under torchrun. Uses the demo's tiny model and task: no ../shared needed."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import demo_model_and_rows
from spin_fast import demo, train

ARGS = ["--loop.iterations", "2", "--loop.heldout", "20", "--generate.max_new_tokens", "20", "--max-length", "48",
        "--max-prompt-length", "24", "--tokens-per-step", "1024", "--micro-batch-tokens", "512",
        "--train.checkpoint_every", "2", "--lr", "1e-3", "--train.optimizer", "adamw", "--train.progress", "false",
        "--generate.batch_size", "32"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return demo_model_and_rows(tmp_path_factory.mktemp("loop"), 220)


def run(argv, env_extra=None, nproc=1, check=True):
    env = {k: v for k, v in os.environ.items() if k != "SPIN_FAST_FAULT"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env_extra or {}))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
                else [sys.executable])
    r = subprocess.run(launcher + ["-m", "spin_fast.train", *argv], capture_output=True, text=True, timeout=600,
                       env=env)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def loop_argv(assets, out, *extra):
    _, model, rows = assets
    return ["--model", str(model), "--data.sft", str(rows), "--output", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def reference_run(assets):
    out = assets[0] / "ref"
    run(loop_argv(assets, out))
    return out


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_iterations_and_their_reports(reference_run, assets):
    out = reference_run
    for t in (0, 1):
        s = json.loads((out / f"iter{t}" / "summary.json").read_text())
        assert s["iteration"] == t and s["pairs"] == 200                      # 220 rows - 20 held out
        assert s["opponent"] == str(assets[1] if t == 0 else out / "iter0")
        for phase in ("generate", "cache", "train"):
            assert s[phase]["tokens_per_s"] > 0 and s[phase]["wall_s"] > 0, phase
        assert s["generate"]["prompts"] == 200 and s["heldout"]["pairs"] == 20
        assert 0 <= s["heldout"]["accuracy"] <= 1 and s["iteration_wall_s"] > 0
        mem = s["peak_memory"]                                       # MiB per phase (peak RSS on CPU)
        assert mem["unit"] == "MiB" and all(mem[p] > 10 for p in ("generate", "cache", "train", "save"))
        # what ran, recorded (on CUDA a Triton or CUDA-graph failure would show here as a fallback)
        assert s["loss_impl"] == {"requested": "auto", "used": "torch"}
        assert s["generate"]["decode"] == {"requested": "auto", "used": "eager"}
        rows = [json.loads(line) for line in (out / f"iter{t}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, s["train"]["steps"] + 1))
        assert not (out / f"iter{t}.tmp").exists() and not (out / f"iter{t}.work" / "ckpt").exists()
    # iteration 1's opponent is iteration 0's result: its first step is ln 2 against the new reference
    first = json.loads((out / "iter1" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert not torch.equal(weights(out / "iter0")["model.embed_tokens.weight"],
                           weights(out / "iter1")["model.embed_tokens.weight"])


def test_finished_iteration_loads_in_transformers(reference_run):
    from transformers import AutoModelForCausalLM

    from spin_fast.hf_io import load_model
    folder = reference_run / "iter1"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder)
    ids = torch.tensor([[1, 30, 25, 12, 9, 40, 2, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids[0], torch.arange(8))), hf(ids).logits[0], atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("fault, evidence", [
    ("generate:50", lambda s: s["generate"]["resumed_rows"] == 50),
    ("cache:1", lambda s: s["cache"]["status"] == "built"),
    ("train:3", lambda s: s["train"]["resumed_at"] == 2),          # checkpoint_every 2: back to step 2
])
def test_sigkill_then_resume_equals_uninterrupted(assets, reference_run, fault, evidence):
    out = assets[0] / f"killed-{fault.replace(':', '-')}"
    r = run(loop_argv(assets, out), env_extra={"SPIN_FAST_FAULT": fault}, check=False)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert not (out / "iter0" / "summary.json").exists()
    refused = run(loop_argv(assets, out), check=False)                   # no --resume: refuses to mix runs
    assert refused.returncode == 2 and "--resume" in refused.stderr
    run(loop_argv(assets, out, "--resume"))
    assert evidence(json.loads((out / "iter0" / "summary.json").read_text()))
    for t in (0, 1):
        a, b = weights(reference_run / f"iter{t}"), weights(out / f"iter{t}")
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=lambda m: f"iter{t} {k}: {m}")
    ref_rows = (reference_run / "iter0" / "metrics.jsonl").read_text().splitlines()
    got_rows = (out / "iter0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in got_rows] == [json.loads(x)["step"] for x in ref_rows]


def test_mix_previous_trains_on_both_iterations(assets):
    out = assets[0] / "mix"
    run(loop_argv(assets, out, "--loop.mix_previous", "--loop.iterations", "2", "--train.max_steps", "2"))
    assert json.loads((out / "iter0" / "summary.json").read_text())["pairs"] == 200
    assert json.loads((out / "iter1" / "summary.json").read_text())["pairs"] == 400


def test_demo_under_torchrun(tmp_path):
    # the built-in demo, shrunk: 2 gloo ranks, a short SFT, 2 SPIN iterations, the continued-SFT baseline
    out = tmp_path / "demo"
    r = run(["--output", str(out), "--loop.iterations", "2", "--sft.epochs", "3", "--train.progress", "false",
             "--loop.heldout", "100"], nproc=2)
    report = json.loads((out / "demo.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["SFT start", "iteration 0", "iteration 1"]
    assert report["task"] == "hmm"                                    # the default task: distances to p_data
    for row in report["rows"]:
        for arm in ("spin", "continued_sft"):
            m = row[arm]
            assert m["forward_kl"] > -5 * m["forward_kl_se"] and 0 <= m["validity"] <= 1
            assert m["coverage"] < 0 and m["n_data_samples"] == m["n_model_samples"] == 200
    assert "distance to p_data" in r.stdout
    assert (out / "continued_sft1" / "summary.json").is_file() and (out / "iter1" / "summary.json").is_file()
    # SFT early-stopped on its own held-out rows (2 ranks: the loss all-reduced), none of them trained on
    es = report["sft_early_stopping"]
    assert 1 <= es["epochs_run"] == len(es["heldout_loss"]) <= 3 and es["heldout_sequences"] == 300
    assert es["best_heldout_loss"] == min(es["heldout_loss"]) == es["heldout_loss"][es["best_epoch"]]
    held = {json.loads(line)["prompt"] for line in (out / "data" / "sft_heldout.jsonl").open()}
    assert not held & {json.loads(line)["prompt"] for line in (out / "data" / "train.jsonl").open()}


# --- run identity: the manifest -------------------------------------------------------------------------------------

@pytest.fixture
def finished_copy(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    return out


@pytest.mark.parametrize("change, key", [
    (["--lr", "2e-3"], r"train.lr differs from the run in .* \(0.001 there, 0.002 now\)"),
    (["--generate.max_new_tokens", "16"], r"generate.max_new_tokens differs .* \(20 there, 16 now\)"),
    (["--seed", "1"], r"seed differs"),
    (["--loop.mix_previous"], r"loop.mix_previous differs"),
    ("data", r"inputs.data.sft differs"),
    ("model", r"inputs.model differs"),
])
def test_resume_refuses_a_changed_setup_naming_the_key(assets, finished_copy, change, key):
    root, model, rows = assets
    argv = loop_argv(assets, finished_copy, "--resume")
    if change == "data":                                   # same path, other content
        edited = finished_copy.parent / "rows.jsonl"
        lines = rows.read_text().splitlines(keepends=True)
        edited.write_text("".join(lines[:-1]))
        argv[argv.index(str(rows))] = str(edited)
    elif change == "model":
        other = finished_copy.parent / "model"
        demo.init_model(other, demo.build_tokenizer(other), hidden=32, layers=2, heads=4, seed=1)
        argv[argv.index(str(model))] = str(other)
    else:
        argv += change
    before = (finished_copy / "manifest.json").read_text()
    with pytest.raises(ValueError, match=key + r".*--resume-force"):
        train.main(argv)
    assert (finished_copy / "manifest.json").read_text() == before and not (finished_copy / ".lock").exists()


def test_resume_accepts_harmless_keys_and_records_a_forced_change(assets, finished_copy):
    # every iteration is finished: these resumes only check, re-report and record
    train.main(loop_argv(assets, finished_copy, "--resume", "--train.log_every", "3", "--train.checkpoint_every",
                         "5", "--train.progress", "true"))
    summary = train.main(loop_argv(assets, finished_copy, "--resume", "--lr", "2e-3", "--resume-force"))
    assert [s["iteration"] for s in summary["iterations"]] == [0, 1]
    history = json.loads((finished_copy / "manifest.json").read_text())["history"]
    assert [h["event"] for h in history] == ["start", "resume", "resume-force"]
    assert history[2]["changed"] == {"train.lr": [0.001, 0.002]}
    train.main(loop_argv(assets, finished_copy, "--resume", "--lr", "2e-3"))      # the manifest follows the force


def test_a_damaged_finished_iteration_is_never_the_next_opponent(assets, finished_copy):
    shutil.rmtree(finished_copy / "iter1")                         # iteration 1 has to run, against iter0
    path = finished_copy / "iter0" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10                                   # one bit of a weight
    path.write_bytes(bytes(data))
    shutil.rmtree(finished_copy / "iter1.work")
    with pytest.raises(ValueError, match=r"iter0/model.safetensors: differs from the sha256 in checksums.json .*"
                                         r"delete .*iter0 to compute it again"):
        train.main(loop_argv(assets, finished_copy, "--resume"))
    assert not (finished_copy / "iter1.work").exists() and not (finished_copy / "iter1.tmp").exists()
