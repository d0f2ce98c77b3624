"""`torchrun --nproc_per_node=N -m spin_fast.train`: the SPIN loop, one training phase, or the built-in demo.

    torchrun ... -m spin_fast.train                                  # no model, no data: the built-in demo
    torchrun ... -m spin_fast.train --model DIR --data.sft FILE --output OUT [--config cfg.yaml] [--key=value ...]
    torchrun ... -m spin_fast.train --model DIR --pairs FILE --output OUT [--beta 0.1] [--lr 5e-7] [--epochs 1]
        [--max-length 1024] [--max-prompt-length 512] [--tokens-per-step K] [--seed 0]   # training phase only

The loop (loop.py): per iteration generate -> reference cache -> train -> OUT/iter{t}/, resumable with --resume.
The training phase alone: the opponent π_t is `--model`; its reference log-probs over the pairs are computed once
(or reused from OUT/ref_logps.safetensors when every fingerprint matches), then the policy, starting from the same
weights, is trained into OUT/ (HF folder, metrics.jsonl, summary.json written last).
`python -m spin_fast.train --help-config` lists every config key. This module only parses and dispatches.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import manifest, rundir
from .config import Config, explicit_keys, load_config, reference_markdown, to_dict
from .data import load_pairs
from .errors import InputError
from .hf_io import load_tokenizer, read_config
from .memory import limit_heap_retention
from .phases import train_phase
from .runtime import init_runtime, on_rank0, run_main, shutdown

log = logging.getLogger("spin_fast.train")


def parse_args(argv=None) -> tuple[Config, bool]:
    """(config, is_demo). No model, no SFT data and no pairs: the built-in demo."""
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
    demo = cfg.model.path is None and not cfg.data.sft and not cfg.data.pairs
    if demo:
        cfg.output = cfg.output or "runs/demo"
        if "resume" not in explicit_keys(cfg):
            cfg.resume = True          # running the demo again continues (or just re-reports) the same run
        return cfg, True
    for key, value in (("model.path", cfg.model.path), ("output", cfg.output)):
        if value is None:
            raise InputError(f"config {key}: required (e.g. --{key.split('.')[0]} ...)")
    if not cfg.data.pairs and not cfg.data.sft:
        raise InputError("config data.sft: required for the SPIN loop (--data.sft FILE), or data.pairs for the "
                         "training phase alone (--pairs FILE)")
    cfg.check_data_paths()
    check_model_context(cfg)
    return cfg, False


def check_model_context(cfg: Config) -> None:
    """Lengths the model cannot hold are refused before anything runs: a sequence is at most data.max_length
    tokens, a generated one data.max_prompt_length + generate.max_new_tokens (the sampler cuts longer prompts)."""
    ctx = read_config(cfg.model.path).max_position_embeddings
    if cfg.data.max_length > ctx:
        raise InputError(f"config data.max_length: {cfg.data.max_length} > the model's context {ctx} "
                         f"(max_position_embeddings in {cfg.model.path}/config.json)")
    if cfg.data.sft and cfg.generate.max_new_tokens >= ctx:
        raise InputError(f"config generate.max_new_tokens: {cfg.generate.max_new_tokens} must be < the model's "
                         f"context {ctx} (max_position_embeddings in {cfg.model.path}/config.json)")


# keys a mode never reads: set explicitly, they are reported (a recipe may well set them for the other mode)
IGNORED_BY_MODE = {"pairs": ("loop.", "generate.", "sft."), "loop": ("data.generated", "ref_cache")}


def ignored_keys(cfg: Config) -> list[str]:
    mode = "pairs" if cfg.data.pairs else "loop"
    return sorted(k for k in explicit_keys(cfg) if k.startswith(IGNORED_BY_MODE[mode]))


def read_pairs(cfg: Config, rt, tokenizer):
    """--pairs: the training pairs (bad rows stop the run here, before anything is written); (pairs, skipped,
    seconds)."""
    t0 = time.perf_counter()
    pairs, bad = load_pairs(cfg.data.pairs, tokenizer, generated=cfg.data.generated or None,
                            max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                            chat_template=cfg.data.chat_template, skip_bad_rows=cfg.data.skip_bad_rows)
    data_s = time.perf_counter() - t0
    if rt.is_main:
        for msg in bad[:10]:
            log.warning("skipped: %s", msg)
        log.info("%d pairs (%d bad rows skipped %s, %d prompts and %d responses truncated), %d tokens, %.1f s",
                 pairs.num_pairs, bad.count, dict(bad.by_kind), pairs.truncated_prompts, pairs.truncated_responses,
                 int(pairs.seq_offsets[-1]), data_s)
    return pairs, bad, data_s


def training_phase_only(cfg: Config, rt, tokenizer, work: Path, data) -> dict:
    """--pairs: one training phase on existing pairs (read_pairs' result), opponent = --model, into `work`
    (OUTPUT.tmp, renamed to OUTPUT by the caller when complete). Returns the summary."""
    model_dir = Path(cfg.model.path)
    pairs, bad, data_s = data
    summary = train_phase(cfg, rt, model_dir=model_dir, out_dir=work, pairs=pairs, tokenizer=tokenizer,
                          checkpoint_dir=work / "ckpt")
    cache = Path(summary["cache"]["path"])
    if work in cache.parents:                        # where it will be once OUTPUT.tmp is OUTPUT
        summary["cache"]["path"] = str(Path(cfg.output) / cache.relative_to(work))
    summary.update({"data": {**bad.summary(), "truncated_prompts": pairs.truncated_prompts,
                             "truncated_responses": pairs.truncated_responses, "wall_s": data_s},
                    "config": to_dict(cfg)})
    return summary


def main(argv=None) -> dict:
    cfg, demo = parse_args(argv)
    limit_heap_retention()        # freed activations go back to the OS (memory.py), not into glibc's arenas
    rt = init_runtime(cfg.device, need_group_on_cuda=True)
    logging.basicConfig(level=logging.INFO if rt.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(cfg.seed)
    if not demo:
        on_rank0(rt, lambda: rundir.check_paths(cfg))
        if rt.is_main and ignored_keys(cfg):
            mode = "data.pairs (the training phase alone)" if cfg.data.pairs else "data.sft (the SPIN loop)"
            log.warning("config keys set but ignored with %s: %s", mode, ", ".join(ignored_keys(cfg)))
    if cfg.data.pairs and (done := on_rank0(rt, lambda: rundir.finished_pairs_run(cfg))) is not None:
        on_rank0(rt, lambda: manifest.check_finished(cfg.output, cfg, load_tokenizer(cfg.model.path), rt.world))
        if rt.is_main:
            log.info("%s is a finished run already: nothing to resume", cfg.output)
        shutdown(rt)
        return done
    lock = rundir.lock(cfg)
    on_rank0(rt, lock.acquire)                       # one run per output folder
    try:
        evaluate = None
        if demo:
            from .demo_run import prepare_demo
            cfg, evaluate = prepare_demo(cfg, rt)
        tokenizer = load_tokenizer(cfg.model.path)
        work = rundir.folder(cfg)
        # the data is read and validated before the manifest marks the folder as a run: a bad row leaves nothing
        # that a corrected rerun would have to --resume
        if cfg.data.pairs:
            data = read_pairs(cfg, rt, tokenizer)
        else:
            from .loop import split_sft
            split_sft(cfg, work, rt, tokenizer)
        on_rank0(rt, lambda: manifest.check_and_write(work, cfg, tokenizer, rt.world))
        if cfg.data.pairs:
            summary = training_phase_only(cfg, rt, tokenizer, work, data)
            if rt.is_main:
                rundir.publish_pairs(cfg, lock, summary)
                t = summary["train"]
                log.info("trained %d steps, %d tokens in %.1f s (%.0f tokens/s); saved %s", t["steps"], t["tokens"],
                         t["wall_s"], t["tokens_per_s"], cfg.output)
        else:
            from .loop import run_loop
            summary = {"iterations": run_loop(cfg, rt, tokenizer, evaluate)}
            if demo:
                from .demo_run import finish_demo
                summary["demo"] = finish_demo(cfg, rt, tokenizer, summary["iterations"], evaluate)
    finally:
        if rt.is_main:
            lock.release()
    shutdown(rt)
    return summary


if __name__ == "__main__":
    run_main(main)
