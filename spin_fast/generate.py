"""`python -m spin_fast.generate`: sample one response per prompt of a data file into a resumable jsonl.

    python -m spin_fast.generate --model DIR --data FILE --output OUT.jsonl [--max-new-tokens 256]
        [--temperature 1.0] [--top-p 1.0] [--top-k 0] [--batch-size 64] [--seed 0] [--greedy]
        [--max-prompt-length 512] [--truncation left|error] [--chat-template STR] [--skip-bad-rows]

Also under `torchrun --nproc-per-node N -m spin_fast.generate ...`: each rank samples every N-th prompt left and
appends each finished row to its own shard OUT.rank{r}.jsonl; rank 0 merges the shards into OUT at the end
(genfiles.py). Output rows are in input order: {index, prompt_id, prompt, messages (+ the generated assistant
turn), response, finish_reason, num_tokens}. A killed run keeps every row written; re-running with the same
arguments (any number of ranks) generates only the prompts not yet in the output file or its shards; the seed key
of a prompt is its row index, so a resumed run samples exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from .chat import RenderError, render_prompt
from .errors import InputError
from .hf_io import load_model, load_tokenizer
from .genfiles import RowWriter, merge, read_done, shard_path
from .integrity import OutputLock, dumps
from .rows import BadRow, load_prompts
from .runtime import fault_point, init_runtime, on_rank0, run_main, shutdown
from .sampler import Sampler, SamplingParams, auto_batch_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _batch_size(text: str) -> int:
    return 0 if text.strip().lower() == "auto" else int(text)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m spin_fast.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    ap.add_argument("--data", required=True,
                    help=".jsonl / .json / .parquet, ultrachat_200k schema or a 'prompt' column")
    ap.add_argument("--output", required=True, help="output .jsonl (appended to; resumable)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--batch-size", type=_batch_size, default=64,
                    help="KV-cache slots per rank; auto (or 0): on CUDA as many as the free memory holds, on CPU 64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--truncation", choices=("left", "error"), default="left",
                    help="a rendered prompt longer than --max-prompt-length (or the model context): "
                         "keep its last tokens, or stop with an error naming the row")
    ap.add_argument("--chat-template", default=None, help="Jinja chat template (for tokenizers without one)")
    ap.add_argument("--skip-bad-rows", action="store_true", help="skip and count invalid rows instead of stopping")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--logprobs", action="store_true", help="also write the sampled tokens' log-probs")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    ap.add_argument("--attn-backend", choices=("auto", "sdpa", "flex", "flash"), default="auto")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Value checks naming the flag (argparse checks only the types)."""
    def need(ok: bool, flag: str, what: str, value):
        if not ok:
            raise InputError(f"--{flag}: {what}, got {value!r}")
    need(args.max_new_tokens >= 1, "max-new-tokens", "must be >= 1", args.max_new_tokens)
    need(math.isfinite(args.temperature) and args.temperature >= 0, "temperature", "must be finite and >= 0",
         args.temperature)
    need(0 < args.top_p <= 1, "top-p", "must be in (0, 1]", args.top_p)
    need(args.top_k >= 0, "top-k", "must be >= 0", args.top_k)
    need(args.batch_size >= 0, "batch-size", "must be >= 1 (or auto)", args.batch_size)
    need(0 <= args.seed < 2 ** 63, "seed", "must be in [0, 2**63)", args.seed)
    need(args.max_prompt_length >= 1, "max-prompt-length", "must be >= 1", args.max_prompt_length)
    need(all(args.stop), "stop", "stop strings must not be empty", args.stop)
    need(not Path(args.output).is_dir(), "output", "is a folder; the output is a .jsonl file", args.output)
    need(Path(args.model).is_dir(), "model", "must be a Hugging Face model folder", args.model)


def eos_ids(model_dir: Path, model, tokenizer) -> list[int]:
    ids = set(model.config.eos_token_ids)
    gc = model_dir / "generation_config.json"
    if gc.is_file():
        e = json.loads(gc.read_text()).get("eos_token_id")
        ids.update([e] if isinstance(e, int) else (e or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def main(argv=None):
    args = parse_args(argv)
    rt = init_runtime(args.device)
    if Path(args.output).resolve() == Path(args.data).resolve():
        raise InputError(f"--output {args.output} is the --data file: appending to it would corrupt the input; "
                         f"choose another --output")
    lock = OutputLock(Path(args.output).with_name(Path(args.output).name + ".lock"))
    on_rank0(rt, lock.acquire)                       # one writer per output file
    try:
        summary = run(args, rt)
    finally:
        if rt.is_main:
            lock.release()
    shutdown(rt)
    return summary


def run(args, rt) -> dict:
    """The generation phase on an initialised runtime (also called by the SPIN loop); returns the summary."""
    rank, world, device = rt.rank, rt.world, rt.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, greedy=args.greedy, seed=args.seed, stop_strings=tuple(args.stop),
                            return_logprobs=args.logprobs)

    model_dir, out_path = Path(args.model), Path(args.output)
    tokenizer = load_tokenizer(model_dir)
    rows, bad = load_prompts(args.data, skip_bad_rows=args.skip_bad_rows)
    n_rows = len(rows) + len(bad)
    done, error = {}, None
    if rank == 0:
        try:
            done = read_done(out_path)
        except InputError as e:
            error = str(e)
    if world > 1:  # every rank must agree on what is left (rank 0 read the file) and stop alike on a bad one
        box = [done, error]
        torch.distributed.broadcast_object_list(box, src=0)
        done, error = box
    if error:
        raise InputError(error)
    for r in rows:
        if r.index in done and done[r.index] != r.prompt_id:
            raise InputError(f"{out_path}: row index {r.index} has prompt_id {done[r.index]!r} but {r.loc} has "
                             f"{r.prompt_id!r}: the output belongs to different data")
    todo = [r for r in rows if r.index not in done]

    model = load_model(model_dir, device=device, dtype=dtype, attn_backend=args.attn_backend)
    ctx = model.config.max_position_embeddings
    if args.max_new_tokens >= ctx:
        raise InputError(f"--max-new-tokens: {args.max_new_tokens} must be < the model context {ctx}")
    # room for max_new_tokens after every prompt, so "length" means max_new_tokens, not a full context
    limit = min(args.max_prompt_length, ctx - args.max_new_tokens)
    prompts, kept, truncated = [], [], 0
    for r in todo:
        try:
            try:
                ids = render_prompt(tokenizer, r.messages, args.chat_template)
            except RenderError as e:
                raise BadRow(r.loc, str(e), "template") from None
            if not ids:
                raise BadRow(r.loc, "the prompt renders to 0 tokens", "empty_text")
            if len(ids) > limit and args.truncation == "error":
                raise BadRow(r.loc, f"prompt has {len(ids)} tokens > limit {limit} (--max-prompt-length "
                                    f"{args.max_prompt_length}; model context {ctx} minus --max-new-tokens "
                                    f"{args.max_new_tokens}); use --truncation left", "too_long")
        except BadRow as e:
            bad.add(e, args.skip_bad_rows)
            continue
        if len(ids) > limit:
            ids, truncated = ids[-limit:], truncated + 1       # keep the end: the question and the turn marker
        prompts.append(ids)
        kept.append(r)
    if not kept and not done:
        raise InputError(f"{args.data}: no usable prompts ({len(bad)} bad rows skipped; first: {bad[0]})")

    batch_size = args.batch_size
    if batch_size == 0:                          # auto: the free device memory, at the run's full sequence length
        batch_size = 64
        if model.lm_head_weight.device.type == "cuda" and prompts:
            max_len = min(ctx, max(map(len, prompts)) + args.max_new_tokens)
            free, _ = torch.cuda.mem_get_info(model.lm_head_weight.device)
            batch_size = auto_batch_size(model.config, model.lm_head_weight.dtype, max_len, free)
        if rank == 0:
            print(f"generate: batch size auto -> {batch_size} KV-cache slots", file=sys.stderr)
    sampler = Sampler(model, batch_size=batch_size, eos_token_ids=eos_ids(model_dir, model, tokenizer),
                      tokenizer=tokenizer)
    keys = [r.index for r in kept]
    reasons, n_tokens = Counter(), 0
    t0 = time.perf_counter()

    def row_of(r, g):
        response = g.text
        out = {"index": r.index, "prompt_id": r.prompt_id, "prompt": r.prompt,
               "messages": r.messages + [{"role": "assistant", "content": response}],
               "response": response, "finish_reason": g.finish_reason, "num_tokens": len(g.token_ids)}
        if args.logprobs:
            out["token_ids"], out["logprobs"] = g.token_ids, g.logprobs
        return out

    if world == 1:
        # stream in input order: buffer completions until the next row in order is there
        writer, order = RowWriter(out_path), range(len(kept))
    else:
        # rank r: every world-th prompt left, appended in completion order to its own shard (merged at the end)
        writer, order = RowWriter(shard_path(out_path, rank)), range(rank, len(kept), world)
    mine = list(order)

    def emit(j, g):
        nonlocal n_tokens
        reasons[g.finish_reason] += 1
        n_tokens += len(g.token_ids)
        writer.write(row_of(kept[mine[j]], g))
        fault_point("generate", sum(reasons.values()))

    try:
        pending, nxt = {}, 0
        for g in sampler.stream([prompts[i] for i in mine], params, [keys[i] for i in mine],
                                progress=not args.no_progress and rank == 0):
            if world > 1:
                emit(g.index, g)
                continue
            pending[g.index] = g
            while nxt in pending:
                emit(nxt, pending.pop(nxt))
                nxt += 1
    finally:
        writer.close()
    if world > 1:               # every shard complete, then one file in input order (rank 0), everyone waits
        torch.distributed.barrier()
        totals = [None] * world
        torch.distributed.all_gather_object(totals, (dict(reasons), n_tokens))
        reasons, n_tokens = sum((Counter(r) for r, _ in totals), Counter()), sum(n for _, n in totals)
    on_rank0(rt, lambda: merge(out_path))
    dt = time.perf_counter() - t0
    summary = {"rows": n_rows, "already_done": len(done), "generated": len(kept), **bad.summary(),
               "truncated_prompts": truncated, "finish_reasons": dict(reasons),
               "new_tokens": n_tokens, "seconds": round(dt, 2), "tokens_per_s": round(n_tokens / max(dt, 1e-9), 1),
               "decode": sampler.graph_report()}                            # CUDA graph, or eager after a fallback
    if rank == 0:
        for msg in bad[:10]:
            print(f"skipped: {msg}", file=sys.stderr)
        print(dumps(summary), file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_main(main)
