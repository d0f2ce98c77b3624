"""Training memory and speed of SmolLM2-135M-Instruct (fp32, CPU): peak RSS per optimizer step, and CPU time of
variants side by side (issue 12 item 1; numbers in benchmarks/README.md, "Training memory").

    python -m benchmarks.train_memory mem --variant lean --steps 3 --pps 2      # VmHWM reset per step
    python -m benchmarks.train_memory mem --variant lean-ac --steps 3 --pps 2   # + activation checkpointing
    PROBE_THREADS=1 OMP_NUM_THREADS=1 python -m benchmarks.train_memory speed --variants plain,lean,lean-ac --rounds 3

Pairs: the first 64 rows of the shared UltraChat-schema SFT file ending on an assistant turn (chosen = that answer,
rejected = the next row's answer cut to 1000 characters, about a 256-token generation), max_length 1024 /
max_prompt_length 512, micro_batch_tokens 2048, the trainer's step plan with --pps pairs per step, AdamW (fused).
Variants: plain = RMSNorm and SwiGLU as plain autograd ops (what the model ran before lean_grad), lean = the
default (spin_fast/lean_grad.py), -ac = train.activation_checkpointing. speed: the same step repeated, the variants
alternated (order reversed every round), tokens per CPU second (process_time: with one thread, robust to other
load on a shared machine, unlike wall time).
"""
import argparse, ctypes, gc, json, os, sys, tempfile, time
import torch
from pathlib import Path
from transformers import AutoTokenizer
from benchmarks.bench_sampler import smollm2_folder
from benchmarks.bench_train import SHARED
from spin_fast import lean_grad
from spin_fast.hf_io import load_model
from spin_fast.data import load_pairs
from spin_fast.config import Config
from spin_fast.model import ACTIVATIONS
from spin_fast.trainer import SpinTask, prepare_model, build_optimizer, plan_steps
from spin_fast.memory import rss_bytes, _reset_hwm, _status_kib

def main():
    ap = argparse.ArgumentParser(); ap.add_argument("mode"); ap.add_argument("--variant", default="lean")
    ap.add_argument("--variants", default="plain,lean,lean-ac"); ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3); ap.add_argument("--pps", type=int, default=2)
    ap.add_argument("--trim", action="store_true"); ap.add_argument("--mbt", type=int, default=2048)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get('PROBE_THREADS', '2')))
    folder, why = smollm2_folder()
    if folder is None:
        sys.exit(f"train_memory: {why}")
    M, MiB = folder, 2**20
    tok = AutoTokenizer.from_pretrained(M, trust_remote_code=False)
    rows = []
    for line in (SHARED / "sft" / "sft_ultrachat_schema-00000.jsonl").open():
        m = json.loads(line).get("messages") or []
        if len(m) >= 2 and m[-1].get("role") == "assistant" and m[-2].get("role") == "user":
            rows.append(m)
        if len(rows) == 65:
            break
    tmp = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    tmp.write_text("".join(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [
        {"role": "assistant", "content": o[-1]["content"][:1000]}]}) + "\n" for m, o in zip(rows, rows[1:])))
    pairs, _ = load_pairs([tmp], tok, max_length=1024, max_prompt_length=512)
    cfg = Config().train; cfg.micro_batch_tokens = a.mbt
    model = load_model(M, dtype=torch.float32); prepare_model(model, cfg, distributed=False, compute_dtype=torch.float32)
    model.train()
    P = pairs.num_pairs
    task = SpinTask(pairs, torch.zeros(P), torch.zeros(P), cfg, torch.device("cpu"))
    steps = plan_steps(task.unit_tokens, tokens_per_step=0, micro_batch_tokens=a.mbt, world_size=1, seed=0, epochs=1, pairs_per_step=a.pps)
    opt = build_optimizer(model.parameters(), cfg)
    LEAN = (lean_grad.rms_norm, lean_grad.gated_act)
    libc = ctypes.CDLL("libc.so.6")
    def plain_rms(x, w, eps, plus_one=False):
        xf = x.float(); n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (n * (1.0 + w.float())).to(x.dtype) if plus_one else w * n.to(x.dtype)
    def set_variant(v):
        # -mmap: glibc's mmap threshold fixed at 1 MiB (M_MMAP_THRESHOLD = -3): large tensors are mmapped and
        # unmapped on free; the others, when alternated with it, 32 MiB (about where the default's dynamic
        # threshold grows to); glibc's default is left alone otherwise
        if "-mmap" in v:
            libc.mallopt(-3, 1 << 20)
        elif any("-mmap" in x for x in a.variants.split(",")) and a.mode == "speed":
            libc.mallopt(-3, 32 << 20)
        v = v.replace("-mmap", "")
        if v.startswith("plain"):
            lean_grad.rms_norm, lean_grad.gated_act = plain_rms, lambda g, u, act: ACTIVATIONS[act](g) * u
        else:
            lean_grad.rms_norm, lean_grad.gated_act = LEAN
        for blk in model.layers: blk.checkpoint_activations = v.endswith("-ac")
    def run_step(st):
        n = 0
        for mb in st.micro_batches[0]:
            n += int(task.unit_tokens[mb].sum()); task.micro_batch(model, mb, float(len(st.units)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step(); opt.zero_grad(set_to_none=True)
        return n
    print("rss after load", round(rss_bytes() / MiB), flush=True)
    if a.mode == "mem":
        set_variant(a.variant)
        for i, st in enumerate(steps[: a.steps]):
            if a.trim: gc.collect(); libc.malloc_trim(0)
            r0 = rss_bytes(); _reset_hwm(); t0 = time.perf_counter(); n = run_step(st); dt = time.perf_counter() - t0
            print(json.dumps(dict(variant=a.variant, trim=a.trim, step=i, mbs=[int(task.unit_tokens[mb].sum()) for mb in st.micro_batches[0]],
                  s=round(dt, 1), tok_s=round(n / dt, 1), rss0=round(r0 / MiB), peak=round(_status_kib("VmHWM") / 1024), rss_end=round(rss_bytes() / MiB))), flush=True)
    else:
        vs = a.variants.split(",")
        st = steps[0]
        set_variant(vs[0]); run_step(st)          # warm-up (Adam states exist from here)
        res = {v: [] for v in vs}
        for r in range(a.rounds):
            for v in (vs if r % 2 == 0 else vs[::-1]):
                set_variant(v); c0 = time.process_time(); t0 = time.perf_counter(); n = run_step(st); dt = time.perf_counter() - t0
                cpu = time.process_time() - c0
                res[v].append(n / cpu); print(json.dumps(dict(round=r, variant=v, tokens=n, s=round(dt, 2), cpu_s=round(cpu, 2), tok_per_cpu_s=round(n / cpu, 1))), flush=True)
        print("median tokens per CPU second", {v: round(sorted(x)[len(x) // 2], 1) for v, x in res.items()})


if __name__ == "__main__":
    main()
