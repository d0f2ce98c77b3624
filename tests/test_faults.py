"""The fault matrix: the SPIN loop (SFT phase + one iteration) under torchrun, 2 gloo ranks, on the demo's tiny model,
SIGKILLed at each point of its life (SPIN_FAST_FAULT), then `--resume`d: the weights equal the uninterrupted run's
(max abs diff <= 1e-6). Damage between the kill and the resume (the reference cache's bytes, a DCP shard, its
.metadata or meta.json, a removed shard, a torn generated row) is detected: recomputed (the checkpoint: the phase
restarts; the row: generated again) or refused naming the file (the cache). A second run into a used OUTPUT
refuses while the first holds the lock. No ../shared needed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import demo_model_and_rows

pytestmark = pytest.mark.slow

ARGS = ["--loop.iterations", "1", "--loop.heldout", "8", "--generate.max_new_tokens", "12", "--max-length", "40",
        "--max-prompt-length", "24", "--tokens-per-step", "400", "--micro-batch-tokens", "160",
        "--train.checkpoint_every", "2", "--lr", "1e-3", "--train.optimizer", "adamw", "--train.progress", "false",
        "--generate.batch_size", "8", "--sft.epochs", "1", "--sft.tokens_per_step", "400"]


def run(argv, fault=None, check=True, nproc=2):
    env = {k: v for k, v in os.environ.items() if k != "SPIN_FAST_FAULT"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if fault:
        env["SPIN_FAST_FAULT"] = fault
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run(launcher + ["-m", "spin_fast.train", *argv], capture_output=True, text=True, timeout=600,
                       env=env)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return demo_model_and_rows(tmp_path_factory.mktemp("faults"), 64)


def argv_for(assets, out, *extra):
    _, model, rows = assets
    return ["--model", str(model), "--data.sft", str(rows), "--output", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def reference(assets):
    out = assets[0] / "ref"
    run(argv_for(assets, out))
    return out


def assert_same_weights(out, reference):
    for folder in ("sft", "iter0"):
        a, b = (load_file(str(o / folder / "model.safetensors")) for o in (reference, out))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= 1e-6, (folder, diff)


def killed(assets, name, fault):
    """OUTPUT of a run SIGKILLed at `fault` (rank 0 unless '@rank'); torchrun then stops the other rank."""
    out = assets[0] / name
    r = run(argv_for(assets, out), fault=fault, check=False)
    assert r.returncode != 0 and f"SIGKILL at {fault.split('@')[0]}" in r.stderr, r.stderr[-3000:]
    assert not (out / "iter0" / "summary.json").exists()
    return out


FAULTS = {
    "generate:10": "generation, rank 0 after its 10th row",
    "generate:5@1": "generation, rank 1 only",
    "cache:1": "reference cache, after its first micro-batch",
    "sft:1": "SFT phase, after its first step",
    "train:3": "SPIN training, after step 3 (checkpoint at step 2)",
    "ckpt:2": "DCP save, shards written, meta.json not",
    "hf_save:1": "HF folder written, not published",
    "publish:1": "checksums written, not renamed",
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_sigkill_then_resume_equals_uninterrupted(assets, reference, fault):
    out = killed(assets, "k-" + fault.replace(":", "-").replace("@", "-r"), fault)
    run(argv_for(assets, out, "--resume"))
    assert_same_weights(out, reference)
    work = out / "iter0.work"
    assert not list(work.glob("generated.rank*.jsonl"))                  # merged into generated.jsonl
    assert (work / "generated.jsonl").read_text() == (reference / "iter0.work" / "generated.jsonl").read_text()


@pytest.fixture(scope="module")
def at_train3(assets):
    """A run killed in SPIN training after the checkpoint of step 2 (kept for the damage cases)."""
    return killed(assets, "at-train3", "train:3")


def flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def step_dir(out):
    return out / "iter0.work" / "ckpt" / "step-000002"


DAMAGE = {
    "dcp-shard": lambda out: flip(sorted(step_dir(out).glob("*.distcp"))[0]),
    "dcp-metadata": lambda out: flip(step_dir(out) / ".metadata"),
    "meta-json": lambda out: flip(step_dir(out) / "meta.json", at=0.2),
    "removed-shard": lambda out: sorted(step_dir(out).glob("*.distcp"))[-1].unlink(),
    "extra-file": lambda out: (step_dir(out) / "__9_0.distcp").write_bytes(b"x"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_never_loaded_and_the_phase_recomputed(assets, reference, at_train3, damage,
                                                                      tmp_path):
    out = tmp_path / "run"
    shutil.copytree(at_train3, out)
    DAMAGE[damage](out)
    r = run(argv_for(assets, out, "--resume"))
    assert "checkpoint not used" in r.stderr and "step-000002" in r.stderr, r.stderr[-2000:]
    assert json.loads((out / "iter0" / "summary.json").read_text())["train"]["resumed_at"] == 0
    assert_same_weights(out, reference)


def test_damaged_reference_cache_is_refused_naming_it(assets, at_train3, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(at_train3, out)
    flip(out / "iter0.work" / "ref_logps.safetensors", at=0.9)
    r = run(argv_for(assets, out, "--resume"), check=False)
    # one line per stopping rank naming the file (torchrun's launcher adds its own failure report)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error") and "ref_logps.safetensors" in x]
    assert r.returncode != 0 and lines and "corrupt reference cache" in lines[0], r.stderr[-2000:]


def test_torn_generated_row_is_generated_again(assets, reference, tmp_path):
    out = killed(assets, "torn", "generate:6")
    shard = out / "iter0.work" / "generated.rank1.jsonl"
    with shard.open("a") as f:
        f.write('{"index": 999, "prompt_id": "x", "resp')           # a row cut by the kill
    run(argv_for(assets, out, "--resume"))
    assert_same_weights(out, reference)


def test_a_second_run_into_the_same_output_refuses(assets, tmp_path):
    out = tmp_path / "busy"
    env = {k: v for k, v in os.environ.items() if k != "SPIN_FAST_FAULT"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "spin_fast.train", *argv_for(assets, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / ".lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)             # alive and holding the lock while the second one starts
        second = subprocess.run([sys.executable, "-m", "spin_fast.train", *argv_for(assets, out, "--resume")],
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"in use by another run (pid {first.pid}" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
