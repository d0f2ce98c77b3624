"""refcache: values == a naive per-sequence forward, policy == opponent gives margin 0 / loss ln 2 on the training
path, reuse / rebuild on fingerprints, corrupt files refused, the distributed code path (gloo, one rank)."""
import json
import math

import pytest
import torch

from spin_fast import refcache
from spin_fast.data import load_pairs
from spin_fast.kernels import spin_loss_from_hidden
from spin_fast.loss import reference_token_logprobs
from spin_fast.model import ModelConfig, Transformer
from spin_fast.packing import IGNORE_INDEX, collate, to_torch

from helpers import PLAIN_TEMPLATE, ByteTokenizer

TOK = ByteTokenizer()


def tiny_model(seed=0, tied=False):
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Transformer(cfg, attn_backend="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                       # far from init, so a wrong formula cannot hide
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def spin_rows(n, tag=""):
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: " + "why " * (i % 4)}]
        rows.append({"real": prompt + [{"role": "assistant", "content": f"Because {i}" + " yes" * i}],
                     "generated": prompt + [{"role": "assistant", "content": f"Dunno{tag} {i}"}]})
    return rows


def make_pairs(tmp_path, rows, name="d.jsonl", **kw):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_pairs(f, TOK, **kw)[0]


def naive_ref(model, pairs):
    """Per sequence, unpacked: model -> hidden -> full-logit log-probs (spin_fast.loss) -> sum of response tokens."""
    out = []
    with torch.no_grad():
        for s in range(pairs.seq_offsets.size - 1):
            ids = torch.from_numpy(pairs.tokens[pairs.seq_offsets[s]:pairs.seq_offsets[s + 1]]).long()
            plen = int(pairs.prompt_lens[s])
            hidden = model(ids, torch.arange(ids.numel()))                                       # (L, H)
            targets = torch.full_like(ids, IGNORE_INDEX)
            targets[plen - 1:-1] = ids[plen:]                                                    # next response token
            out.append(reference_token_logprobs(hidden, model.lm_head_weight, targets).sum())
    out = torch.stack(out)
    return out[0::2], out[1::2]


@pytest.fixture()
def setup(tmp_path):
    return tiny_model(), make_pairs(tmp_path, spin_rows(7), max_length=64, max_prompt_length=32)


@pytest.mark.parametrize("tied", [False, True])
def test_cache_equals_naive_forward(tmp_path, tied):
    model, pairs = tiny_model(tied=tied), make_pairs(tmp_path, spin_rows(7), max_length=64, max_prompt_length=32)
    # a small budget: several micro-batches, so packing order and boundaries are exercised
    chosen, rejected = refcache.compute_ref_logps(model, pairs, token_budget=160)
    ref_c, ref_r = naive_ref(model, pairs)
    torch.testing.assert_close(chosen, ref_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rejected, ref_r, atol=1e-4, rtol=1e-5)
    assert chosen.dtype == torch.float32 and chosen.shape == (pairs.num_pairs,) and (chosen < 0).all()


def test_policy_equals_opponent_gives_zero_margin(tmp_path, setup):
    model, pairs = setup
    cache = refcache.get_or_build(tmp_path / "ref.safetensors", model, pairs, TOK, token_budget=160)
    # the train side: a different packing (all pairs in one micro-batch, then one pair at a time), with grad
    for mb in [list(range(pairs.num_pairs))] + [[p] for p in range(pairs.num_pairs)]:
        b = to_torch(collate(mb, pairs.tokens, pairs.seq_offsets, pairs.prompt_lens))
        hidden = model(b["input_ids"], b["position_ids"], b["cu_seqlens"])                       # (N, H)
        ids = b["pair_ids"]
        loss, metrics = spin_loss_from_hidden(hidden, model.lm_head_weight, b["targets"], b["seq_index"],
                                              b["chosen_index"], b["rejected_index"], cache.chosen[ids],
                                              cache.rejected[ids], beta=0.1)
        assert abs(metrics["rewards/margins"].item()) < 1e-5
        assert abs(loss.item() - math.log(2)) < 1e-5
        assert abs(metrics["rewards/chosen"].item()) < 1e-5 and abs(metrics["rewards/rejected"].item()) < 1e-5


def test_reuse_and_rebuild_on_each_fingerprint(tmp_path, setup, caplog):
    model, pairs = setup
    path = tmp_path / "ref.safetensors"
    first = refcache.get_or_build(path, model, pairs, TOK)
    assert first.status == "built" and path.is_file()
    assert not list(tmp_path.glob(".*tmp*"))                                # the temp file was renamed away
    with caplog.at_level("INFO", logger="spin_fast.refcache"):
        again = refcache.get_or_build(path, model, pairs, TOK)
    assert again.status == "reused" and "reused" in caplog.text
    torch.testing.assert_close(again.chosen, first.chosen, rtol=0, atol=0)
    assert again.metadata["data_fingerprint"] == pairs.fingerprint

    other_data = make_pairs(tmp_path, spin_rows(7, tag="!"), name="e.jsonl", max_length=64, max_prompt_length=32)
    r = refcache.get_or_build(path, model, other_data, TOK)
    assert r.status == "rebuilt" and r.reason.startswith("data fingerprint differs"), r.reason

    shorter = make_pairs(tmp_path, spin_rows(7, tag="!"), name="e.jsonl", max_length=40, max_prompt_length=32)
    r = refcache.get_or_build(path, model, shorter, TOK)
    assert r.status == "rebuilt" and r.reason.startswith("max_length differs (cached 64, now 40)"), r.reason

    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    r = refcache.get_or_build(path, model, shorter, TOK)
    assert r.status == "rebuilt" and r.reason.startswith("weights fingerprint differs"), r.reason
    torch.testing.assert_close(r.chosen, naive_ref(model, shorter)[0], atol=1e-4, rtol=1e-5)
    assert refcache.get_or_build(path, model, shorter, TOK).status == "reused"


def test_corrupt_file_is_refused(tmp_path, setup):
    model, pairs = setup
    path = tmp_path / "ref.safetensors"
    refcache.get_or_build(path, model, pairs, TOK)
    raw = path.read_bytes()
    for name, data in (("truncated", raw[: len(raw) - 5]), ("garbage", b"not a safetensors file"),
                       ("flipped", raw[:-1] + bytes([raw[-1] ^ 0x40]))):
        path.write_bytes(data)
        with pytest.raises(refcache.RefCacheError, match=str(path)):
            refcache.get_or_build(path, model, pairs, TOK)
    path.unlink()
    assert refcache.get_or_build(path, model, pairs, TOK).status == "built"


def test_distributed_code_path_single_rank(tmp_path, setup):
    model, pairs = setup
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        path = tmp_path / "ref.safetensors"
        built = refcache.get_or_build(path, model, pairs, TOK)
        reused = refcache.get_or_build(path, model, pairs, TOK)
    finally:
        dist.destroy_process_group()
    assert (built.status, reused.status) == ("built", "reused")
    torch.testing.assert_close(reused.chosen, naive_ref(model, pairs)[0], atol=1e-4, rtol=1e-5)


def test_stories260k_real_rows(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from spin_fast.hf_io import load_model
    folder = shared_data / "models" / "stories260K"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = load_model(folder)
    src = shared_data / "sft" / "sft_ultrachat_schema-00000.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:20]]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt_id": r["prompt_id"], "messages": r["messages"][:-1] + [
        {"role": "assistant", "content": "Once upon a time."}], "response": "Once upon a time."}) + "\n"
        for r in rows))
    pairs, _ = load_pairs(sft, tok, generated=gen, chat_template=PLAIN_TEMPLATE, max_length=128,
                          max_prompt_length=64, skip_bad_rows=True)
    fp = refcache.folder_fingerprint(folder)
    path = tmp_path / "ref.safetensors"
    cache = refcache.get_or_build(path, model, pairs, tok, weights_fingerprint=fp, token_budget=1024)
    ref_c, ref_r = naive_ref(model, pairs)
    torch.testing.assert_close(cache.chosen, ref_c, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(cache.rejected, ref_r, atol=2e-4, rtol=1e-5)
    again = refcache.get_or_build(path, model, pairs, tok, weights_fingerprint=fp)
    assert again.status == "reused" and again.metadata["weights_fingerprint"] == fp
    assert refcache.get_or_build(path, model, pairs, tok).reason.startswith("weights fingerprint differs")


def test_vocab_mismatch_is_refused(tmp_path):
    model = tiny_model()
    pairs = make_pairs(tmp_path, spin_rows(2))
    pairs.tokens[3] = 300                                                   # beyond the tiny model's 256
    with pytest.raises(ValueError, match="vocabulary has 256"):
        refcache.compute_ref_logps(model, pairs)


WORKER = r'''
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_refcache import TOK, tiny_model
from spin_fast import refcache
from spin_fast.data import load_pairs
torch.distributed.init_process_group("gloo")
pairs = load_pairs({data!r}, TOK, max_length=64, max_prompt_length=32)[0]
model = tiny_model()
out = []
for _ in range(2):
    r = refcache.get_or_build({path!r}, model, pairs, TOK, token_budget={budget})
    out.append([r.status, r.chosen.tolist(), r.rejected.tolist()])
open({path!r} + f".rank{{torch.distributed.get_rank()}}.json", "w").write(json.dumps(out))  # stdout interleaves
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("budget", [160, 100_000])       # several micro-batches; one (rank 1 computes nothing)
def test_two_ranks_equal_one_process(tmp_path, budget):
    """torchrun, 2 CPU ranks (gloo): each rank computes its micro-batches; both end with every pair, one file."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    rows = spin_rows(7)
    pairs = make_pairs(tmp_path, rows, max_length=64, max_prompt_length=32)
    one_c, one_r = refcache.compute_ref_logps(tiny_model(), pairs, token_budget=160)
    path = tmp_path / "two" / "ref.safetensors"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), data=str(tmp_path / "d.jsonl"),
                                    path=str(path), budget=budget))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = {rank: json.loads(Path(f"{path}.rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank, ((s1, c1, r1), (s2, c2, r2)) in results.items():
        assert (s1, s2) == ("built", "reused"), rank
        for got in (c1, c2):
            torch.testing.assert_close(torch.tensor(got), one_c, atol=1e-5, rtol=1e-6)
        for got in (r1, r2):
            torch.testing.assert_close(torch.tensor(got), one_r, atol=1e-5, rtol=1e-6)
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
