"""The training phase hands its memory back: memory.release() (gc + malloc_trim) after the reference cache pass and
again once the gradients and optimizer states are dropped, before the save."""
import os
import subprocess
import sys

import pytest

from spin_fast import phases, train
from tests.helpers import demo_model_and_pairs


def test_save_starts_without_gradients_or_optimizer_state(tmp_path, monkeypatch):
    model_dir, pairs = demo_model_and_pairs(tmp_path, 6)
    events = []
    real_release, real_save = phases.release, phases._save_trained

    def release():
        events.append("release")
        real_release()

    def save(cfg, rt, model, *args, **kw):
        events.append(("save", all(p.grad is None for p in model.parameters()),
                       (model.lm_head is None) == model.config.tie_word_embeddings))
        return real_save(cfg, rt, model, *args, **kw)
    monkeypatch.setattr(phases, "release", release)
    monkeypatch.setattr(phases, "_save_trained", save)
    s = train.main(["--model", str(model_dir), "--pairs", str(pairs), "--output", str(tmp_path / "out"),
                    "--max-length", "40", "--max-prompt-length", "24", "--train.pairs_per_step", "2", "--train.progress", "false", "--device", "cpu"])
    saves = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    assert len(saves) == 1, events
    i = saves[0]
    # the heap was trimmed after the cache pass (before training) and again before the save began
    assert events[:i].count("release") == 2, events
    assert events[i][1], "gradients still alive at the save"
    assert events[i][2], "the tie of lm_head and embed_tokens changed"
    assert set(s["peak_memory"]) >= {"cache", "train", "save"}


RETENTION_PROBE = r"""
import sys, torch
from spin_fast.memory import limit_heap_retention, rss_bytes
if sys.argv[1] == "on":
    assert limit_heap_retention()
big = torch.ones(4 << 20); del big                 # a freed 16 MiB block: glibc's dynamic threshold grows to it
xs, keep = [], []
for _ in range(40):                                # 40 x 4 MiB, activation-sized, each followed by a small
    xs.append(torch.ones(1 << 20))                 # tensor that stays alive (as a step's interleaved ones do):
    keep.append(torch.ones(64 << 10))              # the freed blocks are holes, not a trimmable heap top
before = rss_bytes()
del xs
print((before - rss_bytes()) / 2 ** 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_limit_heap_retention_returns_freed_activations():
    """With the entry point's setting, 160 MiB of freed 4 MiB tensors leave the RSS; with glibc's dynamic
    threshold (the control) they stay in the arena."""
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    drop = {m: float(subprocess.run([sys.executable, "-c", RETENTION_PROBE, m], capture_output=True, text=True,
                                    check=True, env=env).stdout.split()[-1]) for m in ("on", "off")}
    assert drop["on"] >= 150, drop
    assert drop["off"] < 50, drop               # the control: what the setting fixes
