"""Reading and validating instruction rows (jsonl / json / parquet): errors name file:row and the field.

Row schema (HuggingFaceH4/ultrachat_200k): {"prompt": str, "prompt_id": str, "messages": [{"role", "content"}]}.
The prompt for sampling is `messages` up to and including the last user turn; a row with only a `prompt`
column becomes a single user turn. Row numbers in errors are 1-based lines (jsonl) or 0-based indices
(json list, parquet), as the file's own tools count them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")


@dataclass
class PromptRow:
    index: int                 # position among the file's rows (0-based), the stable key for seeding and resume
    loc: str                   # "file:row" for error messages
    prompt_id: str
    prompt: str                # the last user turn's text
    messages: list[dict]       # up to and including the last user turn


class BadRow(ValueError):
    """A row that fails validation; str() names file:row."""


def read_rows(path) -> list[tuple[str, dict]]:
    """[(location "file:row", row dict)] for a .jsonl, .json (list of rows) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
        return [(f"{path}:{i}", r) for i, r in enumerate(data)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return [(f"{path}:{i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"{path}: unsupported data file type {suffix!r} (expected .jsonl, .json or .parquet)")


def _check_messages(loc: str, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{loc}: field 'messages' must be a non-empty list, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow(f"{loc}: messages[{j}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_from_row(loc: str, index: int, row) -> PromptRow:
    """Validate one row and cut its conversation at the last user turn."""
    if not isinstance(row, dict):
        raise BadRow(f"{loc}: row must be an object, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = _check_messages(loc, row["messages"])
        users = [j for j, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise BadRow(f"{loc}: field 'messages' has no user turn")
        messages = messages[: users[-1] + 1]
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise BadRow(f"{loc}: row needs a 'messages' list or a 'prompt' string; has fields {sorted(row)}")
    prompt = messages[-1]["content"]
    if not prompt.strip():
        raise BadRow(f"{loc}: empty prompt (the last user turn has no text)")
    pid = row.get("prompt_id")
    if pid is None:
        pid = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    return PromptRow(index=index, loc=loc, prompt_id=str(pid), prompt=prompt, messages=messages)


def load_prompts(path, skip_bad_rows: bool = False) -> tuple[list[PromptRow], list[str]]:
    """(valid prompt rows, messages of skipped rows). Without skip_bad_rows the first bad row raises."""
    good, bad = [], []
    for index, (loc, row) in enumerate(read_rows(path)):
        try:
            good.append(prompt_from_row(loc, index, row))
        except BadRow as e:
            if not skip_bad_rows:
                raise
            bad.append(str(e))
    return good, bad
