"""The SPIN training phase: FSDP2-sharded policy, packed micro-batches, the fused loss on cached reference log-probs.

One optimizer step = a global batch of pairs (shuffled order, filled up to `tokens_per_step` prompt+chosen+rejected
tokens, or exactly `pairs_per_step` pairs), packed into micro-batches of <= `micro_batch_tokens` per rank, the same count on every rank
(packing.plan_micro_batches). Each micro-batch: packed forward -> final hidden states -> kernels.spin_loss_from_hidden
with the cached Σ log π_t(y|x), Σ log π_t(y'|x) and `normalizer` = the step's global pair count, so

    loss_step = (1 / P_step) Σ_{pairs p of the step, all ranks, all micro-batches} l(β m_p)

and the summed gradients (FSDP reduce-scatter with divide factor 1: a SUM over ranks) are exactly ∇ loss_step,
whatever the number of ranks or micro-batches. The step plan depends only on (seed, epoch, tokens_per_step), not on
the world size, so N ranks train the same steps as one process.

No host syncs inside a step: batch shapes, S and P come from the host-side plan; metrics stay on the device and are
read (one all_reduce + one copy) every `log_every` steps, when metrics.jsonl gets one row per step of the window.

Sharding (torchtitan order): activation checkpointing -> torch.compile per block -> fully_shard per block, then the
root (embedding, final norm, LM head), MixedPrecisionPolicy(bf16 params, fp32 reduce) on CUDA, fp32 on CPU.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import InputError
from .integrity import dumps
from .kernels import spin_loss_from_hidden
from .packing import check_token_range, collate, pair_token_counts, plan_micro_batches, response_rows, to_torch
from .runtime import fault_point

METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


# --- the step plan --------------------------------------------------------------------------------------------------

@dataclass
class StepPlan:
    units: np.ndarray                    # (U_step,) global unit (pair) ids of this optimizer step
    micro_batches: list[list[list[int]]]  # [rank][micro-batch] -> global unit ids
    tokens: int                          # prompt+chosen+rejected tokens of the step, all ranks
    epoch: int
    dropped_in_epoch: int = 0            # always 0 (no unit is left out; kept for the summaries' key)
    padding: list[list[bool]] | None = None  # [rank][micro-batch]: a zero-weight replica (None: no padding)


def _group_steps(order: np.ndarray, pair_tokens: np.ndarray, tokens_per_step: int,
                 pairs_per_step: int = 0) -> list[list[int]]:
    """Cut `order` into consecutive steps: add pairs while the step stays <= tokens_per_step (at least one pair a
    step), or (pairs_per_step > 0) exactly that many pairs a step, the epoch's last the remainder. Independent of
    the world size: the step's pairs and its loss normaliser are what one process trains."""
    if pairs_per_step > 0:
        return [order[i:i + pairs_per_step].tolist() for i in range(0, len(order), pairs_per_step)]
    steps, cur, cur_tokens = [], [], 0
    for p in order.tolist():
        t = int(pair_tokens[p])
        if cur and cur_tokens + t > tokens_per_step:
            steps.append(cur)
            cur, cur_tokens = [], 0
        cur.append(p)
        cur_tokens += t
    if cur:
        steps.append(cur)
    return steps


def _deal(ids: np.ndarray, pair_tokens: np.ndarray, budget: int, world: int):
    """One step's units into micro-batches, the same count on every rank: (micro_batches, padding).

    The packer reaches a multiple of `world` micro-batches by splitting ones of several pairs; when the step has
    too few pairs for that (e.g. 3 long pairs, 3 micro-batches, 2 ranks), each pair gets its own micro-batch and
    the missing ones (< world) are zero-weight replicas of the step's cheapest pair: the rank runs its
    forward/backward (FSDP's collectives need every rank in lockstep) with the loss multiplied by 0, so the step's
    pairs, its normaliser and its gradient are exactly those of one process (moving pairs between steps instead
    would change what is trained)."""
    costs = pair_tokens[ids]
    bins = plan_micro_batches(costs, budget, 1)[0]                           # one rank's first-fit packing
    need = -(-len(bins) // world) * world
    if len(ids) >= need:                                 # splitting reaches `need` (a bin with >= 2 pairs is left)
        local = plan_micro_batches(costs, budget, world)
        return [[ids[mb].tolist() for mb in rank] for rank in local], None
    # too few pairs to split further: one micro-batch per pair (fewer than `need` of them), then the replicas
    cheapest, n = int(np.argmin(costs)), len(ids)
    mbs = [(int(costs[i]), [int(ids[i])], False) for i in range(n)]
    need = -(-n // world) * world
    mbs += [(int(costs[cheapest]), [int(ids[cheapest])], True)] * (need - n)
    mbs.sort(key=lambda m: -m[0])                                                    # heaviest first (stable)
    per_rank, load = need // world, [0] * world
    out, pad = [[] for _ in range(world)], [[] for _ in range(world)]
    for cost, mb, is_pad in mbs:         # to the least loaded rank with a free slot (ties: lowest rank)
        r = min((r for r in range(world) if len(out[r]) < per_rank), key=lambda r: load[r])
        out[r].append(mb)
        pad[r].append(is_pad)
        load[r] += cost
    return out, pad


def plan_steps(unit_tokens, *, tokens_per_step: int, micro_batch_tokens: int, world_size: int, seed: int,
               epochs: int, max_steps: int = -1, pairs_per_step: int = 0) -> list[StepPlan]:
    """Every optimizer step of the phase, epoch by epoch (a fresh permutation of the units per epoch, from
    (seed, epoch) only). unit_tokens (U,): tokens of each training unit (a SPIN pair: prompt+chosen+prompt+rejected;
    an SFT example). pairs_per_step > 0: steps of exactly that many units instead of a token budget (the epoch's
    last step: the remainder). The steps' units do not depend on world_size (only how they are dealt to ranks does).
    InputError if a unit exceeds micro_batch_tokens."""
    pair_tokens = np.asarray(unit_tokens, dtype=np.int64)                     # (U,)
    num_pairs = len(pair_tokens)
    if num_pairs == 0:
        raise InputError("no training units")
    longest = int(pair_tokens.max())
    if longest > micro_batch_tokens:
        p = int(pair_tokens.argmax())
        raise InputError(f"pair {p} has {longest} tokens, more than train.micro_batch_tokens={micro_batch_tokens}")
    plans = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
        for step in _group_steps(order, pair_tokens, tokens_per_step, pairs_per_step):
            ids = np.asarray(step, dtype=np.int64)
            mbs, pad = _deal(ids, pair_tokens, micro_batch_tokens, world_size)
            plans.append(StepPlan(ids, mbs, int(pair_tokens[ids].sum()), epoch, 0, pad))
            if 0 < max_steps <= len(plans):
                return plans
    return plans


# --- optimizer and schedule -----------------------------------------------------------------------------------------

def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """cfg: TrainCfg. AdamW: the fused kernel (CPU and CUDA, DTensor-aware under FSDP2): the foreach path builds
    params-sized temporaries each step (measured: +514 MiB peak RSS on SmolLM2-135M fp32, 2972 vs 2458 MiB for
    weights + grads + states), the fused one updates in place. RMSprop has no fused kernel: foreach."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except RuntimeError:   # a device/dtype without the fused kernel
            return torch.optim.AdamW(params, foreach=True, **kw)
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.eps,
                               weight_decay=cfg.weight_decay, foreach=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as Hugging Face's schedulers (SPIN's):
    linear warmup step / warmup, then linear decay (total - step) / (total - warmup) or half a cosine, to 0."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer, cfg, total_steps: int):
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if warmup >= total_steps:
        logging.getLogger(__name__).warning(
            "warmup (%d steps = ceil(warmup_ratio %.3g x %d steps)) covers the whole phase: the lr never reaches its "
            "peak and step 1 trains at lr 0; use more data, a smaller train.tokens_per_step or warmup_ratio",
            warmup, cfg.warmup_ratio, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.lr_schedule))


# --- sharding -------------------------------------------------------------------------------------------------------

def compute_dtype_for(mixed_precision: str, device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else param_dtype
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[mixed_precision]


def prepare_model(model, cfg, *, distributed: bool, compute_dtype: torch.dtype):
    """Activation checkpointing -> per-block compile -> FSDP2 per block and root (when distributed).
    cfg: TrainCfg. Returns the model (same object)."""
    for blk in model.layers:
        blk.checkpoint_activations = cfg.activation_checkpointing
    if cfg.compile:
        for blk in model.layers:
            blk.compile(dynamic=True)       # packed micro-batches change N every step: no recompiles
    from .lora import has_adapters
    if not has_adapters(model):     # LoRA (lora.attach): the base stays frozen, only the adapters train
        for p in model.parameters():
            p.requires_grad_(True)
    if distributed:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        param_dtype = next(model.parameters()).dtype
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != param_dtype else None,
                                  reduce_dtype=torch.float32)
        for blk in model.layers:
            fully_shard(blk, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        # The loss is already normalised by the GLOBAL pair count: ranks' gradients must be summed, not averaged.
        # Divide factor 1 with plain SUM collectives (gloo has no PREMUL_SUM; NCCL's SUM is its zero-copy path).
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
    elif compute_dtype != next(model.parameters()).dtype:
        raise InputError("mixed precision without FSDP is not supported: launch with torchrun (even for 1 process) "
                         "or set model.mixed_precision=float32")
    return model


def gather_full_state_dict(model, distributed: bool) -> dict[str, torch.Tensor] | None:
    """Whole weights on the CPU of rank 0 (None elsewhere); a collective under FSDP."""
    if not distributed:
        return {n: p.detach() for n, p in model.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


# --- metrics --------------------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one row per step, rank 0) and optional TensorBoard events."""

    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None):
        self.file = open(path, "a") if path is not None else None
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") \
                    from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(dumps(row) + "\n")                   # NaN -> null: every line stays JSON
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def truncate_after(self, step: int) -> None:
        """Resume: drop rows of steps after `step` (written after the checkpoint being resumed from)."""
        if self.file is None:
            return
        path = Path(self.file.name)
        self.file.close()
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                break                                   # a torn last line of a killed run
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# --- what is trained: SPIN pairs (or SFT examples, sft.py) ----------------------------------------------------------

class SpinTask:
    """SPIN pairs against cached reference log-probs (P,) each; units are pairs, the normalizer their count."""
    metric_names = METRIC_NAMES
    unit_name = "pairs"

    def __init__(self, pairs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, cfg, device: torch.device):
        self.pairs, self.cfg, self.device = pairs, cfg, device
        self.ref_chosen = ref_chosen.to(device=device, dtype=torch.float32)       # (P,)
        self.ref_rejected = ref_rejected.to(device=device, dtype=torch.float32)   # (P,)
        self.tokens = pairs.tokens
        self.unit_tokens = pair_token_counts(pairs.seq_offsets).sum(1)            # (P,)

    def normalizer(self, unit_ids: np.ndarray) -> float:
        return float(len(unit_ids))

    def micro_batch(self, model, pair_ids: list[int], normalizer: float, weight: float = 1.0) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its (7,) metric contributions (sums over its pairs /
        normalizer, so the step's rows add up to means over the step's pairs). weight 0: a padding replica."""
        p, cfg = self.pairs, self.cfg
        # only the R response rows (prompt rows and last tokens have no target) go through the LM head: chosen on
        # the host, so the step does one index_select and no host sync
        host = response_rows(collate(pair_ids, p.tokens, p.seq_offsets, p.prompt_lens))
        max_seqlen = int(np.diff(host["cu_seqlens"]).max())
        num_seqs = host["cu_seqlens"].size - 1
        b = to_torch(host, self.device)
        hidden = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], max_seqlen=max_seqlen,
                       cu_seqlens_host=host["cu_seqlens"])                                  # (N, H)
        loss, m = spin_loss_from_hidden(
            hidden.index_select(0, b["scored"]), model.lm_head_weight, b["scored_targets"],         # (R, H), (R,)
            b["scored_seq_index"], b["chosen_index"], b["rejected_index"],
            self.ref_chosen[b["pair_ids"]], self.ref_rejected[b["pair_ids"]], beta=cfg.beta,
            loss_type=cfg.loss_type, normalizer=normalizer, impl=cfg.impl, rpo_alpha=cfg.rpo_alpha,
            num_sequences=num_seqs, check_values=False, memory_budget_bytes=cfg.logits_budget_mib << 20,
            softcap=model.logit_softcap)
        if weight != 1.0:
            loss = loss * weight
        loss.backward()
        share = len(pair_ids) / normalizer * weight
        return torch.stack([loss.detach().float()] + [m[k] * share for k in METRIC_NAMES[1:]])      # (7,)


# --- the loop -------------------------------------------------------------------------------------------------------

class TrainingDiverged(InputError):   # the config made it diverge (train.lr, ...): one line, exit 2
    """A non-finite loss, gradient norm or weight: the phase stops and publishes nothing (one line, exit 2)."""


def _zero_bad_gradients(params, ok: torch.Tensor) -> None:
    """Gradients *= ok (a () bool on the device, the same on every rank: from the global grad norm), NaN/inf first
    mapped to 0 (0 * NaN is NaN). The optimizer then steps on a zero gradient: no host sync decides anything. An
    exact skip would need a per-step sync, or a copy of the weights and optimizer state to roll back to."""
    keep = ok.float()
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad     # DTensor: this rank's shard
            g.nan_to_num_(0.0, 0.0, 0.0).mul_(keep.to(g.dtype))


def _weights_finite(params, distributed: bool) -> bool:
    """Once at the end of a phase: every weight finite (an update can overflow after the last loss was seen)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float()
    if distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


class Trainer:
    """Trains `model` (prepared by prepare_model) on a task's units (SpinTask: pairs + cached reference log-probs)."""

    def __init__(self, model, task, cfg, *, seed: int, device: torch.device, distributed: bool,
                 metrics: MetricsLog | None = None):
        self.model, self.task, self.cfg, self.device = model, task, cfg, device
        self.distributed = distributed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        check_token_range(task.tokens, model.lm_head_weight.shape[0])
        # micro_batch_tokens 0 (auto; Config.validate resolves it from data.max_length): the longest unit's power of 2
        mbt = cfg.micro_batch_tokens or 1 << max(0, int(np.max(task.unit_tokens)) - 1).bit_length()
        self.steps = plan_steps(task.unit_tokens, tokens_per_step=cfg.tokens_per_step,
                                micro_batch_tokens=mbt, world_size=self.world, seed=seed,
                                epochs=cfg.epochs, max_steps=cfg.max_steps,
                                pairs_per_step=getattr(cfg, "pairs_per_step", 0))
        self.dropped_pairs = 0                 # every unit is trained (steps too small for the ranks are padded)
        self.optimizer = build_optimizer(model.parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(self.steps))
        self.metrics = metrics
        self.max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")

    def _flush(self, window: list[dict], t_start: float, bar) -> None:
        """The one host sync of a window: global metric sums, then one JSONL row per step."""
        vecs = torch.stack([w.pop("vec") for w in window])                                   # (K, 7)
        if self.distributed:
            dist.all_reduce(vecs)
        norms = torch.stack([w.pop("grad_norm") for w in window])                            # (K,)
        values, norms = vecs.tolist(), norms.tolist()
        tokens = sum(w["tokens"] for w in window)
        rate = tokens / max(time.perf_counter() - t_start, 1e-9)
        for w, v, g in zip(window, values, norms):
            row = {"step": w["step"], "epoch": w["epoch"], **dict(zip(self.task.metric_names, v)), "grad_norm": g,
                   "lr": w["lr"], self.task.unit_name: w["units"], "tokens": w["tokens"], "tokens_per_s": rate,
                   "elapsed_s": w["elapsed_s"]}
            if not (math.isfinite(v[0]) and math.isfinite(g)):
                row["bad"] = True                   # zeroed on device if allowed (train.max_bad_steps), else fatal
                self.bad_steps.append((w["step"], v[0], g))
            if self.rank == 0 and self.metrics is not None:
                self.metrics.write(row)
        if self.rank == 0 and self.metrics is not None:
            self.metrics.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{values[-1][0]:.4f}", tok_s=f"{rate:.0f}")
        self.last_row = row
        # the values are global (all-reduced), so every rank stops here alike
        if len(self.bad_steps) > self.cfg.max_bad_steps:
            step, loss, norm = self.bad_steps[self.cfg.max_bad_steps]
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {loss}, grad norm {norm} ({len(self.bad_steps)} non-finite "
                f"step(s) > train.max_bad_steps={self.cfg.max_bad_steps}); nothing of this phase is published; lower "
                f"train.lr (now {self.cfg.lr:g}) or allow skipping with train.max_bad_steps")

    def train(self, checkpoint_dir: Path | None = None, checkpoint_every: int = 0, on_epoch_end=None) -> dict:
        """Run every step of the plan. checkpoint_dir: resume from its latest checkpoint if there is one, and
        (checkpoint_every > 0) save one every that many steps. on_epoch_end(epoch) -> bool, called on every rank
        after each epoch's last step (metrics flushed first): True stops the phase there (SFT early stopping)."""
        from tqdm import tqdm

        from . import checkpoint
        cfg = self.cfg
        self.model.train()
        start = 0
        plan = checkpoint.plan_fingerprint(self.steps) if checkpoint_dir is not None else ""
        if checkpoint_dir is not None and (found := checkpoint.usable(checkpoint_dir)) is not None:
            start = checkpoint.load(found, self.model, self.optimizer, self.scheduler, plan)
        if checkpoint_dir is not None and self.rank == 0 and self.metrics is not None:
            self.metrics.truncate_after(start)          # rows after the checkpoint (all: none usable) go
        bar = tqdm(total=len(self.steps), initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.rank != 0 or not cfg.progress)
        t0 = time.perf_counter()
        window, t_window = [], t0
        tokens_done = 0
        self.last_row, self.bad_steps = {}, []
        done = len(self.steps)
        for i, step in enumerate(self.steps):
            if i < start:
                continue
            normalizer = self.task.normalizer(step.units)
            vec = None
            pad = step.padding[self.rank] if step.padding else None
            for j, mb in enumerate(step.micro_batches[self.rank]):
                # a padding micro-batch (a replica, see _deal) runs with weight 0: no gradient, no metrics
                v = self.task.micro_batch(self.model, mb, normalizer, weight=0.0 if pad and pad[j] else 1.0)
                vec = v if vec is None else vec + v
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm, foreach=True)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            if cfg.max_bad_steps > 0:
                _zero_bad_gradients(self.model.parameters(), torch.isfinite(grad_norm))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens_done += step.tokens
            window.append({"step": i + 1, "epoch": step.epoch, "vec": vec, "grad_norm": grad_norm.float(),
                           "lr": lr, "units": len(step.units), "tokens": step.tokens,
                           "elapsed_s": time.perf_counter() - t0})
            bar.update(1)
            save_now = checkpoint_dir is not None and checkpoint_every > 0 and (i + 1) % checkpoint_every == 0 \
                and i + 1 < len(self.steps)
            if len(window) == cfg.log_every or i == len(self.steps) - 1 or save_now:
                self._flush(window, t_window, bar)
                window, t_window = [], time.perf_counter()
            if save_now:
                checkpoint.save(checkpoint_dir, i + 1, self.model, self.optimizer, self.scheduler, plan)
            fault_point(getattr(self.task, "fault_phase", "train"), i + 1)     # "train" | "sft"
            if on_epoch_end is not None and (i + 1 == len(self.steps) or self.steps[i + 1].epoch != step.epoch):
                if window:                               # one host sync per epoch
                    self._flush(window, t_window, bar)
                    window, t_window = [], time.perf_counter()
                if on_epoch_end(step.epoch):
                    done = i + 1
                    break
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - t0
        if not _weights_finite(self.model.parameters(), self.distributed):
            raise TrainingDiverged(f"training diverged: weights are not finite after step {done}; "
                                   f"nothing of this phase is published; lower train.lr (now {cfg.lr:g})")
        return {"steps": done, "planned_steps": len(self.steps), "resumed_at": start, "tokens": tokens_done, "wall_s": wall,
                "dropped_pairs": self.dropped_pairs, "tokens_per_s": tokens_done / max(wall, 1e-9),
                "final": self.last_row, "bad_steps": [s for s, _, _ in self.bad_steps]}
