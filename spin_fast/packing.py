"""Pair-preserving packing: SPIN pairs -> token-budget micro-batches balanced over ranks -> flat collated arrays.

Two jobs, one algorithm each, with two implementations that must agree bit for bit:

- `plan_micro_batches`: first-fit decreasing of pairs (chosen + rejected, never split) into micro-batches of at
  most `token_budget` tokens, then an equal number of micro-batches per data-parallel rank with balanced token
  totals. Result: `plan[rank][micro_batch] = [pair index, ...]`.
- `collate`: one micro-batch of pairs -> the packed, padding-free arrays the fused SPIN loss consumes
  (`kernels/spin_fused.py`): input_ids, position_ids, cu_seqlens, targets, seq_index, chosen_index,
  rejected_index, pair_ids.

The C++ extension `spin_fast._C` (csrc/packing.cpp) is used when it imports; otherwise the pure-Python reference
below runs. `backend()` says which; every public function takes `backend="auto" | "cpp" | "python"` so tests and
the benchmark can hold one against the other. `SPIN_FAST_PURE_PYTHON=1` disables the extension at import.

Sequence storage (what `collate` reads): sequences back to back in one int32 array `tokens` (T,); sequence s is
`tokens[seq_offsets[s]:seq_offsets[s+1]]` = prompt then response, `prompt_lens[s]` its prompt length; pair p is
sequences 2p (chosen) and 2p+1 (rejected).
"""
from __future__ import annotations

import heapq
import os

import numpy as np

from .errors import InputError

IGNORE_INDEX = -100
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1

try:
    if os.environ.get("SPIN_FAST_PURE_PYTHON", "") not in ("", "0"):
        raise ImportError("disabled by SPIN_FAST_PURE_PYTHON")
    from spin_fast import _C
    _C_ERROR = ""
except ImportError as e:       # not built (or disabled): the Python reference serves every call
    _C, _C_ERROR = None, str(e)

__all__ = ["IGNORE_INDEX", "backend", "check_token_range", "cpp_available", "plan_micro_batches", "collate",
           "pair_token_counts", "to_torch"]


def cpp_available() -> bool:
    return _C is not None


def backend() -> str:
    """The implementation `backend="auto"` uses: "cpp" (spin_fast._C imported) or "python" (the reference)."""
    return "cpp" if _C is not None else "python"


def _resolve(name: str) -> str:
    if name == "auto":
        return backend()
    if name == "cpp":
        if _C is None:
            raise RuntimeError(f"backend='cpp' requested but spin_fast._C is not available ({_C_ERROR}); build "
                               f"it with `pip install --no-deps --no-build-isolation -e .`")
        return name
    if name == "python":
        return name
    raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {name!r}")


def _int_array(x, name: str, dtype, ndim: tuple[int, ...]) -> np.ndarray:
    """x as a C-contiguous array of `dtype` (zero-copy when it already is); integer input only, range-checked."""
    if type(x) is np.ndarray and x.dtype == dtype and x.ndim in ndim and x.flags.c_contiguous:
        return x                                                              # the per-micro-batch fast path
    a = np.asarray(x)
    if a.size == 0 and a.dtype == np.float64:          # [] has no integer dtype of its own
        a = a.astype(dtype)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimension(s), got shape {a.shape}")
    if a.dtype != dtype and a.size:
        info = np.iinfo(dtype)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name} holds values outside {np.dtype(dtype).name} ([{lo}, {hi}])")
    return np.ascontiguousarray(a, dtype=dtype)


def check_token_range(tokens: np.ndarray, vocab: int) -> None:
    """Token ids vs the model's vocabulary, once on the host, so every kernel call can skip its value checks
    (device syncs)."""
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise InputError(f"tokens span [{int(tokens.min())}, {int(tokens.max())}] but the model's vocabulary has "
                         f"{vocab} entries: a tokenizer of another model?")


def pair_token_counts(seq_offsets) -> np.ndarray:
    """(2P+1,) sequence offsets -> (P, 2) int64 (chosen, rejected) token counts: the input of the planner."""
    off = _int_array(seq_offsets, "seq_offsets", np.int64, (1,))
    if off.size < 1 or (off.size - 1) % 2:
        raise ValueError(f"seq_offsets must have 2P+1 entries (chosen, rejected per pair), got {off.size}")
    return np.diff(off).reshape(-1, 2)


# --- planning ---------------------------------------------------------------------------------------------------

def plan_micro_batches(pair_tokens, token_budget: int, world_size: int = 1, *,
                       backend: str = "auto") -> list[list[list[int]]]:
    """Pack pairs into micro-batches of <= token_budget tokens and deal them to `world_size` ranks.

    pair_tokens: (P,) token cost per pair, or (P, k) token counts per pair (e.g. (chosen, rejected)) summed per
    row. Returns plan[rank][micro_batch] -> list of pair indices; every rank has the same number of micro-batches,
    every pair appears exactly once, and no pair is split. Deterministic (ties break on the lower index).

    1. First-fit decreasing: pairs by cost descending (stable), each into the first micro-batch with room.
    2. While the micro-batch count is not a multiple of world_size, split the one with the most pairs (its pairs,
       in order: the first two seed two halves, each later one joins the lighter half).
    3. Micro-batches by tokens descending (stable) to the rank with the smallest total that still has a free
       slot (ties: lowest rank); a rank lists its micro-batches in that order (heaviest first).
    Rank totals differ by at most about one micro-batch: micro-batches are dealt whole, so the under-full last
    ones of step 1 (and the halves of step 2) set the spread.

    ValueError: empty input, token_budget or world_size <= 0, a negative count, a pair costing more than the
    budget (named), fewer pairs than ranks, or too few pairs to reach a multiple of world_size by splitting.
    """
    lengths = _int_array(pair_tokens, "pair_tokens", np.int64, (1, 2))
    if lengths.ndim == 1:
        lengths = lengths.reshape(-1, 1)                                      # (P, 1)
    budget, ranks = _check_int(token_budget, "token_budget"), _check_int(world_size, "world_size")
    if _resolve(backend) == "cpp":
        return _C.plan_micro_batches(lengths, budget, ranks)
    return _plan_reference(lengths.tolist(), budget, ranks)


def _check_int(v, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    if not -_INT64_MAX <= v <= _INT64_MAX:
        raise ValueError(f"{name} does not fit in int64: {v}")
    return v


def _pair_costs(lengths: list[list[int]], budget: int) -> list[int]:
    costs = []
    for i, row in enumerate(lengths):
        cost = 0
        for v in row:
            if v < 0:
                raise ValueError(f"pair {i} has a negative token count ({v})")
            cost += v
        if cost > budget:
            raise ValueError(f"pair {i} costs {cost} tokens, more than token_budget={budget}; a pair is never "
                             f"split: raise the budget or truncate the pair")
        costs.append(cost)
    return costs


def _first_fit_decreasing(costs: list[int], budget: int) -> tuple[list[list[int]], list[int]]:
    """Bins (pair indices, in insertion = descending-cost order) and their token totals.

    A max-tree over the room left in potential bins (all start at `budget`, so the leftmost leaf with room is
    either an open bin or the next fresh one: exactly first fit) finds each pair's bin in O(log B). Any first-fit
    packing has total(i) + total(j) > budget for bins i < j (j's first pair did not fit in i), so it opens fewer
    than 2 * sum / budget + 2 bins: the tree needs only that many leaves.
    """
    p = len(costs)
    order = sorted(range(p), key=lambda i: -costs[i])                       # stable: ties keep pair order
    leaves = min(p, 2 * sum(costs) // budget + 2)
    size = 1
    while size < leaves:
        size *= 2
    tree = [0] * (2 * size)                                                   # tree[size + b]: room left in bin b
    for b in range(size):
        tree[size + b] = budget if b < leaves else -1                         # padding leaves never chosen
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        c = costs[i]
        node = 1
        while node < size:                                                    # leftmost leaf with room >= c
            node = 2 * node if tree[2 * node] >= c else 2 * node + 1
        b = node - size
        if tree[node] < c:
            raise RuntimeError("first-fit tree found no bin: the bin-count bound is wrong")
        if b == len(bins):
            bins.append([])
            totals.append(0)
        bins[b].append(i)
        totals[b] += c
        tree[node] -= c
        node //= 2
        while node:                            # rooms only shrink: stop at the first unchanged ancestor
            m = max(tree[2 * node], tree[2 * node + 1])
            if m == tree[node]:
                break
            tree[node] = m
            node //= 2
    return bins, totals


def _split_bin(pairs: list[int], costs: list[int]) -> tuple[list[int], int, list[int], int]:
    """Halve a bin of >= 2 pairs: the first two seed the halves, the rest go (in order) to the lighter half."""
    a, b = [pairs[0]], [pairs[1]]
    ta, tb = costs[pairs[0]], costs[pairs[1]]
    for i in pairs[2:]:
        if ta <= tb:
            a.append(i)
            ta += costs[i]
        else:
            b.append(i)
            tb += costs[i]
    return a, ta, b, tb


def _equalise_bin_count(bins, totals, costs, world_size: int) -> None:
    """Split the bins with the most pairs (ties: lowest bin index) until the count is a multiple of world_size."""
    p, nbins = len(costs), len(bins)
    if p < world_size:
        raise ValueError(f"{p} pairs cannot be spread over world_size={world_size} ranks: every rank needs at "
                         f"least one micro-batch")
    target = -(-nbins // world_size) * world_size
    if target > p:
        raise ValueError(f"{p} pairs packed into {nbins} micro-batches cannot be split into a multiple of "
                         f"world_size={world_size} ({target} micro-batches need {target} pairs); lower world_size "
                         f"or add pairs")
    heap = [(-len(pairs), b) for b, pairs in enumerate(bins)]
    heapq.heapify(heap)
    while len(bins) < target:                  # never runs dry: target <= P bins of one pair each
        _, b = heapq.heappop(heap)
        a, ta, rest, tr = _split_bin(bins[b], costs)
        bins[b], totals[b] = a, ta
        bins.append(rest)
        totals.append(tr)
        heapq.heappush(heap, (-len(a), b))
        heapq.heappush(heap, (-len(rest), len(bins) - 1))


def _deal_to_ranks(bins, totals, world_size: int) -> list[list[list[int]]]:
    """Bins by descending tokens (ties: bin index) to the lightest rank that has a free slot (ties: lowest rank)."""
    slots = [len(bins) // world_size] * world_size
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    heap = [(0, r) for r in range(world_size)]                               # (token total, rank), free slots only
    for b in sorted(range(len(bins)), key=lambda b: -totals[b]):
        total, r = heapq.heappop(heap)
        plan[r].append(bins[b])
        slots[r] -= 1
        if slots[r]:
            heapq.heappush(heap, (total + totals[b], r))
    return plan


def _plan_reference(lengths: list[list[int]], budget: int, world_size: int) -> list[list[list[int]]]:
    """The pure-Python planner: the oracle of csrc/packing.cpp's plan_micro_batches."""
    if not lengths or not lengths[0]:
        raise ValueError("pair_tokens is empty: nothing to pack")
    if budget <= 0:
        raise ValueError(f"token_budget must be positive, got {budget}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    costs = _pair_costs(lengths, budget)
    bins, totals = _first_fit_decreasing(costs, budget)
    _equalise_bin_count(bins, totals, costs, world_size)
    return _deal_to_ranks(bins, totals, world_size)


# --- collation --------------------------------------------------------------------------------------------------

def collate(pairs, tokens, seq_offsets, prompt_lens, *, backend: str = "auto") -> dict[str, np.ndarray]:
    """One micro-batch (global pair indices) -> packed arrays, no padding; N tokens, S = 2P sequences.

    input_ids (N,) int64, position_ids (N,) int64 (0.. per sequence), cu_seqlens (S+1,) int32,
    targets (N,) int64 (next token; IGNORE_INDEX where the next token is prompt and at each sequence's last token),
    seq_index (N,) int64 (local sequence 0..S-1), chosen_index / rejected_index (P,) int64 (local sequences 2j,
    2j+1), pair_ids (P,) int64 (the global pair indices, in order). Only the sequences of `pairs` are validated,
    so collating every micro-batch of a plan costs O(total tokens), not O(micro-batches x total).
    """
    pairs = _int_array(pairs, "pairs", np.int64, (1,))
    tokens = _int_array(tokens, "tokens", np.int32, (1,))
    seq_offsets = _int_array(seq_offsets, "seq_offsets", np.int64, (1,))
    prompt_lens = _int_array(prompt_lens, "prompt_lens", np.int64, (1,))
    if _resolve(backend) == "cpp":
        return _C.collate(pairs, tokens, seq_offsets, prompt_lens)
    return _collate_reference(pairs.tolist(), tokens, seq_offsets, prompt_lens)


def _check_layout(pairs, nseq_offsets: int, nprompt: int) -> None:
    if not pairs:
        raise ValueError("pairs is empty: a micro-batch needs at least one pair")
    if nseq_offsets != nprompt + 1:
        raise ValueError(f"seq_offsets must have len(prompt_lens) + 1 = {nprompt + 1} entries, got {nseq_offsets}")
    if nprompt % 2:
        raise ValueError(f"prompt_lens must hold an even number of sequences (chosen, rejected per pair), "
                         f"got {nprompt}")


def _sequence_span(s: int, seq_offsets, prompt_lens, ntokens: int) -> tuple[int, int, int]:
    a, b, plen = int(seq_offsets[s]), int(seq_offsets[s + 1]), int(prompt_lens[s])
    if a > b:
        raise ValueError(f"sequence {s}: seq_offsets not monotone ({a} > {b})")
    if a < 0 or b > ntokens:
        raise ValueError(f"sequence {s}: spans tokens[{a}:{b}], outside tokens of length {ntokens}")
    if plen < 1:
        raise ValueError(f"sequence {s}: prompt_len {plen} must be >= 1")
    if plen > b - a:
        raise ValueError(f"sequence {s}: prompt_len {plen} exceeds its length {b - a}")
    if plen == b - a:
        raise ValueError(f"sequence {s}: empty response (prompt_len {plen} == length {b - a})")
    return a, b, plen


def _collate_reference(pairs: list[int], tokens: np.ndarray, seq_offsets: np.ndarray,
                       prompt_lens: np.ndarray) -> dict[str, np.ndarray]:
    """The pure-Python collator (lists per sequence, arrays at the end): the oracle of csrc's collate."""
    _check_layout(pairs, seq_offsets.size, prompt_lens.size)
    npairs_total = prompt_lens.size // 2
    spans = []
    for p in pairs:                                    # validate everything before building anything
        if not 0 <= p < npairs_total:
            raise ValueError(f"pair {p} out of range: seq_offsets describe {npairs_total} pairs")
        spans.append(_sequence_span(2 * p, seq_offsets, prompt_lens, tokens.size))
        spans.append(_sequence_span(2 * p + 1, seq_offsets, prompt_lens, tokens.size))
    input_ids, position_ids, targets, seq_index, cu = [], [], [], [], [0]
    for s, (a, b, plen) in enumerate(spans):
        n = b - a
        ids = tokens[a:b].tolist()
        input_ids += ids
        position_ids += range(n)
        # Position i predicts token i+1: the first response token is predicted at L-1, the last token predicts
        # nothing.
        targets += [IGNORE_INDEX] * (plen - 1)
        targets += ids[plen:]
        targets.append(IGNORE_INDEX)
        seq_index += [s] * n
        cu.append(cu[-1] + n)
    if cu[-1] > _INT32_MAX:
        raise ValueError(f"micro-batch of {cu[-1]} tokens overflows int32 cu_seqlens")
    npairs = len(pairs)
    return {
        "input_ids": np.array(input_ids, dtype=np.int64),
        "position_ids": np.array(position_ids, dtype=np.int64),
        "cu_seqlens": np.array(cu, dtype=np.int32),
        "targets": np.array(targets, dtype=np.int64),
        "seq_index": np.array(seq_index, dtype=np.int64),
        "chosen_index": np.arange(0, 2 * npairs, 2, dtype=np.int64),
        "rejected_index": np.arange(1, 2 * npairs, 2, dtype=np.int64),
        "pair_ids": np.array(pairs, dtype=np.int64),
    }


def response_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows that carry a loss, chosen on the host: only response tokens have a target (prompt positions and each
    sequence's last token hold IGNORE_INDEX), so the LM-head kernels, whose cost is R·H·V, get just those rows.

    Adds scored (R,) int64 (row indices into the N packed tokens, ascending), and the gathered scored_targets (R,)
    and, when the batch has seq_index, scored_seq_index (R,): the step then needs one index_select of the hidden
    states (hidden.index_select(0, scored), backward an index_add) and no device-side mask (no host sync).
    """
    scored = np.flatnonzero(batch["targets"] != IGNORE_INDEX).astype(np.int64)       # (R,)
    out = dict(batch, scored=scored, scored_targets=batch["targets"][scored])
    if "seq_index" in batch:
        out["scored_seq_index"] = batch["seq_index"][scored]
    return out


def to_torch(batch: dict[str, np.ndarray], device=None) -> dict:
    """A collated micro-batch as torch tensors (zero-copy on CPU; `device` moves it)."""
    import torch
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    return out if device is None else {k: v.to(device, non_blocking=True) for k, v in out.items()}
