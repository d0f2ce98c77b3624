"""Reading and validating instruction rows (jsonl / json / parquet): errors name file:row and the field.

Row schema (HuggingFaceH4/ultrachat_200k): {"prompt": str, "prompt_id": str, "messages": [{"role", "content"}]}.
The prompt for sampling is `messages` up to and including the last user turn; a row with only a `prompt`
column becomes a single user turn. Row numbers in errors are 1-based lines (jsonl) or 0-based indices
(json list, parquet, datasets folders), as the file's own tools count them.

Training pairs (`load_pairs`): (prompt turns, chosen response, rejected response) from any of three schemas,
rendered with chat.render_prompt_response and stored flat, the way packing.collate reads them:
  (a) ultrachat_200k `messages` (prompt = every turn before the last assistant turn, chosen = that turn), with the
      rejected response from `generated=` files (spin_fast.generate output, joined on prompt_id);
  (b) SPIN's `real` / `generated` message lists (UCLA-AGI/SPIN_iter*): shared prompt turns, last turn assistant;
  (c) `prompt` / `chosen` / `rejected`, each a string or a message list.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import render_prompt_response

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


def _read_datasets_folder(path: Path) -> list[tuple[str, dict]]:
    """Rows of a `datasets.save_to_disk` folder (a Dataset, or a DatasetDict with a 'train' or single split)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: a folder is read as a `datasets.save_to_disk` dataset, which needs the "
                         f"`datasets` package (pip install datasets); or pass .jsonl/.json/.parquet files") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise ValueError(f"{path}: DatasetDict with splits {splits} and no 'train': pass the split's folder")
        ds, where = ds[split], f"{path}[{split}]"
    return [(f"{where}:{i}", r) for i, r in enumerate(ds)]


def read_rows(path) -> list[tuple[str, dict]]:
    """[(location "file:row", row dict)] for a .jsonl, .json (list of rows), .parquet file or datasets folder."""
    path = Path(path)
    if path.is_dir():
        return _read_datasets_folder(path)
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


# --- training pairs -------------------------------------------------------------------------------------------------

@dataclass
class PairSet:
    """Rendered SPIN pairs in packing.collate's storage: pair p = sequences 2p (chosen) and 2p+1 (rejected)."""
    tokens: np.ndarray         # (T,) int32, sequences back to back (prompt then response)
    seq_offsets: np.ndarray    # (2P+1,) int64, sequence s = tokens[seq_offsets[s]:seq_offsets[s+1]]
    prompt_lens: np.ndarray    # (2P,) int64, prompt tokens at the start of each sequence
    locs: list[str]            # (P,) "file:row" of each pair's source row
    prompt_ids: list[str]      # (P,)
    fingerprint: str           # sha256 of the token arrays and the truncation settings
    max_length: int
    max_prompt_length: int
    truncated_prompts: int = 0     # pairs whose prompt lost its start
    truncated_responses: int = 0   # sequences whose response lost its end

    @property
    def num_pairs(self) -> int:
        return len(self.locs)


def _check_conversation(loc: str, field: str, messages, *, end: str) -> list[dict]:
    """Validate a message list: optional system turn, then user/assistant alternating, last turn's role == end."""
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{loc}: field {field!r} must be a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"{loc}: {field}[{j}] must be {{'role': ..., 'content': ...}}, got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRow(f"{loc}: {field}[{j}] has role {role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise BadRow(f"{loc}: {field}[{j}] ({role}) content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRow(f"{loc}: {field}[{j}] ({role}) has empty content")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    for j in range(start, len(out)):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if out[j]["role"] != want:
            raise BadRow(f"{loc}: {field}[{j}] has role {out[j]['role']!r} where {want!r} was expected (roles must "
                         f"alternate user/assistant after an optional system turn)")
    if len(out) == start or out[-1]["role"] != end:
        raise BadRow(f"{loc}: field {field!r} must end with a{'n' if end == 'assistant' else ''} {end} turn, "
                     f"ends with {out[-1]['role']!r}")
    return out


def _response_text(loc: str, field: str, value, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(prompt turns implied by a message-list value or None, response text) for a chosen/rejected field."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"{loc}: field {field!r} is empty")
        return None, value
    if isinstance(value, list):
        if prompt is not None and len(value) == 1:         # TRL's conversational form: [assistant turn]
            if not isinstance(value[0], dict) or value[0].get("role") != "assistant":
                raise BadRow(f"{loc}: field {field!r} must be an assistant turn, got {value[0]!r:.80}")
            conv = _check_conversation(loc, field, prompt + value, end="assistant")
            return None, conv[-1]["content"]
        conv = _check_conversation(loc, field, value, end="assistant")
        return conv[:-1], conv[-1]["content"]
    raise BadRow(f"{loc}: field {field!r} must be a string or a list of messages, got {type(value).__name__}")


def _same_prompt(loc: str, a_name: str, a: list[dict], b_name: str, b: list[dict]) -> None:
    if a != b:
        raise BadRow(f"{loc}: {a_name} and {b_name} have different prompt turns (they must share every turn before "
                     f"the last)")


def pair_from_row(loc: str, row, generated: dict | None = None) -> tuple[str, list[dict], str, str]:
    """(prompt_id, prompt turns, chosen text, rejected text) of one row in any of the three schemas."""
    if not isinstance(row, dict):
        raise BadRow(f"{loc}: row must be an object, got {type(row).__name__}")
    if "real" in row or "generated" in row:                                  # (b) SPIN
        for k in ("real", "generated"):
            if row.get(k) is None:
                raise BadRow(f"{loc}: SPIN row needs both 'real' and 'generated'; missing {k!r}")
        real = _check_conversation(loc, "real", row["real"], end="assistant")
        gen = _check_conversation(loc, "generated", row["generated"], end="assistant")
        _same_prompt(loc, "'real'", real[:-1], "'generated'", gen[:-1])
        if len(real) < 2:
            raise BadRow(f"{loc}: field 'real' has no prompt turn before the response")
        prompt, chosen, rejected = real[:-1], real[-1]["content"], gen[-1]["content"]
    elif "chosen" in row or "rejected" in row:                               # (c) prompt / chosen / rejected
        for k in ("chosen", "rejected"):
            if row.get(k) is None:
                raise BadRow(f"{loc}: preference row needs 'chosen' and 'rejected'; missing {k!r}")
        p = row.get("prompt")
        if isinstance(p, str):
            if not p.strip():
                raise BadRow(f"{loc}: field 'prompt' is empty")
            prompt = [{"role": "user", "content": p}]
        elif isinstance(p, list):
            prompt = _check_conversation(loc, "prompt", p, end="user")
        elif p is None:
            prompt = None
        else:
            raise BadRow(f"{loc}: field 'prompt' must be a string or a list of messages, got {type(p).__name__}")
        pc, chosen = _response_text(loc, "chosen", row["chosen"], prompt)
        pr, rejected = _response_text(loc, "rejected", row["rejected"], prompt)
        if prompt is None:                    # implicit prompt: both fields are whole conversations
            if pc is None or pr is None:
                raise BadRow(f"{loc}: no 'prompt', so 'chosen' and 'rejected' must be whole conversations")
            _same_prompt(loc, "'chosen'", pc, "'rejected'", pr)
            prompt = pc
        else:
            for name, implied in (("'chosen'", pc), ("'rejected'", pr)):
                if implied is not None:
                    _same_prompt(loc, "'prompt'", prompt, name, implied)
        if not prompt:
            raise BadRow(f"{loc}: no prompt turn before the responses")
    elif row.get("messages") is not None:                                    # (a) ultrachat + generated files
        conv = _check_conversation(loc, "messages", row["messages"], end="assistant")
        if len(conv) < 2:
            raise BadRow(f"{loc}: field 'messages' has no prompt turn before the assistant response")
        prompt, chosen = conv[:-1], conv[-1]["content"]
        if generated is None:
            raise BadRow(f"{loc}: a 'messages' row has only the human response: pass generated= (the "
                         f"spin_fast.generate output) for the rejected one, or use the SPIN / chosen-rejected schema")
        pid = row.get("prompt_id")
        pid = str(pid) if pid is not None else hashlib.sha256(prompt[-1]["content"].encode("utf-8")).hexdigest()
        candidates = generated.get(pid, [])
        match = [g for g in candidates if g[0] == prompt]
        if not match:
            why = "none has prompt_id" if not candidates else "the rows with this prompt_id were sampled from other " \
                                                               "prompt turns for"
            raise BadRow(f"{loc}: no generated response: {why} {pid!r}")
        return pid, prompt, chosen, match[0][1]
    else:
        raise BadRow(f"{loc}: row needs 'messages', 'real' + 'generated', or 'prompt' + 'chosen' + 'rejected'; "
                     f"has fields {sorted(row)}")
    pid = row.get("prompt_id")
    pid = str(pid) if pid is not None else hashlib.sha256(prompt[-1]["content"].encode("utf-8")).hexdigest()
    return pid, prompt, chosen, rejected


def _paths(paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def read_generated(paths) -> dict[str, list[tuple[list[dict], str]]]:
    """prompt_id -> [(prompt turns, response)] from spin_fast.generate output files (`messages` = prompt + response)."""
    out: dict[str, list] = {}
    for path in _paths(paths):
        for loc, row in read_rows(path):
            if not isinstance(row, dict) or row.get("prompt_id") is None or not isinstance(row.get("response"), str):
                raise ValueError(f"{loc}: generated row needs 'prompt_id', 'messages' and a 'response' string")
            conv = _check_messages(loc, row.get("messages"))
            out.setdefault(str(row["prompt_id"]), []).append((conv[:-1], row["response"]))
    return out


def _truncate(loc: str, ids: list[int], plen: int, max_length: int, max_prompt_length: int):
    """SPIN/TRL truncation: the prompt keeps its END (max_prompt_length), the response then keeps its start."""
    prompt, response = ids[:plen], ids[plen:]
    cut_prompt = len(prompt) > max_prompt_length
    if cut_prompt:
        prompt = prompt[-max_prompt_length:]                 # the question and the turn marker are at the end
    room = max_length - len(prompt)
    if not response:
        raise BadRow(f"{loc}: the response renders to 0 tokens")
    if room < 1:
        raise BadRow(f"{loc}: cannot fit: the prompt keeps {len(prompt)} tokens (max_prompt_length "
                     f"{max_prompt_length}), leaving nothing of the response within max_length {max_length}")
    cut_response = len(response) > room
    return prompt + response[:room], len(prompt), cut_prompt, cut_response


def load_pairs(paths, tokenizer, *, generated=None, max_length: int = 1024, max_prompt_length: int = 512,
               chat_template: str | None = None, skip_bad_rows: bool = False) -> tuple[PairSet, list[str]]:
    """(PairSet, messages of skipped rows) from jsonl/json/parquet files or datasets folders, in file then row order.

    generated: spin_fast.generate output file(s), needed for `messages`-schema rows (their rejected responses).
    Without skip_bad_rows the first bad row raises ValueError("file:row: problem"); with it, bad rows are skipped
    and their messages returned. No usable pair at all is an error either way.
    """
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int)) or max_prompt_length < 1 \
            or max_length < 2:
        raise ValueError(f"need integers max_length >= 2 and max_prompt_length >= 1, got max_length={max_length!r}, "
                         f"max_prompt_length={max_prompt_length!r}")
    gen = read_generated(generated) if generated is not None else None
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    plens: list[int] = []
    locs, pids, bad = [], [], []
    cut_prompts = cut_responses = 0
    for path in _paths(paths):
        for loc, row in read_rows(path):
            try:
                pid, prompt, chosen, rejected = pair_from_row(loc, row, gen)
                seqs = []
                for response in (chosen, rejected):
                    try:
                        ids, plen = render_prompt_response(tokenizer, prompt, response, chat_template)
                    except ValueError as e:
                        if "no chat template" in str(e):
                            raise                 # a property of the tokenizer, not of this row
                        raise BadRow(f"{loc}: {e}") from None
                    seqs.append(_truncate(loc, ids, plen, max_length, max_prompt_length))
            except BadRow as e:
                if not skip_bad_rows:
                    raise
                bad.append(str(e))
                continue
            cut_prompts += seqs[0][2]
            for ids, plen, _, cut in seqs:
                chunks.append(np.asarray(ids, dtype=np.int32))
                lengths.append(len(ids))
                plens.append(plen)
                cut_responses += cut
            locs.append(loc)
            pids.append(pid)
    if not locs:
        raise ValueError(f"no usable pairs in {[str(p) for p in _paths(paths)]}"
                         + (f" ({len(bad)} bad rows skipped; first: {bad[0]})" if bad else ""))
    tokens = np.concatenate(chunks)                                                   # (T,) int32
    seq_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)                          # (2P+1,)
    np.cumsum(lengths, out=seq_offsets[1:])
    prompt_lens = np.asarray(plens, dtype=np.int64)                                   # (2P,)
    fingerprint = pairs_fingerprint(tokens, seq_offsets, prompt_lens, max_length, max_prompt_length)
    return PairSet(tokens, seq_offsets, prompt_lens, locs, pids, fingerprint, max_length, max_prompt_length,
                   cut_prompts, cut_responses), bad


def pairs_fingerprint(tokens, seq_offsets, prompt_lens, max_length: int, max_prompt_length: int) -> str:
    """sha256 over the rendered token ids, the sequence layout and the truncation settings."""
    h = hashlib.sha256(f"spin_fast.pairs/1 max_length={max_length} max_prompt_length={max_prompt_length}\n".encode())
    for a, dtype in ((tokens, np.int32), (seq_offsets, np.int64), (prompt_lens, np.int64)):
        a = np.ascontiguousarray(a, dtype=dtype)
        h.update(f"{a.size}:".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def concat_pairs(a: PairSet, b: PairSet) -> PairSet:
    """a's pairs then b's (e.g. iteration t's and t-1's, for loop.mix_previous); same truncation required."""
    if (a.max_length, a.max_prompt_length) != (b.max_length, b.max_prompt_length):
        raise ValueError("cannot join pair sets rendered with different max_length / max_prompt_length")
    tokens = np.concatenate([a.tokens, b.tokens])
    seq_offsets = np.concatenate([a.seq_offsets, b.seq_offsets[1:] + a.seq_offsets[-1]])
    prompt_lens = np.concatenate([a.prompt_lens, b.prompt_lens])
    fp = pairs_fingerprint(tokens, seq_offsets, prompt_lens, a.max_length, a.max_prompt_length)
    return PairSet(tokens, seq_offsets, prompt_lens, a.locs + b.locs, a.prompt_ids + b.prompt_ids, fp,
                   a.max_length, a.max_prompt_length, a.truncated_prompts + b.truncated_prompts,
                   a.truncated_responses + b.truncated_responses)
