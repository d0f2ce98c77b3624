"""genfiles.py: rank shards read back on resume (torn last lines cut, damaged lines named), merged once per row in
input order, atomically (a kill in the merge loses nothing)."""
import json

import pytest

from spin_fast.genfiles import merge, read_done, shard_path, shard_paths


def line(i):
    return json.dumps({"index": i, "prompt_id": f"p{i}", "response": "r" * i}) + "\n"


def test_shards_merge_in_input_order_once_per_row(tmp_path):
    out = tmp_path / "generated.jsonl"
    out.write_text(line(0) + line(1))                               # an earlier 1-process run's prefix
    shard_path(out, 0).write_text(line(4) + line(2))                # completion order
    shard_path(out, 1).write_text(line(5) + line(3) + line(1))      # row 1 again: a kill after an earlier merge
    shard_path(out, 2).write_text(line(6) + line(7)[:9])            # a 3-rank run's shard, torn last line
    (tmp_path / "generated.rankx.jsonl").write_text("not ours")      # not a shard name
    assert [p.name for p in shard_paths(out)] == [f"generated.rank{r}.jsonl" for r in (0, 1, 2)]
    assert read_done(out) == {i: f"p{i}" for i in range(7)}
    assert shard_path(out, 2).read_text() == line(6)                 # the torn line is cut (regenerated later)
    assert merge(out) == 5
    assert out.read_text() == "".join(line(i) for i in range(7))
    assert shard_paths(out) == [] and not (tmp_path / "generated.jsonl.merge.tmp").exists()
    assert merge(out) == 0 and out.read_text() == "".join(line(i) for i in range(7))


def test_a_kill_during_the_merge_loses_nothing(tmp_path):
    out = tmp_path / "g.jsonl"
    shard_path(out, 0).write_text(line(0) + line(2))
    shard_path(out, 1).write_text(line(1))
    (tmp_path / "g.jsonl.merge.tmp").write_text(line(0)[:5])         # killed while writing the merged file
    assert read_done(out) == {0: "p0", 1: "p1", 2: "p2"}
    merge(out)
    assert out.read_text() == line(0) + line(1) + line(2)


def test_a_damaged_shard_line_is_named(tmp_path):
    out = tmp_path / "g.jsonl"
    shard_path(out, 1).write_text(line(1) + "{not json\n" + line(3))
    with pytest.raises(ValueError, match=r"g.rank1.jsonl:2: not a row written by spin_fast.generate"):
        read_done(out)
