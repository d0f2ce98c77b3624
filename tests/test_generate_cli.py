"""`python -m spin_fast.generate` end to end on stories260K: output schema and order, resume, bad input."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from spin_fast.generate import main  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(), reason="shared stories260K absent")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}"
            "Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
ROWS = [
    {"prompt": "Tell me a story about a cat.", "prompt_id": "a",
     "messages": [{"role": "user", "content": "Tell me a story about a cat."},
                  {"role": "assistant", "content": "Once upon a time"}]},
    {"prompt": "A dog", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                     {"role": "user", "content": "A dog"}]},
    {"prompt": "Lily went to the park."},
    {"prompt": "The sun was hot", "prompt_id": "d"},
    {"prompt": "Ben had a red ball.", "prompt_id": "e"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(data, out, *extra):
    return main(["--model", str(STORIES), "--data", str(data), "--output", str(out), "--max-new-tokens", "12",
                 "--batch-size", "2", "--chat-template", TEMPLATE, "--no-progress", *extra])


def read(out):
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def test_output_rows_schema_and_order(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    summary = run(data, tmp_path / "o.jsonl", "--greedy")
    rows = read(tmp_path / "o.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and summary["generated"] == 5
    assert [r["prompt_id"] for r in rows][0] == "a" and rows[3]["prompt_id"] == "d"
    assert len(rows[2]["prompt_id"]) == 64                                 # sha256 of the prompt when absent
    for src, r in zip(ROWS, rows):
        assert set(r) >= {"prompt_id", "prompt", "messages", "response", "finish_reason", "num_tokens"}
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
        assert r["messages"][-2]["role"] == "user" and r["finish_reason"] in ("stop", "length")
        assert 1 <= r["num_tokens"] <= 12
    # the prompt is the conversation up to the last user turn (the trailing assistant turn dropped)
    assert rows[0]["messages"][:-1] == ROWS[0]["messages"][:1]
    assert [m["content"] for m in rows[1]["messages"][:-1]] == ["Hi", "Hello", "A dog"]


def test_resume_appends_only_missing_and_matches_full_run(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    full = tmp_path / "full.jsonl"
    run(data, full, "--temperature", "1.0", "--seed", "3")
    part = tmp_path / "part.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    part.write_text(lines[0] + lines[1] + lines[2][:25])                   # 2 rows + a torn third line
    summary = run(data, part, "--temperature", "1.0", "--seed", "3")
    assert summary["already_done"] == 2 and summary["generated"] == 3
    assert read(part) == read(full)                                        # same samples: seeds keyed by row
    again = run(data, part, "--temperature", "1.0", "--seed", "3")
    assert again["generated"] == 0 and len(read(part)) == 5


def test_resume_refuses_output_of_other_data(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    run(data, tmp_path / "o.jsonl", "--greedy")
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x", "prompt_id": "zzz"}] + ROWS[1:])
    with pytest.raises(ValueError, match="different data"):
        run(other, tmp_path / "o.jsonl", "--greedy")


@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "   "}, "'prompt' is empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "where 'user' was expected"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] has no 'content'"),
    ({"text": "no prompt"}, "needs a 'messages' list or a 'prompt' string"),
])
def test_bad_row_named_or_skipped(tmp_path, bad, needle):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [bad] + ROWS[2:3])
    with pytest.raises(ValueError, match=f"d.jsonl:3: .*{needle}"):
        run(data, tmp_path / "o.jsonl", "--greedy")
    summary = run(data, tmp_path / "o2.jsonl", "--greedy", "--skip-bad-rows")
    assert summary["bad_rows"] == 1 and summary["generated"] == 3
    assert [r["index"] for r in read(tmp_path / "o2.jsonl")] == [0, 1, 3]


def test_invalid_json_line_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="d.jsonl:2: invalid JSON"):
        run(p, tmp_path / "o.jsonl", "--greedy")


def test_json_list_input(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS[:3]))
    assert run(p, tmp_path / "o.jsonl", "--greedy")["generated"] == 3


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "messages": r.get("messages")} for r in ROWS[:3]]), p)
    summary = run(p, tmp_path / "o.jsonl", "--greedy")
    assert summary["generated"] == 3 and read(tmp_path / "o.jsonl")[1]["messages"][2]["content"] == "A dog"


def test_long_prompt_truncated_or_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    with pytest.raises(ValueError, match=r"d.jsonl:1: prompt has \d+ tokens > limit 6"):
        run(data, tmp_path / "o.jsonl", "--greedy", "--max-prompt-length", "6", "--truncation", "error")
    summary = run(data, tmp_path / "o.jsonl", "--greedy", "--max-prompt-length", "6")
    assert summary["truncated_prompts"] == 3 and summary["generated"] == 3


def test_template_error_names_row(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1] + [{"prompt": "boom"}])
    strict = "{% if messages[0]['content'] == 'boom' %}{{ raise_exception('no booms') }}{% endif %}" + TEMPLATE
    with pytest.raises(ValueError, match="d.jsonl:2: chat template failed.*no booms"):
        main(["--model", str(STORIES), "--data", str(data), "--output", str(tmp_path / "o.jsonl"),
              "--chat-template", strict, "--no-progress", "--greedy", "--max-new-tokens", "4"])


def test_missing_chat_template_is_a_clear_error(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match="no chat template"):
        main(["--model", str(STORIES), "--data", str(data), "--output", str(tmp_path / "o.jsonl"), "--no-progress"])


def test_output_is_the_data_file_or_in_use_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match="is the --data file"):
        run(data, data, "--greedy")
    assert read(data) == ROWS                                              # untouched
    (tmp_path / "o.jsonl.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()}"):
        run(data, tmp_path / "o.jsonl", "--greedy")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path):
    """Under torchrun (2 CPU ranks, gloo) each rank samples its shard; the gathered file equals a 1-process run."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    run(data, tmp_path / "one.jsonl", "--temperature", "1.0", "--seed", "5")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "spin_fast.generate", "--model", str(STORIES), "--data", str(data),
           "--output", str(tmp_path / "two.jsonl"), "--max-new-tokens", "12", "--batch-size", "2",
           "--chat-template", TEMPLATE, "--no-progress", "--temperature", "1.0", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[:3000]
    assert read(tmp_path / "two.jsonl") == read(tmp_path / "one.jsonl")


@pytest.mark.slow
def test_torchrun_killed_keeps_each_ranks_rows_and_resumes(tmp_path):
    """2 gloo ranks, rank 1 SIGKILLed after its 4th row: the rows both ranks wrote survive in their shards; the
    same command again generates only the rest, and the merged file equals an uninterrupted run's."""
    rows = [{"prompt": f"Tell me a story about {w}.", "prompt_id": f"p{i}"}
            for i, w in enumerate("cat dog sun ball tree fish bird cake frog ship moon rain".split())]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run(data, tmp_path / "one.jsonl", "--temperature", "1.0", "--seed", "5")
    out = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "spin_fast.generate", "--model", str(STORIES), "--data", str(data), "--output", str(out),
           "--max-new-tokens", "12", "--batch-size", "2", "--chat-template", TEMPLATE, "--no-progress",
           "--temperature", "1.0", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPIN_FAST_FAULT": "generate:4@1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode != 0 and "SIGKILL at generate:4 on rank 1" in res.stderr, res.stderr[-3000:]
    shards = {r: out.with_name(f"two.rank{r}.jsonl") for r in (0, 1)}
    kept, per_rank = {}, {}
    for r, path in shards.items():
        data_ = path.read_bytes()
        lines = data_[:data_.rfind(b"\n") + 1].decode().splitlines()             # (a torn last line is cut)
        per_rank[r] = {json.loads(x)["index"]: json.loads(x) for x in lines}
        kept.update(per_rank[r])
    assert not out.exists()
    assert len(per_rank[1]) == 4 and all(i % 2 == 1 for i in per_rank[1])     # rank 1: rows 1, 3, 5, ... as done
    assert all(i % 2 == 0 for i in per_rank[0])                                # (+ what rank 0 had finished)
    env.pop("SPIN_FAST_FAULT")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads([x for x in res.stderr.splitlines() if x.startswith("{")][-1])
    assert summary["already_done"] == len(kept) and summary["generated"] == len(rows) - len(kept)
    assert read(out) == read(tmp_path / "one.jsonl")
    assert all(read(out)[i] == row for i, row in kept.items())                   # not regenerated, kept as written
    assert not any(p.exists() for p in shards.values())                         # merged, then removed
