"""TRL baseline for the training-throughput benchmark: TRL's DPOTrainer (sigmoid loss = SPIN's) on one pairs file.

    python -m benchmarks.trl_baseline --model DIR --pairs FILE.jsonl --out RESULT.json [--mode ref|precompute]
        [--batch-size 8] [--grad-accum 1] [--max-length 1024] [--max-prompt-length 512] [--beta 0.1] [--lr 5e-7]
        [--epochs 1] [--[no-]gradient-checkpointing] [--threads N] [--seed 0]

DIR is a Hugging Face causal-LM folder with a chat-template tokenizer; FILE.jsonl holds TRL's conversational
preference rows ({"prompt": [msgs], "chosen": [msg], "rejected": [msg]}). The run is set up the way a TRL user
would for SPIN: fp32 on CPU, AdamW, linear schedule without warmup, no checkpoints. Fairness with our side: the same
model, pairs, batch (pairs per micro-batch), gradient accumulation, dtype, thread count and truncation.

What is timed (time.perf_counter, after tokenisation, which TRL does inside DPOTrainer.__init__):
  * precompute_s: --mode precompute only. TRL runs the reference pass over the whole dataset inside __init__
    (`_precompute_ref_logps`, with the policy itself as reference); it is timed by wrapping that method.
  * train_s: trainer.train(). In --mode ref that includes the reference model's forward on every batch (TRL loads
    a second copy of the model from DIR when ref_model is None, which is the idiomatic call).
  * total_s = precompute_s + train_s.
train_tokens counts the non-pad tokens TRL feeds per epoch: for each pair min(prompt+chosen, max_length) +
min(prompt+rejected, max_length), i.e. the prompt twice. Rates use train_tokens * epochs.
peak_rss_mib is the process's VmHWM at exit (model loads and the reference pass included).

Truncation: TRL 1.16 has no max_prompt_length; it only cuts each prompt+completion to max_length keeping its start
and drops pairs whose prompt alone fills max_length. Ours first keeps the END of the prompt (max_prompt_length) and
then cuts the response. So that both sides train on the same tokens, this script applies the same prompt cut to
TRL's tokenized `prompt_ids` (hooking `_prepare_dataset`); --max-prompt-length 0 gives stock TRL behaviour.
The dataset is built with Dataset.from_list (in memory): with a cached load_dataset("json") TRL would reuse the
reference log-probs cached by an earlier run and the precompute would cost nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import commit, machine, peak_rss_bytes, rss_bytes

MIB = 2 ** 20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trl_baseline", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder (weights + chat-template tokenizer)")
    ap.add_argument("--pairs", required=True, help="conversational preference rows, JSONL")
    ap.add_argument("--out", required=True, help="result JSON path")
    ap.add_argument("--mode", choices=("ref", "precompute"), default="ref")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512, help="keep the prompt's last N tokens; 0 = off")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="TRL's DPOConfig default is on")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class TimedDPOTrainer(trl.DPOTrainer):
        precompute_s = None

        def _prepare_dataset(self, dataset, processing_class, cfg, name):
            mpl = args.max_prompt_length
            if not mpl or cfg.max_length is None:
                return super()._prepare_dataset(dataset, processing_class, cfg, name)
            untruncated = copy.copy(cfg)
            untruncated.max_length = None                  # skip TRL's drop-filter until the prompt is cut
            ds = super()._prepare_dataset(dataset, processing_class, untruncated, name)
            ds = ds.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-mpl:]}, desc="Keeping the prompt end")
            return ds.filter(lambda ex: len(ex["prompt_ids"]) < cfg.max_length)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.precompute_s = (self.precompute_s or 0.0) + time.perf_counter() - t0
            return out

    rows = [json.loads(line) for line in open(args.pairs, encoding="utf-8") if line.strip()]
    train_dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=False)
    out_dir = tempfile.mkdtemp(prefix="trl_baseline-")
    config = trl.DPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length, truncation_mode="keep_start",
        beta=args.beta, loss_type=["sigmoid"], learning_rate=args.lr, num_train_epochs=args.epochs,
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0,
        gradient_checkpointing=args.gradient_checkpointing, precompute_ref_log_probs=args.mode == "precompute",
        report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
    )
    # ref_model=None: TRL loads a second copy from DIR (mode ref) or uses the policy for the precompute pass.
    trainer = TimedDPOTrainer(model=model, ref_model=None, args=config, train_dataset=train_dataset,
                              processing_class=tokenizer)
    assert (trainer.ref_model is None) == (args.mode == "precompute")

    ds = trainer.train_dataset
    cap = args.max_length or float("inf")
    train_tokens = 0
    for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]):
        train_tokens += min(len(p) + len(c), cap) + min(len(p) + len(r), cap)

    rss_before = rss_bytes()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    precompute_s = trainer.precompute_s
    total_s = train_s + (precompute_s or 0.0)
    seen = train_tokens * args.epochs
    result = {
        "system": "trl", "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "machine": machine(), "commit": commit(),
        "mode": args.mode, "gradient_checkpointing": args.gradient_checkpointing, "dtype": "float32",
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "max_length": args.max_length, "max_prompt_length": args.max_prompt_length or None,
        "prompt_truncation": f"keep_end({args.max_prompt_length}) by this script" if args.max_prompt_length
        else "none (stock TRL)", "beta": args.beta, "lr": args.lr, "epochs": args.epochs, "seed": args.seed,
        "pairs_in": len(rows), "pairs": len(ds), "steps": trainer.state.global_step,
        "train_tokens": train_tokens, "precompute_s": precompute_s, "train_s": train_s, "total_s": total_s,
        "tokens_per_s": seen / total_s, "train_tokens_per_s": seen / train_s,
        "rss_before_train_mib": rss_before / MIB, "peak_rss_mib": peak_rss_bytes() / MIB,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
