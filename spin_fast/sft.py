"""The SFT phase: the same packed forward and log-prob kernels, with the cross-entropy loss.

An optional phase before SPIN's iteration 0 (the built-in demo trains its tiny model from scratch with it; the
loop's continued-SFT baseline reuses it). Units are single (prompt, response) sequences; a step's loss is

    loss_step = -(1 / R_step) Σ_{response tokens t of the step, all ranks} log π_θ(y_t | y_<t, x)

with R_step the step's global number of response tokens (host-known from the data), so micro-batches and ranks
add up to one mean, as in trainer.py. log π comes from kernels.linear_logprobs on the response tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import render_pair_side
from .errors import InputError
from .kernels import linear_logprobs
from .packing import IGNORE_INDEX, response_rows, to_torch
from .rows import BadRow, SkippedRows, paths_of, read_rows, sft_row

SFT_METRICS = ("loss", "response_tokens")


@dataclass
class SequenceSet:
    """(prompt, response) sequences back to back: sequence s = tokens[seq_offsets[s]:seq_offsets[s+1]]."""
    tokens: np.ndarray         # (T,) int32
    seq_offsets: np.ndarray    # (S+1,) int64
    prompt_lens: np.ndarray    # (S,) int64
    locs: list[str]

    @property
    def num_sequences(self) -> int:
        return len(self.locs)


def load_sft_sequences(paths, tokenizer, *, max_length: int, max_prompt_length: int, chat_template=None,
                       skip_bad_rows: bool = False) -> tuple[SequenceSet, SkippedRows]:
    """ultrachat-schema rows (rows.sft_row: `messages` ending on the assistant answer) -> rendered, truncated
    sequences (the prompt keeps its end, the response its start, as for pairs). Bad rows: BadRow naming file:row,
    or skipped and counted with skip_bad_rows."""
    chunks, lens, plens, locs, bad = [], [], [], [], SkippedRows()
    for path in paths_of(paths):
        for loc, row in read_rows(path):
            try:
                _, conv = sft_row(loc, row)
                ids, plen, _, _ = render_pair_side(loc, tokenizer, conv[:-1], conv[-1]["content"], chat_template,
                                                   max_length, max_prompt_length)
            except BadRow as e:
                bad.add(e, skip_bad_rows)
                continue
            chunks.append(np.asarray(ids, dtype=np.int32))
            lens.append(len(ids))
            plens.append(plen)
            locs.append(loc)
    if not locs:
        raise InputError(f"no usable SFT rows in {[str(p) for p in paths_of(paths)]}"
                         + (f" ({len(bad)} bad rows skipped; first: {bad[0]})" if bad else ""))
    off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    return SequenceSet(np.concatenate(chunks), off, np.asarray(plens, dtype=np.int64), locs), bad


def collate_sequences(ids, tokens, seq_offsets, prompt_lens) -> dict[str, np.ndarray]:
    """Packed arrays for sequences `ids` (no padding): input_ids, position_ids, cu_seqlens, targets (the next token
    on response positions, IGNORE_INDEX elsewhere and at each sequence's last token), and packing.response_rows'
    scored / scored_targets (the rows the loss kernel gets)."""
    ids = np.asarray(ids, dtype=np.int64)
    starts, ends = seq_offsets[ids], seq_offsets[ids + 1]
    lens = ends - starts                                                                  # (S,)
    cu = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    n = int(cu[-1])
    local = np.arange(n) - np.repeat(cu[:-1], lens)                                       # (N,) position
    flat = np.repeat(starts, lens) + local                                                # (N,) index in tokens
    input_ids = tokens[flat].astype(np.int64)
    targets = np.full(n, IGNORE_INDEX, dtype=np.int64)
    plen = np.repeat(prompt_lens[ids], lens)
    scored = (local >= plen - 1) & (local < np.repeat(lens, lens) - 1)                    # predicts a response token
    targets[scored] = tokens[flat[scored] + 1]
    return response_rows({"input_ids": input_ids, "position_ids": local.astype(np.int64),
                          "cu_seqlens": cu.astype(np.int32), "targets": targets})


class SftTask:
    """Cross-entropy on response tokens; units are sequences, the normalizer the step's response-token count."""
    metric_names = SFT_METRICS
    unit_name = "sequences"
    fault_phase = "sft"                                  # runtime.fault_point's name for this phase's steps

    def __init__(self, seqs: SequenceSet, cfg, device: torch.device):
        self.seqs, self.cfg, self.device = seqs, cfg, device
        self.tokens = seqs.tokens
        self.unit_tokens = np.diff(seqs.seq_offsets)                                      # (S,)
        self.response_tokens = self.unit_tokens - seqs.prompt_lens                        # (S,) scored per sequence

    def normalizer(self, unit_ids: np.ndarray) -> float:
        return float(self.response_tokens[unit_ids].sum())

    def micro_batch(self, model, seq_ids: list[int], normalizer: float, weight: float = 1.0) -> torch.Tensor:
        """weight 0: a zero-weight padding replica (trainer._deal): forward/backward for the ranks' lockstep only."""
        s = self.seqs
        host = collate_sequences(seq_ids, s.tokens, s.seq_offsets, s.prompt_lens)
        max_seqlen = int(np.diff(host["cu_seqlens"]).max())
        b = to_torch(host, self.device)
        hidden = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], max_seqlen=max_seqlen,
                       cu_seqlens_host=host["cu_seqlens"])                              # (N, H)
        logps = linear_logprobs(hidden.index_select(0, b["scored"]), model.lm_head_weight, b["scored_targets"],
                                impl=self.cfg.impl,
                                memory_budget_bytes=self.cfg.logits_budget_mib << 20, check_values=False,
                                softcap=model.logit_softcap)                                   # (R,)
        loss = -logps.sum() / normalizer
        if weight != 1.0:
            loss = loss * weight
        loss.backward()
        share = torch.tensor(float(len(host["scored"])) * weight, device=self.device)
        return torch.stack([loss.detach().float(), share])                                # (2,)
