"""The SPIN loop: per iteration t, generate (opponent π_t) -> reference cache -> train -> OUTPUT/iter{t}/ = π_{t+1}.

    OUTPUT/data/train.jsonl, heldout.jsonl   the SFT rows, split once (seeded) and reused on resume
    OUTPUT/data/sft_heldout.jsonl            with sft.heldout: the SFT phase's early-stopping rows (trained on by none)
    OUTPUT/sft/                              optional SFT phase before iteration 0 (sft.epochs > 0)
    OUTPUT/iter{t}.work/                     generated.jsonl (+ _heldout), ref caches, checkpoints: resumable state
    OUTPUT/iter{t}/                          the trained model (HF folder), metrics.jsonl, summary.json, checksums.json

An iteration's folder is written as iter{t}.tmp and renamed when complete (summary.json, then checksums.json
last), so a half-written one is never taken for a finished one, and its checksums are verified before it becomes
the next opponent. With `resume`, finished iterations are skipped, generation continues its partial file, a
matching reference cache is reused and training continues from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .chat import RenderError, render_texts
from .config import Config
from .data import concat_pairs, load_pairs
from .errors import InputError
from .integrity import verify_checksums, write_checksums, write_json
from .memory import release
from .phases import generate_phase, sft_phase, train_phase
from .rows import ORIGIN_KEY, BadRow, SkippedRows, read_rows, sft_row
from .runtime import Runtime, fault_point, on_rank0

log = logging.getLogger("spin_fast.loop")


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def split_sft(cfg: Config, out: Path, rt: Runtime, tokenizer=None) -> tuple[Path, Path | None, SkippedRows]:
    """OUTPUT/data/{train,heldout}.jsonl from data.sft: `loop.heldout` rows drawn with the seed, the rest train.

    Only rows the trainer accepts (rows.sft_row, and with `tokenizer` the chat template renders them) are kept: a
    bad row stops the run naming the user's file:row, or with data.skip_bad_rows is skipped and counted
    (OUTPUT/data/split.json). Each kept row carries its origin (rows.ORIGIN_KEY), so errors of the later phases
    still name the user's file and row."""
    if cfg.sft.epochs > 0 and cfg.sft.early_stopping_patience > 0 and cfg.sft.heldout == 0:
        # here, not in Config.validate: the demo fills sft.heldout in after the command line is validated
        raise InputError(f"config sft.early_stopping_patience: needs held-out rows to stop on: set sft.heldout > 0, "
                         f"got {cfg.sft.early_stopping_patience}")
    folder = out / "data"
    train, held, info = folder / "train.jsonl", folder / "heldout.jsonl", folder / "split.json"
    bad = SkippedRows()
    if train.is_file():                                   # resume: the split is fixed
        if info.is_file():
            saved = json.loads(info.read_text())
            bad.extend(saved.get("first_bad_rows", []))
            bad.by_kind.update(saved.get("bad_rows_by_kind", {}))
    else:
        # every rank reads and validates (so a bad file stops every rank alike); rank 0 writes
        rows = []
        for path in cfg.data.sft:
            for loc, row in read_rows(path):
                try:
                    _, conv = sft_row(loc, row)
                    if tokenizer is not None:
                        try:
                            render_texts(tokenizer, conv[:-1], conv[-1]["content"], cfg.data.chat_template)
                        except RenderError as e:
                            raise BadRow(loc, str(e), "template") from None
                    rows.append({**row, ORIGIN_KEY: loc})
                except BadRow as e:
                    bad.add(e, cfg.data.skip_bad_rows)
        if not rows:
            raise InputError(f"no usable rows in data.sft {cfg.data.sft} ({bad.count} bad rows skipped; first: "
                             f"{bad[0]})")
        n_sft_held = sft_heldout_rows(cfg)
        if cfg.loop.heldout + n_sft_held >= len(rows):
            key = "loop.heldout" + (" + sft.heldout" if n_sft_held else "")
            raise InputError(f"config {key}: {cfg.loop.heldout + n_sft_held} held-out rows leave none of the "
                             f"{len(rows)} usable rows of data.sft {cfg.data.sft} to train on; lower it (0: no "
                             f"held-out check)")
    if rt.is_main and not train.is_file():
        order = np.random.default_rng([cfg.seed, 7]).permutation(len(rows))
        held_ids = set(order[:cfg.loop.heldout].tolist())
        # the SFT phase's early-stopping rows: the next ones of the same permutation (loop.heldout's are unchanged)
        sft_ids = set(order[cfg.loop.heldout:cfg.loop.heldout + n_sft_held].tolist())
        folder.mkdir(parents=True, exist_ok=True)
        write_json(info, {"rows": len(rows) + bad.count, "train": len(rows) - len(held_ids) - len(sft_ids),
                          "heldout": len(held_ids), "sft_heldout": len(sft_ids), **bad.summary(),
                          "first_bad_rows": bad[:10]})
        files = [(held, lambda i: i in held_ids), (train, lambda i: i not in held_ids and i not in sft_ids)]
        if n_sft_held:
            files.append((folder / SFT_HELDOUT, lambda i: i in sft_ids))
        for path, keep in files:
            tmp = path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for i, row in enumerate(rows):
                    if keep(i):
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        for msg in bad[:10]:
            log.warning("skipped: %s", msg)
    _barrier(rt)
    return train, (held if held.is_file() and held.stat().st_size > 0 else None), bad


SFT_HELDOUT = "sft_heldout.jsonl"


def sft_heldout_rows(cfg: Config) -> int:
    """Rows split_sft holds out for the SFT phase's held-out loss: sft.heldout when there is an SFT phase."""
    return cfg.sft.heldout if cfg.sft.epochs > 0 else 0


def is_finished(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


def publish(rt: Runtime, tmp: Path, final: Path, summary: dict) -> None:
    """summary.json and checksums.json into tmp, then tmp -> final (rank 0), everyone waits."""
    if rt.is_main:
        write_json(tmp / "summary.json", summary)
        write_checksums(tmp)                                    # last: what "finished" means, verified on use
        fault_point("publish", 1)                               # complete, not yet renamed
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier(rt)


def run_loop(cfg: Config, rt: Runtime, tokenizer, evaluate=None) -> list[dict]:
    """Every iteration; returns their summaries. evaluate(model_dir) -> dict: an extra per-iteration metric
    (the demo's exact-match accuracy), called on every rank."""
    out = Path(cfg.output)                  # train.main holds its lock and wrote its manifest.json
    train_file, held_file, split_bad = split_sft(cfg, out, rt)
    data_opts = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                     chat_template=cfg.data.chat_template, skip_bad_rows=cfg.data.skip_bad_rows)
    opponent = Path(cfg.model.path)
    summaries = []

    if cfg.sft.epochs > 0:                                        # supervised start (the demo: from scratch)
        sft_dir = out / "sft"
        if not is_finished(sft_dir):
            from .sft import load_sft_sequences
            seqs, _ = load_sft_sequences(train_file, tokenizer, **data_opts)
            sft_held = None
            if sft_heldout_rows(cfg):
                sft_held, _ = load_sft_sequences(out / "data" / SFT_HELDOUT, tokenizer, **data_opts)
            tmp = out / "sft.tmp"
            s = sft_phase(cfg, rt, model_dir=opponent, out_dir=tmp, seqs=seqs, train_cfg=sft_train_cfg(cfg),
                          heldout=sft_held)
            release()
            if evaluate is not None:
                s["eval"] = evaluate(tmp)
            publish(rt, tmp, sft_dir, {"phase": "sft", **s})
        opponent = sft_dir
        summaries.append(json.loads((sft_dir / "summary.json").read_text()))

    if cfg.loop.start_iteration > 0:
        opponent = out / f"iter{cfg.loop.start_iteration - 1}"
        if not is_finished(opponent):
            raise InputError(f"loop.start_iteration={cfg.loop.start_iteration}: its opponent {opponent} is not a "
                             f"finished iteration")
    for t in range(cfg.loop.start_iteration, cfg.loop.iterations):
        final, work, tmp = out / f"iter{t}", out / f"iter{t}.work", out / f"iter{t}.tmp"
        if is_finished(final):                                      # resume: done earlier
            summaries.append(json.loads((final / "summary.json").read_text()))
            opponent = final
            continue
        t_iter = time.perf_counter()
        if opponent != Path(cfg.model.path):            # one of ours: used only if it is what we published
            on_rank0(rt, lambda: verify_checksums(opponent, fix=f"delete {opponent} to compute it again"))
        if rt.is_main:
            work.mkdir(parents=True, exist_ok=True)
        _barrier(rt)
        # 1. generation: the opponent answers every training (and held-out) prompt
        seed = cfg.seed * 1000 + t
        gen = generate_phase(cfg, rt, model_dir=opponent, data=train_file, out=work / "generated.jsonl", seed=seed)
        gen_held = None
        if held_file is not None:
            gen_held = generate_phase(cfg, rt, model_dir=opponent, data=held_file,
                                      out=work / "generated_heldout.jsonl", seed=seed)
        # 2. pairs: human answer (chosen) vs the opponent's (rejected); + iteration t-1's pairs when mixing
        pairs, bad = load_pairs(train_file, tokenizer, generated=work / "generated.jsonl", **data_opts)
        if cfg.loop.mix_previous and t >= 1 and (out / f"iter{t - 1}.work" / "generated.jsonl").is_file():
            prev, _ = load_pairs(train_file, tokenizer, generated=out / f"iter{t - 1}.work" / "generated.jsonl",
                                 **data_opts)
            pairs = concat_pairs(pairs, prev)
        heldout = None
        if held_file is not None:
            heldout, held_bad = load_pairs(held_file, tokenizer, generated=work / "generated_heldout.jsonl",
                                           **data_opts)
            bad.extend_from(held_bad)
        if rt.is_main:
            for msg in bad[:10]:                   # (the split's own skipped rows were reported by split_sft)
                log.warning("skipped: %s", msg)
        bad.extend_from(split_bad)
        # 3. reference cache + training -> iter{t}.tmp
        s = train_phase(cfg, rt, model_dir=opponent, out_dir=tmp, pairs=pairs, tokenizer=tokenizer,
                        heldout=heldout, cache_path=work / "ref_logps.safetensors", checkpoint_dir=work / "ckpt")
        release()                    # the policy, its optimizer and the cache pass: back to the OS before the next
        wall = time.perf_counter() - t_iter
        gens = [g["peak_memory"] for g in (gen, gen_held) if g]
        s["peak_memory"]["generate"] = max(g["generate"] for g in gens)
        if "sum_over_ranks" in s["peak_memory"]:
            s["peak_memory"]["sum_over_ranks"]["generate"] = max(g["sum_over_ranks"]["generate"] for g in gens)
        gen_tokens = gen["new_tokens"] + (gen_held["new_tokens"] if gen_held else 0)
        gen_s = gen["wall_s"] + (gen_held["wall_s"] if gen_held else 0.0)
        summary = {"phase": "spin", "iteration": t, "opponent": str(opponent), **s,
                   "generate": {"prompts": gen["generated"] + gen["already_done"], "new_tokens": gen_tokens,
                                "wall_s": gen_s, "tokens_per_s": gen_tokens / max(gen_s, 1e-9),
                                "finish_reasons": gen["finish_reasons"], "resumed_rows": gen["already_done"],
                                "decode": gen.get("decode")},            # CUDA graph or eager (+ why)
                   "iteration_wall_s": wall,
                   # end to end: the SPIN data this iteration produced and trained on, per second of the iteration
                   "iteration_tokens_per_s": s["train"]["tokens"] / max(wall, 1e-9),
                   **bad.summary()}
        if evaluate is not None:
            summary["eval"] = evaluate(tmp)
        publish(rt, tmp, final, summary)
        if rt.is_main:
            shutil.rmtree(work / "ckpt", ignore_errors=True)      # the finished model supersedes its checkpoints
            held = summary["heldout"] or {}
            log.info("iteration %d: %.0f s; train loss %.4f; held-out accuracy %s, mean margin %s%s", t, wall,
                     summary["train"]["final"].get("loss", float("nan")), held.get("accuracy"),
                     held.get("mean_margin"), f"; eval {summary['eval']}" if "eval" in summary else "")
        summaries.append(summary)
        opponent = final
        held = summary.get("heldout") or {}
        if cfg.loop.convergence_threshold > 0 and held and abs(held["mean_margin"]) < cfg.loop.convergence_threshold:
            if rt.is_main:
                log.info("converged: held-out mean margin %.4g < loop.convergence_threshold %.4g; stopping",
                         held["mean_margin"], cfg.loop.convergence_threshold)
            break
    return summaries


def sft_train_cfg(cfg: Config):
    """The TrainCfg of the SFT phase: cfg.train with the sft section's optimizer settings."""
    import dataclasses
    s = cfg.sft
    return dataclasses.replace(cfg.train, epochs=s.epochs, lr=s.lr, optimizer=s.optimizer,
                               lr_schedule=s.lr_schedule, warmup_ratio=s.warmup_ratio,
                               tokens_per_step=s.tokens_per_step, pairs_per_step=s.examples_per_step, max_steps=-1)
