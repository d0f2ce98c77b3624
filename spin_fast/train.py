"""`torchrun --nproc_per_node=N -m spin_fast.train`: one SPIN training phase on existing pairs.

    torchrun --nproc_per_node=N -m spin_fast.train --model DIR --pairs FILE --output DIR [--beta 0.1] [--lr 5e-7]
        [--epochs 1] [--max-length 1024] [--max-prompt-length 512] [--tokens-per-step K] [--seed 0]
        [--config cfg.yaml] [--any.config.key=value ...]

The opponent π_t is `--model`: its reference log-probs over the pairs are computed once (or reused from
OUTPUT/ref_logps.safetensors when every fingerprint matches), then the policy, starting from the same weights, is
trained. Output: OUTPUT/ as a Hugging Face folder (weights, config, tokenizer), OUTPUT/metrics.jsonl (one row per
optimizer step) and OUTPUT/summary.json (tokens, wall time and tokens/s of the cache and train phases), written last.
`python -m spin_fast.train --help-config` lists every config key.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import refcache
from .config import Config, load_config, reference_markdown, to_dict
from .data import load_pairs
from .hf_io import load_model, save_model
from .runtime import Runtime, init_runtime, run_main, shutdown
from .trainer import MetricsLog, Trainer, compute_dtype_for, gather_full_state_dict, prepare_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("spin_fast.train")


def parse_args(argv=None) -> Config:
    ap = argparse.ArgumentParser(prog="torchrun -m spin_fast.train", description=__doc__.split("\n")[0],
                                 epilog="Any config key is a flag: --train.lr=1e-6, --data.max_length 512, ... "
                                        "(see --help-config)")
    ap.add_argument("--config", default=None, help="YAML config file (flags override it)")
    ap.add_argument("--help-config", action="store_true", help="print every config key and exit")
    args, rest = ap.parse_known_args(argv)
    if args.help_config:
        print(reference_markdown())
        sys.exit(0)
    cfg = load_config(args.config, rest)
    for key, value in (("model.path", cfg.model.path), ("output", cfg.output)):
        if value is None:
            raise ValueError(f"config {key}: required (e.g. --{key.split('.')[0]} ...)")
    if not cfg.data.pairs:
        raise ValueError("config data.pairs: required for the training phase (--pairs FILE)")
    return cfg


def _save_dtype(cfg: Config, model_dir: Path, master: torch.dtype) -> torch.dtype:
    if cfg.model.save_dtype != "auto":
        return DTYPES[cfg.model.save_dtype]
    hf = json.loads((model_dir / "config.json").read_text())
    return DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), master)


def train_phase(cfg: Config, rt: Runtime, *, model_dir: Path, out_dir: Path, pairs, tokenizer) -> dict:
    """Reference cache + training of one SPIN iteration; writes the HF folder and metrics into out_dir.
    Returns the phase summary (also what summary.json holds)."""
    master = DTYPES[cfg.model.dtype]
    model = load_model(model_dir, device=rt.device, dtype=master, attn_backend=cfg.model.attn_backend)
    compute_dtype = compute_dtype_for(cfg.model.mixed_precision, rt.device, master)
    prepare_model(model, cfg.train, distributed=rt.distributed, compute_dtype=compute_dtype)

    # 1. reference log-probs of the opponent (= these very weights, before the first step), once per iteration
    t0 = time.perf_counter()
    cache_path = Path(cfg.ref_cache) if cfg.ref_cache else out_dir / "ref_logps.safetensors"
    ref = refcache.get_or_build(cache_path, model, pairs, tokenizer,
                                weights_fingerprint=refcache.folder_fingerprint(model_dir),
                                token_budget=cfg.train.micro_batch_tokens, impl=cfg.train.impl,
                                memory_budget_bytes=cfg.train.logits_budget_mib << 20, lockstep=rt.distributed,
                                compute_dtype=compute_dtype)
    cache_s = time.perf_counter() - t0
    total_tokens = int(pairs.seq_offsets[-1])
    if rt.is_main:
        log.info("reference cache %s: %s (%s), %.1f s", cache_path, ref.status, ref.reason, cache_s)

    # 2. training
    metrics = None
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        metrics = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tb" if cfg.train.tensorboard else None)
    trainer = Trainer(model, pairs, ref.chosen, ref.rejected, cfg.train, seed=cfg.seed, device=rt.device,
                      distributed=rt.distributed, metrics=metrics)
    result = trainer.train()
    if metrics is not None:
        metrics.close()

    # 3. the trained policy as an HF folder
    t1 = time.perf_counter()
    state = gather_full_state_dict(model, rt.distributed)
    if rt.is_main:
        save_model(model, out_dir, source_dir=model_dir, state_dict=state, dtype=_save_dtype(cfg, model_dir, master))
    save_s = time.perf_counter() - t1
    return {
        "pairs": pairs.num_pairs, "world_size": rt.world, "device": str(rt.device),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "cache": {"status": ref.status, "reason": ref.reason, "path": str(cache_path), "tokens": total_tokens,
                  "wall_s": cache_s, "tokens_per_s": total_tokens / max(cache_s, 1e-9)},
        "train": {"steps": result["steps"], "tokens": result["tokens"], "wall_s": result["wall_s"],
                  "dropped_pairs": result["dropped_pairs"],
                  "tokens_per_s": result["tokens_per_s"], "final": result["final"]},
        "save_s": save_s,
    }


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device, need_group_on_cuda=True)
    logging.basicConfig(level=logging.INFO if rt.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(cfg.seed)
    from transformers import AutoTokenizer
    model_dir, out_dir = Path(cfg.model.path), Path(cfg.output)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, bad = load_pairs(cfg.data.pairs, tokenizer, generated=cfg.data.generated or None,
                            max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                            chat_template=cfg.data.chat_template, skip_bad_rows=cfg.data.skip_bad_rows)
    data_s = time.perf_counter() - t0
    if rt.is_main:
        for msg in bad[:10]:
            log.warning("skipped: %s", msg)
        log.info("%d pairs (%d bad rows skipped, %d prompts and %d responses truncated), %d tokens, %.1f s",
                 pairs.num_pairs, len(bad), pairs.truncated_prompts, pairs.truncated_responses,
                 int(pairs.seq_offsets[-1]), data_s)
    summary = train_phase(cfg, rt, model_dir=model_dir, out_dir=out_dir, pairs=pairs, tokenizer=tokenizer)
    summary.update({"data": {"bad_rows": len(bad), "truncated_prompts": pairs.truncated_prompts,
                             "truncated_responses": pairs.truncated_responses, "wall_s": data_s},
                    "config": to_dict(cfg)})
    if rt.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        t = summary["train"]
        log.info("trained %d steps, %d tokens in %.1f s (%.0f tokens/s); saved %s", t["steps"], t["tokens"],
                 t["wall_s"], t["tokens_per_s"], out_dir)
    shutdown(rt)
    return summary


if __name__ == "__main__":
    run_main(main)
