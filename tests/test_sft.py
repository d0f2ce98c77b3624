"""sft.py: sequence collation, and one SFT step's gradient == autograd of the mean token cross-entropy over the
step's response tokens, whatever the micro-batching; bad rows named file:row; the held-out loss and early stopping
(the rule, the ranks' lockstep, the best epoch's weights kept through Trainer.train)."""
import json

import numpy as np
import pytest
import torch

from spin_fast.config import TrainCfg
from spin_fast.packing import IGNORE_INDEX
from spin_fast.sft import EarlyStopping, SftTask, collate_sequences, heldout_batches, heldout_loss, load_sft_sequences
from spin_fast.trainer import Trainer, prepare_model

from helpers import ByteTokenizer
from test_refcache import tiny_model

TOK = ByteTokenizer()


def sft_file(tmp_path, n=10, extra=()):
    rows = [{"messages": [{"role": "user", "content": f"q{i} " + "x" * (i % 5)},
                          {"role": "assistant", "content": f"answer {i}" + " y" * i}]} for i in range(n)]
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return f


def test_collate_sequences_targets():
    tokens = np.arange(100, 112, dtype=np.int32)        # two sequences: 5 tokens (prompt 2), 7 tokens (prompt 3)
    off, plen = np.array([0, 5, 12]), np.array([2, 3])
    b = collate_sequences([1, 0], tokens, off, plen)
    assert b["cu_seqlens"].tolist() == [0, 7, 12]
    assert b["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    assert b["input_ids"].tolist() == list(range(105, 112)) + list(range(100, 105))
    # sequence 1: predicts its response tokens 108..111 from positions 2..5; sequence 0: 102..104 from 1..3
    want = [IGNORE_INDEX, IGNORE_INDEX, 108, 109, 110, 111, IGNORE_INDEX, IGNORE_INDEX, 102, 103, 104, IGNORE_INDEX]
    assert b["targets"].tolist() == want
    assert b["scored"].tolist() == [i for i, t in enumerate(want) if t != IGNORE_INDEX]


@pytest.mark.parametrize("micro_batch_tokens", [2000, 150])
def test_sft_step_gradient_is_mean_token_cross_entropy(tmp_path, micro_batch_tokens):
    seqs, _ = load_sft_sequences(sft_file(tmp_path), TOK, max_length=64, max_prompt_length=16)
    cfg = TrainCfg(tokens_per_step=2000, micro_batch_tokens=micro_batch_tokens, progress=False)
    model = tiny_model()
    prepare_model(model, cfg, distributed=False, compute_dtype=torch.float32)
    trainer = Trainer(model, SftTask(seqs, cfg, torch.device("cpu")), cfg, seed=0, device=torch.device("cpu"),
                      distributed=False)
    step = trainer.steps[0]
    assert len(step.units) == seqs.num_sequences and (micro_batch_tokens == 2000) == (len(step.micro_batches[0]) == 1)
    norm = trainer.task.normalizer(step.units)
    vec = sum(trainer.task.micro_batch(trainer.model, mb, norm) for mb in step.micro_batches[0])
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for s in range(seqs.num_sequences):                 # unpacked, full logits
        ids = torch.from_numpy(seqs.tokens[seqs.seq_offsets[s]:seqs.seq_offsets[s + 1]]).long()
        p = int(seqs.prompt_lens[s])
        logits = model.logits(model(ids, torch.arange(ids.numel())))
        lp = torch.log_softmax(logits.double(), -1)[p - 1:-1].gather(1, ids[p:, None]).squeeze(1)
        total, count = total - lp.sum(), count + lp.numel()
    loss = total / count
    loss.backward()
    assert norm == count and vec[1].item() == count
    torch.testing.assert_close(vec[0].double(), loss.detach(), atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ({"prompt": "no messages"}, "needs a 'messages' list"),
    ({"messages": [{"role": "assistant", "content": "alone"}]}, "roles must alternate"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "content"),
])
def test_bad_sft_rows_are_named(tmp_path, row, problem):
    f = sft_file(tmp_path, n=3, extra=[row])
    with pytest.raises(ValueError, match=rf"sft.jsonl:4: .*{problem}"):
        load_sft_sequences(f, TOK, max_length=64, max_prompt_length=16)
    seqs, bad = load_sft_sequences(f, TOK, max_length=64, max_prompt_length=16, skip_bad_rows=True)
    assert seqs.num_sequences == 3 and len(bad) == 1 and "sft.jsonl:4" in bad[0]


# ---- held-out loss and early stopping ----------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 16])
@pytest.mark.parametrize("micro_batch_tokens", [1, 40, 150, 10_000])
def test_heldout_batches_cover_every_sequence_once_in_lockstep(tmp_path, world, micro_batch_tokens):
    seqs, _ = load_sft_sequences(sft_file(tmp_path, n=11), TOK, max_length=64, max_prompt_length=16)
    lens = np.diff(seqs.seq_offsets)
    per_rank = [heldout_batches(seqs, micro_batch_tokens, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1                     # the same number of forwards on every rank
    real = sorted(s for b in per_rank for ids, pad in b if not pad for s in ids)
    assert real == list(range(seqs.num_sequences))
    for b in per_rank:
        for ids, _ in b:                                            # chunks fit unless one sequence alone is longer
            assert len(ids) == 1 or lens[ids].sum() <= micro_batch_tokens


@pytest.mark.parametrize("micro_batch_tokens", [30, 10_000])
def test_heldout_loss_is_mean_token_cross_entropy(tmp_path, micro_batch_tokens):
    seqs, _ = load_sft_sequences(sft_file(tmp_path, n=7), TOK, max_length=64, max_prompt_length=16)
    cfg = TrainCfg(micro_batch_tokens=2000, progress=False)
    model = tiny_model()
    got = heldout_loss(model, SftTask(seqs, cfg, torch.device("cpu")), micro_batch_tokens)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(seqs.num_sequences):
            ids = torch.from_numpy(seqs.tokens[seqs.seq_offsets[s]:seqs.seq_offsets[s + 1]]).long()
            p = int(seqs.prompt_lens[s])
            lp = torch.log_softmax(model.logits(model(ids, torch.arange(ids.numel()))).double(), -1)
            lp = lp[p - 1:-1].gather(1, ids[p:, None])
            total, count = total - lp.sum().item(), count + lp.numel()
    assert got == pytest.approx(total / count, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())          # evaluation only


@pytest.mark.parametrize("losses, patience, min_delta, stop_after, best", [
    ([3.0, 2.0, 2.5, 2.1, 2.2, 1.0], 2, 0.0, 4, 1),        # plateau: 2 epochs without a new low after epoch 1
    ([3.0, 2.0, 2.5, 1.9, 2.2, 2.3, 1.0], 2, 0.0, 6, 3),   # a new low resets the count
    ([3.0, 2.0, 1.995, 1.99, 1.0], 2, 0.01, 4, 3),         # too small a fall is no improvement; lowest kept
    ([3.0, 2.0, 2.5, 2.6, 2.7, 2.8], 0, 0.0, 6, 5),        # patience 0: never stops, the last weights kept
])
def test_early_stopping_rule(losses, patience, min_delta, stop_after, best):
    model = torch.nn.Linear(2, 2)
    it = iter(losses)
    es = EarlyStopping(model, lambda: next(it), patience=patience, min_delta=min_delta)
    epochs = 0
    for e in range(len(losses)):
        epochs += 1
        if es(e):
            break
    assert epochs == stop_after and es.losses == losses[:stop_after] and es.stopped == (stop_after < len(losses))
    assert es.best_epoch == (best if patience else int(np.argmin(losses)))


def test_early_stopped_training_keeps_the_best_epochs_weights(tmp_path):
    """A real SFT run through Trainer.train: scripted held-out losses plateau after epoch 1, so the phase stops
    after epoch 3 (patience 2) and the model's weights are those seen at the end of epoch 1, not the last ones."""
    seqs, _ = load_sft_sequences(sft_file(tmp_path), TOK, max_length=64, max_prompt_length=16)
    cfg = TrainCfg(tokens_per_step=600, micro_batch_tokens=600, epochs=8, lr=3e-3, optimizer="adamw",
                   warmup_ratio=0.0, progress=False)
    model = tiny_model().train()
    prepare_model(model, cfg, distributed=False, compute_dtype=torch.float32)
    trainer = Trainer(model, SftTask(seqs, cfg, torch.device("cpu")), cfg, seed=0, device=torch.device("cpu"),
                      distributed=False)
    steps_per_epoch = sum(1 for s in trainer.steps if s.epoch == 0)
    seen, scripted = [], iter([3.0, 2.0, 2.4, 2.2, 1.0, 1.0, 1.0, 1.0])

    def evaluate():
        seen.append([p.detach().clone() for p in model.parameters()])
        return next(scripted)
    es = EarlyStopping(model, evaluate, patience=2, min_delta=0.0)
    res = trainer.train(on_epoch_end=es)
    assert res["steps"] == 4 * steps_per_epoch and res["planned_steps"] == 8 * steps_per_epoch
    assert es.stopped and es.best_epoch == 1 and len(seen) == 4
    assert any(not torch.equal(a, b) for a, b in zip(seen[1], seen[3]))     # training did move the weights
    es.restore()
    for p, b in zip(model.parameters(), seen[1]):
        assert torch.equal(p, b)


def _split(tmp_path, name, **sft):
    from spin_fast.config import load_config
    from spin_fast.loop import split_sft
    from spin_fast.runtime import Runtime
    argv = ["--data.sft", str(sft_file(tmp_path, n=20)), "--loop.heldout", "4", "--sft.epochs", "3"]
    for k, v in sft.items():
        argv += [f"--sft.{k}", str(v)]
    out = tmp_path / name
    split_sft(load_config(None, argv), out, Runtime(0, 1, 0, torch.device("cpu"), False))
    read = lambda f: [json.loads(line)["messages"][0]["content"] for line in (out / "data" / f).open()]  # noqa: E731
    return {f: read(f) for f in ("train.jsonl", "heldout.jsonl", "sft_heldout.jsonl") if (out / "data" / f).is_file()}


def test_split_holds_out_sft_rows_from_all_training_and_keeps_the_loop_heldout(tmp_path):
    plain, split = _split(tmp_path, "plain"), _split(tmp_path, "split", heldout=5, early_stopping_patience=2)
    assert "sft_heldout.jsonl" not in plain and len(split["sft_heldout.jsonl"]) == 5
    assert split["heldout.jsonl"] == plain["heldout.jsonl"]               # the loop's check is unchanged
    assert sorted(split["train.jsonl"] + split["sft_heldout.jsonl"]) == sorted(plain["train.jsonl"])
    assert not set(split["train.jsonl"]) & set(split["sft_heldout.jsonl"])


def test_early_stopping_without_heldout_rows_is_refused_naming_the_key(tmp_path):
    from spin_fast.errors import InputError
    with pytest.raises(InputError, match=r"config sft.early_stopping_patience: needs held-out rows .* sft.heldout > 0"):
        _split(tmp_path, "x", early_stopping_patience=2)
    with pytest.raises(InputError, match=r"config loop.heldout \+ sft.heldout: 20 held-out rows leave none"):
        _split(tmp_path, "y", heldout=16)
