"""Fuzzing the row readers (generation, SFT, --pairs, the loop's split): a corpus of crafted bad files
(tests/data/bad_rows/, expected.json is the oracle) and random rows from hypothesis. Every outcome is one of: the
row used, an InputError naming FILE:ROW (or FILE, for a file that is wrong as a whole), or with skip_bad_rows a
skipped row counted under its kind. Never another exception, never a silent wrong result: used + skipped == rows
and the rows used are exactly the good ones."""
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spin_fast.config import Config
from spin_fast.data import load_pairs
from spin_fast.errors import InputError
from spin_fast.loop import split_sft
from spin_fast.rows import BadRow, load_prompts, read_rows
from spin_fast.runtime import Runtime
from spin_fast.sft import load_sft_sequences

from helpers import ByteTokenizer

CORPUS = Path(__file__).parent / "data" / "bad_rows"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
TOK = ByteTokenizer()
RT = Runtime(rank=0, world=1, local_rank=0, device=None, distributed=False)
LENGTHS = dict(max_length=1 << 14, max_prompt_length=1 << 13)


def generated_file(data: Path, folder: Path) -> Path:
    """spin_fast.generate-style output for every prompt generation can read from `data` (so --pairs finds the
    rejected response of every row the trainer accepts)."""
    try:
        prompts, _ = load_prompts(data, skip_bad_rows=True)
    except InputError:
        prompts = []
    out = folder / "generated.jsonl"
    rows = [(p.prompt_id, p.messages) for p in prompts] + [("unrelated", [{"role": "user", "content": "?"}])]
    out.write_text("".join(json.dumps({"prompt_id": pid, "messages": msgs + [{"role": "assistant", "content": "G"}],
                                       "response": "G"}) + "\n" for pid, msgs in rows))
    return out


def read_with(reader: str, data: Path, folder: Path, skip: bool) -> tuple[list[str], list[str], Counter]:
    """(locations of the rows used, messages of the skipped rows, skipped per kind) of one reader."""
    if reader == "generate":
        rows, bad = load_prompts(data, skip_bad_rows=skip)
        return [r.loc for r in rows], list(bad), bad.by_kind
    if reader == "sft":
        seqs, bad = load_sft_sequences(data, TOK, skip_bad_rows=skip, **LENGTHS)
        return seqs.locs, list(bad), bad.by_kind
    if reader == "pairs":
        pairs, bad = load_pairs(data, TOK, generated=generated_file(data, folder), skip_bad_rows=skip, **LENGTHS)
        return pairs.locs, list(bad), bad.by_kind
    cfg = Config()
    cfg.data.sft, cfg.data.skip_bad_rows, cfg.loop.heldout = [str(data)], skip, 0
    out = Path(tempfile.mkdtemp(dir=folder))
    train, _, bad = split_sft(cfg, out, RT)
    return [loc for loc, _ in read_rows(train)], list(bad), bad.by_kind


READERS = ("generate", "sft", "pairs", "loop split")
TRAINERS = READERS[1:]


def row_of(message: str, path: Path) -> int:
    assert message.startswith(f"{path}:"), message
    return int(message[len(f"{path}:"):].split(":", 1)[0])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus(name, tmp_path):
    path, want = CORPUS / name, EXPECTED[name]
    for reader in READERS:
        if "file_error" in want:                  # the file as a whole: named, with or without skipping
            for skip in (False, True):
                with pytest.raises(InputError) as e:
                    read_with(reader, path, tmp_path, skip)
                assert str(e.value).startswith(f"{path}") and want["file_error"] in str(e.value), (reader, e.value)
            continue
        bad = {int(r): kind for r, kind in want["bad"].items()}
        if reader == "generate" and want["generation_accepts"]:
            bad = {}                              # prompt-only rows: generation needs nothing else
        used, skipped, kinds = read_with(reader, path, tmp_path, skip=True)
        assert len(used) + len(skipped) == want["rows"], (reader, used, skipped)
        assert sorted(row_of(m, path) for m in skipped) == sorted(bad), (reader, skipped)
        assert all(row_of(loc, path) not in bad for loc in used)
        if reader != "generate":                  # generation's kind may differ where its rule differs
            assert kinds == Counter(bad.values()), (reader, kinds)
        if bad:
            with pytest.raises(BadRow) as e:
                read_with(reader, path, tmp_path, skip=False)
            assert str(e.value).startswith(f"{path}:{min(bad)}: "), (reader, e.value)
        else:
            assert read_with(reader, path, tmp_path, skip=False)[0] == used


# --- random rows ------------------------------------------------------------------------------------------------------

GOOD = {"prompt_id": "good", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\n", "ok", "\ud800", "x\udcff", "é"]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), text)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "User", ""]), scalar)
message = st.one_of(st.fixed_dictionaries({"role": role, "content": st.one_of(text, scalar, st.lists(text,
                                                                                                     max_size=2))}),
                    st.fixed_dictionaries({"role": role}), scalar)


@st.composite
def near_valid(draw):
    """A valid conversation (optional system turn, user/assistant pairs), then at most one mutation."""
    words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
    conv = [{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        conv += [{"role": "user", "content": draw(words)}, {"role": "assistant", "content": draw(words)}]
    j = draw(st.integers(0, len(conv) - 1))
    mutation = draw(st.sampled_from(["none", "none", "drop last", "drop one", "swap", "content", "role", "repeat"]))
    if mutation == "drop last":
        conv = conv[:-1]
    elif mutation == "drop one":
        conv = conv[:j] + conv[j + 1:]
    elif mutation == "swap" and j + 1 < len(conv):
        conv[j], conv[j + 1] = conv[j + 1], conv[j]
    elif mutation == "content":
        conv[j] = {**conv[j], "content": draw(st.one_of(text, scalar))}
    elif mutation == "role":
        conv[j] = {**conv[j], "role": draw(role)}
    elif mutation == "repeat":
        conv.insert(j, dict(conv[j]))
    return conv


conversation = st.one_of(near_valid(), near_valid(), near_valid(), st.lists(message, max_size=4), scalar)
with_messages = st.fixed_dictionaries(
    {"messages": conversation},
    optional={"prompt_id": st.one_of(text, text, st.integers(), scalar, st.dictionaries(text, text)),
              "prompt": st.one_of(text, scalar)})
others = st.one_of(st.fixed_dictionaries({}, optional={"prompt": st.one_of(text, scalar), "text": text}),
                   scalar, st.lists(scalar, max_size=2))
row = st.integers(0, 9).flatmap(lambda k: with_messages if k < 7 else others)     # mostly conversations
line = st.one_of(row.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
                 row.map(lambda r: json.dumps(r).encode()),                    # surrogates as \ud800 escapes
                 st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b" ") + b"}"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=line)
def test_random_rows(line):
    folder = Path(tempfile.mkdtemp())
    try:
        data = folder / "d.jsonl"
        good = json.dumps(GOOD).encode()
        data.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
        verdicts = {}
        for reader in READERS:
            used, skipped, kinds = read_with(reader, data, folder, skip=True)
            assert len(used) + len(skipped) == 3 and sum(kinds.values()) == len(skipped), reader
            assert {row_of(loc, data) for loc in used} >= {1, 3}                 # the good rows always kept
            try:
                read_with(reader, data, folder, skip=False)
                verdicts[reader] = None
                assert not skipped
            except BadRow as e:
                assert str(e).startswith(f"{data}:2: ") and skipped == [str(e)], (reader, e)
                verdicts[reader] = str(e)
        # one rule: the trainers agree (--pairs names its other schemas when a row has no `messages`) ...
        parsed = json.loads(line.decode("utf-8")) if _decodes(line) else None
        has_messages = isinstance(parsed, dict) and parsed.get("messages") is not None
        trainers = {r: verdicts[r] for r in TRAINERS if has_messages or r != "pairs"}
        assert len(set(trainers.values())) == 1, verdicts
        # ... and generation accepts all they accept, rejecting with their message where the rules coincide
        if verdicts["sft"] is None:
            assert verdicts["generate"] is None
        if verdicts["generate"] is not None and (has_messages or not isinstance(parsed, dict)):
            assert verdicts["generate"] == verdicts["sft"], verdicts
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _decodes(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
        return True
    except ValueError:
        return False
