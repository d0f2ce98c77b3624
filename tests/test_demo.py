"""The built-in demo's task side (spin_fast/demo.py): rows, char tokenizer, tiny Llama folder, exact match."""
from __future__ import annotations

import json

import pytest
import torch

from spin_fast import demo
from spin_fast.chat import render_prompt, render_prompt_response, render_text
from spin_fast.hf_io import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_model")
    tok = demo.build_tokenizer(path)
    demo.init_model(path, tok, hidden=32, layers=2, heads=2, seed=0)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


# ---- rows ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", demo.KINDS)
def test_rows_deterministic_and_well_formed(kind):
    rows = demo.make_rows(300, seed=3, kind=kind)
    assert rows == demo.make_rows(300, seed=3, kind=kind)
    assert rows != demo.make_rows(300, seed=4, kind=kind)
    assert len({r["prompt_id"] for r in rows}) == len({r["prompt"] for r in rows}) == 300
    for r in rows:
        user, assistant = r["messages"]
        assert user == {"role": "user", "content": r["prompt"]} and assistant["role"] == "assistant"
        assert demo.answer_of(r) == assistant["content"]            # recomputed from the prompt
        op, word = demo.parse_prompt(r["prompt"])
        assert (op == kind or kind == "mixed") and word.isalpha() and word.islower()
        assert demo.MIN_LEN <= len(word) <= demo.MAX_LEN
    if kind == "mixed":
        assert {demo.parse_prompt(r["prompt"])[0] for r in rows} == set(demo.TRANSFORMS)


def test_answers():
    a = lambda p: demo.answer_of({"prompt": p})                    # noqa: E731
    assert (a("reverse: kdfa"), a("sort: kdfa"), a("double: ab"), a("shift: azy")) == ("afdk", "adfk", "aabb", "baz")
    with pytest.raises(ValueError, match="not a demo prompt"):
        a("translate: abc")
    with pytest.raises(ValueError, match="kind"):
        demo.make_rows(3, 0, kind="nope")


def test_split_disjoint(tmp_path):
    rows = demo.make_rows(500, seed=0)
    train, held = demo.split_rows(rows, 100)
    assert len(train) == 400 and len(held) == 100
    words = lambda rs: {demo.parse_prompt(r["prompt"])[1] for r in rs}   # noqa: E731
    assert not words(train) & words(held) and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    # rows of another generation that reuse a held-out word are dropped from train
    clash = demo._row("reverse: " + demo.parse_prompt(held[0]["prompt"])[1], "x")
    assert clash not in demo.split_rows([clash] + rows, 100)[0]
    tr, ho = demo.write_demo_data(tmp_path, 200, 50, seed=1)
    tr_rows, ho_rows = ([json.loads(line) for line in open(p)] for p in (tr, ho))
    assert len(tr_rows) == 200 and len(ho_rows) == 50 and not words(tr_rows) & words(ho_rows)


# ---- tokenizer ----------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tok):
    text = "reverse: kdfa, then (x)!\nok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[:3]) == ["r", "e", "v"]
    assert tok("A", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]      # uppercase: not in vocab
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == demo.SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("</s>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert tok("<s>", add_special_tokens=False)["input_ids"] == [tok.bos_token_id]
    fresh = demo.build_tokenizer()                                   # the reload is the built one
    assert fresh.get_vocab() == tok.get_vocab() and fresh.chat_template == tok.chat_template
    assert fresh(text)["input_ids"] == tok(text)["input_ids"]


def test_chat_rendering_splits_prompt_and_response(tok):
    row = demo.make_rows(1, seed=0, kind="reverse")[0]
    prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
    assert render_text(tok, prompt) == f"<s>u:{row['prompt']}</s><s>a:"
    ids, n = render_prompt_response(tok, prompt, answer)
    assert ids[:n] == render_prompt(tok, prompt)
    assert ids[n:] == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]   # one </s>
    assert tok.decode(ids[n:], skip_special_tokens=True) == answer
    # the whole rendering tokenized at once gives the same ids (no merges across the boundary)
    full = render_text(tok, row["messages"], add_generation_prompt=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == ids


# ---- model --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_init_model_loads_and_matches_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM
    tok = demo.build_tokenizer()
    path = demo.init_model(tmp_path / "m", tok, hidden=32, layers=2, heads=4, kv_heads=2, tie_word_embeddings=tied,
                           seed=1)
    cfg = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == gen["eos_token_id"] == tok.eos_token_id
    assert cfg["bos_token_id"] == gen["bos_token_id"] == tok.bos_token_id
    ours = load_model(path)
    assert ours.config.eos_token_ids == [tok.eos_token_id] and (ours.lm_head is None) == tied
    ids = torch.tensor(render_prompt_response(tok, [{"role": "user", "content": "sort: qwerty"}], "eqrtwy")[0])
    with torch.no_grad():
        got = ours.logits(ours(ids, torch.arange(ids.numel())))                          # (T, V)
        ref = AutoModelForCausalLM.from_pretrained(path).eval()(ids[None]).logits[0]      # (T, V)
    assert got.shape == (ids.numel(), len(tok))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # deterministic from the seed, and the caller's RNG is left alone
    state = torch.random.get_rng_state()
    again = demo.init_model(tmp_path / "m2", tok, hidden=32, layers=2, heads=4, kv_heads=2, tie_word_embeddings=tied,
                            seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(load_model(again).embed_tokens.weight, ours.embed_tokens.weight)


# ---- exact match --------------------------------------------------------------------------------------------------

def test_score():
    rows = demo.make_rows(20, seed=0)
    answers = [demo.answer_of(r) for r in rows]
    assert demo.score(rows, answers)["accuracy"] == 1.0
    assert demo.score(rows, [" " + a + "\n" for a in answers])["accuracy"] == 1.0        # stripped
    wrong = demo.score(rows, answers[:10] + [a + "x" for a in answers[10:]], n_examples=3)
    assert wrong["accuracy"] == 0.5 and wrong["n"] == 20 and len(wrong["examples"]) == 3
    assert set(wrong["by_kind"]) <= set(demo.TRANSFORMS)
    with pytest.raises(ValueError):
        demo.score(rows, answers[:-1])


class OracleSampler:
    """Stands in for sampler.Sampler: answers each rendered prompt correctly (or with a fixed wrong string)."""

    def __init__(self, tok, rows, wrong=None):
        self.by_prompt = {tuple(render_prompt(tok, r["messages"][:-1])): demo.answer_of(r) for r in rows}
        self.wrong, self.calls = wrong, []

    def generate(self, prompts, params, keys=None, progress=False):
        from spin_fast.sampler import Generation
        self.calls.append(params)
        return [Generation(index=i, key=i, token_ids=[], text=self.wrong or self.by_prompt[tuple(p)],
                           finish_reason="stop") for i, p in enumerate(prompts)]


def test_exact_match_oracle_and_untrained(folder, tok):
    rows = demo.make_rows(40, seed=5)
    oracle = OracleSampler(tok, rows)
    res = demo.exact_match(None, tok, rows, sampler=oracle)
    assert res["accuracy"] == 1.0 and res["n"] == 40
    params = oracle.calls[0]
    assert params.is_greedy and params.max_new_tokens >= max(len(demo.answer_of(r)) for r in rows) + 1
    assert demo.exact_match(None, tok, rows, sampler=OracleSampler(tok, rows, wrong="zz"))["accuracy"] == 0.0
    # the real sampler on the untrained model: runs end to end, gets (essentially) nothing right
    res = demo.exact_match(load_model(folder), tok, rows[:16], batch_size=8)
    assert res["n"] == 16 and res["accuracy"] <= 0.125
    assert all(isinstance(e["response"], str) for e in res["examples"])
    assert demo.exact_match(None, tok, [])["n"] == 0


# ---- the hmm task: exact p_data, its sampler, the distance estimators -------------------------------------------

import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

from spin_fast import hmm_task  # noqa: E402


def _tiny_hmm(seed=0):
    return hmm_task.make_hmm(seed, states=3, vocab=4, emit_support=2, trans_support=2, prompt_len=2, max_len=5)


def _all_answers(hmm):
    return ["".join(t) for n in range(1, hmm.max_answer_len + 1) for t in itertools.product(hmm.letters, repeat=n)]


def _valid_prompts(hmm):
    rng = np.random.default_rng(0)
    return sorted({hmm.sample(rng)[:hmm.prompt_len] for _ in range(200)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hmm_likelihood_sums_to_one(seed):
    hmm = _tiny_hmm(seed)
    ys = _all_answers(hmm)
    n_invalid = 0
    for x in _valid_prompts(hmm):
        p = [math.exp(hmm.logp(x, y)) for y in ys]
        assert math.isclose(sum(p), 1.0, rel_tol=0, abs_tol=1e-12), (x, sum(p))
        assert sum(v > 0 for v in p) >= 2                # many valid answers
        n_invalid += sum(v == 0 for v in p)
    assert n_invalid > 0                                 # sparse: some answers are invalid
    assert hmm.logp(x, "") == -math.inf and hmm.logp(x, "z") == -math.inf   # empty / out of alphabet: invalid


def test_hmm_sampler_matches_likelihood_chi_square():
    hmm = _tiny_hmm(1)
    x = _valid_prompts(hmm)[0]
    ys = _all_answers(hmm)
    p = np.array([math.exp(hmm.logp(x, y)) for y in ys])
    rng, n = np.random.default_rng(3), 6000
    counts = {}
    for _ in range(n):
        y = hmm.sample(rng, x)
        counts[y] = counts.get(y, 0) + 1
    assert all(p[ys.index(y)] > 0 for y in counts)               # never samples an invalid answer
    def chi2(q):      # Pearson's statistic against q: cells with expected count >= 5, the rest pooled
        big = q * n >= 5
        o = np.append(obs[big], obs[~big].sum())
        e = np.append(q[big] * n, q[~big].sum() * n)
        keep = e > 0
        return float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1
    obs = np.array([counts.get(y, 0) for y in ys], dtype=float)
    stat, dof = chi2(p)
    assert dof >= 5
    bound = dof + 5 * math.sqrt(2 * dof)                        # ~5 sigma above chi2(dof)'s mean
    assert stat < bound, (stat, dof)
    # meaningful: a mildly wrong distribution (10% of the mass spread uniformly on the valid answers) fails it
    u = (p > 0) / (p > 0).sum()
    assert chi2(0.9 * p + 0.1 * u)[0] > bound


def test_hmm_rows_deterministic_distinct_prompts():
    hmm = hmm_task.make_hmm(0)
    rows = hmm_task.make_rows(hmm, 200, seed=1)
    assert rows == hmm_task.make_rows(hmm_task.make_hmm(0), 200, seed=1)
    assert len({r["prompt"] for r in rows}) == 200
    for r in rows:
        assert len(r["prompt"]) == hmm.prompt_len and hmm.logp(r["prompt"], r["messages"][1]["content"]) > -math.inf


def test_distribution_metrics_known_answers():
    # p_theta = p_data: both KLs ~ 0 within their standard errors; validity 1
    hmm = _tiny_hmm(0)
    x = _valid_prompts(hmm)[0]
    rng = np.random.default_rng(0)
    ys = [hmm.sample(rng, x) for _ in range(4000)]
    lp = [hmm.logp(x, y) for y in ys]
    m = hmm_task.distribution_metrics(lp, lp, lp, lp)
    assert m["forward_kl"] == 0 and m["reverse_kl_valid"] == 0 and m["validity"] == 1
    # p_theta = uniform over the valid answers of x (a known KL); half its samples replaced by invalid ones
    valid = [y for y in _all_answers(hmm) if hmm.logp(x, y) > -math.inf]
    logq = -math.log(len(valid))
    p = np.array([math.exp(hmm.logp(x, y)) for y in valid])
    exact_fwd = float((p * (np.log(p) - logq)).sum())              # KL(p_data || uniform)
    exact_rev = float((np.log(1 / len(valid)) - np.log(p)).mean())  # KL(uniform || p_data)
    model_ys = [valid[i] for i in rng.integers(len(valid), size=4000)]
    d_on_t = [hmm.logp(x, y) for y in model_ys] + [-math.inf] * 4000
    t_on_t = [logq + math.log(0.5)] * 4000 + [math.log(0.5 / 7)] * 4000   # theta: half its mass invalid
    m = hmm_task.distribution_metrics(lp, [logq] * len(lp), d_on_t, t_on_t)
    assert abs(m["forward_kl"] - exact_fwd) < 4 * m["forward_kl_se"]
    assert abs(m["validity"] - 0.5) < 1e-12
    assert abs(m["reverse_kl_valid"] - exact_rev) < 4 * m["reverse_kl_valid_se"]   # renormalised on the valid set
    assert abs(m["coverage"] - logq) < 1e-12


def test_response_logps_match_hf(folder, tok):
    # our summed response log-prob equals the HF model's on the same rendered ids
    from transformers import AutoModelForCausalLM
    model = load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts, resps = ["abcde", "ab"], ["fgh", "a"]
    ours = hmm_task.response_logps(model, tok, prompts, resps)
    for p, r, v in zip(prompts, resps, ours):
        ids, pl = render_prompt_response(tok, [{"role": "user", "content": p}], r)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        want = float(sum(lp[i - 1, ids[i]] for i in range(pl, len(ids))))
        assert abs(v - want) < 1e-4, (v, want)
