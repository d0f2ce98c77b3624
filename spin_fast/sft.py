"""The SFT phase: the same packed forward and log-prob kernels, with the cross-entropy loss.

An optional phase before SPIN's iteration 0 (the built-in demo trains its tiny model from scratch with it; the
loop's continued-SFT baseline reuses it). Units are single (prompt, response) sequences; a step's loss is

    loss_step = -(1 / R_step) Σ_{response tokens t of the step, all ranks} log π_θ(y_t | y_<t, x)

with R_step the step's global number of response tokens (host-known from the data), so micro-batches and ranks
add up to one mean, as in trainer.py. log π comes from kernels.linear_logprobs on the response tokens only.
"""
from __future__ import annotations

import math
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

    def response_logps(self, model, seq_ids) -> torch.Tensor:
        """(R,) log π_θ of every response token of sequences seq_ids, packed."""
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
        return logps

    def micro_batch(self, model, seq_ids: list[int], normalizer: float, weight: float = 1.0) -> torch.Tensor:
        """weight 0: a zero-weight padding replica (trainer._deal): forward/backward for the ranks' lockstep only."""
        logps = self.response_logps(model, seq_ids)                                       # (R,)
        loss = -logps.sum() / normalizer
        if weight != 1.0:
            loss = loss * weight
        loss.backward()
        share = torch.tensor(float(logps.numel()) * weight, device=self.device)
        return torch.stack([loss.detach().float(), share])                                # (2,)


# ---- held-out loss and early stopping ---------------------------------------------------------------------------

def heldout_batches(seqs: SequenceSet, micro_batch_tokens: int, rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's share of the held-out sequences: consecutive sequences packed into chunks of <= micro_batch_tokens
    (a longer one alone), chunk c to rank c % world. Every rank gets the same number of chunks (FSDP2 all-gathers
    per forward, so the ranks must run the same number): missing ones are (chunk 0, True) = a padding replica whose
    result is discarded. Returns [(sequence ids, is_padding)]."""
    lens = np.diff(seqs.seq_offsets)
    chunks, cur, used = [], [], 0
    for s, n in enumerate(lens.tolist()):
        if cur and used + n > micro_batch_tokens:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += n
    chunks.append(cur)
    per_rank = -(-len(chunks) // world)                                                  # ceil
    mine = [(chunks[c], False) for c in range(rank, len(chunks), world)]
    return mine + [(chunks[0], True)] * (per_rank - len(mine))


def heldout_loss(model, task: SftTask, micro_batch_tokens: int, *, rank: int = 0, world: int = 1,
                 distributed: bool = False) -> float:
    """Mean cross-entropy per response token over all held-out sequences (every rank gets the same value):

        L_held = -(Σ_{held-out response tokens t} log π_θ(y_t | y_<t, x)) / (number of those tokens)

    The sums stay on the device; one all_reduce and one host read per call (once per epoch)."""
    acc = torch.zeros(2, dtype=torch.float64, device=task.device)                          # (Σ -log π, tokens)
    with torch.no_grad():
        for ids, pad in heldout_batches(task.seqs, micro_batch_tokens, rank, world):
            logps = task.response_logps(model, ids)                                        # (R,)
            if not pad:
                acc += torch.stack([-logps.double().sum(), torch.tensor(float(logps.numel()), dtype=torch.float64,
                                                                         device=task.device)])
    if distributed:
        torch.distributed.all_reduce(acc)
    total, count = acc.tolist()
    return total / max(count, 1.0)


class EarlyStopping:
    """Trainer.train's on_epoch_end for the SFT phase. evaluate() -> the held-out loss L_e after epoch e (the same
    on every rank: heldout_loss); then

        improved  <=>  L_e < L_ref - min_delta    (L_ref: the loss at the last improvement; +inf at first)
        stop      <=>  patience > 0 and the last `patience` epochs in a row did not improve

    and the weights of the epoch with the lowest L_e are kept (a copy of this rank's shards: one more copy of the
    parameters; restore() copies them back). patience 0: the loss is only recorded, every epoch runs, the last
    weights are kept."""

    def __init__(self, model, evaluate, *, patience: int, min_delta: float):
        self.model, self.evaluate, self.patience, self.min_delta = model, evaluate, patience, min_delta
        self.losses: list[float] = []
        self.ref, self.best, self.best_epoch, self.wait, self.stopped = math.inf, math.inf, -1, 0, False
        self._best_params: list[torch.Tensor] | None = None

    def __call__(self, epoch: int) -> bool:
        loss = float(self.evaluate())
        self.losses.append(loss)
        if loss < self.best:                                     # the weights to keep
            self.best, self.best_epoch = loss, epoch
            if self.patience > 0:
                with torch.no_grad():
                    self._best_params = [p.detach().clone() for p in self.model.parameters()]
        if loss < self.ref - self.min_delta:
            self.ref, self.wait = loss, 0
        else:
            self.wait += 1
        self.stopped = self.patience > 0 and self.wait >= self.patience
        return self.stopped

    def restore(self) -> None:
        """Copy the best epoch's weights back (no-op when they are the current ones)."""
        if self._best_params is not None and self.best_epoch != len(self.losses) - 1:
            with torch.no_grad():
                for p, b in zip(self.model.parameters(), self._best_params):
                    p.copy_(b)
        self._best_params = None

    def summary(self) -> dict:
        return {"heldout_loss": self.losses, "epochs_run": len(self.losses), "best_epoch": self.best_epoch,
                "best_heldout_loss": self.best, "stopped_early": self.stopped, "patience": self.patience,
                "min_delta": self.min_delta}
