"""The phases of a SPIN iteration on an initialised runtime: generation, reference cache + training, SFT.

Each takes the opponent's HF folder and an output folder and returns its summary dict (tokens, wall time,
tokens/s). They are what `torchrun -m spin_fast.train --pairs ...` runs alone (training phase) and what loop.py
chains per iteration.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from . import lora, refcache
from .config import Config
from .hf_io import load_model, load_model_sharded, save_model
from .kernels import loss_impl_report
from .memory import PhaseMemory, peak_record, release
from .runtime import Runtime, fault_point
from .trainer import MetricsLog, SpinTask, Trainer, compute_dtype_for, gather_full_state_dict, prepare_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("spin_fast.train")


def _save_dtype(cfg: Config, model_dir: Path, master: torch.dtype) -> torch.dtype:
    if cfg.model.save_dtype != "auto":
        return DTYPES[cfg.model.save_dtype]
    hf = json.loads((model_dir / "config.json").read_text())
    return DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), master)


def _load_prepared(cfg: Config, rt: Runtime, model_dir: Path, train_cfg, lora_cfg=None):
    """The starting model on this rank, prepared for training (checkpointing -> compile -> FSDP2).
    lora_cfg (train.lora, rank > 0): freeze the loaded weights (the merged opponent pi_t) and attach fresh
    adapters, B = 0, so the model still IS pi_t for the reference cache (lora.py). Returns (model, master dtype,
    compute dtype)."""
    master = DTYPES[cfg.model.dtype]
    compute_dtype = compute_dtype_for(cfg.model.mixed_precision, rt.device, master)
    prepare = lambda m: prepare_model(m, train_cfg, distributed=rt.distributed, compute_dtype=compute_dtype)
    lora_cfg = lora_cfg if lora.enabled(lora_cfg) else None
    if rt.distributed:
        # shard on meta, then each rank reads only its rows: no rank holds the whole model (LoRA: its adapters are
        # attached on meta and each rank's shards filled as a whole-model attach would fill them)
        model = load_model_sharded(model_dir, prepare, rt.device, dtype=master, attn_backend=cfg.model.attn_backend,
                                   lora_cfg=lora_cfg, lora_seed=cfg.seed)
    else:
        model = load_model(model_dir, device=rt.device, dtype=master, attn_backend=cfg.model.attn_backend)
        if lora_cfg is not None:
            lora.attach(model, lora_cfg, seed=cfg.seed)
        prepare(model)
    return model, master, compute_dtype


def _open_metrics(rt: Runtime, out_dir: Path, *, keep: bool, tensorboard: bool) -> MetricsLog | None:
    """Rank 0's metrics.jsonl in out_dir (started afresh unless `keep`: a resumed phase truncates it instead)."""
    if not rt.is_main:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    if not keep:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    return MetricsLog(out_dir / "metrics.jsonl", out_dir / "tb" if tensorboard else None)


def _save_trained(cfg: Config, rt: Runtime, model, model_dir: Path, out_dir: Path, master: torch.dtype,
                  lora_cfg=None) -> float:
    """Gather the weights to rank 0, write the HF folder, and wait until it is complete; returns seconds.
    LoRA: the folder holds the merged weights W + (alpha/r) B A (the next iteration's opponent and base);
    train.lora.save_peft also writes out_dir/adapter in PEFT's format (for model_dir, this phase's base)."""
    t0 = time.perf_counter()
    state = gather_full_state_dict(model, rt.distributed)
    if rt.is_main and lora.enabled(lora_cfg):
        if lora_cfg.save_peft:
            lora.save_peft(state, lora_cfg, model.config, out_dir / "adapter", base_model=str(model_dir))
        state = lora.merged_state_dict(state, lora_cfg)
    if rt.is_main:
        save_model(model, out_dir, source_dir=model_dir, state_dict=state, dtype=_save_dtype(cfg, model_dir, master))
        fault_point("hf_save", 1)                     # the HF folder is written, not yet published
    if rt.distributed:
        torch.distributed.barrier()        # the folder is complete before any rank reads it
    return time.perf_counter() - t0


def train_phase(cfg: Config, rt: Runtime, *, model_dir: Path, out_dir: Path, pairs, tokenizer, heldout=None,
                cache_path: Path | None = None, checkpoint_dir: Path | None = None) -> dict:
    """Reference cache + training of one SPIN iteration; writes the HF folder and metrics into out_dir.
    heldout: a PairSet of held-out prompts (human answer vs the opponent's): after training, the discriminator
    check. checkpoint_dir: resume from / save checkpoints there (cfg.train.checkpoint_every).
    Returns the phase summary (also what summary.json holds)."""
    mem = {"cache": PhaseMemory(rt.device), "train": PhaseMemory(rt.device), "save": PhaseMemory(rt.device)}
    mem["cache"].__enter__()                # the model load counts with the cache pass: the phase's first use
    model, master, compute_dtype = _load_prepared(cfg, rt, model_dir, cfg.train, lora_cfg=cfg.train.lora)

    # 1. reference log-probs of the opponent (= these very weights, before the first step), once per iteration
    t0 = time.perf_counter()
    if cache_path is None:
        cache_path = Path(cfg.ref_cache) if cfg.ref_cache else out_dir / "ref_logps.safetensors"
    cache_opts = dict(weights_fingerprint=refcache.folder_fingerprint(model_dir),
                      token_budget=cfg.train.micro_batch_tokens, impl=cfg.train.impl,
                      memory_budget_bytes=cfg.train.logits_budget_mib << 20, lockstep=rt.distributed,
                      compute_dtype=compute_dtype)
    ref = refcache.get_or_build(cache_path, model, pairs, tokenizer, **cache_opts)
    held_ref = None
    if heldout is not None:
        held_ref = refcache.get_or_build(cache_path.with_name(cache_path.stem + "_heldout.safetensors"), model,
                                         heldout, tokenizer, **cache_opts)
    cache_s = time.perf_counter() - t0
    release()               # the cache pass's freed activations back to the OS: training's heap starts lean
    mem["cache"].__exit__(None, None, None)
    total_tokens = int(pairs.seq_offsets[-1])
    if rt.is_main:
        log.info("reference cache %s: %s (%s), %.1f s", cache_path, ref.status, ref.reason, cache_s)

    # 2. training
    resuming = checkpoint_dir is not None and (Path(checkpoint_dir) / "latest").is_file()
    metrics = _open_metrics(rt, out_dir, keep=resuming, tensorboard=cfg.train.tensorboard)
    with mem["train"]:
        task = SpinTask(pairs, ref.chosen, ref.rejected, cfg.train, rt.device)
        trainer = Trainer(model, task, cfg.train, seed=cfg.seed, device=rt.device, distributed=rt.distributed,
                          metrics=metrics)
        result = trainer.train(checkpoint_dir=checkpoint_dir, checkpoint_every=cfg.train.checkpoint_every)
        if metrics is not None:
            metrics.close()
        # the optimizer states and gradients are not needed any more: gone before the held-out pass and the save
        trainer.optimizer.state.clear()
        trainer.optimizer.zero_grad(set_to_none=True)
        release()           # ... and their pages (and the activations') back to the OS: the save starts lean
        held = heldout_check(model, heldout, held_ref, cfg, rt) if heldout is not None else None

    # 3. the trained policy as an HF folder
    with mem["save"]:
        save_s = _save_trained(cfg, rt, model, model_dir, out_dir, master, lora_cfg=cfg.train.lora)
    peak = peak_record(mem, rt.distributed)
    return {
        "pairs": pairs.num_pairs, "world_size": rt.world, "device": str(rt.device),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "cache": {"status": ref.status, "reason": ref.reason, "path": str(cache_path), "tokens": total_tokens,
                  "wall_s": cache_s, "tokens_per_s": total_tokens / max(cache_s, 1e-9)},
        "train": {"steps": result["steps"], "tokens": result["tokens"], "wall_s": result["wall_s"],
                  "dropped_pairs": result["dropped_pairs"], "resumed_at": result["resumed_at"],
                  "tokens_per_s": result["tokens_per_s"], "final": result["final"],
                  "bad_steps": result["bad_steps"]},
        "save_s": save_s,
        "heldout": held,
        "peak_memory": peak,
        "loss_impl": loss_impl_report(cfg.train.impl, rt.device),     # did impl=auto fall back from Triton?
    }


def heldout_check(model, heldout, ref, cfg, rt: Runtime) -> dict:
    """The discriminator on held-out prompts: margin_p = β[(log π_θ(y) − log π_t(y)) − (log π_θ(y') − log π_t(y'))]
    with y the human answer and y' the opponent's own; the fraction of pairs with margin > 0 (π_θ tells the human
    answer from the opponent's) and the mean margin. Near 0.5 / 0: the opponent can no longer be told apart."""
    chosen, rejected = refcache.compute_ref_logps(model, heldout, token_budget=cfg.train.micro_batch_tokens,
                                                  impl=cfg.train.impl, memory_budget_bytes=cfg.train.logits_budget_mib
                                                  << 20, lockstep=rt.distributed)
    margin = cfg.train.beta * ((chosen - ref.chosen) - (rejected - ref.rejected))            # (P,)
    return {"pairs": heldout.num_pairs, "accuracy": float((margin > 0).float().mean()),
            "mean_margin": float(margin.mean())}


def generate_phase(cfg: Config, rt: Runtime, *, model_dir: Path, data: Path, out: Path, seed: int) -> dict:
    """The opponent's responses to every prompt of `data` into `out` (spin_fast.generate; resumable: prompts
    already in `out` are skipped)."""
    from . import generate
    g = cfg.generate
    argv = ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-new-tokens",
            str(g.max_new_tokens), "--temperature", str(g.temperature), "--top-p", str(g.top_p), "--top-k",
            str(g.top_k), "--batch-size", str(g.batch_size), "--seed", str(seed), "--max-prompt-length",
            str(cfg.data.max_prompt_length), "--attn-backend", cfg.model.attn_backend]
    if g.dtype != "auto":
        argv += ["--dtype", g.dtype]
    if cfg.data.chat_template:
        argv += ["--chat-template", cfg.data.chat_template]
    if cfg.data.skip_bad_rows:
        argv += ["--skip-bad-rows"]
    if not cfg.train.progress:
        argv += ["--no-progress"]
    args = generate.parse_args(argv)
    args.device = str(rt.device)
    t0 = time.perf_counter()
    with PhaseMemory(rt.device) as mem:
        summary = generate.run(args, rt)
    summary["wall_s"] = time.perf_counter() - t0
    summary["peak_memory"] = peak_record({"generate": mem}, rt.distributed)
    release()               # the sampler, its KV cache and the opponent copy are gone: their pages back to the OS
    return summary


def sft_phase(cfg: Config, rt: Runtime, *, model_dir: Path, out_dir: Path, seqs, train_cfg=None,
              heldout=None) -> dict:
    """Supervised fine-tuning (cross-entropy on response tokens) with the same packed path; writes an HF folder
    and metrics.jsonl into out_dir. train_cfg: the TrainCfg to use (default cfg.train). heldout: a SequenceSet
    scored after every epoch (sft.early_stopping_patience > 0: early stopping on it, the best epoch's weights
    are the ones saved; see sft.EarlyStopping)."""
    from .sft import EarlyStopping, SftTask, heldout_loss
    tcfg = train_cfg or cfg.train
    model, master, _ = _load_prepared(cfg, rt, model_dir, tcfg)
    metrics = _open_metrics(rt, out_dir, keep=False, tensorboard=False)
    trainer = Trainer(model, SftTask(seqs, tcfg, rt.device), tcfg, seed=cfg.seed, device=rt.device,
                      distributed=rt.distributed, metrics=metrics)
    stopper = None
    if heldout is not None:
        held = SftTask(heldout, tcfg, rt.device)
        stopper = EarlyStopping(model, lambda: heldout_loss(model, held, tcfg.micro_batch_tokens, rank=rt.rank,
                                                            world=rt.world, distributed=rt.distributed),
                                patience=cfg.sft.early_stopping_patience, min_delta=cfg.sft.early_stopping_min_delta)
    result = trainer.train(on_epoch_end=stopper)
    if metrics is not None:
        metrics.close()
    if stopper is not None:
        stopper.restore()
    _save_trained(cfg, rt, model, model_dir, out_dir, master)
    out = {"sequences": seqs.num_sequences, "steps": result["steps"], "tokens": result["tokens"],
           "wall_s": result["wall_s"], "tokens_per_s": result["tokens_per_s"], "final": result["final"],
           "loss_impl": loss_impl_report(tcfg.impl, rt.device)}
    if stopper is not None:
        out["early_stopping"] = {**stopper.summary(), "heldout_sequences": heldout.num_sequences}
        if rt.is_main:
            e = out["early_stopping"]
            log.info("SFT: held-out loss per epoch %s; kept epoch %d (%.4f)%s",
                     " ".join(f"{v:.4f}" for v in e["heldout_loss"]), e["best_epoch"], e["best_heldout_loss"],
                     f"; stopped after {e['epochs_run']} of {tcfg.epochs} epochs" if e["stopped_early"] else "")
    return out


