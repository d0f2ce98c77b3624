"""The reference-log-prob cache: Σ log π_t(chosen), Σ log π_t(rejected) per pair, once per SPIN iteration.

Computed with the training step's own path (packing.plan_micro_batches + collate -> packed varlen forward -> final
hidden states -> kernels.linear_logprobs with the LM-head weight -> per-sequence sums), without grad, so the
cached reference and the policy's log-probs at θ = θ_t agree to rounding and the first step's margins are 0.

Storage: one safetensors file, `ref_chosen_logps` and `ref_rejected_logps` float32 (P,), plus string metadata:
fingerprints of the opponent's weights, the tokenizer and the pair data, the truncation lengths, the dtype, the code
version and a sha256 of the values (so a flipped byte in the payload is caught, not just a truncated file).
Written atomically (temp file in the same folder, fsync, rename); read with safetensors.safe_open (memory-mapped).

Distributed (torch.distributed initialised): the trainer's packer makes the micro-batches, which are dealt
heaviest first to the least-loaded rank; each rank computes its own into zero-filled (P,) buffers; one all_reduce(SUM) then gives every rank every pair (each pair is
computed by exactly one rank). Rank 0 alone reads and writes the ONE cache file and broadcasts its decision and,
on reuse, the values: no shared file system is assumed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .kernels import linear_logprobs
from .packing import check_token_range, collate, pair_token_counts, plan_micro_batches, response_rows, to_torch
from .runtime import fault_point

log = logging.getLogger(__name__)

CODE_VERSION = "spin_fast.refcache/1"
FORMAT = "spin_fast.refcache"
KEYS = ("ref_chosen_logps", "ref_rejected_logps")
# Metadata that must equal the current run's for the cache to be reused, in the order they are reported.
# max lengths before the data fingerprint (which covers them too), so a length change is reported as such.
MATCH_KEYS = ("code_version", "weights_fingerprint", "tokenizer_fingerprint", "max_length", "max_prompt_length",
              "data_fingerprint", "dtype", "num_pairs")


class RefCacheError(InputError):
    """The cache file exists but cannot be trusted (corrupt, truncated, wrong content); str() names the file."""


@dataclass
class RefLogps:
    chosen: torch.Tensor       # (P,) float32, on the model's device
    rejected: torch.Tensor     # (P,) float32
    path: Path
    status: str                # "reused" | "built" | "rebuilt"
    reason: str                # why it was (re)built, or "every fingerprint matches"
    metadata: dict


# --- fingerprints ---------------------------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> bytes:
    # as raw bytes: numpy has no bf16, and a uint8 view works for every dtype
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model) -> str:
    """sha256 over the model config and every parameter (name, dtype, shape, bytes). One pass over the weights:
    once per iteration, when the cache is looked up."""
    h = hashlib.sha256(b"spin_fast.weights/1\n")
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "hf_config"}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name} {p.dtype} {tuple(p.shape)}\n".encode())
        h.update(_tensor_bytes(p))
    return h.hexdigest()


def folder_fingerprint(folder) -> str:
    """sha256 over an HF folder's config.json and *.safetensors (+ index) bytes: the opponent as saved."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir()
                   if p.name == "config.json" or p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json"))
    if not any(p.name.endswith(".safetensors") for p in files):
        raise InputError(f"{folder}: no safetensors files to fingerprint")
    h = hashlib.sha256(b"spin_fast.folder/1\n")
    for p in files:
        h.update(f"{p.name} {p.stat().st_size}\n".encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers' JSON, else the vocabulary), special tokens and
    chat template."""
    h = hashlib.sha256(f"spin_fast.tokenizer/1 {type(tokenizer).__name__}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    else:
        raise InputError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: no backend_tokenizer or get_vocab")
    h.update(json.dumps([getattr(tokenizer, "all_special_tokens", None),
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def _values_sha(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(chosen.float()) + _tensor_bytes(rejected.float())).hexdigest()


# --- computing ------------------------------------------------------------------------------------------------------

def _dist():
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def _model_device_dtype(model):
    w = model.lm_head_weight
    return w.device, w.dtype


def _rank_micro_batches(counts, token_budget: int, rank: int, world: int, lockstep: bool = False) -> list[list[int]]:
    """This rank's micro-batches: the trainer's packer (one rank), then heaviest first to the lightest rank.

    Not plan_micro_batches(world_size=world) by default: that gives every rank the same number of micro-batches
    and so needs >= world pairs and splits bins; a plain (replicated) model only meets the other ranks at the final
    all_reduce, so a rank may get fewer micro-batches, or none. lockstep=True (an FSDP-sharded model, whose every
    forward is a collective) takes the equal-count plan instead.
    """
    if lockstep and world > 1:
        return plan_micro_batches(counts, token_budget, world)[rank]
    bins = plan_micro_batches(counts, token_budget, 1)[0]                  # heaviest first
    if world == 1:
        return bins
    totals = [0] * world
    mine = []
    for b in bins:
        r = min(range(world), key=lambda i: (totals[i], i))
        totals[r] += int(counts[b].sum())
        if r == rank:
            mine.append(b)
    return mine


@torch.no_grad()
def compute_ref_logps(model, pairs, *, token_budget: int | None = None, impl: str = "auto",
                      memory_budget_bytes: int | None = None, lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (P,), rejected (P,)) float32 summed response log-probs under `model`, on the model's device.

    token_budget: tokens per packed micro-batch (default: room for the longest pair, at least 8192). Distributed:
    each rank computes its share of the micro-batches (maybe none; with lockstep=True, for a sharded model, the
    same number on every rank), then one all_reduce makes the result whole everywhere.
    """
    rank, world = _dist()
    device, _ = _model_device_dtype(model)
    check_token_range(pairs.tokens, model.lm_head_weight.shape[0])      # so the kernels skip their value checks
    counts = pair_token_counts(pairs.seq_offsets)                                  # (P, 2)
    if token_budget is None:
        token_budget = max(8192, int(counts.sum(1).max()))
    mine = _rank_micro_batches(counts, token_budget, rank, world, lockstep)
    num_pairs = counts.shape[0]
    chosen = torch.zeros(num_pairs, dtype=torch.float32, device=device)          # (P,)
    rejected = torch.zeros(num_pairs, dtype=torch.float32, device=device)        # (P,)
    was_training = model.training
    model.eval()
    done = 0
    try:
        for mb in mine:
            # only response tokens reach the LM head (prompt and last tokens have no target): chosen on the host
            host = response_rows(collate(mb, pairs.tokens, pairs.seq_offsets, pairs.prompt_lens))
            max_seqlen = int(np.diff(host["cu_seqlens"]).max())                  # on the host: no device sync
            b = to_torch(host, device)
            hidden = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], max_seqlen=max_seqlen,
                           cu_seqlens_host=host["cu_seqlens"])                              # (N, H)
            # targets are token ids, range-checked above: no per-batch device sync
            tok = linear_logprobs(hidden.index_select(0, b["scored"]), model.lm_head_weight, b["scored_targets"],
                                  impl=impl, memory_budget_bytes=memory_budget_bytes, check_values=False,
                                  softcap=model.logit_softcap)                                          # (R,)
            nseq = host["cu_seqlens"].size - 1
            seq = torch.zeros(nseq, dtype=torch.float32, device=device).index_add_(
                0, b["scored_seq_index"], tok.float())                                                  # (S,)
            chosen[b["pair_ids"]] = seq[b["chosen_index"]]
            rejected[b["pair_ids"]] = seq[b["rejected_index"]]
            done += 1
            fault_point("cache", done)
    finally:
        model.train(was_training)
        if hasattr(model, "reshard"):
            # FSDP2 keeps the root's parameters unsharded after a forward (backward would reshard them); after
            # no-grad forwards nothing does, and a later training step's root gradients were then lost
            model.reshard()
    if world > 1:
        both = torch.stack([chosen, rejected])                                     # (2, P)
        torch.distributed.all_reduce(both)                                         # each pair is nonzero on one rank
        chosen, rejected = both[0].contiguous(), both[1].contiguous()
    return chosen, rejected


# --- the file -------------------------------------------------------------------------------------------------------

def expected_metadata(model, pairs, tokenizer, weights_fingerprint: str | None = None,
                      compute_dtype: torch.dtype | None = None) -> dict[str, str]:
    dtype = compute_dtype or _model_device_dtype(model)[1]
    return {
        "format": FORMAT,
        "code_version": CODE_VERSION,
        "weights_fingerprint": weights_fingerprint or model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data_fingerprint": pairs.fingerprint,
        "max_length": str(pairs.max_length),
        "max_prompt_length": str(pairs.max_prompt_length),
        "dtype": str(dtype).removeprefix("torch."),
        "num_pairs": str(pairs.num_pairs),
    }


def save(path, chosen: torch.Tensor, rejected: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write atomically: a temp file beside `path`, fsync, then rename over it."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen, rejected = chosen.detach().float().cpu().contiguous(), rejected.detach().float().cpu().contiguous()
    meta = dict(metadata, values_sha256=_values_sha(chosen, rejected))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({KEYS[0]: chosen, KEYS[1]: rejected}, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(chosen (P,), rejected (P,), metadata) from a cache file, verified; RefCacheError naming the file if not."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:     # memory-mapped
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            if names != set(KEYS):
                raise RefCacheError(f"{path}: corrupt reference cache: tensors {sorted(names)}, expected {list(KEYS)}")
            chosen, rejected = f.get_tensor(KEYS[0]), f.get_tensor(KEYS[1])
    except RefCacheError:
        raise
    except Exception as e:                     # safetensors header/size errors: a truncated or foreign file
        raise RefCacheError(f"{path}: corrupt or truncated reference cache ({type(e).__name__}: {e}); delete it "
                            f"to rebuild") from None
    missing = [k for k in (*MATCH_KEYS, "format", "values_sha256") if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise RefCacheError(f"{path}: not a spin_fast reference cache (format {meta.get('format')!r}, missing "
                            f"metadata {missing})")
    p = meta["num_pairs"]
    for name, t in zip(KEYS, (chosen, rejected)):
        if t.dtype != torch.float32 or t.dim() != 1 or str(t.shape[0]) != p:
            raise RefCacheError(f"{path}: corrupt reference cache: {name} is {t.dtype} {tuple(t.shape)}, expected "
                                f"float32 ({p},)")
    if _values_sha(chosen, rejected) != meta["values_sha256"]:
        raise RefCacheError(f"{path}: corrupt reference cache: the values do not match their recorded sha256; "
                            f"delete it to rebuild")
    return chosen, rejected, meta


def _difference(cached: dict, expected: dict) -> str | None:
    for k in MATCH_KEYS:
        if cached.get(k) != expected[k]:
            a, b = str(cached.get(k)), expected[k]
            short = (lambda s: s[:12] + "…") if k.endswith("fingerprint") else (lambda s: s)
            return f"{k.removesuffix('_fingerprint')} {'fingerprint ' if k.endswith('fingerprint') else ''}differs " \
                   f"(cached {short(a)}, now {short(b)})"
    return None


def get_or_build(path, model, pairs, tokenizer, *, weights_fingerprint: str | None = None,
                 token_budget: int | None = None, impl: str = "auto",
                 memory_budget_bytes: int | None = None, lockstep: bool = False,
                 compute_dtype: torch.dtype | None = None) -> RefLogps:
    """The cached reference log-probs for `pairs` under `model`, reused if every fingerprint matches, else
    (re)computed and written. weights_fingerprint: e.g. folder_fingerprint(opponent_dir); default: hash the model's
    parameters. Status and reason are logged and returned. A corrupt file raises RefCacheError naming it.
    lockstep: see compute_ref_logps (True for an FSDP-sharded model); compute_dtype: the dtype the forward really
    runs in, when it is not the parameters' (FSDP mixed precision), recorded and matched as `dtype`."""
    path = Path(path)
    rank, world = _dist()
    device, _ = _model_device_dtype(model)
    expected = expected_metadata(model, pairs, tokenizer, weights_fingerprint, compute_dtype)
    decision = None
    if rank == 0:
        if path.exists():
            try:
                chosen, rejected, meta = load(path)
                diff = _difference(meta, expected)
                decision = ("reused", "every fingerprint matches") if diff is None else ("rebuilt", diff)
            except RefCacheError as e:
                decision = ("error", str(e))
        else:
            decision = ("built", "no cache file")
    if world > 1:
        box = [decision]
        torch.distributed.broadcast_object_list(box, src=0)  # rank 0 decides: no shared file system assumed
        decision = box[0]
    status, reason = decision
    if status == "error":                                    # every rank raises, none is left waiting
        raise RefCacheError(reason)
    if status == "reused":
        if rank == 0:
            both = torch.stack([chosen, rejected]).to(device)                            # (2, P)
        else:
            both = torch.empty(2, pairs.num_pairs, dtype=torch.float32, device=device)
        if world > 1:
            torch.distributed.broadcast(both, src=0)
        chosen, rejected, meta = both[0].contiguous(), both[1].contiguous(), (meta if rank == 0 else expected)
    else:
        chosen, rejected = compute_ref_logps(model, pairs, token_budget=token_budget, impl=impl,
                                             memory_budget_bytes=memory_budget_bytes, lockstep=lockstep)
        meta = expected
        if rank == 0:
            save(path, chosen, rejected, expected)
        if world > 1:
            torch.distributed.barrier()                      # the file exists once anyone returns
    if rank == 0:
        log.info("reference cache %s: %s (%s)", path, status, reason)
    return RefLogps(chosen, rejected, path, status, reason, meta)
