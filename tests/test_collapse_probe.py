"""benchmarks/collapse_probe.py's per-token diagnostics against a naive oracle: transformers' LlamaForCausalLM run
on each sequence alone (no packing), its log-softmax in fp64, bucketed by response position in plain Python."""
import json

import numpy as np
import pytest
import torch

from benchmarks.collapse_probe import BUCKETS, Probe, bucket_name, summarise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from spin_fast import demo
    from spin_fast.data import load_pairs
    from spin_fast.hf_io import load_model
    root = tmp_path_factory.mktemp("probe")
    tok = demo.build_tokenizer(root / "model")
    demo.init_model(root / "model", tok, hidden=32, layers=2, heads=4, seed=1)
    rows = demo.make_rows(9, seed=5)
    with (root / "pairs.jsonl").open("w") as f:
        for i, r in enumerate(rows):
            m = r["messages"]
            # pair 3's "sample" is the human answer itself: no signal, left out of the per-pair statistics
            rej = m[-1] if i == 3 else rows[(i + 1) % len(rows)]["messages"][-1]
            f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [rej]}) + "\n")
    pairs, _ = load_pairs(root / "pairs.jsonl", tok, max_length=48, max_prompt_length=24)
    return tok, pairs, load_model(root / "model"), root / "model"


def _naive(model_dir, pairs, eos_id):
    """Per sequence s: [(response position, token log-prob, is </s>)] from HF's model, one sequence at a time."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    out = []
    for s in range(2 * pairs.num_pairs):
        a, b, pl = (int(x) for x in (pairs.seq_offsets[s], pairs.seq_offsets[s + 1], pairs.prompt_lens[s]))
        ids = torch.tensor(pairs.tokens[a:b], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)                   # (L, V)
        out.append([(k, logp[pl + k - 1, ids[0, pl + k]].item(), int(ids[0, pl + k]) == eos_id)
                    for k in range(b - a - pl)])
    return out


def test_probe_matches_naive_per_sequence_oracle(setup):
    tok, pairs, model, model_dir = setup
    probe = Probe(pairs, tok.eos_token_id, torch.device("cpu"))
    got = probe.measure(model)
    naive = _naive(model_dir, pairs, tok.eos_token_id)
    distinct = [p for p in range(pairs.num_pairs) if p != 3]
    assert got["distinct_pairs"] == len(distinct) == pairs.num_pairs - 1
    seq = [sum(lp for _, lp, _ in toks) for toks in naive]
    np.testing.assert_allclose(got["seq_chosen"].numpy(), [seq[2 * p] for p in distinct], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["seq_rejected"].numpy(), [seq[2 * p + 1] for p in distinct], rtol=0, atol=1e-4)
    assert got["chosen"] == pytest.approx(np.mean([seq[2 * p] for p in distinct]), abs=1e-4)
    for side, name in ((0, "chosen"), (1, "rejected")):
        toks = [t for p in distinct for t in naive[2 * p + side]]
        for a, b in BUCKETS:
            want = [lp for k, lp, eos in toks if a <= k < b and not eos]
            if want:
                assert got["pos"][name][bucket_name(a, b)] == pytest.approx(np.mean(want), abs=1e-4), (name, a, b)
            else:
                assert bucket_name(a, b) not in got["pos"][name]
        assert got["pos"][name]["eos"] == pytest.approx(np.mean([lp for _, lp, eos in toks if eos]), abs=1e-4)
    # the human answers' </s>, over every pair (pair 3 included): what greedy decoding has to reproduce
    eos_lp = [lp for p in range(pairs.num_pairs) for _, lp, eos in naive[2 * p] if eos]
    assert got["chosen_eos_logp"] == pytest.approx(np.mean(eos_lp), abs=1e-4)


def test_summarise_deltas_from_reference(setup):
    tok, pairs, model, _ = setup
    probe = Probe(pairs, tok.eos_token_id, torch.device("cpu"))
    ref = probe.measure(model)
    with torch.no_grad():
        model.lm_head_weight.mul_(1.5)           # any change of the weights moves the log-probs
    new = probe.measure(model)
    s = summarise(new, ref)
    assert s["d_chosen"] == pytest.approx(new["chosen"] - ref["chosen"], abs=1e-9)
    assert s["d_rejected"] == pytest.approx(new["rejected"] - ref["rejected"], abs=1e-9)
    assert s["d_chosen"] != 0.0
    dc, dr = new["seq_chosen"] - ref["seq_chosen"], new["seq_rejected"] - ref["seq_rejected"]
    assert s["margin_acc"] == pytest.approx((dc > dr).double().mean().item())
    assert "seq_chosen" not in s and summarise(ref, ref)["d_chosen"] == 0.0
