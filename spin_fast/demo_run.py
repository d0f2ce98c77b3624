"""The built-in demo run: `torchrun --nproc_per_node=2 -m spin_fast.train` with no model and no data.

1. prepare_demo: writes OUTPUT/demo_assets/ (a character tokenizer, a random 89k-parameter Llama, and
   n_train + n_heldout rows of the demo.task: the exact-p_data HMM of hmm_task.py, the default, or the
   string-transformation task of demo.py, `exact_match`) and points the config at them:
   an SFT phase from scratch (sft.epochs), then loop.iterations SPIN iterations; the loop holds out
   loop.heldout rows (its discriminator check and the exact-match accuracy here); hmm: SFT is early-stopped on
   sft.heldout further rows (a held-out plateau, the best epoch's weights kept), none of them trained on.
2. The loop runs as for any model (generation, cache, training), calling `evaluate` on every finished model:
   hmm: the distances to p_data on the held-out prompts (evaluate_hmm); exact_match: greedy exact match.
3. finish_demo: the paper's ablation, continued SFT for the same compute: from the SFT model, one more SFT round
   per SPIN iteration on as many tokens as that iteration trained on; prints and writes OUTPUT/demo.json.

Every demo default below can be overridden like any key (`--loop.iterations 2 --sft.epochs 5 ...`): the demo only
fills in keys the user did not set (config.explicit_keys), even when set to the library default.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path

from . import demo
from .config import Config, TrainCfg, explicit_keys
from .integrity import write_json
from .loop import sft_heldout_rows
from .runtime import Runtime

log = logging.getLogger("spin_fast.demo")

N_TRAIN, N_HELDOUT = 3000, 300
TASKS = ("hmm", "exact_match")
# the hmm task (spin_fast/hmm_task.py): |x| = 5, |y| <= 8 letters; the model's samples at temperature 1 are what
# SPIN pushes away from (its opponent samples p_theta itself, as in the paper) and what quality is measured on
HMM_DEFAULTS = {
    ("data", "max_length"): 32, ("data", "max_prompt_length"): 16, ("generate", "max_new_tokens"): 10,
    ("generate", "temperature"): 1.0,
    # SFT to a held-out plateau (the paper's regime: SPIN starts where more SFT no longer helps): at most 15 epochs
    # (cosine over 15), stopped once 3 epochs in a row did not lower the loss on 300 held-out training rows, the best
    # epoch kept. 15, not more: the held-out loss flattens at ~epoch 10-13, when this schedule's lr has nearly
    # decayed, and continued SFT at SPIN's lr then changes KL(p_data||p_theta) by < 0.005 (3 seeds). Over 30 epochs
    # the stop came mid-schedule at a high lr, and more SFT at any lower lr still gained 0.01-0.05 nats by annealing
    # (benchmarks/README.md, "demo sweep").
    ("sft", "epochs"): 15, ("sft", "heldout"): 300, ("sft", "early_stopping_patience"): 3,
    # SPIN: the paper's logistic loss at beta 0.1, at lr 1e-3: of the 9 swept settings (benchmarks/README.md, "demo
    # sweep", 3 seeds) the one whose held-out discriminator check (the implicit reward telling the human answer from
    # the opponent's, on held-out prompts: the quantity SPIN trains) is clearly above chance (0.73 +- 0.07 after
    # iteration 1; every lr 1e-4 setting: 0.50-0.56). Chosen on that, not on the distances to p_data it reports
    # (there it moves p_theta away from p_data: KL(p_data||p_theta) +4.3 +- 1.6 after 2 iterations).
    ("train", "loss_type"): "sigmoid", ("train", "beta"): 0.1, ("train", "lr"): 1e-3,
    # 2 iterations: ~70-100 s on the shared 2-core machine (2026-12-04)
    ("loop", "iterations"): 2,
}
HMM_SAMPLES = 2          # samples per held-out prompt from p_data and from p_theta, for the metrics
# key -> demo value, applied only where the user kept the library default
DEMO_DEFAULTS = {
    ("data", "max_length"): 48, ("data", "max_prompt_length"): 24,
    ("generate", "max_new_tokens"): 20, ("generate", "temperature"): 1.5, ("generate", "batch_size"): 256,
    ("sft", "epochs"): 10, ("sft", "lr"): 3e-3, ("sft", "tokens_per_step"): 2048,
    # SPIN's hinge loss with beta 1: each pair stops pulling once its margin passes 1/beta nats. With the logistic
    # loss at beta 0.1 the margin keeps being paid for by pushing down everything sampled, the human answer's
    # log-prob falls too and exact match collapses (measured: 0.49 -> 0.29 / 0.12 / 0.16 over 3 iterations).
    ("train", "loss_type"): "hinge", ("train", "beta"): 1.0,
    ("train", "optimizer"): "adamw", ("train", "lr"): 3e-4, ("train", "epochs"): 2,
    ("train", "warmup_ratio"): 0.1, ("train", "tokens_per_step"): 4096, ("train", "micro_batch_tokens"): 2048,
    ("train", "max_grad_norm"): 1.0, ("loop", "iterations"): 3, ("loop", "heldout"): N_HELDOUT,
    ("loop", "continued_sft_baseline"): True,
}


def _apply_defaults(cfg: Config) -> Config:
    from .errors import InputError
    if cfg.demo.task not in TASKS:
        raise InputError(f"demo.task: one of {' | '.join(TASKS)}, got {cfg.demo.task!r}")
    given = explicit_keys(cfg)
    defaults = {**DEMO_DEFAULTS, **(HMM_DEFAULTS if cfg.demo.task == "hmm" else {})}
    for (section, key), value in defaults.items():
        if f"{section}.{key}" not in given:
            setattr(getattr(cfg, section), key, value)
    return cfg.validate()


def prepare_demo(cfg: Config, rt: Runtime):
    """(config pointing at the demo's model and data, evaluate(model_dir) -> dict)."""
    import torch
    cfg = _apply_defaults(cfg)
    if not 0 <= cfg.loop.heldout <= N_TRAIN:     # beyond: make_rows searches for distinct prompts for minutes
        from .errors import InputError
        raise InputError(f"config loop.heldout: the demo holds out 0 .. {N_TRAIN} rows (as many as it trains on), "
                         f"got {cfg.loop.heldout}")
    out = Path(cfg.output)
    assets = out / "demo_assets"
    # N_TRAIN rows to train on, whatever is held out for the loop's checks and for SFT's early stopping
    n_rows = N_TRAIN + cfg.loop.heldout + sft_heldout_rows(cfg)
    if rt.is_main and not (assets / "model" / "config.json").is_file():
        tmp = out / "demo_assets.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.demo.task == "hmm":
            from . import hmm_task
            rows = hmm_task.make_rows(hmm_task.make_hmm(cfg.seed), n_rows, seed=cfg.seed)
        else:
            rows = demo.make_rows(n_rows, seed=cfg.seed)
        demo.write_jsonl(tmp / "rows.jsonl", rows)
        tok = demo.build_tokenizer(tmp / "model")
        demo.init_model(tmp / "model", tok, hidden=64, layers=2, heads=4, seed=cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, assets)
    if rt.distributed:
        torch.distributed.barrier()
    cfg.model.path = str(assets / "model")
    cfg.data.sft = [str(assets / "rows.jsonl")]
    if rt.is_main:
        stop = (f"early-stopped on {cfg.sft.heldout} held-out rows (patience {cfg.sft.early_stopping_patience})"
                if cfg.sft.early_stopping_patience else "")
        log.info("demo (%s): %d task rows (%d held out), tiny Llama in %s; SFT at most %d epochs %s, then %d SPIN "
                 "iterations", cfg.demo.task, n_rows, cfg.loop.heldout, assets, cfg.sft.epochs, stop,
                 cfg.loop.iterations)
    return cfg, lambda model_dir: evaluate(cfg, rt, Path(model_dir))


def evaluate(cfg: Config, rt: Runtime, model_dir: Path) -> dict:
    """Greedy exact match of `model_dir` on the loop's held-out rows (every rank: the prompts are sharded)."""
    from .hf_io import load_model, load_tokenizer
    from .rows import read_rows
    rows = [r for _, r in read_rows(Path(cfg.output) / "data" / "heldout.jsonl")]
    model = load_model(model_dir, device=rt.device)
    tok = load_tokenizer(model_dir)
    if cfg.demo.task == "hmm":
        return evaluate_hmm(cfg, model, tok, rows)
    res = demo.exact_match(model, tok, rows, max_new_tokens=cfg.generate.max_new_tokens)
    return {"accuracy": res["accuracy"], "n": res["n"], "by_kind": res["by_kind"]}


def evaluate_hmm(cfg: Config, model, tok, rows: list[dict]) -> dict:
    """The distances to p_data on the held-out prompts (hmm_task.distribution_metrics), from HMM_SAMPLES samples
    per prompt of p_data (the same ones for every model: common random numbers) and of p_theta (temperature 1,
    a fixed seed: sampled by our Sampler, sharded over the ranks)."""
    import numpy as np
    from . import hmm_task
    from .chat import render_prompt
    from .sampler import Sampler, SamplingParams, generate_sharded
    hmm = hmm_task.make_hmm(cfg.seed)
    xs = [r["prompt"] for r in rows for _ in range(HMM_SAMPLES)]
    rng = np.random.default_rng(10_000 + cfg.seed)
    ys_data = [hmm.sample(rng, x) for x in xs]
    prompts = [render_prompt(tok, [{"role": "user", "content": x}]) for x in xs]
    sampler = Sampler(model, batch_size=256, eos_token_ids=[tok.eos_token_id], tokenizer=tok)
    gens = generate_sharded(sampler, prompts, SamplingParams(max_new_tokens=hmm.max_answer_len + 1, seed=7),
                            keys=list(range(len(xs))))
    # an answer that ran past the longest valid length never ended: invalid, whatever its letters
    ys_model = [g.text if g.finish_reason == "stop" else "\x00" for g in gens]
    m = hmm_task.distribution_metrics(
        [hmm.logp(x, y) for x, y in zip(xs, ys_data)], hmm_task.response_logps(model, tok, xs, ys_data),
        [hmm.logp(x, y) for x, y in zip(xs, ys_model)], hmm_task.response_logps(model, tok, xs, ys_model))
    return {**m, "examples": [{"prompt": x, "data": yd, "model": ym} for x, yd, ym in
                              list(zip(xs, ys_data, ys_model))[:6]]}


def finish_demo(cfg: Config, rt: Runtime, tokenizer, summaries: list[dict], evaluate) -> dict:
    """The continued-SFT baseline for the same tokens per iteration, then the per-iteration table."""
    from .loop import is_finished, publish, sft_train_cfg
    from .phases import sft_phase
    from .sft import load_sft_sequences
    out = Path(cfg.output)
    sft = next((s for s in summaries if s.get("phase") == "sft"), None)
    spin = [s for s in summaries if s.get("phase") == "spin"]
    baseline = []
    if cfg.loop.continued_sft_baseline and sft is not None:
        seqs, _ = load_sft_sequences(out / "data" / "train.jsonl", tokenizer, max_length=cfg.data.max_length,
                                     max_prompt_length=cfg.data.max_prompt_length)
        prev = out / "sft"
        tokens_per_epoch = int(seqs.seq_offsets[-1])
        for s in spin:
            t = s["iteration"]
            final, tmp = out / f"continued_sft{t}", out / f"continued_sft{t}.tmp"
            if not is_finished(final):
                base: TrainCfg = sft_train_cfg(cfg)
                steps = max(1, round(s["train"]["tokens"] / cfg.sft.tokens_per_step))
                # the SFT phase's own optimizer and lr (its best known settings: the baseline is not weakened by
                # SPIN's lr) unless loop.continued_sft_lr says otherwise, a fresh warmup + decay per round, as
                # SPIN's iterations have
                tcfg = dataclasses.replace(base, epochs=max(1, math.ceil(s["train"]["tokens"] / tokens_per_epoch)),
                                           max_steps=steps, lr=cfg.loop.continued_sft_lr or base.lr)
                res = sft_phase(cfg, rt, model_dir=prev, out_dir=tmp, seqs=seqs, train_cfg=tcfg)
                res["eval"] = evaluate(tmp)
                publish(rt, tmp, final, {"phase": "continued_sft", "iteration": t, **res})
            baseline.append(json.loads((final / "summary.json").read_text()))
            prev = final
    hmm = cfg.demo.task == "hmm"
    # per task: (summary key in eval, column title); hmm: lower forward KL / higher quality and validity is better
    cols = ([("forward_kl", "KL(pd||pt)"), ("reverse_kl_valid", "KL(pt||pd)"), ("quality", "E_pt log pd"),
             ("validity", "valid")] if hmm else [("accuracy", "EM")])
    ev = lambda s: (s or {}).get("eval", {})  # noqa: E731
    rows = [{"model": "SFT start", "spin": ev(sft), "continued_sft": ev(sft), "heldout_acc": None,
             "heldout_margin": None, "train_tokens": None}]
    for i, s in enumerate(spin):
        b = baseline[i] if i < len(baseline) else {}
        h = s.get("heldout") or {}
        rows.append({"model": f"iteration {s['iteration']}", "spin": ev(s), "continued_sft": ev(b),
                     "heldout_acc": h.get("accuracy"), "heldout_margin": h.get("mean_margin"),
                     "train_tokens": s["train"]["tokens"]})
    for r in rows:                              # the old flat keys, kept for the exact-match task's readers
        r["spin_em"], r["continued_sft_em"] = r["spin"].get("accuracy"), r["continued_sft"].get("accuracy")
    report = {"task": cfg.demo.task, "rows": rows, "n_heldout": cfg.loop.heldout,
              "continued_sft_lr": cfg.loop.continued_sft_lr or cfg.sft.lr,
              "sft_early_stopping": (sft or {}).get("early_stopping")}
    if rt.is_main:
        write_json(out / "demo.json", report)
        fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        title = ("distance to p_data" if hmm else "exact match") + f" on {cfg.loop.heldout} held-out prompts"
        head = f"{'model':<13}" + "".join(f"{'SPIN ' + c:>17}{'cSFT ' + c:>17}" for _, c in cols)
        lines = ["", title + " (SPIN vs continued SFT at equal tokens):", head + f"{'disc.acc':>9}{'margin':>8}"]
        for r in rows:
            lines.append(f"{r['model']:<13}" + "".join(f"{fmt(r['spin'].get(k)):>17}{fmt(r['continued_sft'].get(k)):>17}"
                                                      for k, _ in cols)
                         + f"{fmt(r['heldout_acc']):>9}{fmt(r['heldout_margin']):>8}")
        print("\n".join(lines), flush=True)
    return report
