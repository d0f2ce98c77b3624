"""The files of a resumable generation: the output jsonl and, under torchrun, one append-only shard per rank.

    OUT.jsonl              rows in input order (a finished run's only file)
    OUT.rank{r}.jsonl      rank r's rows in completion order, appended (flushed per row, fsynced about once a
                           second and at the end) while it generates; merged into OUT.jsonl at the end, then removed

A SIGKILL at any point keeps every row a rank has written (a torn last line is cut off on the next run). The next
run with the same arguments (any world size) treats the rows of OUT.jsonl and of every shard as done, generates
the rest, and merges: the merge writes OUT.jsonl.merge.tmp (every row once, by row index) and renames it over
OUT.jsonl before the shards are removed, so a kill during the merge loses nothing either (a row both in OUT.jsonl
and in a shard is the same row: sampling is seeded per row index). Why shards and not rank-ordered appends to one
file: ranks finish rows at different times; one file per writer needs no cross-rank lock and no waiting.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .errors import InputError


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def shard_paths(out: Path) -> list[Path]:
    """Every rank shard of `out` on disk (of this run's world size or an earlier one's), by rank."""
    pat = re.compile(rf"^{re.escape(out.stem)}\.rank(\d+){re.escape(out.suffix)}$")
    found = [(int(m.group(1)), p) for p in out.parent.glob(f"{out.stem}.rank*{out.suffix}")
             if (m := pat.match(p.name))] if out.parent.is_dir() else []
    return [p for _, p in sorted(found)]


def _rows(path: Path) -> list[tuple[int, str, int, int]]:
    """(row index, prompt_id, start, end byte offsets) of each row of a file we wrote. A torn last line (a killed
    run) is cut off, so appends stay valid jsonl; any other unreadable line is an InputError naming file:line."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows, pos = [], 0
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((int(row["index"]), str(row["prompt_id"]), start, pos))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}:{lineno}: not a row written by spin_fast.generate ({e!r}); "
                             f"use a fresh --output") from None
    return rows


def read_done(out: Path) -> dict[int, str]:
    """{row index: prompt_id} of every row already generated: in `out` and in its rank shards."""
    done = {}
    for path in [out, *shard_paths(out)]:
        if path.is_file():
            for index, pid, _, _ in _rows(path):
                done.setdefault(index, pid)
    return done


def merge(out: Path) -> int:
    """Rank shards (if any) into `out`, every row once, in row-index order; returns the number of rows moved from
    the shards. Atomic: temp file + fsync + rename, then the shards are removed."""
    shards = shard_paths(out)
    if not shards:
        return 0
    where: dict[int, tuple[Path, int, int]] = {}
    for path in [out, *shards]:
        if path.is_file():
            for index, _, start, end in _rows(path):
                where.setdefault(index, (path, start, end))
    moved = sum(1 for p, _, _ in where.values() if p != out)
    tmp = out.with_name(out.name + ".merge.tmp")
    handles = {}
    try:
        with open(tmp, "wb") as f:
            for index in sorted(where):
                path, start, end = where[index]
                src = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                src.seek(start)
                f.write(src.read(end - start))
            f.flush()
            os.fsync(f.fileno())
    finally:
        for h in handles.values():
            h.close()
    os.replace(tmp, out)
    for path in shards:
        path.unlink()
    return moved


class RowWriter:
    """Appends jsonl rows to one file: flushed per row (a SIGKILL keeps it: the bytes are in the kernel), fsynced
    at most once a second and on close (a machine crash loses at most the last second)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.synced = time.monotonic()

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        if time.monotonic() - self.synced > 1.0:
            os.fsync(self.f.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
