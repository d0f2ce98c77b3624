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
