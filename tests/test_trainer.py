"""trainer.py in-process (no ../shared needed): the step plan, the schedule, and that one optimizer step's gradient is
the gradient of the mean SPIN loss over the step's pairs, whatever the micro-batching."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spin_fast import refcache
from spin_fast.config import TrainCfg
from spin_fast.loss import reference_token_logprobs
from spin_fast.packing import IGNORE_INDEX, pair_token_counts
from spin_fast.trainer import (MetricsLog, SpinTask, Trainer, TrainingDiverged, lr_factor, plan_steps,
                               prepare_model)

from test_refcache import make_pairs, spin_rows, tiny_model


def pair_tokens_of(lengths):
    """(chosen, rejected) sequence lengths back to back -> tokens per pair."""
    return np.asarray(lengths, dtype=np.int64).reshape(-1, 2).sum(1)


# --- the step plan --------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2, 60), min_size=2, max_size=80).filter(lambda x: len(x) % 2 == 0),
       tokens_per_step=st.integers(100, 900), seed=st.integers(0, 3), epochs=st.integers(1, 2))
def test_plan_is_world_independent_and_complete(lengths, tokens_per_step, seed, epochs):
    pair_tokens = pair_tokens_of(lengths)           # (P,) tokens per pair
    budget = 128                                    # >= the longest pair (2 * 60)
    plans = {w: plan_steps(pair_tokens, tokens_per_step=tokens_per_step, micro_batch_tokens=budget, world_size=w,
                           seed=seed, epochs=epochs) for w in (1, 2, 3, 4, 8)}
    for w, steps in plans.items():
        # every world trains exactly one process's steps: the same pairs per step (so the same normaliser)
        assert [s.units.tolist() for s in steps] == [s.units.tolist() for s in plans[1]]
        for epoch in range(epochs):
            ids = np.concatenate([s.units for s in steps if s.epoch == epoch]).tolist()
            assert sorted(ids) == list(range(len(pair_tokens)))             # every pair once per epoch
        for s in steps:
            assert len(s.micro_batches) == w and s.dropped_in_epoch == 0
            assert len({len(r) for r in s.micro_batches}) == 1                     # ranks step in lockstep
            pad = s.padding or [[False] * len(r) for r in s.micro_batches]
            real = sorted(p for r, pr in zip(s.micro_batches, pad) for mb, x in zip(r, pr) if not x for p in mb)
            assert real == sorted(s.units.tolist())                               # no pair lost, none split
            replicas = [mb for r, pr in zip(s.micro_batches, pad) for mb, x in zip(r, pr) if x]
            # padding only when splitting cannot reach a multiple of w: one cheapest pair per replica
            assert all(len(mb) == 1 and pair_tokens[mb[0]] == pair_tokens[s.units].min() for mb in replicas)
            assert len(replicas) < w and (w > 1 or not replicas)
            assert all(len(mb) > 0 and pair_tokens[mb].sum() <= budget for r in s.micro_batches for mb in r)
            assert s.tokens == int(pair_tokens[s.units].sum())


def test_a_step_too_small_for_the_ranks_is_padded_not_changed():
    # 3 pairs of 100 tokens: 3 micro-batches of 128; 2 ranks need 4 and no micro-batch can be split
    pair_tokens = np.array([100, 100, 100])
    one = plan_steps(pair_tokens, tokens_per_step=1000, micro_batch_tokens=128, world_size=1, seed=0, epochs=1)
    two = plan_steps(pair_tokens, tokens_per_step=1000, micro_batch_tokens=128, world_size=2, seed=0, epochs=1)
    assert [s.units.tolist() for s in two] == [s.units.tolist() for s in one] and len(one) == 1
    assert sorted(sum(two[0].padding, [])) == [False, False, False, True]
    # fewer pairs than ranks: padded too (a rank may only replicate)
    three = plan_steps(pair_tokens[:2], tokens_per_step=1000, micro_batch_tokens=256, world_size=3, seed=0, epochs=1)
    assert [len(r) for r in three[0].micro_batches] == [1, 1, 1] and sum(sum(three[0].padding, [])) == 1


def test_plan_respects_token_budget_and_seed():
    off = pair_tokens_of([30] * 40)                         # 20 pairs of 60 tokens
    steps = plan_steps(off, tokens_per_step=300, micro_batch_tokens=128, world_size=1, seed=0, epochs=1)
    assert [len(s.units) for s in steps] == [5, 5, 5, 5]
    assert all(s.tokens <= 300 for s in steps)
    other = plan_steps(off, tokens_per_step=300, micro_batch_tokens=128, world_size=1, seed=1, epochs=1)
    assert [s.units.tolist() for s in other] != [s.units.tolist() for s in steps]
    two = plan_steps(off, tokens_per_step=300, micro_batch_tokens=128, world_size=1, seed=0, epochs=2)
    assert [s.units.tolist() for s in two[:4]] == [s.units.tolist() for s in steps]
    assert len(plan_steps(off, tokens_per_step=300, micro_batch_tokens=128, world_size=1, seed=0, epochs=2,
                          max_steps=3)) == 3


def test_plan_errors_name_the_problem():
    off = pair_tokens_of([30, 30, 100, 90])
    with pytest.raises(ValueError, match=r"pair 1 has 190 tokens, more than train.micro_batch_tokens=128"):
        plan_steps(off, tokens_per_step=300, micro_batch_tokens=128, world_size=1, seed=0, epochs=1)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2, 60), min_size=16, max_size=80).filter(lambda x: len(x) % 2 == 0),
       per_step=st.integers(1, 12), seed=st.integers(0, 3), epochs=st.integers(1, 2), world=st.sampled_from([1, 2, 4]))
def test_pairs_per_step_gives_steps_of_exactly_that_many_pairs(lengths, per_step, seed, epochs, world):
    """train.pairs_per_step = K: every step of an epoch holds exactly K pairs over all ranks, the last the remainder,
    the same global batches for every world size (ranks short of a pair get zero-weight padding)."""
    pair_tokens = pair_tokens_of(lengths)                              # (P,)
    k = per_step * world if per_step % 3 else per_step                 # multiples of the world size, and not
    steps = plan_steps(pair_tokens, tokens_per_step=1, micro_batch_tokens=128, world_size=world, seed=seed,
                       epochs=epochs, pairs_per_step=k)                 # tokens_per_step is ignored
    n = len(pair_tokens)
    full, rest = divmod(n, k)
    for epoch in range(epochs):
        assert [len(s.units) for s in steps if s.epoch == epoch] == [k] * full + [rest] * (rest > 0)
        ids = np.concatenate([s.units for s in steps if s.epoch == epoch]).tolist()
        assert sorted(ids) == list(range(n))                           # every pair once, none dropped
    for s in steps:
        assert len({len(r) for r in s.micro_batches}) == 1             # ranks step in lockstep
        assert all(pair_tokens[mb].sum() <= 128 for r in s.micro_batches for mb in r)
    one = plan_steps(pair_tokens, tokens_per_step=1, micro_batch_tokens=128, world_size=1, seed=seed,
                     epochs=epochs, pairs_per_step=k)
    assert [s.units.tolist() for s in one] == [s.units.tolist() for s in steps]


def test_trainer_plans_pairs_per_step_and_auto_micro_batch(tmp_path):
    trainer, pairs = build(tmp_path, cfg_for(pairs_per_step=5, micro_batch_tokens=0, tokens_per_step=1), rows=12)
    assert [len(s.units) for s in trainer.steps] == [5, 5, 2]
    longest = int(trainer.task.unit_tokens.max())
    budget = 1 << (longest - 1).bit_length()                          # the longest pair's power of two
    assert all(trainer.task.unit_tokens[mb].sum() <= budget for s in trainer.steps for mb in s.micro_batches[0])
    assert max(len(s.micro_batches[0]) for s in trainer.steps) > 1 >= 0   # budget < a step: accumulation used
    trainer.train()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_factor(schedule):
    total, warm = 10, 2
    f = [lr_factor(s, total, warm, schedule) for s in range(total)]
    assert f[:3] == [0.0, 0.5, 1.0]                      # Hugging Face's warmup: step / warmup
    if schedule == "constant":
        assert f[2:] == [1.0] * 8
    elif schedule == "linear":
        assert f[2:] == pytest.approx([1 - i / 8 for i in range(8)])
    else:
        assert f[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])


# --- training -------------------------------------------------------------------------------------------------------

def cfg_for(**kw):
    base = dict(lr=2e-3, optimizer="adamw", warmup_ratio=0.0, lr_schedule="constant", tokens_per_step=600,
                micro_batch_tokens=600, max_grad_norm=0.0, log_every=2, progress=False, beta=0.5)
    base.update(kw)
    return TrainCfg(**base)


def build(tmp_path, cfg, model=None, ref_model=None, rows=12):
    pairs = make_pairs(tmp_path, spin_rows(rows), max_length=64, max_prompt_length=32)
    model = model if model is not None else tiny_model()
    ref_c, ref_r = refcache.compute_ref_logps(ref_model if ref_model is not None else model, pairs)
    prepare_model(model, cfg, distributed=False, compute_dtype=torch.float32)
    task = SpinTask(pairs, ref_c, ref_r, cfg, torch.device("cpu"))
    return Trainer(model, task, cfg, seed=0, device=torch.device("cpu"), distributed=False), pairs


def naive_step_loss(model, ref_c, ref_r, pairs, pair_ids, beta, loss_type="sigmoid", rpo_alpha=0.0):
    """Mean over the step's pairs of the SPIN loss (+ RPO's alpha * per-token NLL of the human answer), from
    per-sequence unpacked forwards with full logits."""
    logps, lengths = [], []
    for p in pair_ids:
        for s in (2 * p, 2 * p + 1):
            ids = torch.from_numpy(pairs.tokens[pairs.seq_offsets[s]:pairs.seq_offsets[s + 1]]).long()
            plen = int(pairs.prompt_lens[s])
            targets = torch.full_like(ids, IGNORE_INDEX)
            targets[plen - 1:-1] = ids[plen:]
            lengths.append(ids.numel() - plen)
            hidden = model(ids, torch.arange(ids.numel()))
            logps.append(reference_token_logprobs(hidden, model.lm_head_weight, targets).sum())
    logps = torch.stack(logps)
    idx = torch.as_tensor(pair_ids)
    margin = (logps[0::2] - ref_c[idx]) - (logps[1::2] - ref_r[idx])
    losses = -torch.nn.functional.logsigmoid(beta * margin) if loss_type == "sigmoid" else torch.relu(1 - beta * margin)
    return (losses - rpo_alpha * logps[0::2] / torch.tensor(lengths[0::2], dtype=logps.dtype)).mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("micro_batch_tokens", [600, 200])          # one micro-batch per step, or several
@pytest.mark.parametrize("checkpointing", [False, True])
def test_step_gradient_is_gradient_of_mean_step_loss(tmp_path, loss_type, micro_batch_tokens, checkpointing):
    check_step_gradient(tmp_path, loss_type, micro_batch_tokens, checkpointing, rpo_alpha=0.0)


def test_step_gradient_with_the_rpo_nll_term(tmp_path):
    """train.rpo_alpha reaches the loss: the step gradient is that of mean(l(m) - alpha log pi(y|x) / |y|)."""
    check_step_gradient(tmp_path, "sigmoid", 200, False, rpo_alpha=1.0)


def check_step_gradient(tmp_path, loss_type, micro_batch_tokens, checkpointing, rpo_alpha):
    # reference = another model, so margins are far from 0 and l'(m) differs per pair
    cfg = cfg_for(loss_type=loss_type, micro_batch_tokens=micro_batch_tokens, activation_checkpointing=checkpointing,
                  rpo_alpha=rpo_alpha)
    trainer, pairs = build(tmp_path, cfg, model=tiny_model(seed=0), ref_model=tiny_model(seed=1))
    step = trainer.steps[0]
    assert len(step.micro_batches[0]) == (1 if micro_batch_tokens == 600 else len(step.micro_batches[0]))
    if micro_batch_tokens == 200:
        assert len(step.micro_batches[0]) > 1
    vec = sum(trainer.task.micro_batch(trainer.model, mb, len(step.units)) for mb in step.micro_batches[0])
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    oracle = copy.deepcopy(trainer.model)
    oracle.zero_grad(set_to_none=True)
    for blk in oracle.layers:
        blk.checkpoint_activations = False
    loss = naive_step_loss(oracle, trainer.task.ref_chosen, trainer.task.ref_rejected, pairs, step.units.tolist(),
                           cfg.beta, loss_type, rpo_alpha)
    loss.backward()
    torch.testing.assert_close(vec[0], loss.detach(), atol=1e-5, rtol=1e-5)
    for n, p in oracle.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_only_response_rows_reach_the_loss_kernel(tmp_path, monkeypatch, impl):
    """The LM-head kernel gets the R response rows (not the N packed rows) and the step gradient is still the naive
    full-logits loss's (prompt rows of the hidden states get a zero gradient through index_select's backward)."""
    import spin_fast.trainer as trainer_mod
    seen = []

    def spy(hidden, *a, **kw):
        seen.append((hidden.shape[0], a[1].shape[0]))
        return real(hidden, *a, **kw)
    real = trainer_mod.spin_loss_from_hidden
    monkeypatch.setattr(trainer_mod, "spin_loss_from_hidden", spy)
    cfg = cfg_for(micro_batch_tokens=200, impl=impl)
    trainer, pairs = build(tmp_path, cfg, model=tiny_model(seed=0), ref_model=tiny_model(seed=1))
    step = trainer.steps[0]
    vec = sum(trainer.task.micro_batch(trainer.model, mb, len(step.units)) for mb in step.micro_batches[0])
    counts = pair_token_counts(pairs.seq_offsets)
    for (rows, seq_rows), mb in zip(seen, step.micro_batches[0]):
        response = int(sum(pairs.seq_offsets[s + 1] - pairs.seq_offsets[s] - pairs.prompt_lens[s] for p in mb
                           for s in (2 * p, 2 * p + 1)))
        assert rows == seq_rows == response < counts[mb].sum()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    oracle = copy.deepcopy(trainer.model)
    oracle.zero_grad(set_to_none=True)
    loss = naive_step_loss(oracle, trainer.task.ref_chosen, trainer.task.ref_rejected, pairs, step.units.tolist(),
                           cfg.beta)
    loss.backward()
    torch.testing.assert_close(vec[0], loss.detach(), atol=1e-5, rtol=1e-5)
    for n, p in oracle.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_first_step_is_ln2_and_training_moves_margins(tmp_path):
    cfg = cfg_for(tokens_per_step=300, micro_batch_tokens=300, epochs=3)
    trainer, _ = build(tmp_path, cfg)
    metrics_path = tmp_path / "metrics.jsonl"
    trainer.metrics = MetricsLog(metrics_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    trainer.metrics.close()
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert len(rows) == result["steps"] == len(trainer.steps) and [r["step"] for r in rows] == list(
        range(1, len(rows) + 1))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)          # policy == opponent at step 0
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["rewards/margins"] > 0.5 and rows[-1]["loss"] < 0.5 * math.log(2)
    assert rows[-1]["rewards/accuracies"] == 1.0
    assert result["tokens"] == sum(r["tokens"] for r in rows) and result["tokens_per_s"] > 0
    assert max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters()) > 1e-3


def test_micro_batching_does_not_change_the_trained_weights(tmp_path):
    # the same global steps, cut into 1 or several micro-batches per step: gradient accumulation must be exact
    # (up to fp32 summation order)
    results = []
    for mbt in (600, 150):
        trainer, _ = build(tmp_path, cfg_for(micro_batch_tokens=mbt, max_grad_norm=1.0, optimizer="rmsprop",
                                             lr_schedule="linear", warmup_ratio=0.2, epochs=2))
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    start = tiny_model()
    moved = max((results[0][n] - p.detach()).abs().max().item() for n, p in start.named_parameters())
    diff = max((results[0][n] - results[1][n]).abs().max().item() for n in results[0])
    assert moved > 1e-3 and diff < 1e-5 * max(1.0, moved), (moved, diff)


def test_bad_pair_tokens_are_refused(tmp_path):
    cfg = cfg_for()
    pairs = make_pairs(tmp_path, spin_rows(4), max_length=64, max_prompt_length=32)
    model = tiny_model()
    ref = torch.zeros(pairs.num_pairs)
    pairs.tokens[3] = 999                                     # beyond the 256-entry vocabulary
    with pytest.raises(ValueError, match="vocabulary has 256 entries"):
        Trainer(model, SpinTask(pairs, ref, ref, cfg, torch.device("cpu")), cfg, seed=0, device=torch.device("cpu"),
                distributed=False)


# --- numeric health -------------------------------------------------------------------------------------------------

def test_divergence_stops_the_phase_naming_the_step(tmp_path):
    # lr 1e30: the first update overflows the weights, step 2's loss is NaN: the flush after step 2 stops it
    cfg = cfg_for(lr=1e30, tokens_per_step=300, micro_batch_tokens=300, log_every=2, epochs=2)
    trainer, _ = build(tmp_path, cfg)
    trainer.metrics = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2: loss nan, grad norm nan .*train.lr"):
        trainer.train()
    trainer.metrics.close()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] is None and rows[1]["bad"] is True


def test_last_update_overflowing_is_caught_before_publishing(tmp_path):
    # one RMSprop step of ~10 lr = 1e39 > the fp32 maximum, after a finite loss and gradient
    cfg = cfg_for(lr=1e38, optimizer="rmsprop", tokens_per_step=10_000, micro_batch_tokens=600, epochs=1)
    trainer, _ = build(tmp_path, cfg)
    assert len(trainer.steps) == 1
    with pytest.raises(TrainingDiverged, match="weights are not finite after step 1"):
        trainer.train()


def test_max_bad_steps_skips_the_step_on_device(tmp_path):
    # a NaN reference log-prob poisons one step; with max_bad_steps=1 RMSprop steps on a zero gradient: the
    # weights after that step equal those before it, and training goes on finite
    kw = dict(optimizer="rmsprop", tokens_per_step=300, micro_batch_tokens=300, max_grad_norm=1.0)
    trainer, _ = build(tmp_path, cfg_for(**kw))
    poisoned = int(trainer.steps[2].units[0])
    trainer.task.ref_chosen[poisoned] = float("nan")
    with pytest.raises(TrainingDiverged, match="at step 3"):
        trainer.train()                                              # max_bad_steps 0: the first one stops it

    def weights_after(max_steps, max_bad):
        t, _ = build(tmp_path, cfg_for(**kw, max_steps=max_steps, max_bad_steps=max_bad))
        t.task.ref_chosen[poisoned] = float("nan")
        result = t.train()
        return {n: p.detach().clone() for n, p in t.model.named_parameters()}, result

    before, _ = weights_after(2, 0)
    after, result = weights_after(3, 1)
    assert result["bad_steps"] == [3]
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0)
    full, result = weights_after(-1, 1)
    assert result["bad_steps"] == [3] and len(trainer.steps) > 4
    assert all(torch.isfinite(p).all() for p in full.values())
    assert max((full[n] - before[n]).abs().max().item() for n in full) > 1e-4   # later steps trained
