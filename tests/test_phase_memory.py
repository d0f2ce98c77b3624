"""The training phase hands its memory back: memory.release() (gc + malloc_trim) after the reference cache pass and
again once the gradients and optimizer states are dropped, before the save."""
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
