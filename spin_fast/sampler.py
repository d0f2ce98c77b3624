"""Batched generation with a KV cache, continuous batching and per-prompt seeding.

The cache has fixed slots (per layer [slots, kv_heads, capacity, head_dim]); its capacity grows in chunks of
KV_CHUNK positions as the longest live sequence needs it (the CUDA-graph path allocates it whole, once). Every slot holds one prompt;
when its sequence ends (EOS, a stop string, max_new_tokens, or the cache is full) the slot is refilled
with the next queued prompt: one packed prefill of just the new prompts, written into their slots, and
the batch stays full with ragged lengths.

Randomness is a counter-based hash of (seed, prompt key, step) -> one uniform per sampled token, turned
into a token by inverse CDF over the (temperature / top-k / top-p) distribution. A prompt's output thus
does not depend on which prompts share its batch, the batch size, or the number of ranks.

Per step there is one device -> host transfer (the sampled tokens, plus their log-probs when asked):
the host needs the tokens to detect finished sequences and stop strings. On CUDA the decode step
(forward over all slots + sampling + state update) is captured in a CUDA graph; on CPU the model runs
inside `model.cpu_prepacked()` (prepacked fp32 GEMMs) and decodes only the active slots.
"""
from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from .model import CacheArgs, KVCache, Transformer

M32 = 0xFFFFFFFF
FINISH_REASONS = ("stop", "length")
_GRAPH_WARNED = False          # process state: the CUDA-graph fallback warns once per process


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    greedy: bool = False              # also implied by temperature == 0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    return_logprobs: bool = False     # log-probs of sampled tokens under the UNtempered model distribution

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


@dataclass
class Generation:
    index: int                      # position in the prompts passed to generate()
    key: int                        # the seeding key (prompt id) used
    token_ids: list[int]            # generated tokens, including the EOS token if one ended it
    text: str | None                # decoded response (no special tokens, cut before a stop string)
    finish_reason: str              # "stop" (EOS or stop string) | "length"
    logprobs: list[float] | None = None


# ---- counter-based randomness ---------------------------------------------------------------------------

def _mix32(x):
    """lowbias32 integer hash on 32-bit lanes held in int64 (Python int or tensor): products wrap, the
    mask keeps the low 32 bits, and masked values are non-negative so >> is a logical shift."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniforms(seed: int, key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in (0, 1), a pure function of (seed, key[b], step[b])."""
    return uniforms_from_hashes(key_hash(seed, key), step_hash(step))


def key_hash(seed: int, key):
    """The (seed, key) half of `uniforms`: constant per prompt, so the sampler computes it once per slot."""
    s = _mix32(_mix32(seed & M32) ^ _mix32((seed >> 32) + 0x9E3779B9))               # host ints
    h = _mix32(_mix32(key & M32) ^ s)                                                  # (B,)
    return _mix32(h ^ _mix32((key >> 32) + 0x632BE5AB))


def step_hash(step):
    """The step half of `uniforms` (the sampler tabulates it once per run and gathers it per step)."""
    return _mix32(step + 0x85EBCA6B)


def uniforms_from_hashes(kh: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """uniforms() from key_hash(seed, key) and step_hash(step): bit-identical, fewer ops per step."""
    h = _mix32(kh ^ sh)
    lo = _mix32(h ^ 0x27D4EB2F)                                                        # a second lane: 53 bits
    bits = (h << 21) | (lo >> 11)                                                      # < 2**53
    return (bits.double() + 0.5) / float(1 << 53)


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B,) token ids from logits (B, V) fp32 and uniforms u (B,): temperature, then top-k, then top-p
    (the order transformers applies them), then inverse CDF. No host syncs."""
    if params.is_greedy:
        return logits.argmax(-1)
    v = logits.shape[-1]
    scaled = logits if params.temperature == 1.0 else logits / params.temperature     # (B, V); x / 1 == x
    if 0 < params.top_k < v:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]                  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    order = None
    if params.top_p < 1.0:
        scaled, order = scaled.sort(dim=-1, descending=True)                           # (B, V) each
        probs = scaled.softmax(-1)
        before = probs.cumsum(-1) - probs                                              # mass strictly above
        probs = probs.masked_fill(before >= params.top_p, 0.0)                         # keeps >= 1 token
    else:
        probs = scaled.softmax(-1)                                                     # (B, V)
    # fp64 CDF: x = u * total stays strictly below the last step, and zero-probability tokens
    # (flat CDF steps) can never be the first index whose CDF exceeds x
    cdf = probs.double().cumsum(-1)                                                    # (B, V)
    x = (u * cdf[:, -1]).unsqueeze(1)                                                  # (B, 1)
    idx = torch.searchsorted(cdf, x, right=True).clamp_(max=v - 1)                     # (B, 1)
    if order is not None:
        idx = order.gather(1, idx)
    return idx.squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) log softmax(logits)[tokens] at temperature 1."""
    return logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


# ---- the sampler ----------------------------------------------------------------------------------------

class Sampler:
    """Owns the KV cache and the per-slot state; `generate` / `stream` run prompts through it.

    model: a Transformer in eval mode. batch_size: number of cache slots. eos_token_ids: tokens that end
    a sequence (default: the model config's). tokenizer: optional, for `text` and stop strings.
    cuda_graphs: capture the decode step on CUDA ("auto" = on CUDA). prefill_tokens: token budget of one
    packed prefill. static_decode: decode every slot over the whole cache each step, as the CUDA graph
    does, but eagerly (for tests). cpu_threads: torch intra-op threads while generating on CPU (restored
    afterwards); "auto" = 1 for tiny models (< TINY_MODEL_PARAMS parameters: their decode ops are a few
    microseconds each, and a parallel region's fork/join costs more than it saves), else unchanged.
    """

    TINY_MODEL_PARAMS = 2_000_000
    KV_CHUNK = 128          # eager path: cache capacity grows by this many positions as the longest live sequence

    def __init__(self, model: Transformer, batch_size: int = 64, eos_token_ids=None, tokenizer=None,
                 cuda_graphs: str | bool = "auto", prefill_tokens: int = 2048, static_decode: bool = False,
                 cpu_threads: int | str | None = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.cfg = model.config
        self.batch_size = batch_size
        self.eos = set(self.cfg.eos_token_ids if eos_token_ids is None else
                       ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids))
        self.tokenizer = tokenizer
        self.device = model.lm_head_weight.device
        self.dtype = model.lm_head_weight.dtype
        # "auto": graphs on CUDA, and if a capture or replay fails, one warning and eager decode from then on
        # (graph_report() says which ran and why; generate's summary records it). True: failures raise.
        self.graphs_requested = cuda_graphs
        self.graph_fallback_reason: str | None = None
        self.use_graphs = self._graphs_possible() if cuda_graphs == "auto" else bool(cuda_graphs)
        if self.use_graphs and not self._graphs_possible():
            raise ValueError(f"cuda_graphs=True needs a CUDA model, got device {self.device}")
        # the graph path's static-shape decode, also selectable eagerly (how CPU tests cover its logic)
        self.static_decode = self.use_graphs or static_decode
        self.prefill_tokens = prefill_tokens
        if cpu_threads == "auto":
            tiny = sum(p.numel() for p in model.parameters()) < self.TINY_MODEL_PARAMS
            cpu_threads = 1 if tiny and self.device.type == "cpu" else None
        elif cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be 'auto', None or an int >= 1, got {cpu_threads!r}")
        self.cpu_threads = cpu_threads if self.device.type == "cpu" else None
        self.cache: KVCache | None = None
        self.graphs: dict = {}
        self._step_tables: dict = {}
        # cumulative: tokens sampled by decode steps (first tokens come from prefill), prompt tokens prefilled
        self.stats = {"tokens": 0, "prefill_tokens": 0, "steps": 0, "seconds": 0.0}

    def _graphs_possible(self) -> bool:
        return self.device.type == "cuda"

    def graph_report(self) -> dict:
        """{"requested", "used": "cuda_graph" | "eager", "fallback_reason"?}: what decoded, for summaries."""
        out = {"requested": self.graphs_requested, "used": "cuda_graph" if self.use_graphs else "eager"}
        if self.graph_fallback_reason is not None:
            out["fallback_reason"] = self.graph_fallback_reason
        return out

    def _graph_failed(self, what: str, e: Exception) -> None:
        """cuda_graphs="auto": record, warn once per process, decode eagerly (the same static-shape step)."""
        global _GRAPH_WARNED
        if self.graphs_requested != "auto":
            raise e
        self.graph_fallback_reason = f"{what}: {type(e).__name__}: {str(e).strip()[:300]}"
        self.use_graphs, self.graphs = False, {}
        if not _GRAPH_WARNED:
            _GRAPH_WARNED = True
            warnings.warn(f"spin_fast: CUDA-graph decode failed ({self.graph_fallback_reason}); decoding eagerly "
                          "(slower, same tokens)", RuntimeWarning, stacklevel=3)

    # device state, one entry per slot
    def _alloc(self, max_len: int):
        self.max_len = max_len                      # the run's limit: longest prompt + max_new_tokens (<= context)
        if self.static_decode:
            # the graph path reads fixed addresses: the whole capacity once
            if self.cache is None or self.cache.max_len < max_len:
                self.cache = None                   # the old one freed before the new one is allocated
                self.cache = KVCache(self.cfg, self.batch_size, max_len, self.device, self.dtype)
                self.graphs = {}  # graphs captured against the old cache tensors
        elif self.cache is None:
            self.cache = KVCache(self.cfg, self.batch_size, min(max_len, self.KV_CHUNK), self.device, self.dtype)
        B, dev = self.batch_size, self.device
        z = lambda: torch.zeros(B, dtype=torch.long, device=dev)  # noqa: E731
        if not hasattr(self, "tok"):
            self.tok, self.pos, self.step, self.key, self.active, self.khash = z(), z(), z(), z(), z(), z()
            self.all_slots = torch.arange(B, device=dev)
        for t in (self.tok, self.pos, self.step, self.key, self.active, self.khash):
            t.zero_()

    def generate(self, prompts: list[list[int]], params: SamplingParams, keys: list[int] | None = None,
                 progress: bool = False) -> list[Generation]:
        """Generations in the order of `prompts`. keys: per-prompt seeding keys (default: 0..n-1)."""
        out = [None] * len(prompts)
        for g in self.stream(prompts, params, keys, progress):
            out[g.index] = g
        return out

    def stream(self, prompts: list[list[int]], params: SamplingParams, keys: list[int] | None = None,
               progress: bool = False) -> Iterator[Generation]:
        """Yield each Generation as its sequence finishes (completion order, not prompt order)."""
        if keys is None:
            keys = list(range(len(prompts)))
        if len(keys) != len(prompts):
            raise ValueError(f"keys has {len(keys)} entries for {len(prompts)} prompts")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (Sampler(tokenizer=...))")
        if not prompts:
            return
        ctx = self.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (0 tokens)")
            if len(p) >= ctx:
                raise ValueError(f"prompt {i} has {len(p)} tokens; the model context is {ctx} and at least one "
                                 f"new token must fit (truncate prompts first)")
        max_len = min(ctx, max(len(p) for p in prompts) + params.max_new_tokens)
        self._alloc(max_len)
        # step_hash(step) for every step a slot can reach (1..max_new_tokens; the static path clamps
        # inactive slots into range). Kept per max_new_tokens: a captured CUDA graph reads this tensor.
        n_steps = params.max_new_tokens + 2
        if n_steps not in self._step_tables:
            self._step_tables[n_steps] = step_hash(torch.arange(n_steps, device=self.device))
        self.step_hashes = self._step_tables[n_steps]
        if self.use_graphs and params not in self.graphs:
            try:
                self.graphs[params] = self._capture(params)
            except Exception as e:                                         # noqa: BLE001 - see _graph_failed
                self._graph_failed("capture", e)
        # CPU: prepacked fp32 weights for the whole run (packed now, dropped at the end: never stale)
        prev = torch.get_num_threads()
        try:
            if self.cpu_threads is not None:
                torch.set_num_threads(self.cpu_threads)
            with self.model.cpu_prepacked(self.batch_size):
                yield from self._loop(prompts, params, keys, progress)
        finally:
            if self.cpu_threads is not None:
                torch.set_num_threads(prev)

    def _ensure(self, positions: int) -> None:
        """Eager path: cache capacity >= positions, grown to the next multiple of KV_CHUNK (at most max_len)."""
        if positions > self.cache.max_len:
            self.cache.grow(max(positions, min(self.max_len, -(-positions // self.KV_CHUNK) * self.KV_CHUNK)))

    def _loop(self, prompts, params, keys, progress):
        L = self.max_len
        B = self.batch_size
        queue = deque(range(len(prompts)))
        slot_prompt = [-1] * B           # prompt index per slot, -1 = free
        slot_pos = [0] * B               # position of the slot's pending (last sampled) token
        gen: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), unit="prompt", dynamic_ncols=True)
        t0, n_tok, last_bar = time.perf_counter(), 0, 0.0

        def finish(slot, reason):
            ids = gen[slot]
            g = Generation(index=slot_prompt[slot], key=keys[slot_prompt[slot]], token_ids=ids,
                           text=None, finish_reason=reason, logprobs=lps[slot] if params.return_logprobs else None)
            if self.tokenizer is not None:
                body = ids[:-1] if ids and ids[-1] in self.eos else ids
                text = self.tokenizer.decode(body, skip_special_tokens=True)
                for s in params.stop_strings:
                    j = text.find(s)
                    if j >= 0:
                        text, g.finish_reason = text[:j], "stop"
                g.text = text
            slot_prompt[slot] = -1
            gen[slot], lps[slot] = [], []
            return g

        def accept(slots: list[int], toks: torch.Tensor, lp: torch.Tensor | None) -> list[Generation]:
            """Host bookkeeping for one sampled token per slot; the single device->host transfer."""
            if lp is not None:
                both = torch.cat([toks.double(), lp.double()]).tolist()               # one sync
                tl, ll = both[: len(slots)], both[len(slots):]
            else:
                tl, ll = toks.tolist(), None                                          # one sync
            done = []
            for j, s in enumerate(slots):
                t = int(tl[j])
                gen[s].append(t)
                if ll is not None:
                    lps[s].append(ll[j])
                slot_pos[s] += 1
                if t in self.eos:
                    done.append(finish(s, "stop"))
                elif len(gen[s]) >= params.max_new_tokens or slot_pos[s] + 1 >= L:  # context full
                    done.append(finish(s, "length"))
                elif params.stop_strings and self._hit_stop(gen[s], params.stop_strings):
                    done.append(finish(s, "stop"))
            return done

        while True:
            free = [s for s in range(B) if slot_prompt[s] < 0]
            if free and queue:
                for g in self._refill(queue, prompts, keys, params, slot_prompt, slot_pos, accept):
                    yield g
                    if bar is not None:
                        bar.update(1)
            active = [s for s in range(B) if slot_prompt[s] >= 0]
            if not active:
                if not queue:
                    break
                continue
            if self.static_decode:
                # all slots, whole cache length: the shapes a CUDA graph needs (finished slots compute garbage)
                replayed = False
                if self.use_graphs:
                    try:
                        self.graphs[params].replay()
                        tok_out, lp_out = self._graph_out[params]
                        replayed = True
                    except Exception as e:                                 # noqa: BLE001 - see _graph_failed
                        self._graph_failed("replay", e)
                if not replayed:
                    tok_out, lp_out = self._decode(self.all_slots, L, params)
                idx = torch.tensor(active, device=self.device) if len(active) < B else self.all_slots
                toks, lp = tok_out[idx], (lp_out[idx] if lp_out is not None else None)
            else:
                slots_t = self.all_slots if len(active) == B else torch.tensor(active, device=self.device)
                kv_len = max(slot_pos[s] for s in active) + 1
                self._ensure(kv_len)
                toks, lp = self._decode(slots_t, kv_len, params)
            self.stats["steps"] += 1
            n_tok += len(active)
            for g in accept(active, toks, lp):
                yield g
                if bar is not None:
                    bar.update(1)
            if bar is not None and time.perf_counter() - last_bar > 0.5:
                last_bar = time.perf_counter()
                bar.set_postfix_str(f"{n_tok / (last_bar - t0):.0f} tok/s")
        self.stats["tokens"] += n_tok
        self.stats["seconds"] += time.perf_counter() - t0
        if bar is not None:
            bar.set_postfix_str(f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f} tok/s")
            bar.close()

    def _hit_stop(self, ids: list[int], stops: tuple[str, ...]) -> bool:
        # only the tail can contain a stop string that just completed
        tail = self.tokenizer.decode(ids[-(max(len(s) for s in stops) + 8):], skip_special_tokens=True)
        return any(s in tail for s in stops)

    @torch.inference_mode()
    def _refill(self, queue, prompts, keys, params, slot_prompt, slot_pos, accept):
        """Prefill the next queued prompts into the free slots (packed, within the token budget) and
        sample their first tokens. Returns the generations that finished on that first token."""
        done = []
        while queue:
            free = [s for s in range(self.batch_size) if slot_prompt[s] < 0]   # includes first-token finishes
            if not free:
                break
            take, n = [], 0
            while free and queue and (not take or n + len(prompts[queue[0]]) <= self.prefill_tokens):
                i = queue.popleft()
                take.append((free.pop(0), i))
                n += len(prompts[i])
            slots = [s for s, _ in take]
            lens = [len(prompts[i]) for _, i in take]
            ids = torch.tensor([t for _, i in take for t in prompts[i]], device=self.device)       # (N,)
            pos = torch.cat([torch.arange(m) for m in lens]).to(self.device)                       # (N,)
            cu_list = [0]
            for m in lens:
                cu_list.append(cu_list[-1] + m)
            cu = torch.tensor(cu_list, dtype=torch.int32, device=self.device)                      # (S+1,)
            slots_t = torch.tensor(slots, device=self.device)                                     # (S,)
            self._ensure(max(lens))
            h = self.model(ids, pos, cu, max_seqlen=max(lens), cache=CacheArgs(self.cache, slots_t, decode=False),
                           cu_seqlens_host=cu_list)
            last = torch.tensor(cu_list[1:], device=self.device) - 1
            logits = self.model.logits(h[last]).float()                                          # (S, V)
            key_t = torch.tensor([keys[i] for _, i in take], device=self.device)
            zero = torch.zeros_like(key_t)
            toks = sample_from_logits(logits, uniforms(params.seed, key_t, zero), params)         # (S,)
            lp = token_logprobs(logits, toks) if params.return_logprobs else None
            # per-slot device state: pending token, its position, next step index, key, active flag
            self.tok[slots_t] = toks
            self.pos[slots_t] = torch.tensor(lens, device=self.device)
            self.step[slots_t] = 1
            self.key[slots_t] = key_t
            self.khash[slots_t] = key_hash(params.seed, key_t)
            self.active[slots_t] = 1
            self.stats["prefill_tokens"] += n
            for s, i in take:
                slot_prompt[s] = i
                slot_pos[s] = len(prompts[i]) - 1   # accept() advances it to the pending token's position
            done.extend(accept(slots, toks, lp))
        # slots freed by first-token finishes must not decode: mark them inactive
        free_t = [s for s in range(self.batch_size) if slot_prompt[s] < 0]
        if free_t:
            self.active[torch.tensor(free_t, device=self.device)] = 0
        return done

    @torch.inference_mode()
    def _decode(self, slots_t: torch.Tensor, kv_len: int, params: SamplingParams):
        """One decode step for `slots_t`: feed each slot's pending token, sample the next, advance state."""
        L = self.cache.max_len
        full = slots_t is self.all_slots
        if self.static_decode:
            pos = self.pos[slots_t].clamp(max=L - 1)       # inactive slots (graph path) must stay in bounds
            step = self.step[slots_t].clamp(max=self.step_hashes.numel() - 1)
        elif full:
            pos, step = self.pos, self.step                # every slot active: views, no gathers
        else:
            pos, step = self.pos[slots_t], self.step[slots_t]
        tok, kh = (self.tok, self.khash) if full else (self.tok[slots_t], self.khash[slots_t])
        h = self.model(tok, pos, cache=CacheArgs(self.cache, slots_t, decode=True, kv_len=kv_len, all_slots=full))
        logits = self.model.logits(h).float()                                                  # (B, V)
        u = None if params.is_greedy else uniforms_from_hashes(kh, self.step_hashes[step])
        toks = sample_from_logits(logits, u, params)
        lp = token_logprobs(logits, toks) if params.return_logprobs else None
        if self.static_decode:
            act = self.active[slots_t]
            self.tok.index_copy_(0, slots_t, toks)
            self.pos.index_add_(0, slots_t, act)
            self.step.index_add_(0, slots_t, act)
        elif full:                                          # dynamic decode: every slot active
            self.tok.copy_(toks)
            self.pos.add_(1)
            self.step.add_(1)
        else:
            self.tok.index_copy_(0, slots_t, toks)
            self.pos.index_add_(0, slots_t, torch.ones_like(slots_t))
            self.step.index_add_(0, slots_t, torch.ones_like(slots_t))
        return toks, lp

    def _capture(self, params: SamplingParams):
        """CUDA graph of a full-slot decode step (all slots, whole cache length: static shapes).

        Captured while no slot is active (active == 0), so the warm-up runs leave pos/step unchanged and
        only write garbage K/V at position 0, which every prefill overwrites.
        """
        if not hasattr(self, "_graph_out"):
            self._graph_out = {}
        L = self.cache.max_len
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._decode(self.all_slots, L, params)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            toks, lp = self._decode(self.all_slots, L, params)
        self._graph_out[params] = (toks, lp)
        return g


def auto_batch_size(cfg, dtype: torch.dtype, max_len: int, free_bytes: int, *, headroom: float = 0.1,
                    max_slots: int = 1024) -> int:
    """generate.batch_size = auto on CUDA: the most KV-cache slots that the free memory (free_bytes, from
    torch.cuda.mem_get_info after the model is loaded) holds at full length, keeping `headroom` of it free.

    Per slot: the K/V of max_len positions over all layers (the graph path allocates the whole capacity), plus the
    decode step's per-row workspace: the (V,) fp32 logits and the sampler's copies of them (softmax, sort or mask,
    an fp64 CDF: ~6 fp32-sized rows) and one layer's attention scores (H x max_len fp32). Rounded down to a multiple
    of 8 (tensor-core friendly M), at least 1, at most max_slots."""
    kv = KVCache.bytes_per_token(cfg, dtype) * max_len
    work = 6 * 4 * cfg.vocab_size + 4 * cfg.num_heads * max_len
    n = int(free_bytes * (1.0 - headroom)) // (kv + work)
    if n >= 8:
        n -= n % 8
    return max(1, min(max_slots, n))


def generate_sharded(sampler: Sampler, prompts: list[list[int]], params: SamplingParams,
                     keys: list[int] | None = None, progress: bool = False) -> list[Generation]:
    """Under torch.distributed: rank r generates prompts r, r+W, ...; results are gathered on every rank
    in prompt order. Without an initialised process group this is sampler.generate."""
    import torch.distributed as dist
    if keys is None:
        keys = list(range(len(prompts)))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sampler.generate(prompts, params, keys, progress)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(prompts), world))
    local = sampler.generate([prompts[i] for i in mine], params, [keys[i] for i in mine],
                             progress and rank == 0)
    for g, i in zip(local, mine):
        g.index = i
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    out = [None] * len(prompts)
    for part in gathered:
        for g in part:
            out[g.index] = g
    return out
