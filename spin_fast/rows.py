"""Reading data rows, and the one row validator every reader shares (the loop, `--pairs`, SFT, spin_fast.generate).

Files: .jsonl (row = its 1-based line number; blank lines are skipped), .json (a list of rows), .parquet and
`datasets.save_to_disk` folders (row = 1-based position). A file without any row is an error naming it.
A problem of one row is a `BadRow` "FILE:ROW: FIELD: problem" with a `kind` (KINDS): invalid JSON, invalid UTF-8
or a lone surrogate in any string, a wrong or missing field, roles out of order, empty text, and (from the readers
that render) a chat-template failure or a row that cannot fit. With skip_bad_rows a reader skips such rows and
counts them per kind (`SkippedRows`); without, the first one stops the run.

Derived files (the loop's OUTPUT/data/train.jsonl) keep each row's origin in ORIGIN_KEY, so every error, also
from generation and pair building after the split, names the user's own file and row.

The rules. A conversation (`check_conversation`) is a non-empty list of {'role', 'content'}, role in ROLES,
content a non-blank string; an optional system turn, then user / assistant alternating, starting with user.
  - `sft_row` (data.sft of the loop, the SFT phase, `messages` rows of --pairs): `messages` is a conversation
    ending on the assistant turn, the human answer; the prompt is every turn before it.
  - `prompt_row` (spin_fast.generate, which needs only a prompt): the same rule on `messages`, except that the
    conversation may also end on the user turn (a prompt without answer); or a row with a `prompt` string alone.
    The prompt is every turn up to the last user turn, so for a row both accept it is the same prompt.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

ROLES = ("system", "user", "assistant")
ORIGIN_KEY = "_spin_fast_origin"       # "user_file:row" of a row copied into a derived file

KINDS = {
    "invalid_json": "the line / row is not valid JSON",
    "encoding": "invalid UTF-8 bytes or a lone surrogate in a string",
    "not_an_object": "the row is not a JSON object",
    "missing_field": "a required field is absent",
    "wrong_type": "a field has the wrong type",
    "bad_role": "a message role outside system/user/assistant",
    "role_order": "roles out of order (optional system, then user/assistant alternating)",
    "no_answer": "the conversation does not end on the assistant answer",
    "empty_text": "a message, prompt or response without text",
    "prompt_mismatch": "the two sides of a pair have different prompt turns",
    "no_generated": "no generated (rejected) response for the row's prompt",
    "template": "the chat template fails on the row",
    "too_long": "the row cannot fit the length limits",
}


class BadRow(InputError):
    """A row that fails validation: str() is "loc: problem"; `kind` is one of KINDS."""

    def __init__(self, loc: str, problem: str, kind: str):
        assert kind in KINDS, kind
        super().__init__(f"{loc}: {problem}")
        self.loc, self.kind = loc, kind


class SkippedRows(list):
    """Messages of the rows a reader skipped (a list of str), with their count per kind."""

    def __init__(self):
        super().__init__()
        self.by_kind: Counter = Counter()

    def add(self, e: BadRow, skip: bool) -> None:
        """Record e, or raise it when not skipping."""
        if not skip:
            raise e
        self.append(str(e))
        self.by_kind[e.kind] += 1

    def extend_from(self, other: "SkippedRows") -> None:
        self.extend(other)
        self.by_kind.update(other.by_kind)

    @property
    def count(self) -> int:
        """Rows skipped (the messages may be only the first few, e.g. reloaded from the loop's split.json)."""
        return sum(self.by_kind.values())

    def summary(self) -> dict:
        return {"bad_rows": self.count, "bad_rows_by_kind": dict(sorted(self.by_kind.items()))}


# --- files -----------------------------------------------------------------------------------------------------------

def _parse_line(loc: str, raw: bytes):
    """One jsonl line -> the row, or a BadRow (returned, not raised: the caller decides whether to skip it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(loc, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)", "encoding")
    try:
        return json.loads(text)
    except RecursionError:
        return BadRow(loc, "invalid JSON (nested too deeply)", "invalid_json")
    except ValueError as e:            # JSONDecodeError, and int('9' * 5000)'s digit limit
        return BadRow(loc, f"invalid JSON ({getattr(e, 'msg', e)})", "invalid_json")


def _read_jsonl(path: Path) -> list[tuple[str, object]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):                 # a UTF-8 byte order mark (some editors write one)
        data = data[3:]
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        loc = f"{path}:{lineno}"
        row = _parse_line(loc, raw)
        if isinstance(row, dict) and isinstance(row.get(ORIGIN_KEY), str):
            loc = row.pop(ORIGIN_KEY)
        rows.append((loc, row))
    return rows


def _read_json(path: Path) -> list[tuple[str, object]]:
    raw = path.read_bytes()
    try:
        text, escaped = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        # surrogateescape: an invalid byte inside a string becomes U+DC80..U+DCFF, reported below for its row (so
        # it can be skipped); outside a string it is a JSON syntax error of the whole document
        text, escaped = raw.decode("utf-8-sig", errors="surrogateescape"), True
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: invalid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except ValueError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
    rows = [(f"{path}:{i}", r) for i, r in enumerate(data, 1)]
    if escaped:
        for i, (loc, r) in enumerate(rows):
            try:
                check_text(loc, r, escaped_bytes=True)
            except BadRow as e:
                rows[i] = (loc, e)
    return rows


def _read_parquet(path: Path) -> list[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:             # ArrowInvalid, OSError, UnicodeDecodeError: the file, not a row
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return [(f"{path}:{i}", r) for i, r in enumerate(rows, 1)]


def _read_datasets_folder(path: Path) -> list[tuple[str, object]]:
    """Rows of a `datasets.save_to_disk` folder (a Dataset, or a DatasetDict with a 'train' or single split)."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path}: a folder is read as a `datasets.save_to_disk` dataset, which needs the "
                         f"`datasets` package (pip install datasets); or pass .jsonl/.json/.parquet files") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InputError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise InputError(f"{path}: DatasetDict with splits {splits} and no 'train': pass the split's folder")
        ds, where = ds[split], f"{path}[{split}]"
    return [(f"{where}:{i}", r) for i, r in enumerate(ds, 1)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def read_rows(path) -> list[tuple[str, object]]:
    """[(loc "file:row", row)] of a .jsonl / .json / .parquet file or a datasets folder, in file order.
    A jsonl line that is not valid JSON or UTF-8 comes as (loc, BadRow): the row rules raise it, so it is skipped
    and counted like any other bad row. A missing, unreadable or empty file raises InputError naming it."""
    path = Path(path)
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif not path.is_file():
        raise InputError(f"{path}: no such file")
    elif path.suffix.lower() not in READERS:
        raise InputError(f"{path}: unsupported data file type {path.suffix!r} (expected .jsonl, .json, .parquet or "
                         f"a datasets folder)")
    else:
        try:
            rows = READERS[path.suffix.lower()](path)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise InputError(f"{path}: holds no rows (the file is empty or blank)")
    return rows


def paths_of(paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


# --- the row rules ---------------------------------------------------------------------------------------------------

def check_text(loc: str, row, escaped_bytes: bool = False) -> None:
    """Every string in the row (keys included) must be encodable as UTF-8: no lone surrogates (JSON escapes like
    "\\ud800"), nor, with escaped_bytes (text read with surrogateescape), invalid bytes U+DC80..U+DCFF."""
    stack = [("row", row)]
    while stack:                          # iterative: a deeply nested row must not overflow the Python stack
        where, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    c = ord(v[e.start])
                    what = f"invalid UTF-8 byte 0x{c - 0xDC00:02x}" if escaped_bytes and 0xDC80 <= c <= 0xDCFF \
                        else f"lone surrogate U+{c:04X}"
                    raise BadRow(loc, f"{where}: {what} at character {e.start}", "encoding") from None
        elif isinstance(v, dict):
            for k, x in reversed(v.items()):
                stack += [(f"{k}" if where == "row" else f"{where}.{k}", x), (f"a key of {where}", k)]
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v)))]


def check_object(loc: str, row) -> dict:
    """The common start of every rule: a row that failed to parse, is not an object, has bad text or a bad
    `prompt_id` raises (in this order, so every reader names the same first problem)."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(loc, f"row must be an object ({{...}}), got {type(row).__name__}", "not_an_object")
    check_text(loc, row)
    pid = row.get("prompt_id")
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise BadRow(loc, f"field 'prompt_id' must be a string or an integer, got {type(pid).__name__}",
                         "wrong_type")
        if isinstance(pid, str) and not pid.strip():
            raise BadRow(loc, "field 'prompt_id' is empty", "empty_text")
    return row


def check_conversation(loc: str, field: str, messages, *, end: str | None) -> list[dict]:
    """Validate a message list (the rule above); end: the role the last turn must have ('assistant' | 'user'),
    or None for either. Returns [{'role', 'content'}] (other keys dropped)."""
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise BadRow(loc, f"field {field!r} must be a non-empty list of messages, got {what}",
                     "empty_text" if isinstance(messages, list) else "wrong_type")
    out = []
    for j, m in enumerate(messages):
        at = f"{field}[{j}]"
        if not isinstance(m, dict):
            raise BadRow(loc, f"{at} must be {{'role': ..., 'content': ...}}, got {type(m).__name__}", "wrong_type")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise BadRow(loc, f"{at} has no {key!r}", "missing_field")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRow(loc, f"{at} has role {role!r:.40}, expected one of {ROLES}", "bad_role")
        if not isinstance(content, str):
            raise BadRow(loc, f"{at} ({role}) content must be a string, got {type(content).__name__}", "wrong_type")
        if not content.strip():
            raise BadRow(loc, f"{at} ({role}) has empty content", "empty_text")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    if len(out) == start:
        raise BadRow(loc, f"field {field!r} has only a system turn (no user turn)", "role_order")
    for j in range(start, len(out)):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if out[j]["role"] != want:
            raise BadRow(loc, f"{field}[{j}] has role {out[j]['role']!r} where {want!r} was expected (roles "
                              f"must alternate user/assistant after an optional system turn)", "role_order")
    if end is not None and out[-1]["role"] != end:
        what = "an assistant turn (the answer)" if end == "assistant" else "a user turn"
        raise BadRow(loc, f"field {field!r} must end with {what}, ends with {out[-1]['role']!r}",
                     "no_answer" if end == "assistant" else "role_order")
    return out


def prompt_id_of(row: dict, prompt: list[dict]) -> str:
    """The row's `prompt_id` (checked by check_object), or the sha256 of the last prompt turn's text."""
    pid = row.get("prompt_id")
    if pid is None:
        return hashlib.sha256(prompt[-1]["content"].encode("utf-8")).hexdigest()
    return str(pid)


def sft_row(loc: str, row) -> tuple[str, list[dict]]:
    """(prompt_id, conversation ending on the answer) of a row the trainer can use (ultrachat `messages`)."""
    row = check_object(loc, row)
    if row.get("messages") is None:
        raise BadRow(loc, f"row needs a 'messages' list ending on the assistant answer; has fields "
                          f"{sorted(map(str, row))[:8]}", "missing_field")
    conv = check_conversation(loc, "messages", row["messages"], end="assistant")
    return prompt_id_of(row, conv[:-1]), conv


@dataclass
class PromptRow:
    index: int                 # position among the file's rows (0-based), the stable key for seeding and resume
    loc: str                   # "file:row" for error messages (the user's own file, also after the loop's split)
    prompt_id: str
    prompt: str                # the last user turn's text
    messages: list[dict]       # up to and including the last user turn


def prompt_row(loc: str, index: int, row) -> PromptRow:
    """A row generation can use: `messages` as for sft_row, or ending on the user turn; or a `prompt` string."""
    row = check_object(loc, row)
    if row.get("messages") is not None:
        conv = check_conversation(loc, "messages", row["messages"], end=None)
        messages = conv[:-1] if conv[-1]["role"] == "assistant" else conv
    elif row.get("prompt") is not None:
        p = row["prompt"]
        if not isinstance(p, str):
            raise BadRow(loc, f"field 'prompt' must be a string, got {type(p).__name__}", "wrong_type")
        if not p.strip():
            raise BadRow(loc, "field 'prompt' is empty", "empty_text")
        messages = [{"role": "user", "content": p}]
    else:
        raise BadRow(loc, f"row needs a 'messages' list or a 'prompt' string; has fields {sorted(map(str, row))[:8]}",
                     "missing_field")
    return PromptRow(index=index, loc=loc, prompt_id=prompt_id_of(row, messages),
                     prompt=messages[-1]["content"], messages=messages)


def load_prompts(path, skip_bad_rows: bool = False) -> tuple[list[PromptRow], SkippedRows]:
    """(prompt rows, skipped rows) of a data file. Without skip_bad_rows the first bad row raises."""
    good, bad = [], SkippedRows()
    for index, (loc, row) in enumerate(read_rows(path)):
        try:
            good.append(prompt_row(loc, index, row))
        except BadRow as e:
            bad.add(e, skip_bad_rows)
    return good, bad
