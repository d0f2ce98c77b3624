"""sft.py: sequence collation, and one SFT step's gradient == autograd of the mean token cross-entropy over the
step's response tokens, whatever the micro-batching; bad rows named file:row."""
import json

import numpy as np
import pytest
import torch

from spin_fast.config import TrainCfg
from spin_fast.packing import IGNORE_INDEX
from spin_fast.sft import SftTask, collate_sequences, load_sft_sequences
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
