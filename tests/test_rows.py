"""rows.py, the one row validator: generation, the SFT phase, --pairs and the loop's split accept and reject the same
rows with the same message (generation alone also takes prompt-only rows); errors name the user's file:row, also
after the loop's split; decoding errors are row errors; skipped rows are counted per kind; empty files named."""
import json

import pytest

from spin_fast.config import Config
from spin_fast.data import load_pairs
from spin_fast.errors import InputError
from spin_fast.loop import split_sft
from spin_fast.rows import load_prompts, read_rows
from spin_fast.runtime import Runtime
from spin_fast.sft import load_sft_sequences

from helpers import ByteTokenizer

TOK = ByteTokenizer()
U, A, S = "user", "assistant", "system"
RT = Runtime(rank=0, world=1, local_rank=0, device=None, distributed=False)


def m(role, content):
    return {"role": role, "content": content}


GOOD = {"prompt_id": "g", "messages": [m(U, "Question?"), m(A, "Answer.")]}
# row -> (expected message fragment for the readers that reject it, does generation accept it?)
CASES = {
    "assistant first": ({"messages": [m(A, "hi"), m(U, "q"), m(A, "a")]}, "messages[0] has role 'assistant' where "
                                                                          "'user' was expected", False),
    "two user turns": ({"messages": [m(U, "q"), m(U, "q2"), m(A, "a")]}, "messages[1] has role 'user' where "
                                                                        "'assistant' was expected", False),
    "empty assistant content": ({"messages": [m(U, "q"), m(A, "  ")]}, "messages[1] (assistant) has empty content",
                                False),
    "empty user content": ({"messages": [m(U, ""), m(A, "a")]}, "messages[0] (user) has empty content", False),
    "system only": ({"messages": [m(S, "be nice")]}, "only a system turn", False),
    "unknown role": ({"messages": [m("tool", "q"), m(A, "a")]}, "role 'tool'", False),
    "content not a string": ({"messages": [m(U, "q"), m(A, 3)]}, "content must be a string", False),
    "missing content": ({"messages": [{"role": U}, m(A, "a")]}, "messages[0] has no 'content'", False),
    "messages not a list": ({"messages": "q"}, "'messages' must be a non-empty list", False),
    "empty messages": ({"messages": []}, "'messages' must be a non-empty list", False),
    "not an object": (["q", "a"], "row must be an object", False),
    "bad prompt_id": ({"prompt_id": {"x": 1}, "messages": [m(U, "q"), m(A, "a")]}, "'prompt_id' must be a string",
                      False),
    "lone surrogate": ({"messages": [m(U, "q\ud800"), m(A, "a")]}, "messages[0].content: lone surrogate U+D800",
                       False),
    # generation needs only a prompt: these are prompts without an answer, which the trainer cannot use
    "ends on a user turn": ({"messages": [m(U, "q"), m(A, "a"), m(U, "q2")]},
                            "field 'messages' must end with an assistant turn", True),
    "prompt-only row": ({"prompt": "Tell me a story."}, "row needs a 'messages' list ending on the assistant answer",
                        True),
}
# --pairs also reads two more schemas, so for a row of none of them its message lists all three
PAIRS_MESSAGE = {"prompt-only row": "row needs 'messages', 'real' + 'generated', or 'prompt' + 'chosen' + 'rejected'"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generated_for(path, rows):
    """spin_fast.generate-style output for the trainable rows."""
    out = []
    for r in rows:
        msgs = r["messages"][:-1] + [m(A, "Guess.")]
        out.append({"prompt_id": r["prompt_id"], "messages": msgs, "response": "Guess."})
    return write_jsonl(path, out)


def loop_cfg(sft, out, **kw):
    cfg = Config()
    cfg.data.sft, cfg.output = [str(sft)], str(out)
    cfg.loop.heldout = kw.pop("heldout", 0)
    cfg.data.skip_bad_rows = kw.pop("skip", False)
    return cfg


def verdicts(tmp_path, row):
    """{reader: None (accepted) | error message} for a file [GOOD, row]."""
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    gen = generated_for(tmp_path / "gen.jsonl", [GOOD])
    readers = {
        "generate": lambda: load_prompts(f),
        "sft": lambda: load_sft_sequences(f, TOK, max_length=256, max_prompt_length=128),
        "pairs": lambda: load_pairs(f, TOK, generated=gen),
        "loop split": lambda: split_sft(loop_cfg(f, tmp_path / "out"), tmp_path / "out", RT),
    }
    out = {}
    for name, read in readers.items():
        try:
            read()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return f, out


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_gives_the_same_verdict_and_message(tmp_path, case):
    row, fragment, generation_accepts = CASES[case]
    f, got = verdicts(tmp_path, row)
    trainers = {k: v for k, v in got.items() if k != "generate"}
    assert all(v is not None for v in trainers.values()), got                        # the trainers reject it ...
    if case in PAIRS_MESSAGE:
        assert trainers.pop("pairs").startswith(f"{f}:2: {PAIRS_MESSAGE[case]}")
    assert len(set(trainers.values())) == 1, got                                     # ... with one message
    msg = trainers["sft"]
    assert msg.startswith(f"{f}:2: ") and fragment in msg, msg
    if generation_accepts:
        assert got["generate"] is None
    else:
        assert got["generate"] == msg                                                  # and so does generation


def test_accepted_rows_give_the_same_prompt_to_generation_and_training(tmp_path):
    rows = [GOOD, {"prompt_id": 7, "messages": [m(S, "sys"), m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d")]},
            {"messages": [m(U, "no id"), m(A, "x")]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    prompts, bad = load_prompts(f)
    assert not bad and [p.loc for p in prompts] == [f"{f}:{i}" for i in (1, 2, 3)]
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt_id": p.prompt_id, "messages": p.messages + [m(A, "G")],
                                                "response": "G"} for p in prompts])
    pairs, bad = load_pairs(f, TOK, generated=gen)                                   # every join matches
    assert pairs.num_pairs == 3 and not bad and pairs.prompt_ids == [p.prompt_id for p in prompts]
    assert prompts[1].messages == rows[1]["messages"][:-1] and prompts[1].prompt_id == "7"


def test_split_keeps_the_users_file_and_row(tmp_path):
    """After the loop's split into OUTPUT/data/train.jsonl, generation and pair building still name the user's
    file:row (the row's origin travels with it)."""
    rows = [{"prompt_id": f"p{i}", "messages": [m(U, f"q{i}"), m(A, f"a{i}")]} for i in range(6)]
    rows[4]["messages"][0]["content"] = "BOOM"
    user = write_jsonl(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "out"
    train, held, bad = split_sft(loop_cfg(user, out, heldout=2), out, RT)
    assert held is not None and not bad
    prompts, _ = load_prompts(train)
    assert sorted(p.loc for p in prompts) == sorted(f"{user}:{i}" for i in range(1, 7)
                                                    if f"{user}:{i}" not in {q.loc for q in load_prompts(held)[0]})
    assert all(p.loc.startswith(f"{user}:") for p in prompts)
    assert '"_spin_fast_origin": "' in train.read_text()                          # the derived file carries it
    assert all("_spin_fast_origin" not in r for _, r in read_rows(train))           # and reading strips it
    strict = ("{% for m in messages %}{% if m['content'] == 'BOOM' %}{{ raise_exception('no booms') }}{% endif %}"
              "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    in_train = any(p.loc == f"{user}:5" for p in prompts)
    target = train if in_train else held
    gen = generated_for(tmp_path / "gen.jsonl", [json.loads(line) for line in target.read_text().splitlines()])
    with pytest.raises(InputError, match=f"^{user}:5: chat template failed"):
        load_pairs(target, TOK, generated=gen, chat_template=strict)
    with pytest.raises(InputError, match=f"^{user}:5: chat template failed"):
        load_sft_sequences(target, TOK, chat_template=strict, max_length=64, max_prompt_length=32)


def test_split_checks_that_the_template_renders_every_row(tmp_path):
    """With the tokenizer (as train.main calls it, before the run's manifest) the split also renders each row:
    a template failure stops the run at the user's row before any phase ran, or is skipped and counted."""
    rows = [{"prompt_id": f"p{i}", "messages": [m(U, "BOOM" if i == 2 else f"q{i}"), m(A, "a")]} for i in range(4)]
    user = write_jsonl(tmp_path / "mine.jsonl", rows)
    cfg = loop_cfg(user, tmp_path / "out")
    cfg.data.chat_template = ("{% for m in messages %}{% if m['content'] == 'BOOM' %}{{ raise_exception('no booms') }}"
                              "{% endif %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(InputError, match=f"^{user}:3: chat template failed.*no booms"):
        split_sft(cfg, tmp_path / "out", RT, TOK)
    assert not (tmp_path / "out").exists()
    cfg.data.skip_bad_rows = True
    train, _, bad = split_sft(cfg, tmp_path / "out", RT, TOK)
    assert bad.summary() == {"bad_rows": 1, "bad_rows_by_kind": {"template": 1}}
    assert len(train.read_text().splitlines()) == 3


def test_decoding_errors_are_row_errors_named_and_skippable(tmp_path):
    good = json.dumps(GOOD).encode()
    f = tmp_path / "d.jsonl"
    lone = json.dumps({"messages": [m(U, "q"), m(A, "x")]}).replace('"x"', '"\\udc80"').encode()
    f.write_bytes(good + b"\n" + good.replace(b"Question", b"Qu\xe9stion") + b"\n\n" + lone + b"\n" + good + b"\n")
    with pytest.raises(InputError, match=rf"^{f}:2: invalid UTF-8 \(byte 0xe9"):
        load_prompts(f)
    for read in (lambda: load_prompts(f, skip_bad_rows=True)[1],
                 lambda: load_sft_sequences(f, TOK, max_length=64, max_prompt_length=32, skip_bad_rows=True)[1],
                 lambda: split_sft(loop_cfg(f, tmp_path / "o", skip=True), tmp_path / "o", RT)[2]):
        bad = read()
        assert bad.summary() == {"bad_rows": 2, "bad_rows_by_kind": {"encoding": 2}}
        assert bad[0].startswith(f"{f}:2: ") and bad[1].startswith(f"{f}:4: messages[1].content: lone surrogate")
    # a .json list: the invalid byte is located at its row (read with surrogateescape)
    j = tmp_path / "d.json"
    j.write_bytes(b"[" + good + b",\n" + good.replace(b"Answer", b"Answ\xff") + b"]")
    with pytest.raises(InputError, match=rf"^{j}:2: messages\[1\].content: invalid UTF-8 byte 0xff"):
        load_prompts(j)
    assert len(load_prompts(j, skip_bad_rows=True)[0]) == 1


@pytest.mark.parametrize("text", ["", "\n\n", "   \n\t\n"])
def test_empty_file_is_an_error_naming_it(tmp_path, text):
    f = tmp_path / "empty.jsonl"
    f.write_text(text)
    for read in (lambda: load_prompts(f, skip_bad_rows=True),
                 lambda: load_pairs(f, TOK, skip_bad_rows=True),
                 lambda: load_sft_sequences(f, TOK, max_length=64, max_prompt_length=32),
                 lambda: split_sft(loop_cfg(f, tmp_path / "o"), tmp_path / "o", RT)):
        with pytest.raises(InputError, match=f"^{f}: holds no rows"):
            read()


def test_skip_counts_every_kind_and_adds_up(tmp_path):
    rows = [GOOD, CASES["assistant first"][0], GOOD, CASES["empty assistant content"][0], CASES["not an object"][0],
            CASES["prompt-only row"][0], GOOD]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    out = tmp_path / "o"
    train, _, bad = split_sft(loop_cfg(f, out, skip=True), out, RT)
    assert bad.summary() == {"bad_rows": 5, "bad_rows_by_kind": {"empty_text": 1, "invalid_json": 1,
                                                                 "missing_field": 1, "not_an_object": 1,
                                                                 "role_order": 1}}
    assert len(train.read_text().splitlines()) == 3
    split = json.loads((out / "data" / "split.json").read_text())
    assert split["rows"] == 8 and split["train"] == 3 and split["bad_rows"] == 5
    # on resume the split's counts come back from split.json
    _, _, again = split_sft(loop_cfg(f, out, skip=True), out, RT)
    assert again.summary() == bad.summary()
    prompts, gbad = load_prompts(f, skip_bad_rows=True)             # generation: the prompt-only row is usable
    assert len(prompts) + gbad.count == 8 and len(prompts) == 4


def test_heldout_must_leave_training_rows(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 5)
    with pytest.raises(InputError, match=r"config loop.heldout: 5 held-out rows leave none of the 5 usable rows"):
        split_sft(loop_cfg(f, tmp_path / "o", heldout=5), tmp_path / "o", RT)
    assert not (tmp_path / "o").exists()                                       # nothing written
    train, held, _ = split_sft(loop_cfg(f, tmp_path / "o", heldout=4), tmp_path / "o", RT)
    assert len(train.read_text().splitlines()) == 1 and len(held.read_text().splitlines()) == 4
