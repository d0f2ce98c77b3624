"""Pair-preserving packing (spin_fast.packing): plan invariants, collated arrays, errors; C++ == Python reference.

Every test runs on both backends; the C++ one is skipped when spin_fast._C is not built.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spin_fast import packing as pk

BACKENDS = [
    "python",
    pytest.param("cpp", marks=pytest.mark.skipif(not pk.cpp_available(), reason="spin_fast._C is not built")),
]
needs_cpp = pytest.mark.skipif(not pk.cpp_available(), reason="spin_fast._C is not built")
KEYS = ["input_ids", "position_ids", "cu_seqlens", "targets", "seq_index", "chosen_index", "rejected_index",
        "pair_ids"]


def outcome(fn, *args, **kw):
    """The result, or the ValueError's message: both backends must agree on either."""
    try:
        return fn(*args, **kw)
    except ValueError as e:
        return f"ValueError: {e}"


def random_dataset(rng, npairs, max_prompt=12, max_resp=10):
    """Flat storage for npairs pairs: tokens (T,) int32, seq_offsets (2P+1,), prompt_lens (2P,)."""
    prompt = rng.integers(1, max_prompt + 1, size=npairs)
    resp = rng.integers(1, max_resp + 1, size=(npairs, 2))
    lens = (prompt[:, None] + resp).reshape(-1)                                      # (2P,)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = rng.integers(0, 1000, size=int(offsets[-1]), dtype=np.int32)
    return tokens, offsets, np.repeat(prompt, 2).astype(np.int64)


def check_plan(plan, costs, budget, world_size):
    costs = np.asarray(costs)
    assert len(plan) == world_size
    assert len({len(rank) for rank in plan}) == 1, "ranks differ in micro-batch count"
    seen = [i for rank in plan for mb in rank for i in mb]
    assert sorted(seen) == list(range(len(costs))), "every pair exactly once"
    mb_tokens = [int(costs[mb].sum()) for rank in plan for mb in rank]
    assert all(mb for rank in plan for mb in rank), "no empty micro-batch"
    assert max(mb_tokens) <= budget
    totals = [int(sum(costs[mb].sum() for mb in rank)) for rank in plan]
    assert max(totals) - min(totals) <= max(mb_tokens)
    return totals


# --- planning ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_hand_example(backend):
    # costs 6, 5, 4, 3, 2 in budget 10, FFD: [0(6), 2(4)] [1(5), 3(3), 4(2)]
    costs = [6, 5, 4, 3, 2]
    assert pk.plan_micro_batches(costs, 10, backend=backend) == [[[0, 2], [1, 3, 4]]]
    # (chosen, rejected) rows are summed: same plan
    assert pk.plan_micro_batches([[3, 3], [4, 1], [2, 2], [1, 2], [1, 1]], 10, backend=backend) == \
        [[[0, 2], [1, 3, 4]]]
    # world_size 2: both bins weigh 10; ties go to the lower bin index and the lower rank
    assert pk.plan_micro_batches(costs, 10, 2, backend=backend) == [[[0, 2]], [[1, 3, 4]]]
    # world_size 3: the 3-pair bin is split (5 seeds one half, 3 the other, 2 joins the lighter)
    assert pk.plan_micro_batches(costs, 10, 3, backend=backend) == [[[0, 2]], [[1]], [[3, 4]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_ties_are_stable(backend):
    assert pk.plan_micro_batches([2, 2, 2, 2], 4, backend=backend) == [[[0, 1], [2, 3]]]
    assert pk.plan_micro_batches([1, 3, 1, 3], 4, 2, backend=backend) == [[[1, 0]], [[3, 2]]]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_plan_invariants(backend, data):
    budget = data.draw(st.integers(1, 200), label="budget")
    costs = data.draw(st.lists(st.integers(0, budget), min_size=1, max_size=80), label="costs")
    world_size = data.draw(st.integers(1, 9), label="world_size")
    plan = outcome(pk.plan_micro_batches, costs, budget, world_size, backend=backend)
    if isinstance(plan, str):                  # only the documented too-few-pairs cases may fail
        assert "cannot be s" in plan, plan
        assert len(costs) < world_size or "multiple of world_size" in plan
        return
    check_plan(plan, costs, budget, world_size)


@needs_cpp
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_plan_cpp_matches_reference(data):
    budget = data.draw(st.integers(1, 300), label="budget")
    n = data.draw(st.integers(1, 120), label="pairs")
    lengths = data.draw(st.lists(st.tuples(st.integers(0, budget // 2), st.integers(0, budget // 2)),
                                 min_size=n, max_size=n), label="lengths")
    world_size = data.draw(st.integers(1, 12), label="world_size")
    assert outcome(pk.plan_micro_batches, lengths, budget, world_size, backend="cpp") == \
        outcome(pk.plan_micro_batches, lengths, budget, world_size, backend="python")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_realistic_balance(backend):
    # Many near-full micro-batches per rank: rank totals within one micro-batch, micro-batches well filled.
    rng = np.random.default_rng(0)
    n = 3000
    prompt = rng.integers(20, 513, n)
    lengths = np.stack([prompt + rng.integers(20, 701, n), prompt + rng.integers(20, 257, n)], 1)
    costs = lengths.sum(1)
    for world_size in (1, 8):
        plan = pk.plan_micro_batches(lengths, 16384, world_size, backend=backend)
        totals = check_plan(plan, costs, 16384, world_size)
        # Micro-batches are dealt whole and every rank gets the same count, so the under-full last micro-batches
        # of first-fit decreasing land on some rank: the spread is bounded by one micro-batch, not by one pair.
        assert max(totals) - min(totals) <= 16384
        assert max(totals) - min(totals) <= 0.05 * np.mean(totals)
        nmb = sum(len(rank) for rank in plan)
        assert costs.sum() / (nmb * 16384) > 0.95, "first-fit decreasing should fill micro-batches"


@needs_cpp
def test_plan_cpp_matches_reference_large():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 1200, size=(20000, 2))
    for world_size in (1, 3, 8):
        plan = pk.plan_micro_batches(lengths, 16384, world_size, backend="cpp")
        assert plan == pk.plan_micro_batches(lengths, 16384, world_size, backend="python")
        # Scaling every cost and the budget changes nothing; in C++ it takes the int64-room tree and the
        # comparison sort instead of the int32 tree and the counting sort.
        assert plan == pk.plan_micro_batches(lengths * 2**30, 16384 * 2**30, world_size, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_huge_costs(backend):
    # Three bins of 2^62 tokens: the rank total (3 * 2^62) does not fit int64 and must not overflow.
    assert pk.plan_micro_batches([2**62] * 3, 2**63 - 1, backend=backend) == [[[0], [1], [2]]]
    assert pk.plan_micro_batches([[2**61, 2**61]] * 4, 2**63 - 1, 2, backend=backend) == [[[0], [2]], [[1], [3]]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args, message", [
    (([], 10), "pair_tokens is empty"),
    (([1, 2], 0), "token_budget must be positive, got 0"),
    (([1, 2], -5), "token_budget must be positive, got -5"),
    (([1, 2], 10, 0), "world_size must be positive, got 0"),
    (([[1, 2], [3, -1]], 10), r"pair 1 has a negative token count \(-1\)"),
    (([4, 11, 3], 10), "pair 1 costs 11 tokens, more than token_budget=10"),
    (([[4, 4], [6, 5]], 10), "pair 1 costs 11 tokens, more than token_budget=10"),
    (([1, 2, 3], 10, 4), "3 pairs cannot be spread over world_size=4 ranks"),
    (([6, 6, 6, 6, 6], 10, 4), r"5 pairs packed into 5 micro-batches cannot be split .* world_size=4 "
                               r"\(8 micro-batches need 8 pairs\)"),
    (([1.5, 2], 10), "pair_tokens must hold integers"),
    (([1, 2], 10.0), "token_budget must be an integer"),
    ((np.zeros((2, 2, 2), dtype=int), 10), "pair_tokens must have 1 or 2 dimension"),
    ((np.zeros((2, 0), dtype=int), 10), "pair_tokens is empty"),
    (([[2**62, 2**62]], 2**63 - 1), "pair 0 costs 9223372036854775808 tokens, more than "
                                    "token_budget=9223372036854775807"),
    (([1], 2**64), "token_budget does not fit in int64"),
])
def test_plan_errors(backend, args, message):
    with pytest.raises(ValueError, match=message):
        pk.plan_micro_batches(*args, backend=backend)


# --- collation --------------------------------------------------------------------------------------------------

def hand_dataset():
    # pair 0: chosen  [11 12 | 13 14]  rejected [11 12 | 15]      (prompt | response)
    # pair 1: chosen  [7 | 8 9]        rejected [7 | 5]
    seqs = [[11, 12, 13, 14], [11, 12, 15], [7, 8, 9], [7, 5]]
    tokens = np.array(sum(seqs, []), dtype=np.int32)
    offsets = np.array([0, 4, 7, 10, 12], dtype=np.int64)
    return tokens, offsets, np.array([2, 2, 1, 1], dtype=np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_collate_hand_example(backend):
    tokens, offsets, prompt_lens = hand_dataset()
    b = pk.collate([1, 0], tokens, offsets, prompt_lens, backend=backend)   # pair order is kept
    x = -100
    expect = {
        "input_ids": [7, 8, 9, 7, 5, 11, 12, 13, 14, 11, 12, 15],
        "position_ids": [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2],
        "cu_seqlens": [0, 3, 5, 9, 12],
        "targets": [8, 9, x, 5, x, x, 13, 14, x, x, 15, x],
        "seq_index": [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3],
        "chosen_index": [0, 2],
        "rejected_index": [1, 3],
        "pair_ids": [1, 0],
    }
    assert sorted(b) == sorted(KEYS)
    for k, v in expect.items():
        assert b[k].tolist() == v, k
        assert b[k].dtype == (np.int32 if k == "cu_seqlens" else np.int64), k
    t = pk.to_torch(b)
    assert t["targets"].tolist() == expect["targets"]
    r = pk.response_rows(b)                                  # the rows the loss kernels get: targets != -100
    assert r["scored"].tolist() == [0, 1, 3, 6, 7, 10] and r["scored"].dtype == np.int64
    assert r["scored_targets"].tolist() == [8, 9, 5, 13, 14, 15]
    assert r["scored_seq_index"].tolist() == [0, 0, 1, 2, 2, 3]
    assert all(r[k] is b[k] for k in b)                      # the batch itself is left as it was


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), npairs=st.integers(1, 30))
def test_collate_matches_definition(backend, seed, npairs):
    rng = np.random.default_rng(seed)
    tokens, offsets, prompt_lens = random_dataset(rng, npairs)
    pairs = rng.permutation(npairs)[: rng.integers(1, npairs + 1)]
    b = pk.collate(pairs, tokens, offsets, prompt_lens, backend=backend)
    # The definition, one sequence at a time.
    s_local = 0
    for p in pairs:
        for s in (2 * p, 2 * p + 1):
            a, e, plen = offsets[s], offsets[s + 1], prompt_lens[s]
            lo, hi = b["cu_seqlens"][s_local], b["cu_seqlens"][s_local + 1]
            assert hi - lo == e - a
            tok = tokens[a:e]
            assert (b["input_ids"][lo:hi] == tok).all()
            assert (b["position_ids"][lo:hi] == np.arange(e - a)).all()
            assert (b["seq_index"][lo:hi] == s_local).all()
            want = np.full(e - a, -100)
            want[plen - 1:-1] = tok[plen:]
            assert (b["targets"][lo:hi] == want).all()
            s_local += 1
    assert b["cu_seqlens"][-1] == b["input_ids"].size
    assert (b["pair_ids"] == pairs).all()
    assert (b["chosen_index"] == 2 * np.arange(len(pairs))).all()
    assert (b["rejected_index"] == 2 * np.arange(len(pairs)) + 1).all()


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), npairs=st.integers(1, 40), budget=st.integers(50, 200),
       world_size=st.integers(1, 4))
def test_plan_and_collate_cpp_match_reference(seed, npairs, budget, world_size):
    rng = np.random.default_rng(seed)
    tokens, offsets, prompt_lens = random_dataset(rng, npairs)
    lengths = pk.pair_token_counts(offsets)                                          # (P, 2)
    plan = outcome(pk.plan_micro_batches, lengths, budget, world_size, backend="cpp")
    assert plan == outcome(pk.plan_micro_batches, lengths, budget, world_size, backend="python")
    if isinstance(plan, str):
        return
    for rank in plan:
        for mb in rank:
            got = pk.collate(mb, tokens, offsets, prompt_lens, backend="cpp")
            ref = pk.collate(mb, tokens, offsets, prompt_lens, backend="python")
            for k in KEYS:
                assert got[k].dtype == ref[k].dtype and (got[k] == ref[k]).all(), k
            assert got["input_ids"].size <= budget


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate, message", [
    (lambda t, o, pl: ([], t, o, pl), "pairs is empty"),
    (lambda t, o, pl: ([2], t, o, pl), "pair 2 out of range: seq_offsets describe 2 pairs"),
    (lambda t, o, pl: ([-1], t, o, pl), "pair -1 out of range"),
    (lambda t, o, pl: ([0], t, o[:-1], pl), r"seq_offsets must have len\(prompt_lens\) \+ 1 = 5 entries, got 4"),
    (lambda t, o, pl: ([0], t, o[:-1], pl[:-1]), "prompt_lens must hold an even number of sequences"),
    (lambda t, o, pl: ([1], t, np.array([0, 4, 7, 6, 12]), pl), r"sequence 2: seq_offsets not monotone \(7 > 6\)"),
    (lambda t, o, pl: ([1], t, np.array([0, 4, 7, 10, 13]), pl),
     r"sequence 3: spans tokens\[10:13\], outside tokens of length 12"),
    (lambda t, o, pl: ([1], t, o, np.array([2, 2, 1, 0])), "sequence 3: prompt_len 0 must be >= 1"),
    (lambda t, o, pl: ([0], t, o, np.array([2, 4, 1, 1])), "sequence 1: prompt_len 4 exceeds its length 3"),
    (lambda t, o, pl: ([0], t, o, np.array([4, 2, 1, 1])), r"sequence 0: empty response \(prompt_len 4 == length 4\)"),
    (lambda t, o, pl: ([0], t.astype(np.float32), o, pl), "tokens must hold integers"),
    (lambda t, o, pl: ([0], t.astype(np.int64) + 2**31, o, pl), "tokens holds values outside int32"),
])
def test_collate_errors(backend, mutate, message):
    tokens, offsets, prompt_lens = hand_dataset()
    with pytest.raises(ValueError, match=message):
        pk.collate(*mutate(tokens, offsets, prompt_lens), backend=backend)


def test_collate_validates_only_its_pairs():
    # A bad sequence outside the micro-batch does not stop it (that keeps collating a plan O(total tokens)).
    tokens, offsets, _ = hand_dataset()
    for backend in ["python"] + (["cpp"] if pk.cpp_available() else []):
        b = pk.collate([0], tokens, offsets, np.array([2, 2, 0, 0]), backend=backend)
        assert b["input_ids"].size == 7


# --- backend selection ------------------------------------------------------------------------------------------

def test_backend_reports_what_auto_uses():
    assert pk.backend() == ("cpp" if pk.cpp_available() else "python")
    with pytest.raises(ValueError, match="backend must be"):
        pk.plan_micro_batches([1], 1, backend="fortran")
    if not pk.cpp_available():
        with pytest.raises(RuntimeError, match="spin_fast._C is not available"):
            pk.plan_micro_batches([1], 1, backend="cpp")


def test_pure_python_env_disables_extension():
    env = dict(os.environ, SPIN_FAST_PURE_PYTHON="1")
    code = ("from spin_fast import packing as pk; assert pk.backend() == 'python'; "
            "print(pk.plan_micro_batches([3, 2, 1], 4))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[[0, 2], [1]]]"
