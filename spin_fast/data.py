"""Training pairs: (prompt turns, chosen response, rejected response) rows -> rendered, truncated token storage.

Rows are read and validated by rows.py (the rules every reader shares; errors name the user's file:row). Three
schemas, rendered with chat.render_prompt_response and stored flat, the way packing.collate reads them:
  (a) ultrachat_200k `messages` (rows.sft_row: prompt = every turn before the last, the assistant answer = chosen),
      with the rejected response from `generated=` files (spin_fast.generate output, joined on prompt_id and the
      prompt turns);
  (b) SPIN's `real` / `generated` message lists (UCLA-AGI/SPIN_iter*): shared prompt turns, last turn assistant;
  (c) `prompt` / `chosen` / `rejected`, each a string or a message list.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .chat import RenderError, render_prompt_response
from .errors import InputError
from .rows import (BadRow, SkippedRows, check_conversation, check_object, paths_of, prompt_id_of, read_rows,
                   sft_row)


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


def _response_text(loc: str, field: str, value, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(prompt turns implied by a message-list value or None, response text) for a chosen/rejected field."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(loc, f"field {field!r} is empty", "empty_text")
        return None, value
    if isinstance(value, list):
        if prompt is not None and len(value) == 1:         # TRL's conversational form: [assistant turn]
            if not isinstance(value[0], dict) or value[0].get("role") != "assistant":
                raise BadRow(loc, f"field {field!r} must be [an assistant turn] after a 'prompt'", "role_order")
            conv = check_conversation(loc, field, prompt + value, end="assistant")
            return None, conv[-1]["content"]
        conv = check_conversation(loc, field, value, end="assistant")
        return conv[:-1], conv[-1]["content"]
    raise BadRow(loc, f"field {field!r} must be a string or a list of messages, got {type(value).__name__}",
                 "wrong_type")


def _same_prompt(loc: str, a_name: str, a: list[dict], b_name: str, b: list[dict]) -> None:
    if a != b:
        raise BadRow(loc, f"{a_name} and {b_name} have different prompt turns (they must share every turn before "
                          f"the last)", "prompt_mismatch")


def pair_from_row(loc: str, row) -> tuple[str, list[dict], str, str | None]:
    """(prompt_id, prompt turns, chosen text, rejected text) of one row in any of the three schemas; rejected is
    None for a `messages` row (schema a: its rejected response comes from the generated files)."""
    row = check_object(loc, row)
    if "real" in row or "generated" in row:                                  # (b) SPIN
        for k in ("real", "generated"):
            if row.get(k) is None:
                raise BadRow(loc, f"SPIN row needs both 'real' and 'generated'; missing {k!r}", "missing_field")
        real = check_conversation(loc, "real", row["real"], end="assistant")
        gen = check_conversation(loc, "generated", row["generated"], end="assistant")
        _same_prompt(loc, "'real'", real[:-1], "'generated'", gen[:-1])
        prompt, chosen, rejected = real[:-1], real[-1]["content"], gen[-1]["content"]
    elif "chosen" in row or "rejected" in row:                               # (c) prompt / chosen / rejected
        for k in ("chosen", "rejected"):
            if row.get(k) is None:
                raise BadRow(loc, f"preference row needs 'chosen' and 'rejected'; missing {k!r}", "missing_field")
        p = row.get("prompt")
        if isinstance(p, str):
            if not p.strip():
                raise BadRow(loc, "field 'prompt' is empty", "empty_text")
            prompt = [{"role": "user", "content": p}]
        elif isinstance(p, list):
            prompt = check_conversation(loc, "prompt", p, end="user")
        elif p is None:
            prompt = None
        else:
            raise BadRow(loc, f"field 'prompt' must be a string or a list of messages, got {type(p).__name__}",
                         "wrong_type")
        pc, chosen = _response_text(loc, "chosen", row["chosen"], prompt)
        pr, rejected = _response_text(loc, "rejected", row["rejected"], prompt)
        if prompt is None:                    # implicit prompt: both fields are whole conversations
            if pc is None or pr is None:
                raise BadRow(loc, "no 'prompt', so 'chosen' and 'rejected' must be whole conversations",
                             "missing_field")
            _same_prompt(loc, "'chosen'", pc, "'rejected'", pr)
            prompt = pc
        else:
            for name, implied in (("'chosen'", pc), ("'rejected'", pr)):
                if implied is not None:
                    _same_prompt(loc, "'prompt'", prompt, name, implied)
    elif row.get("messages") is not None:                                    # (a) ultrachat + generated files
        pid, conv = sft_row(loc, row)
        return pid, conv[:-1], conv[-1]["content"], None
    else:
        raise BadRow(loc, f"row needs 'messages', 'real' + 'generated', or 'prompt' + 'chosen' + 'rejected'; "
                          f"has fields {sorted(map(str, row))[:8]}", "missing_field")
    return prompt_id_of(row, prompt), prompt, chosen, rejected


def read_generated(paths) -> dict[str, list[tuple[list[dict], str]]]:
    """prompt_id -> [(prompt turns, response)] from spin_fast.generate output files (`messages` = prompt + response;
    the response may be empty: the opponent may answer with nothing). A bad row raises InputError naming it."""
    out: dict[str, list] = {}
    for path in paths_of(paths):
        for loc, row in read_rows(path):
            row = check_object(loc, row)
            msgs, response = row.get("messages"), row.get("response")
            if row.get("prompt_id") is None or not isinstance(response, str) or not isinstance(msgs, list) \
                    or not msgs:
                raise InputError(f"{loc}: a generated row needs 'prompt_id', 'messages' and a 'response' string "
                                 f"(spin_fast.generate output)")
            prompt = check_conversation(loc, "messages", msgs[:-1], end="user")
            out.setdefault(str(row["prompt_id"]), []).append((prompt, response))
    return out


def join_generated(loc: str, pid: str, prompt: list[dict], generated: dict) -> str:
    """The generated response of the row with prompt_id `pid` and these prompt turns."""
    candidates = generated.get(pid, [])
    match = [g for g in candidates if g[0] == prompt]
    if not match:
        why = "none has prompt_id" if not candidates else "the rows with this prompt_id were sampled from other " \
                                                           "prompt turns for"
        raise BadRow(loc, f"no generated response: {why} {pid!r}", "no_generated")
    return match[0][1]


def render_pair_side(loc: str, tokenizer, prompt: list[dict], response: str, chat_template, max_length: int,
                     max_prompt_length: int):
    """Render + truncate one (prompt, response) sequence; a template failure is a BadRow of the row."""
    try:
        ids, plen = render_prompt_response(tokenizer, prompt, response, chat_template)
    except RenderError as e:
        raise BadRow(loc, str(e), "template") from None
    return _truncate(loc, ids, plen, max_length, max_prompt_length)


def _truncate(loc: str, ids: list[int], plen: int, max_length: int, max_prompt_length: int):
    """SPIN/TRL truncation: the prompt keeps its END (max_prompt_length), the response then keeps its start."""
    prompt, response = ids[:plen], ids[plen:]
    cut_prompt = len(prompt) > max_prompt_length
    if cut_prompt:
        prompt = prompt[-max_prompt_length:]                 # the question and the turn marker are at the end
    room = max_length - len(prompt)
    if not response:
        raise BadRow(loc, "the response renders to 0 tokens", "empty_text")
    if room < 1:
        raise BadRow(loc, f"cannot fit: the prompt keeps {len(prompt)} tokens (max_prompt_length "
                          f"{max_prompt_length}), leaving nothing of the response within max_length {max_length}",
                     "too_long")
    cut_response = len(response) > room
    return prompt + response[:room], len(prompt), cut_prompt, cut_response


def load_pairs(paths, tokenizer, *, generated=None, max_length: int = 1024, max_prompt_length: int = 512,
               chat_template: str | None = None, skip_bad_rows: bool = False) -> tuple[PairSet, SkippedRows]:
    """(PairSet, skipped rows) from jsonl/json/parquet files or datasets folders, in file then row order.

    generated: spin_fast.generate output file(s), needed for `messages`-schema rows (their rejected responses).
    Without skip_bad_rows the first bad row raises BadRow("file:row: problem"); with it, bad rows are skipped and
    counted per kind. No usable pair at all is an error either way.
    """
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int)) or max_prompt_length < 1 \
            or max_length < 2:
        raise InputError(f"need integers max_length >= 2 and max_prompt_length >= 1, got max_length="
                         f"{max_length!r}, max_prompt_length={max_prompt_length!r}")
    gen = read_generated(generated) if generated is not None else None
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    plens: list[int] = []
    locs, pids, bad = [], [], SkippedRows()
    cut_prompts = cut_responses = 0
    render = dict(chat_template=chat_template, max_length=max_length, max_prompt_length=max_prompt_length)
    for path in paths_of(paths):
        for loc, row in read_rows(path):
            try:
                pid, prompt, chosen, rejected = pair_from_row(loc, row)
                if rejected is None and gen is None:
                    raise BadRow(loc, "a 'messages' row has only the human response: pass generated= (the "
                                      "spin_fast.generate output) for the rejected one, or use the SPIN / "
                                      "chosen-rejected schema", "no_generated")
                # the chosen side first: a row whose template fails is reported as that, also when generation
                # (which renders the same prompt) skipped it and there is no generated response
                seqs = [render_pair_side(loc, tokenizer, prompt, chosen, **render)]
                if rejected is None:
                    rejected = join_generated(loc, pid, prompt, gen)
                seqs.append(render_pair_side(loc, tokenizer, prompt, rejected, **render))
            except BadRow as e:
                bad.add(e, skip_bad_rows)
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
        raise InputError(f"no usable pairs in {[str(p) for p in paths_of(paths)]}"
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
