"""data.load_pairs: three schemas -> the same tokens, file:row errors per bad-row kind, skipping, truncation."""
import json
import sys

import numpy as np
import pytest

from spin_fast.chat import render_prompt_response
from spin_fast.data import load_pairs
from spin_fast.packing import collate

from helpers import PLAIN_TEMPLATE, ByteTokenizer

TOK = ByteTokenizer()
SYSTEM = {"role": "system", "content": "Be brief."}
CONV = [SYSTEM, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
REJECTED = "Probably 5."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_spin_row(i=0):
    prompt = [{"role": "user", "content": f"Question {i}?"}]
    return {"real": prompt + [{"role": "assistant", "content": f"Answer {i}."}],
            "generated": prompt + [{"role": "assistant", "content": f"Guess {i}."}]}


def arrays(ps):
    return ps.tokens.tolist(), ps.seq_offsets.tolist(), ps.prompt_lens.tolist(), ps.fingerprint


def test_three_schemas_give_the_same_tokens(tmp_path):
    prompt = CONV[:-1]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt_id": "p0", "messages": CONV}])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt_id": "p0", "messages": prompt + [
        {"role": "assistant", "content": REJECTED}], "response": REJECTED}])
    spin = write_jsonl(tmp_path / "spin.jsonl", [{"real": CONV, "generated": prompt + [
        {"role": "assistant", "content": REJECTED}]}])
    pcr_lists = write_jsonl(tmp_path / "pcr.jsonl", [{"prompt": prompt, "chosen": [CONV[-1]],
                                                      "rejected": [{"role": "assistant", "content": REJECTED}]}])
    pcr_strings = write_jsonl(tmp_path / "pcr_s.jsonl", [{"prompt": prompt, "chosen": "It is 4.",
                                                          "rejected": REJECTED}])
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": CONV, "rejected": prompt + [
        {"role": "assistant", "content": REJECTED}]}])
    got = [arrays(load_pairs(sft, TOK, generated=gen)[0])]
    for f in (spin, pcr_lists, pcr_strings, implicit):
        got.append(arrays(load_pairs(f, TOK)[0]))
    assert all(g == got[0] for g in got[1:])
    # and they are chat.render_prompt_response's tokens, chosen then rejected
    ids_c, plen = render_prompt_response(TOK, prompt, "It is 4.", PLAIN_TEMPLATE)
    ids_r, _ = render_prompt_response(TOK, prompt, REJECTED, PLAIN_TEMPLATE)
    tokens, offsets, plens, _ = got[0]
    assert tokens == ids_c + ids_r and offsets == [0, len(ids_c), len(ids_c) + len(ids_r)] and plens == [plen, plen]


def test_json_and_parquet_match_jsonl(tmp_path):
    rows = [good_spin_row(i) for i in range(3)]
    a = load_pairs(write_jsonl(tmp_path / "a.jsonl", rows), TOK)[0]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    b = load_pairs(tmp_path / "b.json", TOK)[0]
    assert arrays(a) == arrays(b)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    c = load_pairs(tmp_path / "c.parquet", TOK)[0]
    assert arrays(a) == arrays(c)
    assert c.locs == [f"{tmp_path / 'c.parquet'}:{i}" for i in range(1, 4)]          # 1-based rows


U, A = "user", "assistant"
BAD_ROWS = {
    "missing keys": ({"text": "hello"}, "row needs"),
    "SPIN missing generated": ({"real": good_spin_row()["real"]}, "missing 'generated'"),
    "preference missing rejected": ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    "empty content": ({"real": [{"role": U, "content": "q"}, {"role": A, "content": "  "}],
                       "generated": [{"role": U, "content": "q"}, {"role": A, "content": "x"}]}, "empty content"),
    "empty prompt string": ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    "roles out of order": ({"real": [{"role": A, "content": "a"}, {"role": U, "content": "q"},
                                     {"role": A, "content": "a"}],
                            "generated": [{"role": U, "content": "q"}, {"role": A, "content": "x"}]},
                           "where 'user' was expected"),
    "ends on user": ({"real": [{"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": U, "content": "q2"}],
                      "generated": [{"role": U, "content": "q"}, {"role": A, "content": "x"}]},
                     "must end with an assistant turn"),
    "unknown role": ({"prompt": [{"role": "tool", "content": "q"}], "chosen": "a", "rejected": "b"}, "role 'tool'"),
    "non-string content": ({"prompt": "q", "chosen": [{"role": A, "content": 7}], "rejected": "b"},
                           "content must be a string"),
    "prompts differ": ({"real": [{"role": U, "content": "q"}, {"role": A, "content": "a"}],
                        "generated": [{"role": U, "content": "other"}, {"role": A, "content": "x"}]},
                       "different prompt turns"),
    "not an object": (["q", "a"], "must be an object"),
    "messages without generated": ({"messages": CONV}, "pass generated="),
    "cannot fit": ({"prompt": "q" * 200, "chosen": "a", "rejected": "b"}, "cannot fit"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_names_file_and_row(tmp_path, kind):
    row, needle = BAD_ROWS[kind]
    f = write_jsonl(tmp_path / "d.jsonl", [good_spin_row(), row])
    with pytest.raises(ValueError) as e:
        load_pairs(f, TOK, max_length=64, max_prompt_length=64)
    assert f"{f}:2:" in str(e.value) and needle in str(e.value), str(e.value)


def test_skip_bad_rows_counts_and_names(tmp_path):
    rows = [good_spin_row(0), BAD_ROWS["empty content"][0], good_spin_row(1), BAD_ROWS["missing keys"][0],
            good_spin_row(2)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    ps, bad = load_pairs(f, TOK, skip_bad_rows=True)
    assert ps.num_pairs == 3 and ps.locs == [f"{f}:1", f"{f}:3", f"{f}:5"]
    assert len(bad) == 2 and bad[0].startswith(f"{f}:2:") and bad[1].startswith(f"{f}:4:")
    # the kept pairs are exactly the good rows alone
    alone = load_pairs(write_jsonl(tmp_path / "g.jsonl", [good_spin_row(i) for i in range(3)]), TOK)[0]
    assert arrays(ps)[:3] == arrays(alone)[:3]
    with pytest.raises(ValueError, match="no usable pairs"):
        load_pairs(write_jsonl(tmp_path / "x.jsonl", rows[1:2]), TOK, skip_bad_rows=True)


def test_generated_join_checks_prompt(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt_id": "p0", "messages": CONV}])
    other = [{"role": "user", "content": "Something else"}]
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt_id": "p0", "messages": other + [
        {"role": "assistant", "content": REJECTED}], "response": REJECTED}])
    with pytest.raises(ValueError, match=f"{sft}:1: no generated response"):
        load_pairs(sft, TOK, generated=gen)


def test_truncation_keeps_prompt_end_and_response_start(tmp_path):
    prompt = [{"role": "user", "content": "word " * 40 + "THE QUESTION?"}]
    chosen, rejected = "A long answer " * 10, "short"
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    ps = load_pairs(f, TOK, max_length=60, max_prompt_length=24)[0]
    full_c, plen = render_prompt_response(TOK, prompt, chosen, PLAIN_TEMPLATE)
    full_r, _ = render_prompt_response(TOK, prompt, rejected, PLAIN_TEMPLATE)
    c = ps.tokens[ps.seq_offsets[0]:ps.seq_offsets[1]].tolist()
    r = ps.tokens[ps.seq_offsets[1]:ps.seq_offsets[2]].tolist()
    assert ps.prompt_lens.tolist() == [24, 24]
    assert c[:24] == full_c[plen - 24:plen] and bytes(c[:24]).decode().endswith("QUESTION?\nassistant: ")
    assert len(c) == 60 and c[24:] == full_c[plen:plen + 36]              # response cut to max_length
    assert r == full_r[plen - 24:]                                         # short response untouched
    assert ps.truncated_prompts == 1 and ps.truncated_responses == 1
    # the fingerprint covers the truncation settings even when the tokens are unchanged
    loose = load_pairs(f, TOK, max_length=1000, max_prompt_length=900)[0]
    looser = load_pairs(f, TOK, max_length=1001, max_prompt_length=900)[0]
    assert loose.tokens.tolist() == looser.tokens.tolist() and loose.fingerprint != looser.fingerprint
    batch = collate([0], ps.tokens, ps.seq_offsets, ps.prompt_lens)       # packing accepts the storage
    assert batch["cu_seqlens"].tolist() == [0, 60, len(c) + len(r)]


def test_datasets_folder_needs_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)                      # import datasets -> ImportError
    folder = tmp_path / "ds"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"ds: .*needs the `datasets` package"):
        load_pairs(folder, TOK)


def test_datasets_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [good_spin_row(i) for i in range(2)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    a = load_pairs(tmp_path / "ds", TOK)[0]
    assert arrays(a) == arrays(load_pairs(write_jsonl(tmp_path / "a.jsonl", rows), TOK)[0])


def test_stories_ultrachat_rows(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(shared_data / "models" / "stories260K")
    src = shared_data / "sft" / "sft_ultrachat_schema-00000.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:20]]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    gen = write_jsonl(tmp_path / "gen.jsonl", [
        {"prompt_id": r["prompt_id"], "messages": r["messages"][:-1] + [{"role": "assistant", "content": "Once."}],
         "response": "Once."} for r in rows])
    ps, bad = load_pairs(sft, tok, generated=gen, chat_template=PLAIN_TEMPLATE, max_length=256,
                         max_prompt_length=128, skip_bad_rows=True)
    assert ps.num_pairs + len(bad) == 20 and ps.num_pairs >= 15
    assert (np.diff(ps.seq_offsets) <= 256).all() and (ps.prompt_lens <= 128).all()
    assert (np.diff(ps.seq_offsets) > ps.prompt_lens).all()               # every sequence keeps a response


def test_template_error_names_row_and_missing_template_is_not_a_row_error(tmp_path):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
              "{% endif %}{{ m['content'] }}\n{% endfor %}")
    f = write_jsonl(tmp_path / "d.jsonl", [good_spin_row(), {"real": CONV, "generated": CONV}])

    class Strict(ByteTokenizer):
        def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=False):
            import jinja2

            def raise_exception(msg):
                raise jinja2.TemplateError(msg)
            env = jinja2.Environment()
            env.globals["raise_exception"] = raise_exception
            return env.from_string(chat_template).render(messages=messages)

    with pytest.raises(ValueError, match=f"{f}:2: chat template failed.*no system turns"):
        load_pairs(f, Strict(), chat_template=strict)
    ps, bad = load_pairs(f, Strict(), chat_template=strict, skip_bad_rows=True)
    assert ps.num_pairs == 1 and len(bad) == 1

    class Bare(ByteTokenizer):
        chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):             # raised even with skip_bad_rows
        load_pairs(f, Bare(), skip_bad_rows=True)
