"""`-m spin_fast.train` end to end on a real model (stories260K) and real SFT rows (skipped without ../shared):
2 gloo ranks under torchrun train the same weights as 1 process; the output is an HF folder transformers loads;
metrics/summary files; the reference cache is reused on a re-run; bad rows stop the run naming file:row."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import PLAIN_TEMPLATE

ARGS = ["--data.chat_template", PLAIN_TEMPLATE, "--max-length", "192", "--max-prompt-length", "96",
        "--tokens-per-step", "3072", "--micro-batch-tokens", "768", "--lr", "3e-4", "--train.warmup_ratio", "0",
        "--train.log_every", "2", "--train.progress", "false", "--epochs", "2"]


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_cli")
    rows = [json.loads(line) for line in (shared_data / "sft" / "sft_ultrachat_schema-00000.jsonl").open()][:24]
    pairs = tmp / "pairs.jsonl"
    with pairs.open("w") as f:
        for i, r in enumerate(rows):        # the human answer vs another row's: a real, easy-to-learn preference
            m, other = r["messages"], rows[(i + 1) % len(rows)]["messages"]
            f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [other[-1]]}) + "\n")
    return shared_data / "models" / "stories260K", pairs, tmp


def run(cmd, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)


def train(model, pairs, out, nproc=1, extra=()):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
                else [sys.executable])
    r = run(launcher + ["-m", "spin_fast.train", "--model", str(model), "--pairs", str(pairs), "--output", str(out),
                        *ARGS, *extra])
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def runs(setup):
    model, pairs, tmp = setup
    train(model, pairs, tmp / "one")
    train(model, pairs, tmp / "two", nproc=2)
    return model, pairs, tmp


def test_two_ranks_train_the_same_weights_as_one(runs):
    model, _, tmp = runs
    start = load_file(str(model / "model.safetensors"))
    one, two = (load_file(str(tmp / d / "model.safetensors")) for d in ("one", "two"))
    assert set(one) == set(two) == set(start)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-3, moved                              # the test can fail: the weights really changed
    assert diff < 2e-5, (diff, moved)                        # fp32 summation order only
    m1 = [json.loads(line) for line in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in m1] == [r["pairs"] for r in m2] and len(m1) >= 4
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_outputs_metrics_and_summary(runs):
    model, _, tmp = runs
    out = tmp / "one"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)          # step 1: policy == opponent
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]          # it learns the preference
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert summary["train"]["steps"] == len(rows) and summary["pairs"] == 24
    assert summary["train"]["tokens"] == sum(r["tokens"] for r in rows) > 0
    assert summary["cache"]["status"] == "built" and summary["cache"]["tokens"] > 0
    assert summary["cache"]["tokens_per_s"] > 0 and summary["train"]["tokens_per_s"] > 0
    assert summary["config"]["train"]["lr"] == 3e-4


def test_trained_folder_loads_in_transformers_with_our_logits(runs):
    from transformers import AutoModelForCausalLM

    from spin_fast.hf_io import load_model
    _, _, tmp = runs
    out = tmp / "two"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(out)
    ids = torch.tensor([[1, 403, 62, 19, 7, 300, 5, 88]])
    with torch.no_grad():
        ref = hf(ids).logits[0]
        got = ours.logits(ours(ids[0], torch.arange(ids.shape[1])))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rerun_reuses_the_reference_cache(runs):
    # a new run pointed at a finished run's cache (a copy: the finished folder stays as published) reuses it
    # when every fingerprint matches, and rebuilds it, naming the reason, when one differs
    model, pairs, tmp = runs
    cache = tmp / "cache.safetensors"
    shutil.copyfile(tmp / "one" / "ref_logps.safetensors", cache)
    train(model, pairs, tmp / "again", extra=["--train.max_steps", "1", "--ref_cache", str(cache)])
    summary = json.loads((tmp / "again" / "summary.json").read_text())
    assert summary["cache"]["status"] == "reused", summary["cache"]
    train(model, pairs, tmp / "again2", extra=["--train.max_steps", "1", "--max-prompt-length", "64", "--ref_cache",
                                               str(cache)])
    summary = json.loads((tmp / "again2" / "summary.json").read_text())
    assert summary["cache"]["status"] == "rebuilt" and "max_prompt_length" in summary["cache"]["reason"]


def test_bad_row_stops_naming_file_and_row(setup):
    model, pairs, tmp = setup
    bad = tmp / "bad.jsonl"
    lines = pairs.read_text().splitlines()
    row = json.loads(lines[2])
    row["chosen"] = [{"role": "assistant", "content": ""}]
    bad.write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    r = run([sys.executable, "-m", "spin_fast.train", "--model", str(model), "--pairs", str(bad), "--output",
             str(tmp / "bad_out"), *ARGS])
    assert r.returncode == 2 and f"{bad}:3" in r.stderr and "empty" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_spin_loop_end_to_end_on_stories260k(setup, shared_data):
    # the whole loop on a real model and real SFT rows: generation -> cache -> training, 2 iterations, 2 ranks
    model, _, tmp = setup
    out = tmp / "loop"
    sft = shared_data / "sft" / "sft_ultrachat_schema-00000.jsonl"
    rows = tmp / "sft16.jsonl"
    rows.write_text("".join(sft.open().readlines()[:16]))
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "spin_fast.train",
             "--model", str(model), "--data.sft", str(rows), "--output", str(out), *ARGS,
             "--loop.iterations", "2", "--loop.heldout", "4", "--generate.max_new_tokens", "24",
             "--loop.mix_previous"])
    assert r.returncode == 0, r.stderr[-4000:]
    s0, s1 = (json.loads((out / f"iter{t}" / "summary.json").read_text()) for t in (0, 1))
    assert s0["pairs"] == 12 and s1["pairs"] == 24                     # 16 rows - 4 held out; + iteration 0's
    assert s0["generate"]["prompts"] == 12 and s0["generate"]["new_tokens"] > 0
    assert s1["opponent"] == str(out / "iter0") and s1["heldout"]["pairs"] == 4
    gen = [json.loads(line) for line in (out / "iter1.work" / "generated.jsonl").read_text().splitlines()]
    assert len(gen) == 12 and all(g["response"] is not None for g in gen)


def test_pairs_mode_refuses_a_used_output_and_a_changed_setup(runs):
    # in process: every refusal comes before any model is loaded
    from spin_fast import train as train_mod
    model, pairs, tmp = runs
    argv = lambda out, *extra: ["--model", str(model), "--pairs", str(pairs), "--output", str(out), *ARGS, *extra]  # noqa: E731
    with pytest.raises(ValueError, match="already holds a finished training run"):
        train_mod.main(argv(tmp / "one"))
    assert train_mod.main(argv(tmp / "one", "--resume"))["pairs"] == 24       # finished: re-reported, nothing run
    interrupted = tmp / "cut.tmp"                                             # a killed run's folder
    interrupted.mkdir()
    shutil.copyfile(tmp / "one" / "manifest.json", interrupted / "manifest.json")
    with pytest.raises(ValueError, match=r"already holds a run \(manifest.json\): pass --resume"):
        train_mod.main(argv(tmp / "cut"))                                     # never resumes silently
    with pytest.raises(ValueError, match=r"--resume: train.beta differs .*\(0.1 there, 0.2 now\)"):
        train_mod.main(argv(tmp / "cut", "--resume", "--beta", "0.2"))
    assert not (interrupted / ".lock").exists()


@pytest.mark.parametrize("where", ["model", "inside_model", "data"])
def test_output_that_would_destroy_an_input_is_refused(runs, where):
    from spin_fast import train as train_mod
    model, pairs, tmp = runs
    out = {"model": model, "inside_model": model / "out", "data": pairs}[where]
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(ValueError, match="the run would overwrite its own starting model" if where != "data"
                       else "is the data.pairs input"):
        train_mod.main(["--model", str(model), "--pairs", str(pairs), "--output", str(out), *ARGS])
    assert sorted(p.name for p in model.iterdir()) == before
