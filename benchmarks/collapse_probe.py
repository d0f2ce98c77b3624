"""Why the logistic loss at beta 0.1 collapsed the old exact-match demo (held-out exact match 0.49 -> 0.12).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/collapse_probe.py --seeds 0 1 --iterations 3 \
        --arms old lr3e-5 lr3e-6 rpo1 nll_only hinge1 spin_scaled        # ~25 min on 2 loaded cores
    python benchmarks/collapse_probe.py --report RESULTS.json [--merge A.json B.json] [--rescore --work W]

(OMP_NUM_THREADS=1: the 89k-parameter model's ops are too small for threads; with the default thread count the same
run took ~8x longer on the shared machine.)

The old demo (commit 0a41f41^, spin_fast/demo_run.py DEMO_DEFAULTS before the hinge change): the exact-match task
of spin_fast/demo.py, an 89k-parameter Llama trained from scratch by SFT (10 epochs, AdamW 3e-3, 2048 tokens a
step), then SPIN iterations with opponent samples at temperature 1.0 and the logistic loss, beta 0.1, AdamW lr 3e-4,
2 epochs, warmup 0.1, linear decay, 4096 tokens a step, grad-norm clip 1. This script rebuilds that run in one
process (the step plan does not depend on the world size: the same steps as the 2-rank demo) with the library's
own phases (sft_phase, generate_phase, load_pairs, refcache, SpinTask, Trainer), and per optimizer step records:

  * the trainer's own metrics (metrics.jsonl with log_every 1: loss, rewards, logps/chosen, logps/rejected of the
    step's pairs);
  * on two fixed probe sets (256 training pairs, and the held-out pairs: human answer vs the opponent's sample),
    read by an optimizer step-post hook (torch's register_step_post_hook: nothing is added to the trainer's
    path) with the full [R, V] logits (V = 54): mean sequence log-prob of chosen and rejected, their change from
    the reference, the mean token log-prob per response position bucket, for the human answer also the greedy
    (argmax) agreement per position and the probability mass on </s> before the answer's end;
  * held-out greedy exact match and mean greedy answer length vs the right length, every --em-every steps.

Arms are named settings of train.* (ARMS below); each (seed, arm) starts from the same SFT model and, for
iteration 0, the same opponent samples. Output: benchmarks/results/collapse-probe-<date>-<commit>.json (per-step
series + a summary per arm), and a markdown summary on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the old demo's settings (git show 0a41f41^:spin_fast/demo_run.py), as config overrides
OLD_DEMO = ["--demo.task", "exact_match", "--generate.temperature", "1.0", "--train.loss_type", "sigmoid",
            "--train.beta", "0.1", "--train.optimizer", "adamw", "--train.lr", "3e-4", "--train.epochs", "2",
            "--train.warmup_ratio", "0.1", "--train.lr_schedule", "linear", "--train.tokens_per_step", "4096",
            "--train.micro_batch_tokens", "2048", "--train.max_grad_norm", "1.0", "--loop.heldout", "300",
            "--sft.epochs", "10", "--sft.lr", "3e-3", "--sft.tokens_per_step", "2048", "--generate.max_new_tokens",
            "20", "--generate.batch_size", "256", "--data.max_length", "48", "--data.max_prompt_length", "24"]
# arm -> TrainCfg fields changed from the old demo's
ARMS = {
    "old": {},                                                     # logistic, beta 0.1, AdamW 3e-4: the collapse
    "lr3e-5": {"lr": 3e-5},                                        # 10x lower lr
    "lr3e-6": {"lr": 3e-6},                                        # 100x lower lr
    "rpo1": {"rpo_alpha": 1.0},        # iterative RPO (Pang et al. 2024): + NLL of the human answer / |y|, alpha 1
    "rpo1_lr3e-5": {"rpo_alpha": 1.0, "lr": 3e-5},
    "hinge1": {"loss_type": "hinge", "beta": 1.0},                 # today's exact-match demo setting
    # control for rpo1: its NLL term alone (beta 1e-6 leaves the logistic term a gradient ~5e-7 x that of beta 0.1's),
    # i.e. continued SFT on the human answers at SPIN's lr and steps: is RPO's gain the preference term's or the NLL's?
    "nll_only": {"beta": 1e-6, "rpo_alpha": 1.0},
    # SPIN's own hyperparameters (Chen et al. 2024: RMSprop, beta 0.1, linear, warmup 0.1, 2 epochs, batch 64 pairs),
    # lr scaled by the paper's SPIN/SFT lr ratio (5e-7 / 2e-5 for zephyr-7b-sft-full = 1/40) x our SFT lr 3e-3
    "spin_scaled": {"optimizer": "rmsprop", "lr": 7.5e-5, "pairs_per_step": 64, "tokens_per_step": 0},
}
BUCKETS = ((0, 1), (1, 2), (2, 3), (3, 5), (5, 8), (8, 12), (12, 64))     # response position ranges [a, b), not </s>


def bucket_name(a: int, b: int) -> str:
    return f"{a}" if b == a + 1 else f"{a}-{b - 1}"


class Probe:
    """Per-token diagnostics of a fixed PairSet under the live model (full logits: the demo's V is 54)."""

    def __init__(self, pairs, eos_id: int, device, pair_ids=None):
        from spin_fast.packing import collate, response_rows, to_torch
        ids = np.arange(pairs.num_pairs) if pair_ids is None else np.asarray(pair_ids)
        host = response_rows(collate(ids, pairs.tokens, pairs.seq_offsets, pairs.prompt_lens))
        self.max_seqlen = int(np.diff(host["cu_seqlens"]).max())
        self.cu_host = host["cu_seqlens"]
        self.b = to_torch(host, device)
        seq = host["scored_seq_index"]                                                      # (R,) local sequence
        pos = np.zeros_like(seq)                                        # response position of each scored row
        first = np.r_[0, np.flatnonzero(np.diff(seq)) + 1]              # first scored row of each sequence
        for a, b in zip(first, np.r_[first[1:], seq.size]):
            pos[a:b] = np.arange(b - a)
        self.pos = torch.from_numpy(pos)
        self.side = torch.from_numpy(seq % 2)                                              # 0 chosen, 1 rejected
        self.seq = torch.from_numpy(seq)
        self.is_eos = torch.from_numpy(host["scored_targets"] == eos_id)
        self.eos_id, self.nseq = eos_id, host["cu_seqlens"].size - 1
        self.length = torch.zeros(self.nseq).index_add_(0, self.seq, torch.ones(seq.size))  # (S,) incl. </s>
        # pairs whose sample IS the human answer (margin 0 for every theta: no gradient, no signal) are left out of
        # the per-pair statistics; `distinct` (P,) marks the others
        c, r = _pair_texts(pairs)
        self.distinct = torch.tensor([c[i] != r[i] for i in ids.tolist()])

    @torch.no_grad()
    def measure(self, model) -> dict:
        b = self.b
        hidden = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], max_seqlen=self.max_seqlen,
                       cu_seqlens_host=self.cu_host)                                          # (N, H)
        logits = torch.nn.functional.linear(hidden.index_select(0, b["scored"]).double(),
                                            model.lm_head_weight.double())                    # (R, V)
        logp = torch.log_softmax(logits, -1).cpu()                                           # (R, V)
        tgt = b["scored_targets"].cpu()
        tok = logp.gather(1, tgt[:, None])[:, 0]                                             # (R,)
        seq_lp = torch.zeros(self.nseq, dtype=torch.float64).index_add_(0, self.seq, tok)    # (S,)
        argmax_ok = (logp.argmax(1) == tgt).double()                                         # (R,)
        p_eos = logp[:, self.eos_id].exp()                                                   # (R,)
        d = self.distinct
        out = {"chosen": seq_lp[0::2][d].mean().item(), "rejected": seq_lp[1::2][d].mean().item(),
               "chosen_per_token": (seq_lp[0::2] / self.length[0::2])[d].mean().item(),
               "rejected_per_token": (seq_lp[1::2] / self.length[1::2])[d].mean().item(),
               "seq_chosen": seq_lp[0::2][d], "seq_rejected": seq_lp[1::2][d], "pos": {},
               "distinct_pairs": int(d.sum())}
        tok_distinct = d[self.seq // 2]                                                      # (R,)
        for side, name in ((0, "chosen"), (1, "rejected")):
            m = (self.side == side) & tok_distinct
            d = {}
            for a, bb in BUCKETS:
                sel = m & ~self.is_eos & (self.pos >= a) & (self.pos < bb)
                if sel.any():
                    d[bucket_name(a, bb)] = tok[sel].mean().item()
            d["eos"] = tok[m & self.is_eos].mean().item()
            out["pos"][name] = d
        # the human answers of every pair (identical ones included: this is what greedy decoding must reproduce)
        m = (self.side == 0) & ~self.is_eos
        out["chosen_argmax_ok"] = argmax_ok[m].mean().item()               # teacher-forced greedy agreement
        out["chosen_eos_ok"] = argmax_ok[(self.side == 0) & self.is_eos].mean().item()   # stops where it should
        out["chosen_eos_logp"] = tok[(self.side == 0) & self.is_eos].mean().item()
        out["chosen_p_eos_early"] = p_eos[m].mean().item()                 # </s> mass inside the human answer
        out["chosen_entropy"] = -(logp.exp() * logp).sum(1)[m].mean().item()
        return out


def greedy_eval(model, tok, rows, max_new_tokens: int) -> dict:
    from spin_fast import demo
    was = model.training
    model.eval()
    res = demo.exact_match(model, tok, rows, max_new_tokens=max_new_tokens, n_examples=len(rows))
    model.train(was)
    lens = [len(e["response"].strip()) - len(e["expected"]) for e in res["examples"]]
    # right answer, then no </s>: the response starts with the right answer but runs on
    runs_on = [e["response"].strip().startswith(e["expected"]) and not e["correct"] for e in res["examples"]]
    return {"em": res["accuracy"], "right_then_runs_on": float(np.mean(runs_on)),
            "by_kind": res["by_kind"], "len_minus_right": float(np.mean(lens)),
            "too_short": float(np.mean([x < 0 for x in lens])), "too_long": float(np.mean([x > 0 for x in lens])),
            "examples": [{k: e[k] for k in ("prompt", "expected", "response")} for e in res["examples"][:6]]}


def summarise(p: dict, ref: dict) -> dict:
    """A probe measurement without the per-sequence tensors, with deltas from the reference (step 0)."""
    out = {k: v for k, v in p.items() if not k.startswith("seq_")}
    dc = (p["seq_chosen"] - ref["seq_chosen"])
    dr = (p["seq_rejected"] - ref["seq_rejected"])
    out["d_chosen"], out["d_rejected"] = dc.mean().item(), dr.mean().item()
    out["frac_chosen_down"] = (dc < 0).double().mean().item()
    out["margin_acc"] = (dc > dr).double().mean().item()
    return out


def run_arm(cfg, rt, tok, seed_dir: Path, arm: str, iterations: int, probe_every: int, em_every: int,
            sft_eval: dict) -> dict:
    from spin_fast import refcache
    from spin_fast.data import load_pairs
    from spin_fast.hf_io import load_model, save_model
    from spin_fast.phases import generate_phase
    from spin_fast.rows import read_rows
    from spin_fast.trainer import MetricsLog, SpinTask, Trainer, prepare_model
    from spin_fast.config import TrainCfg

    tcfg: TrainCfg = dataclasses.replace(cfg.train, **ARMS[arm], log_every=1, progress=False)
    data_opts = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    train_file, held_file = seed_dir / "data" / "train.jsonl", seed_dir / "data" / "heldout.jsonl"
    held_rows = [r for _, r in read_rows(held_file)]
    opponent = seed_dir / "sft"
    iters = []
    for t in range(iterations):
        # generation: iteration 0's opponent (the SFT model) is shared by every arm of the seed
        gen_dir = seed_dir / ("gen0" if t == 0 else f"{arm}/gen{t}")
        gseed = cfg.seed * 1000 + t
        for data, name in ((train_file, "generated.jsonl"), (held_file, "generated_heldout.jsonl")):
            if not (gen_dir / name).is_file():
                generate_phase(cfg, rt, model_dir=opponent, data=data, out=gen_dir / name, seed=gseed)
        pairs, _ = load_pairs(train_file, tok, generated=gen_dir / "generated.jsonl", **data_opts)
        held, _ = load_pairs(held_file, tok, generated=gen_dir / "generated_heldout.jsonl", **data_opts)
        model = load_model(opponent, device=rt.device)
        prepare_model(model, tcfg, distributed=False, compute_dtype=torch.float32)
        ref_c, ref_r = refcache.compute_ref_logps(model, pairs, token_budget=tcfg.micro_batch_tokens)
        rng = np.random.default_rng(12345)                  # the same 256 training pairs for every arm
        probes = {"train": Probe(pairs, tok.eos_token_id, rt.device, np.sort(rng.choice(pairs.num_pairs, 256, False))),
                  "heldout": Probe(held, tok.eos_token_id, rt.device)}
        identical = float(np.mean([a == b for a, b in zip(*_pair_texts(pairs))]))
        model.train()
        ref = {k: p.measure(model) for k, p in probes.items()}
        out_dir = seed_dir / arm / f"iter{t}"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        metrics = MetricsLog(out_dir / "metrics.jsonl")
        task = SpinTask(pairs, ref_c, ref_r, tcfg, rt.device)
        trainer = Trainer(model, task, tcfg, seed=cfg.seed, device=rt.device, distributed=False, metrics=metrics)
        n_steps = len(trainer.steps)
        series = [{"step": 0, **{k: summarise(ref[k], ref[k]) for k in probes}}]
        em0 = sft_eval if t == 0 else iters[-1]["em_end"]
        series[0]["greedy"] = em0
        state = {"step": 0}

        def hook(opt, args, kwargs):      # after every optimizer step: the weights are the new ones
            state["step"] += 1
            s = state["step"]
            row = {"step": s}
            if s % probe_every == 0 or s == n_steps:
                row.update({k: summarise(p.measure(model), ref[k]) for k, p in probes.items()})
            if em_every and (s % em_every == 0) and s != n_steps:
                row["greedy"] = greedy_eval(model, tok, held_rows, cfg.generate.max_new_tokens)
            if len(row) > 1:
                series.append(row)

        handle = trainer.optimizer.register_step_post_hook(hook)
        t0 = time.perf_counter()
        trainer.train()
        handle.remove()
        metrics.close()
        em_end = greedy_eval(model, tok, held_rows, cfg.generate.max_new_tokens)
        series[-1]["greedy"] = em_end
        steps_metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        save_model(model, out_dir / "model", source_dir=opponent)
        iters.append({"iteration": t, "steps": n_steps, "pairs": pairs.num_pairs, "train_wall_s": time.perf_counter() - t0,
                      "identical_pairs": identical, "em_start": em0, "em_end": em_end, "series": series,
                      "trainer_metrics": [{k: r[k] for k in ("step", "loss", "rewards/margins", "rewards/chosen",
                                                              "rewards/rejected", "logps/chosen", "logps/rejected",
                                                              "grad_norm", "lr")} for r in steps_metrics]})
        print(f"  {arm} iter {t}: EM {em0['em']:.3f} -> {em_end['em']:.3f}; held-out d_chosen "
              f"{series[-1]['heldout']['d_chosen']:+.2f} d_rejected {series[-1]['heldout']['d_rejected']:+.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        opponent = out_dir / "model"
    return {"arm": arm, "train": {k: v for k, v in dataclasses.asdict(dataclasses.replace(
        cfg.train, **ARMS[arm])).items() if k != "lora"}, "iterations": iters}


def _pair_texts(pairs):
    """(chosen response token tuples, rejected ones) of a PairSet."""
    c, r = [], []
    for s in range(2 * pairs.num_pairs):
        a, b, pl = pairs.seq_offsets[s], pairs.seq_offsets[s + 1], pairs.prompt_lens[s]
        (c if s % 2 == 0 else r).append(tuple(pairs.tokens[a + pl:b].tolist()))
    return c, r


def prepare_seed(seed: int, work: Path, rt):
    """The old demo's config, assets, split, SFT model (cached in work/seed{S}) and its held-out greedy eval."""
    from spin_fast.config import load_config
    from spin_fast.demo_run import prepare_demo
    from spin_fast.hf_io import load_model, load_tokenizer
    from spin_fast.loop import is_finished, publish, sft_train_cfg, split_sft
    from spin_fast.phases import sft_phase
    from spin_fast.rows import read_rows
    from spin_fast.sft import load_sft_sequences
    seed_dir = work / f"seed{seed}"
    cfg = load_config(overrides=[*OLD_DEMO, "--output", str(seed_dir), "--seed", str(seed), "--device", "cpu",
                                 "--train.progress", "false"])
    cfg, _ = prepare_demo(cfg, rt)
    tok = load_tokenizer(cfg.model.path)
    train_file, held_file, _ = split_sft(cfg, seed_dir, rt, tok)
    if not is_finished(seed_dir / "sft"):
        seqs, _ = load_sft_sequences(train_file, tok, max_length=cfg.data.max_length,
                                     max_prompt_length=cfg.data.max_prompt_length)
        s = sft_phase(cfg, rt, model_dir=Path(cfg.model.path), out_dir=seed_dir / "sft.tmp", seqs=seqs,
                      train_cfg=sft_train_cfg(cfg))
        publish(rt, seed_dir / "sft.tmp", seed_dir / "sft", {"phase": "sft", **s})
    held_rows = [r for _, r in read_rows(held_file)]
    sft_eval = greedy_eval(load_model(seed_dir / "sft"), tok, held_rows, cfg.generate.max_new_tokens)
    return cfg, tok, seed_dir, sft_eval


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def table(runs: list[dict]) -> str:
    """Per arm, mean over seeds (and range) of: EM before/after each iteration, held-out Δ log π(chosen),
    Δ log π(rejected), mean greedy length error."""
    lines = ["| arm | iter | seeds | EM start | EM end | Δ log π(y) held-out | Δ log π(y') held-out | "
             "Δ log π(y) train | Δ log π(y') train | log π(</s>) of y, start → end | greedy len − right | "
             "right, then runs on |", "|" + "---|" * 12]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fmt = lambda xs, d=3: f"{np.mean(xs):.{d}f}" + (f" ({min(xs):.{d}f}..{max(xs):.{d}f})" if len(xs) > 1 else "")  # noqa: E731
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        for t in range(len(rs[0]["iterations"])):
            it = [r["iterations"][t] for r in rs]
            last = [i["series"][-1] for i in it]
            lines.append(f"| {arm} | {t} | {len(rs)} | {fmt([i['em_start']['em'] for i in it])} | "
                         f"{fmt([i['em_end']['em'] for i in it])} | {fmt([x['heldout']['d_chosen'] for x in last], 2)} | "
                         f"{fmt([x['heldout']['d_rejected'] for x in last], 2)} | "
                         f"{fmt([x['train']['d_chosen'] for x in last], 2)} | "
                         f"{fmt([x['train']['d_rejected'] for x in last], 2)} | "
                         f"{fmt([i['series'][0]['heldout']['chosen_eos_logp'] for i in it], 2)} → "
                         f"{fmt([x['heldout']['chosen_eos_logp'] for x in last], 2)} | "
                         f"{fmt([i['em_end']['len_minus_right'] for i in it], 2)} | "
                         f"{fmt([i['em_start'].get('right_then_runs_on', np.nan) for i in it])} → "
                         f"{fmt([i['em_end'].get('right_then_runs_on', np.nan) for i in it])} |")
    return "\n".join(lines) + "\n"


def position_table(runs: list[dict], arm: str = "old", t: int = 0, probe: str = "heldout") -> str:
    """Mean token log-prob per response position bucket of the human answer (y) and the opponent's sample (y'),
    before and after iteration t of `arm` (mean over seeds; distinct pairs only)."""
    its = [r["iterations"][t]["series"] for r in runs if r["arm"] == arm and len(r["iterations"]) > t]
    if not its:
        return ""
    first, last = [s[0][probe]["pos"] for s in its], [s[-1][probe]["pos"] for s in its]
    lines = [f"| position | log π(y) before | after | Δ | log π(y') before | after | Δ |", "|" + "---|" * 7]
    for b in first[0]["chosen"]:
        cells = []
        for side in ("chosen", "rejected"):
            a0 = np.mean([f[side].get(b, np.nan) for f in first])
            a1 = np.mean([f[side].get(b, np.nan) for f in last])
            cells += [f"{a0:.3f}", f"{a1:.3f}", f"{a1 - a0:+.3f}"]
        lines.append(f"| {'</s>' if b == 'eos' else b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def step_table(runs: list[dict], arm: str = "old", t: int = 0, every: int = 21) -> str:
    """Per optimizer step of iteration t (mean over seeds): the trainer's own batch metrics, the held-out probe's
    Δ log π of y and y', the human answer's </s> log-prob and how often it is the argmax, greedy EM and length."""
    its = [r["iterations"][t] for r in runs if r["arm"] == arm and len(r["iterations"]) > t]
    if not its:
        return ""
    lines = ["| step | lr | batch logps/chosen | batch logps/rejected | batch margin | held-out Δ log π(y) | "
             "Δ log π(y') | log π(</s>) of y | </s> argmax | token argmax | greedy EM | len − right |",
             "|" + "---|" * 12]
    # steps measured in every seed (an iteration >= 1 can have a different step count per seed)
    steps = sorted(set.intersection(*({row["step"] for row in it["series"] if "heldout" in row} for it in its)))
    keep = [s for s in steps if s in (0, 3, 6, 9, 12, 15) or s % every == 0 or s == steps[-1]]
    for st in keep:
        rows = [next(r for r in it["series"] if r["step"] == st) for it in its]
        tm = [next((m for m in it["trainer_metrics"] if m["step"] == st), None) for it in its]
        mean = lambda xs: np.mean([x for x in xs if x is not None]) if any(x is not None for x in xs) else None  # noqa: E731
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        h = [r["heldout"] for r in rows]
        g = [r.get("greedy") for r in rows]
        lines.append("| " + " | ".join([
            str(st), f(mean([m and m["lr"] for m in tm]), 6), f(mean([m and m["logps/chosen"] for m in tm]), 2),
            f(mean([m and m["logps/rejected"] for m in tm]), 2), f(mean([m and m["rewards/margins"] for m in tm])),
            f(mean([x["d_chosen"] for x in h]), 2), f(mean([x["d_rejected"] for x in h]), 2),
            f(mean([x["chosen_eos_logp"] for x in h])), f(mean([x["chosen_eos_ok"] for x in h])),
            f(mean([x["chosen_argmax_ok"] for x in h])), f(mean([x and x["em"] for x in g])),
            f(mean([x and x["len_minus_right"] for x in g]), 2)]) + " |")
    return "\n".join(lines) + "\n"


def rescore(path: Path, work: Path) -> None:
    """Greedy eval (greedy_eval, incl. keys added since the run) of the saved SFT and end-of-iteration models of a
    results JSON, from its --work folder; stored as em_start / em_end again."""
    from spin_fast.hf_io import load_model, load_tokenizer
    from spin_fast.rows import read_rows
    d = json.loads(path.read_text())
    for r in d["runs"]:
        seed_dir = work / f"seed{r['seed']}"
        tok = load_tokenizer(seed_dir / "sft")
        rows = [x for _, x in read_rows(seed_dir / "data" / "heldout.jsonl")]
        prev = greedy_eval(load_model(seed_dir / "sft"), tok, rows, 20)
        for it in r["iterations"]:
            it["em_start"] = prev
            it["em_end"] = prev = greedy_eval(load_model(seed_dir / r["arm"] / f"iter{it['iteration']}" / "model"),
                                              tok, rows, 20)
    path.write_text(json.dumps(d, indent=1))


def report(path: Path) -> None:
    """Print the tables of a results JSON (and write them into it as position_md / step_md)."""
    d = json.loads(path.read_text())
    runs = d["runs"]
    d["table_md"] = table(runs)
    d["position_md"] = {f"{a}/iter{t}": position_table(runs, a, t) for a in dict.fromkeys(r["arm"] for r in runs)
                        for t in range(len(runs[0]["iterations"]))}
    d["step_md"] = {f"{a}/iter{t}": step_table(runs, a, t) for a in ("old", "rpo1")
                    for t in range(len(runs[0]["iterations"]))}
    path.write_text(json.dumps(d, separators=(",", ":")))
    print(d["table_md"])
    for k, v in d["step_md"].items():
        print(f"per step, {k}:\n{v}")
    for k, v in d["position_md"].items():
        print(f"per position (held-out), {k}:\n{v}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=["old"], choices=list(ARMS))
    ap.add_argument("--iterations", type=int, default=1, help="SPIN iterations per arm (the old demo ran 3)")
    ap.add_argument("--probe-every", type=int, default=3, help="optimizer steps between probe-set measurements")
    ap.add_argument("--em-every", type=int, default=21, help="steps between held-out greedy evals (0: ends only)")
    ap.add_argument("--work", default="/tmp/collapse_probe", help="scratch folder (SFT models are cached there)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/collapse-probe-DATE-COMMIT.json)")
    ap.add_argument("--report", default=None, help="only print (and store) the tables of this results JSON")
    ap.add_argument("--rescore", action="store_true", help="with --report: re-evaluate the saved models in --work")
    ap.add_argument("--merge", nargs="+", default=None, help="with --report: write the runs of these results JSONs "
                                                              "(same arms, other seeds) into --report's file first")
    args = ap.parse_args(argv)
    if args.report and args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**parts[0], "runs": [r for d in parts for r in d["runs"]],
                  "command": " && ".join(d["command"] for d in parts), "merged_from": [str(f) for f in args.merge]}
        Path(args.report).write_text(json.dumps(merged, indent=1))
    if args.report and args.rescore:
        rescore(Path(args.report), Path(args.work))
    if args.report:
        return report(Path(args.report))
    from spin_fast.runtime import init_runtime
    rt = init_runtime("cpu")
    commit = _commit()
    runs, t0 = [], time.perf_counter()
    for seed in args.seeds:
        cfg, tok, seed_dir, sft_eval = prepare_seed(seed, Path(args.work), rt)
        print(f"seed {seed}: SFT held-out EM {sft_eval['em']:.3f}", flush=True)
        for arm in args.arms:
            runs.append({"seed": seed, **run_arm(cfg, rt, tok, seed_dir, arm, args.iterations, args.probe_every,
                                                 args.em_every, sft_eval)})
    md = table(runs)
    print(md)
    day = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"collapse-probe-{day}-{commit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": day, "commit": commit, "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "command": "python benchmarks/collapse_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.perf_counter() - t0, 1), "old_demo_overrides": OLD_DEMO, "arms": ARMS,
        "buckets": [bucket_name(a, b) for a, b in BUCKETS] + ["eos"], "table_md": md, "runs": runs}, indent=1))
    report(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
