"""Shared test helpers: oracle-relative error checks, random packed SPIN batches, and a tiny --pairs training run
(1 process or 2 gloo ranks under torchrun) on the demo's model."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# Absolute slack added to the same-dtype torch error, relative to the size of the fp64 value (Cut Cross-Entropy's
# criterion: a low-precision kernel may be as wrong as torch in that dtype, plus a little).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float64: 1e-10}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def scale_of(ref: torch.Tensor) -> float:
    return max(ref.double().abs().max().item(), 1e-6)


def assert_oracle_close(name, impl_val, torch_same_dtype_val, fp64_val, dtype):
    """err(impl vs fp64) <= err(torch same dtype vs fp64) + tol * |fp64|_max."""
    err_impl = max_err(impl_val, fp64_val)
    err_torch = max_err(torch_same_dtype_val, fp64_val)
    bound = err_torch + TOL[dtype] * scale_of(fp64_val)
    assert err_impl <= bound, (f"{name}: err(impl vs fp64) = {err_impl:.3e} > err(torch {dtype} vs fp64) "
                               f"{err_torch:.3e} + tol = {bound:.3e}")


def assert_elementwise_close(name, impl_val, torch_same_dtype_val, fp64_val, dtype, tol=None):
    """Cut Cross-Entropy's criterion, per element: |impl - fp64| <= |torch same dtype - fp64| + tol * |fp64|_max.

    Stricter than the max-norm form: an impl cannot hide a wrong element behind torch's worst element elsewhere."""
    ref = fp64_val.detach().double().cpu()
    err_impl = (impl_val.detach().double().cpu() - ref).abs()
    err_torch = (torch_same_dtype_val.detach().double().cpu() - ref).abs()
    # + one unit in the last place of the output's dtype at the element's magnitude: both sides round their fp32
    # accumulator to that dtype, and a last-bit difference in the accumulation order flips a value that sits near
    # a rounding midpoint to the other neighbour (a whole bf16 ulp, even where torch happens to be exact).
    ulp = torch.finfo(impl_val.dtype).eps * ref.abs() if impl_val.dtype != torch.float64 else 0.0
    bound = err_torch + (TOL[dtype] if tol is None else tol) * scale_of(ref) + ulp
    bad = err_impl > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index((err_impl - bound).flatten().argmax(), err_impl.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements fail |impl - fp64| <= "
                             f"|torch {dtype} - fp64| + tol; worst at {idx}: impl err {err_impl[idx]:.3e}, torch "
                             f"err {err_torch[idx]:.3e}, bound {bound[idx]:.3e}")


def random_packed_batch(num_pairs, num_unpaired, max_len, hidden_size, vocab, dtype, seed, long_pair_len=0,
                        all_ignored_sequence=False):
    """A packed micro-batch with pairs in shuffled positions, prompt tokens ignored, ragged lengths.

    Returns dict(hidden (N, H), weight (V, H), targets (N,), seq_index (N,), chosen_index (P,), rejected_index (P,),
    num_sequences S). Sequence order is a random permutation, so a pair's two sequences are anywhere in the batch.
    """
    g = torch.Generator().manual_seed(seed)
    num_sequences = 2 * num_pairs + num_unpaired
    lengths = torch.randint(2, max_len + 1, (num_sequences,), generator=g)
    if long_pair_len:
        lengths[0] = long_pair_len                                     # one pair much longer than a chunk
    perm = torch.randperm(num_sequences, generator=g)                  # sequence s sits at slot perm[s]
    seq_index = torch.cat([torch.full((int(lengths[s]),), s) for s in perm.tolist()])   # (N,)
    n = seq_index.numel()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.randint(0, n, (1,), generator=g)] = vocab - 1        # the last column
    # Prompt-like prefix ignored, and the last token of each sequence (no next token).
    start = 0
    for s in perm.tolist():
        length = int(lengths[s])
        prompt = int(torch.randint(0, length, (1,), generator=g))
        targets[start:start + prompt] = -100
        targets[start + length - 1] = -100
        if all_ignored_sequence and s == 1:
            targets[start:start + length] = -100
        start += length
    pair_seq = torch.randperm(2 * num_pairs, generator=g)
    chosen_index, rejected_index = pair_seq[:num_pairs], pair_seq[num_pairs:]
    hidden = torch.randn(n, hidden_size, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) / hidden_size ** 0.5).to(dtype)
    return dict(hidden=hidden, weight=weight, targets=targets, seq_index=seq_index, chosen_index=chosen_index,
                rejected_index=rejected_index, num_sequences=num_sequences)


def impl_device(impl: str) -> str:
    """Triton runs on CUDA when there is a GPU (and in the interpreter on CPU otherwise)."""
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


def on_impl_device(impl, fn):
    """Wrap fn(*tensors, **kw) so its tensor arguments move to impl's device; .to() is differentiable, so gradients
    still reach the CPU leaves the test inspects."""
    device = impl_device(impl)
    if device == "cpu":
        return fn

    def moved(*args, **kwargs):
        mv = lambda a: a.to(device) if isinstance(a, torch.Tensor) else a
        out = fn(*map(mv, args), **{k: mv(v) for k, v in kwargs.items()})
        return out
    return moved


PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


class ByteTokenizer:
    """A dependency-free tokenizer for data/refcache tests: UTF-8 bytes as ids (vocab 256), Jinja chat templates."""
    name_or_path = "byte-tokenizer"
    chat_template = PLAIN_TEMPLATE
    vocab_size = 256

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=False):
        import jinja2
        return jinja2.Template(chat_template or self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def get_vocab(self):
        return {f"<{i}>": i for i in range(256)}


def train_pairs_cli(model, pairs, out, nproc: int, args) -> None:
    """`spin_fast.train --pairs` in a subprocess: 1 process, or `nproc` gloo ranks under torchrun."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("SPIN_FAST_FAULT", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
                else [sys.executable])
    r = subprocess.run(launcher + ["-m", "spin_fast.train", "--model", str(model), "--pairs", str(pairs),
                                   "--output", str(out), *args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


def demo_model_and_pairs(root, num_rows: int):
    """The demo's tiny model in root/model and root/pairs.jsonl: each row's right answer vs the next row's."""
    from spin_fast import demo
    tok = demo.build_tokenizer(root / "model")
    demo.init_model(root / "model", tok, hidden=32, layers=2, heads=4, seed=0)
    rows = demo.make_rows(num_rows, seed=3)
    pairs = root / "pairs.jsonl"
    with pairs.open("w") as f:
        for i, r in enumerate(rows):
            m = r["messages"]
            f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]],
                                "rejected": [rows[(i + 1) % len(rows)]["messages"][-1]]}) + "\n")
    return root / "model", pairs


def demo_model_and_rows(root, num_rows: int):
    """The demo's tiny model in root/model and num_rows of its SFT rows in root/rows.jsonl: (root, model, rows)."""
    from spin_fast import demo
    tok = demo.build_tokenizer(root / "model")
    demo.init_model(root / "model", tok, hidden=32, layers=2, heads=4, seed=0)
    rows = demo.write_jsonl(root / "rows.jsonl", demo.make_rows(num_rows, seed=0))
    return root, root / "model", rows
