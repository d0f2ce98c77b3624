// spin_fast._C: pair-preserving packing, the C++ twin of spin_fast/packing.py's pure-Python reference.
//
// One job: SPIN pairs -> token-budget micro-batches balanced over data-parallel ranks (plan_micro_batches), and
// one micro-batch -> the flat, padding-free arrays the fused loss consumes (collate). The algorithms, tie-breaks
// and error messages are exactly those of spin_fast/packing.py (the tests compare the two bit for bit); read the
// Python for the specification and this file for the speed. Bad input throws std::invalid_argument, which
// pybind11 turns into ValueError; every index is checked before it is used.
//
// This is the only csrc/*.cpp, so it holds PYBIND11_MODULE(_C, m).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kIgnoreIndex = -100;
using i128 = __int128;
using Plan = std::vector<std::vector<std::vector<int64_t>>>;  // plan[rank][micro_batch] -> pair indices

std::string to_string(i128 v) {  // std::to_string has no __int128 overload; costs may exceed int64 in messages
  if (v == 0) return "0";
  bool neg = v < 0;
  std::string s;
  while (v != 0) {
    int digit = static_cast<int>(v % 10);
    s.push_back(static_cast<char>('0' + (neg ? -digit : digit)));
    v /= 10;
  }
  if (neg) s.push_back('-');
  return std::string(s.rbegin(), s.rend());
}

std::string str(int64_t v) { return std::to_string(v); }

// --- planning ----------------------------------------------------------------------------------------------------

// (P, k) token counts -> (P,) costs; each row summed in 128 bits so no sum can overflow before it is compared.
std::vector<int64_t> pair_costs(const int64_t* lengths, int64_t npairs, int64_t k, int64_t budget) {
  std::vector<int64_t> costs(static_cast<size_t>(npairs));
  for (int64_t i = 0; i < npairs; ++i) {
    i128 cost = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t v = lengths[i * k + j];
      if (v < 0) throw std::invalid_argument("pair " + str(i) + " has a negative token count (" + str(v) + ")");
      cost += v;
    }
    if (cost > budget)
      throw std::invalid_argument("pair " + str(i) + " costs " + to_string(cost) + " tokens, more than token_budget=" +
                                  str(budget) + "; a pair is never split: raise the budget or truncate the pair");
    costs[static_cast<size_t>(i)] = static_cast<int64_t>(cost);
  }
  return costs;
}

struct Bins {
  std::vector<std::vector<int64_t>> pairs;  // pair indices per bin, in insertion (= descending cost) order
  std::vector<int64_t> totals;              // tokens per bin, <= budget
};

// Pair indices by descending cost, ties in index order (= std::stable_sort's order). Costs are token counts, so
// when they span a small range a counting sort does it in O(P + max cost) instead of O(P log P).
std::vector<int64_t> descending_order(const std::vector<int64_t>& costs) {
  const size_t p = costs.size();
  std::vector<int64_t> order(p);
  const int64_t max_cost = p ? *std::max_element(costs.begin(), costs.end()) : 0;
  if (max_cost > 8 * static_cast<int64_t>(p) + 4096) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
    return order;
  }
  std::vector<int64_t> start(static_cast<size_t>(max_cost) + 2, 0);  // start[max_cost - c + 1]: count of cost c
  for (int64_t c : costs) ++start[static_cast<size_t>(max_cost - c + 1)];
  for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];  // start[max_cost - c]: first slot of c
  for (size_t i = 0; i < p; ++i) order[static_cast<size_t>(start[static_cast<size_t>(max_cost - costs[i])]++)] =
      static_cast<int64_t>(i);
  return order;
}

// First-fit decreasing. A max-tree over the room left in potential bins (all start at `budget`, so the leftmost
// leaf with room is an open bin or the next fresh one: exactly first fit) finds each pair's bin in O(log B).
// Any first-fit packing has total(i) + total(j) > budget for bins i < j (j's first pair did not fit in i), so it
// opens fewer than 2 * sum / budget + 2 bins: the tree only needs that many leaves (it stays cache-resident).
// Room is stored as Room (int32_t when the budget fits: half the cache footprint of the latency-bound descent).
template <typename Room>
Bins first_fit_decreasing(const std::vector<int64_t>& costs, int64_t budget) {
  const size_t p = costs.size();
  const std::vector<int64_t> order = descending_order(costs);
  i128 sum = 0;
  for (int64_t c : costs) sum += c;
  const i128 bound = 2 * sum / budget + 2;
  const size_t leaves = bound < static_cast<i128>(p) ? static_cast<size_t>(bound) : p;
  size_t size = 1;
  while (size < leaves) size *= 2;
  std::vector<Room> tree(2 * size, -1);  // tree[size + b]: room left in bin b; padding leaves stay -1
  std::fill(tree.begin() + static_cast<std::ptrdiff_t>(size),
            tree.begin() + static_cast<std::ptrdiff_t>(size + leaves), static_cast<Room>(budget));
  for (size_t node = size - 1; node >= 1; --node) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  Bins bins;
  for (int64_t i : order) {
    const Room c = static_cast<Room>(costs[static_cast<size_t>(i)]);  // 0 <= c <= budget: fits Room
    size_t node = 1;
    while (node < size) node = 2 * node + static_cast<size_t>(tree[2 * node] < c);  // leftmost leaf with room >= c
    if (tree[node] < c) throw std::logic_error("first-fit tree found no bin: the bin-count bound is wrong");
    const size_t b = node - size;
    if (b == bins.pairs.size()) {
      bins.pairs.emplace_back();
      bins.totals.push_back(0);
    }
    bins.pairs[b].push_back(i);
    bins.totals[b] += c;
    tree[node] -= c;
    // Rooms only shrink, so stop at the first ancestor whose maximum is unchanged (usually a few levels up).
    for (node /= 2; node >= 1; node /= 2) {
      const Room m = std::max(tree[2 * node], tree[2 * node + 1]);
      if (m == tree[node]) break;
      tree[node] = m;
    }
  }
  return bins;
}

// Halve a bin of >= 2 pairs: the first two seed the halves, the rest go (in order) to the lighter half.
void split_bin(Bins& bins, size_t b, const std::vector<int64_t>& costs) {
  std::vector<int64_t> src = std::move(bins.pairs[b]);
  std::vector<int64_t> a{src[0]}, r{src[1]};
  int64_t ta = costs[static_cast<size_t>(src[0])], tr = costs[static_cast<size_t>(src[1])];
  for (size_t j = 2; j < src.size(); ++j) {
    const int64_t i = src[j];
    if (ta <= tr) {
      a.push_back(i);
      ta += costs[static_cast<size_t>(i)];
    } else {
      r.push_back(i);
      tr += costs[static_cast<size_t>(i)];
    }
  }
  bins.pairs[b] = std::move(a);
  bins.totals[b] = ta;
  bins.pairs.push_back(std::move(r));
  bins.totals.push_back(tr);
}

// Split the bins with the most pairs (ties: lowest bin index) until the count is a multiple of world_size.
void equalise_bin_count(Bins& bins, const std::vector<int64_t>& costs, int64_t world_size) {
  const int64_t p = static_cast<int64_t>(costs.size());
  const int64_t nbins = static_cast<int64_t>(bins.pairs.size());
  if (p < world_size)
    throw std::invalid_argument(str(p) + " pairs cannot be spread over world_size=" + str(world_size) +
                                " ranks: every rank needs at least one micro-batch");
  const int64_t target = (nbins + world_size - 1) / world_size * world_size;  // nbins <= p < 2^62: no overflow
  if (target > p)
    throw std::invalid_argument(str(p) + " pairs packed into " + str(nbins) +
                                " micro-batches cannot be split into a multiple of world_size=" + str(world_size) +
                                " (" + str(target) + " micro-batches need " + str(target) +
                                " pairs); lower world_size or add pairs");
  std::priority_queue<std::pair<int64_t, int64_t>> heap;  // (pairs in bin, -bin): most pairs, then lowest index
  for (int64_t b = 0; b < nbins; ++b) heap.emplace(static_cast<int64_t>(bins.pairs[b].size()), -b);
  while (static_cast<int64_t>(bins.pairs.size()) < target) {  // never runs dry: target <= P one-pair bins
    const size_t b = static_cast<size_t>(-heap.top().second);
    heap.pop();
    split_bin(bins, b, costs);
    const int64_t last = static_cast<int64_t>(bins.pairs.size()) - 1;
    heap.emplace(static_cast<int64_t>(bins.pairs[b].size()), -static_cast<int64_t>(b));
    heap.emplace(static_cast<int64_t>(bins.pairs[last].size()), -last);
  }
}

// Bins by descending tokens (ties: bin index) to the lightest rank with a free slot (ties: lowest rank).
Plan deal_to_ranks(Bins& bins, int64_t world_size) {
  const size_t nbins = bins.pairs.size();
  std::vector<int64_t> order(nbins);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return bins.totals[a] > bins.totals[b]; });
  std::vector<int64_t> slots(static_cast<size_t>(world_size), static_cast<int64_t>(nbins) / world_size);
  Plan plan(static_cast<size_t>(world_size));
  // Rank totals can exceed int64 only for absurd budgets, but 128 bits make that impossible rather than UB.
  using Entry = std::pair<i128, int64_t>;  // (token total, rank), ranks with free slots only
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int64_t r = 0; r < world_size; ++r) heap.emplace(0, r);
  for (int64_t b : order) {
    const Entry top = heap.top();
    heap.pop();
    const size_t r = static_cast<size_t>(top.second);
    plan[r].push_back(std::move(bins.pairs[static_cast<size_t>(b)]));
    if (--slots[r] > 0) heap.emplace(top.first + bins.totals[static_cast<size_t>(b)], top.second);
  }
  return plan;
}

// plan -> nested Python lists, built with the C API (pybind11's generic casters cost ~3x more per int).
py::list to_python(const Plan& plan) {
  auto new_list = [](size_t n) {
    PyObject* l = PyList_New(static_cast<Py_ssize_t>(n));
    if (!l) throw py::error_already_set();
    return py::reinterpret_steal<py::list>(l);
  };
  py::list out = new_list(plan.size());
  for (size_t r = 0; r < plan.size(); ++r) {
    py::list rank = new_list(plan[r].size());
    for (size_t m = 0; m < plan[r].size(); ++m) {
      const std::vector<int64_t>& mb = plan[r][m];
      py::list pairs = new_list(mb.size());
      for (size_t j = 0; j < mb.size(); ++j) {
        PyObject* v = PyLong_FromLongLong(mb[j]);
        if (!v) throw py::error_already_set();
        PyList_SET_ITEM(pairs.ptr(), static_cast<Py_ssize_t>(j), v);  // steals v
      }
      PyList_SET_ITEM(rank.ptr(), static_cast<Py_ssize_t>(m), pairs.release().ptr());
    }
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(r), rank.release().ptr());
  }
  return out;
}

py::list plan_micro_batches(py::array_t<int64_t, py::array::c_style> lengths, int64_t budget, int64_t world_size) {
  if (lengths.ndim() != 1 && lengths.ndim() != 2)
    throw std::invalid_argument("pair_tokens must have 1 or 2 dimension(s), got " + str(lengths.ndim()));
  const int64_t npairs = lengths.shape(0);
  const int64_t k = lengths.ndim() == 2 ? lengths.shape(1) : 1;
  if (npairs == 0 || k == 0) throw std::invalid_argument("pair_tokens is empty: nothing to pack");
  if (budget <= 0) throw std::invalid_argument("token_budget must be positive, got " + str(budget));
  if (world_size <= 0) throw std::invalid_argument("world_size must be positive, got " + str(world_size));
  // Validate and copy the costs while holding the GIL: everything after reads only memory this call owns.
  const std::vector<int64_t> costs = pair_costs(lengths.data(), npairs, k, budget);
  Plan plan;
  {
    py::gil_scoped_release nogil;  // pure C++ until the lists are built
    Bins bins = budget <= std::numeric_limits<int32_t>::max() ? first_fit_decreasing<int32_t>(costs, budget)
                                                               : first_fit_decreasing<int64_t>(costs, budget);
    equalise_bin_count(bins, costs, world_size);
    plan = deal_to_ranks(bins, world_size);
  }
  return to_python(plan);
}

// --- collation ---------------------------------------------------------------------------------------------------

struct Span {
  int64_t begin, end, prompt_len;
};

Span sequence_span(int64_t s, const int64_t* offsets, const int64_t* prompt_lens, int64_t ntokens) {
  const int64_t a = offsets[s], b = offsets[s + 1], plen = prompt_lens[s];
  const std::string seq = "sequence " + str(s) + ": ";
  if (a > b) throw std::invalid_argument(seq + "seq_offsets not monotone (" + str(a) + " > " + str(b) + ")");
  if (a < 0 || b > ntokens)
    throw std::invalid_argument(seq + "spans tokens[" + str(a) + ":" + str(b) + "], outside tokens of length " +
                                str(ntokens));
  if (plen < 1) throw std::invalid_argument(seq + "prompt_len " + str(plen) + " must be >= 1");
  if (plen > b - a)
    throw std::invalid_argument(seq + "prompt_len " + str(plen) + " exceeds its length " + str(b - a));
  if (plen == b - a)
    throw std::invalid_argument(seq + "empty response (prompt_len " + str(plen) + " == length " + str(b - a) + ")");
  return {a, b, plen};
}

template <typename T>
void require_1d(const py::array_t<T, py::array::c_style>& a, const char* name) {
  if (a.ndim() != 1)
    throw std::invalid_argument(std::string(name) + " must have 1 dimension(s), got " + str(a.ndim()));
}

py::dict collate(py::array_t<int64_t, py::array::c_style> pairs, py::array_t<int32_t, py::array::c_style> tokens,
                 py::array_t<int64_t, py::array::c_style> seq_offsets,
                 py::array_t<int64_t, py::array::c_style> prompt_lens) {
  require_1d(pairs, "pairs");
  require_1d(tokens, "tokens");
  require_1d(seq_offsets, "seq_offsets");
  require_1d(prompt_lens, "prompt_lens");
  const int64_t npairs = pairs.shape(0), ntokens = tokens.shape(0);
  const int64_t noffsets = seq_offsets.shape(0), nprompt = prompt_lens.shape(0);
  if (npairs == 0) throw std::invalid_argument("pairs is empty: a micro-batch needs at least one pair");
  if (noffsets != nprompt + 1)
    throw std::invalid_argument("seq_offsets must have len(prompt_lens) + 1 = " + str(nprompt + 1) +
                                " entries, got " + str(noffsets));
  if (nprompt % 2)
    throw std::invalid_argument(
        "prompt_lens must hold an even number of sequences (chosen, rejected per pair), got " + str(nprompt));
  const int64_t* pair = pairs.data();
  const int32_t* tok = tokens.data();
  const int64_t* off = seq_offsets.data();
  const int64_t* plens = prompt_lens.data();

  // Pass 1: validate every sequence of the micro-batch (only those: O(micro-batch), not O(dataset)) and count N.
  const int64_t npairs_total = nprompt / 2;
  std::vector<Span> spans;
  spans.reserve(static_cast<size_t>(2 * npairs));
  int64_t n_total = 0;
  bool overflow = false;
  for (int64_t j = 0; j < npairs; ++j) {
    const int64_t p = pair[j];
    if (p < 0 || p >= npairs_total)
      throw std::invalid_argument("pair " + str(p) + " out of range: seq_offsets describe " + str(npairs_total) +
                                  " pairs");
    for (int64_t side = 0; side < 2; ++side) {
      spans.push_back(sequence_span(2 * p + side, off, plens, ntokens));
      overflow |= __builtin_add_overflow(n_total, spans.back().end - spans.back().begin, &n_total);
    }
  }
  if (overflow || n_total > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("micro-batch of " +
                                (overflow ? std::string("more than 2^63") : str(n_total)) +
                                " tokens overflows int32 cu_seqlens");

  const int64_t nseq = 2 * npairs;
  py::array_t<int64_t> input_ids(n_total), position_ids(n_total), targets(n_total), seq_index(n_total);
  py::array_t<int32_t> cu_seqlens(nseq + 1);
  py::array_t<int64_t> chosen_index(npairs), rejected_index(npairs), pair_ids(npairs);
  int64_t* ids = input_ids.mutable_data();
  int64_t* pos = position_ids.mutable_data();
  int64_t* tgt = targets.mutable_data();
  int64_t* sid = seq_index.mutable_data();
  int32_t* cu = cu_seqlens.mutable_data();
  int64_t* ci = chosen_index.mutable_data();
  int64_t* ri = rejected_index.mutable_data();
  int64_t* pid = pair_ids.mutable_data();
  {
    py::gil_scoped_release nogil;  // pass 2: plain writes into arrays this call owns
    int64_t o = 0;
    cu[0] = 0;
    for (int64_t s = 0; s < nseq; ++s) {
      const Span& sp = spans[static_cast<size_t>(s)];
      const int64_t n = sp.end - sp.begin, plen = sp.prompt_len;
      const int32_t* t = tok + sp.begin;
      for (int64_t i = 0; i < n; ++i) {
        ids[o + i] = t[i];
        pos[o + i] = i;
        sid[o + i] = s;
      }
      // Position i predicts token i+1: the first response token is predicted at L-1, the last token nothing.
      for (int64_t i = 0; i < plen - 1; ++i) tgt[o + i] = kIgnoreIndex;
      for (int64_t i = plen - 1; i < n - 1; ++i) tgt[o + i] = t[i + 1];
      tgt[o + n - 1] = kIgnoreIndex;
      o += n;
      cu[s + 1] = static_cast<int32_t>(o);  // o <= n_total <= INT32_MAX, checked above
    }
    for (int64_t j = 0; j < npairs; ++j) {
      ci[j] = 2 * j;
      ri[j] = 2 * j + 1;
      pid[j] = pair[j];
    }
  }
  py::dict out;
  out["input_ids"] = input_ids;
  out["position_ids"] = position_ids;
  out["cu_seqlens"] = cu_seqlens;
  out["targets"] = targets;
  out["seq_index"] = seq_index;
  out["chosen_index"] = chosen_index;
  out["rejected_index"] = rejected_index;
  out["pair_ids"] = pair_ids;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spin_fast C++ hot paths: pair-preserving packing (see spin_fast/packing.py for the specification)";
  m.def("plan_micro_batches", &plan_micro_batches, py::arg("lengths"), py::arg("token_budget"),
        py::arg("world_size"),
        "(P, k) int64 token counts -> plan[rank][micro_batch] = [pair index, ...] (first-fit decreasing, "
        "equal micro-batch count per rank, balanced tokens)");
  m.def("collate", &collate, py::arg("pairs"), py::arg("tokens"), py::arg("seq_offsets"), py::arg("prompt_lens"),
        "one micro-batch -> dict of input_ids, position_ids, cu_seqlens, targets, seq_index, chosen_index, "
        "rejected_index, pair_ids");
}
