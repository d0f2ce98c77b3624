"""Training-phase throughput: spin_fast.train vs TRL's DPOTrainer, same model, pairs, batch, dtype and threads.

    python -m benchmarks.bench_train                 # CPU: random Llama H256/L4, Phi-3 tokenizer, 64 real SFT pairs
    python -m benchmarks.bench_train --pairs 32 --skip-trl-gc
    python -m benchmarks.bench_train --lora-only     # full fine-tuning vs LoRA (rank 8, all 7 projections) only

Setup (needs ../shared/data): a random Llama (hidden 256, 4 layers, 4 heads, SwiGLU 688, vocab 32011 = the Phi-3
tokenizer) and 64 conversational pairs from the shared UltraChat-schema rows (prompt = the turns before the last
answer, chosen = that answer, rejected = the next row's answer: a stand-in for a generated response). fp32, SPIN's
max_length 1024 / max_prompt_length 512 (TRL gets the same prompt cut, see trl_baseline.py), beta 0.1, AdamW,
linear schedule, no warmup, one epoch, 8 pairs per optimizer step for TRL; for spin_fast the token budget that
gives the same number of steps (tokens_per_step = total tokens / (P / 8)).

Each system runs in its own process (so peak memory is its own): VmHWM at exit, i.e. model, optimizer, reference and
everything. Tokens = prompt+chosen+rejected tokens (the prompt counted in both sequences), as each system feeds them.
tokens/s = tokens / (reference pass + training): the reference log-prob cache (ours) and TRL's
precompute_ref_log_probs pass are counted; tokenisation and model loading are not (for either).
Rows: spin_fast (1 process, N threads; and torchrun 2 ranks x 1 thread, memory = both processes), spin_fast LoRA
(train.lora.rank = --lora-rank on all seven block projections, 1 process: frozen base, adapters-only gradients and
optimizer state, the same reference cache pass and loss kernels), TRL with a
reference model (gradient checkpointing on = DPOConfig's default, and off), TRL with precompute_ref_log_probs.
Ratios are against the best TRL row in tokens/s. Results: benchmarks/results/train-DATE-MACHINE.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, peak_rss_bytes, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MIB = 2 ** 20
TRAIN_ARGS = dict(beta=0.1, lr=5e-7, max_length=1024, max_prompt_length=512, batch_pairs=8)


def build_model(folder: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)


def build_pairs(path: Path, sft_file: Path, n: int) -> None:
    rows = []
    for line in sft_file.open():
        m = json.loads(line).get("messages") or []
        if len(m) >= 2 and m[-1].get("role") == "assistant":
            rows.append(m)
        if len(rows) == n + 1:
            break
    with path.open("w") as f:
        for i in range(n):
            m, other = rows[i], rows[i + 1]
            f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [other[-1]]}) + "\n")


def count_tokens(model: Path, pairs: Path) -> tuple[int, int]:
    """Our packed token count of the pairs (prompt+chosen + prompt+rejected, after SPIN's truncation)."""
    from transformers import AutoTokenizer

    from spin_fast.data import load_pairs
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    p, _ = load_pairs(pairs, tok, max_length=TRAIN_ARGS["max_length"],
                      max_prompt_length=TRAIN_ARGS["max_prompt_length"])
    return int(p.seq_offsets[-1]), p.num_pairs


def ours_argv(model: Path, pairs: Path, out: Path, tokens_per_step: int) -> list[str]:
    a = TRAIN_ARGS
    return ["--model", str(model), "--pairs", str(pairs), "--output", str(out), "--beta", str(a["beta"]),
            "--lr", str(a["lr"]), "--max-length", str(a["max_length"]), "--max-prompt-length",
            str(a["max_prompt_length"]), "--tokens-per-step", str(tokens_per_step), "--micro-batch-tokens",
            str(tokens_per_step), "--train.optimizer", "adamw", "--train.warmup_ratio", "0",
            "--train.lr_schedule", "linear", "--train.progress", "false", "--epochs", "1"]


def run_ours_inprocess(result: Path, threads: int | None, argv: list[str]) -> None:
    """The body of one spin_fast process (also each torchrun rank): train, then record VmHWM."""
    import torch

    from spin_fast import train
    if threads:
        torch.set_num_threads(threads)
    summary = train.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    payload = {"rank": rank, "summary": summary, "peak_rss_mib": peak_rss_bytes() / MIB}
    Path(f"{result}.rank{rank}").write_text(json.dumps(payload))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        os._exit(0)      # as spin_fast.runtime.run_main: skip gloo's racy teardown at interpreter exit


def spawn(cmd: list[str], env_threads: int | None = None) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if env_threads:
        env["OMP_NUM_THREADS"] = str(env_threads)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")


def ours_row(tmp: Path, model: Path, pairs: Path, tokens_per_step: int, threads: int, ranks: int,
             lora_rank: int = 0) -> dict:
    tag = f"ours-{ranks}" + (f"-lora{lora_rank}" if lora_rank else "")
    out, result = tmp / tag, tmp / f"{tag}.json"
    shutil.rmtree(out, ignore_errors=True)          # a fresh reference cache: its cost is counted
    argv = ours_argv(model, pairs, out, tokens_per_step)
    if lora_rank:
        argv += ["--train.lora.rank", str(lora_rank), "--train.lora.alpha", str(2 * lora_rank)]
    if ranks == 1:
        spawn([sys.executable, "-m", "benchmarks.bench_train", "--_ours", str(result), "--threads", str(threads),
               "--", *argv], threads)
    else:
        spawn([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "-m",
               "benchmarks.bench_train", "--_ours", str(result), "--threads", "1", "--", *argv], 1)
    parts = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(ranks)]
    s = parts[0]["summary"]
    total = s["cache"]["wall_s"] + s["train"]["wall_s"]
    setting = f"{ranks} process x {threads} threads" if ranks == 1 else f"torchrun {ranks} ranks x 1 thread"
    if lora_rank:
        setting = f"LoRA r{lora_rank} (7 projections), " + setting
    return {"system": "spin_fast", "setting": setting, "tokens": s["train"]["tokens"],
            "steps": s["train"]["steps"], "ref_s": s["cache"]["wall_s"], "train_s": s["train"]["wall_s"],
            "total_s": total, "tokens_per_s": s["train"]["tokens"] / total,
            "peak_rss_mib": sum(p["peak_rss_mib"] for p in parts),
            "final_loss": s["train"]["final"].get("loss")}


def trl_row(tmp: Path, model: Path, pairs: Path, threads: int, mode: str, gc: bool) -> dict:
    result = tmp / f"trl-{mode}-{gc}.json"
    a = TRAIN_ARGS
    spawn([sys.executable, "-m", "benchmarks.trl_baseline", "--model", str(model), "--pairs", str(pairs),
           "--out", str(result), "--mode", mode, "--batch-size", str(a["batch_pairs"]), "--max-length",
           str(a["max_length"]), "--max-prompt-length", str(a["max_prompt_length"]), "--beta", str(a["beta"]),
           "--lr", str(a["lr"]), "--threads", str(threads),
           "--gradient-checkpointing" if gc else "--no-gradient-checkpointing"], threads)
    r = json.loads(result.read_text())
    setting = ("reference model" if mode == "ref" else "precompute_ref_log_probs") + \
              (", grad checkpointing (default)" if gc else ", no grad checkpointing")
    return {"system": f"TRL {r.get('trl_version', '')}".strip(), "setting": setting, "tokens": r["train_tokens"],
            "steps": r["steps"], "ref_s": r.get("precompute_s") or 0.0, "train_s": r["train_s"],
            "total_s": r["total_s"], "tokens_per_s": r["tokens_per_s"], "peak_rss_mib": r["peak_rss_mib"],
            "final_loss": r.get("final_loss")}


def workload(tmp: Path, num_rows: int):
    """The benchmark's model and pairs in tmp, and the token budget giving TRL's step count:
    (model, pairs, total tokens, pairs, steps, tokens_per_step)."""
    model, pairs = tmp / "model", tmp / "pairs.jsonl"
    build_model(model, SHARED / "tokenizers" / "phi-3-mini-4k-instruct")
    build_pairs(pairs, SHARED / "sft" / "sft_ultrachat_schema-00000.jsonl", num_rows)
    total, num_pairs = count_tokens(model, pairs)
    steps = math.ceil(num_pairs / TRAIN_ARGS["batch_pairs"])
    tokens_per_step = max(2 * TRAIN_ARGS["max_length"], math.ceil(total / steps))
    return model, pairs, total, num_pairs, steps, tokens_per_step


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each single-process run")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-trl-gc", action="store_true", help="skip TRL with gradient checkpointing (its default)")
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA row (0: no LoRA row)")
    ap.add_argument("--lora-only", action="store_true",
                    help="only full fine-tuning vs LoRA, 1 process each, side by side (no torchrun, no TRL rows)")
    ap.add_argument("--_ours", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args._ours:
        return run_ours_inprocess(Path(args._ours), args.threads, rest[1:] if rest[:1] == ["--"] else rest)
    if not (SHARED / "sft").is_dir():
        sys.exit(f"bench_train needs the shared test data at {SHARED} (tokenizer and SFT rows)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, pairs, total, num_pairs, steps, tokens_per_step = workload(tmp, args.pairs)
        print(f"{num_pairs} pairs, {total} tokens, {steps} steps of ~{tokens_per_step} tokens", flush=True)
        plan = [("ours", 1)] + ([("lora", 1)] if args.lora_rank else []) + ([] if args.lora_only else [("ours", 2)])
        if not (args.skip_trl or args.lora_only):
            plan += [("trl", ("precompute", False)), ("trl", ("ref", False))]
            if not args.skip_trl_gc:
                plan.append(("trl", ("ref", True)))
        for kind, opt in plan:
            row = (ours_row(tmp, model, pairs, tokens_per_step, args.threads, opt) if kind == "ours"
                   else ours_row(tmp, model, pairs, tokens_per_step, args.threads, opt, args.lora_rank)
                   if kind == "lora" else trl_row(tmp, model, pairs, args.threads, *opt))
            print(json.dumps(row), flush=True)
            rows.append(row)
    full = next(r for r in rows if r["system"] == "spin_fast")
    for r in rows:
        if r["system"] == "spin_fast":            # LoRA vs full fine-tuning, measured side by side in this run
            r["x_full_ft"] = r["tokens_per_s"] / full["tokens_per_s"]
            r["mem_vs_full_ft"] = r["peak_rss_mib"] / full["peak_rss_mib"]
    trl = [r for r in rows if r["system"].startswith("TRL")]
    if trl:
        best = max(trl, key=lambda r: r["tokens_per_s"])
        for r in rows:
            r["x_trl_best"] = r["tokens_per_s"] / best["tokens_per_s"]
            r["mem_vs_trl_best"] = r["peak_rss_mib"] / best["peak_rss_mib"]
    cols = ["system", "setting", "tokens", "ref_s", "train_s", "tokens_per_s", "peak_rss_mib", "x_full_ft",
            "mem_vs_full_ft"] + \
           (["x_trl_best", "mem_vs_trl_best"] if trl else [])
    print(markdown_table(rows, cols))
    path = write_results("train-lora" if args.lora_only else "train", rows, extra={"setup": {
        "model": "random Llama H256/L4/heads4/SwiGLU688/V32011 fp32", "pairs": num_pairs, "tokens": total,
        "threads": args.threads, **TRAIN_ARGS, "tokens_per_step": tokens_per_step, "lora_rank": args.lora_rank}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
