"""hf_io.load_model_sharded under torchrun (2 CPU ranks, gloo): no rank ever holds the whole model, and the
sharded model's hidden states and logits equal the single-process model's (fp32). With train.lora the same holds
for the base, and the adapters' shards make up exactly what a whole-model lora.attach with the same seed gives.

"Never holds the whole model" is checked two independent ways on each rank, around the loader alone:
  * every byte that leaves a safetensors file goes through a counting proxy of `safe_open`: per parameter the
    rank reads exactly its shard's rows (a loader that read a whole tensor and sliced it, or that bypassed
    safe_open, fails);
  * a TorchDispatchMode records every tensor the loader's torch ops allocate (views excluded: safetensors hands
    out views of the mmapped file, whose pages are only touched for the rows copied; DTensors by their local
    shard): none has the shape of a whole parameter whose shard is smaller.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"

WORKER = r'''
import json, sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
sys.path.insert(0, {root!r})
from spin_fast import hf_io
from spin_fast.trainer import prepare_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
reads = []                                     # (hf name, elements read from the file)
real_open = hf_io.safe_open


class CountingSlice:
    def __init__(self, sl, name):
        self.sl, self.name = sl, name

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, idx):
        t = self.sl[idx]
        reads.append((self.name, t.numel()))
        return t


class CountingOpen:
    def __init__(self, *a, **k):
        self.f = real_open(*a, **k)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *e):
        return self.f.__exit__(*e)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        t = self.f.get_tensor(name)
        reads.append((name, t.numel()))
        return t

    def get_slice(self, name):
        return CountingSlice(self.f.get_slice(name), name)


class Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()
        self.ops = {{}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {{}}))
        if func.is_view:        # no new memory (safetensors hands out views of the mmapped file; rows are read
            return out          # from it only by the copy into the shard, counted by CountingSlice)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                local = t._local_tensor if isinstance(t, DTensor) else t
                if local.device.type != "meta":           # meta tensors hold no memory
                    self.shapes.add(tuple(local.shape))
                    self.ops.setdefault(tuple(local.shape), str(func))
        return out


results = {{}}
LORA = SimpleNamespace(rank=3, alpha=6.0, dropout=0.0, targets=["q_proj,v_proj,down_proj"])
for folder, key, lora_cfg in [(f, f, None) for f in {folders!r}] + [({folders!r}[0], "lora", LORA)]:
    cfg = SimpleNamespace(activation_checkpointing=True, compile=False)
    prepare = lambda m: prepare_model(m, cfg, distributed=True, compute_dtype=torch.float32)
    reads.clear()
    hf_io.safe_open = CountingOpen
    mode = Allocations()
    with mode:
        model = hf_io.load_model_sharded(folder, prepare, torch.device("cpu"), attn_backend="sdpa",
                                         lora_cfg=lora_cfg, lora_seed=5)
    hf_io.safe_open = real_open
    adapters = {{n: p.full_tensor().tolist() for n, p in model.named_parameters() if ".lora." in n}}
    # the base's parameters (LoRA adapters are tiny and filled whole, one at a time: lora.init_sharded_)
    params = {{n: p for n, p in model.named_parameters() if ".lora." not in n}}
    info = {{n: [list(p.shape), list(p.to_local().shape), isinstance(p, DTensor)] for n, p in params.items()}}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # a whole parameter's shape (one whose shard is smaller), unless it is also some shard's shape on this rank
    locals_ = {{tuple(v[1]) for v in info.values()}}
    whole_shapes = [[list(s), mode.ops[s]] for s in mode.shapes if s not in locals_
                    and any(list(s) == v[0] and v[0] != v[1] for v in info.values())]
    # the same input on both ranks: hidden states and logits of the sharded model
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    lens = [9, 1, 14]
    ids = torch.randint(0, vocab, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32)
    with torch.no_grad():
        hidden = model(ids, pos, cu, cu_seqlens_host=cu.tolist())
        w = model.lm_head_weight
        w = w.full_tensor() if isinstance(w, DTensor) else w
        logits = hidden @ w.T
    sizes = {{}}
    for name, n in reads:
        sizes[name] = sizes.get(name, 0) + n
    results[key] = dict(params=info, reads=sizes, whole_shapes=whole_shapes, hidden=hidden.tolist(),
                        logits=logits.tolist(), buffers_finite=bool(torch.isfinite(model.inv_freq).all()),
                        adapters=adapters, trainable=trainable)
    del model
open({out!r} + f".rank{{rank}}.json", "w").write(json.dumps(results))
dist.destroy_process_group()
'''


def tiny_folder(tmp_path: Path) -> Path:
    """Random Llama, SmolLM2's 9 query / 3 KV heads, odd row counts (uneven shards), untied head, several
    safetensors files (an index)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=36, intermediate_size=51, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape)) if "norm" in name else 0.2 * torch.randn(p.shape))
    folder = tmp_path / "tiny"
    hf.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.slow
def test_two_ranks_never_hold_the_whole_model_and_match_one_process(tmp_path):
    from spin_fast.hf_io import hf_name as _hf_name, load_model
    folders = [tiny_folder(tmp_path)]
    if (STORIES / "model.safetensors").is_file():       # tied embeddings, 8 / 4 heads; skipped cleanly if absent
        folders.append(STORIES)
    folders = [str(f) for f in folders]
    out = tmp_path / "res"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(Path(__file__).resolve().parents[1]), folders=folders, out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for folder, key in [(f, f) for f in folders] + [(folders[0], "lora")]:
        one = load_model(folder, attn_backend="sdpa")
        if key == "lora":     # a whole-model attach with the same seed: what every rank's shards must make up
            from spin_fast import lora
            lcfg = SimpleNamespace(rank=3, alpha=6.0, dropout=0.0, targets=["q_proj,v_proj,down_proj"])
            lora.attach(one, lcfg, seed=5)
            want = {n: p.detach() for n, p in one.named_parameters() if lora.is_adapter_name(n)}
            for res_r in ranks:
                got_ad = res_r[key]["adapters"]
                assert set(got_ad) == set(want) and len(want) == 3 * len(one.layers) * 2
                for n, t in want.items():
                    torch.testing.assert_close(torch.tensor(got_ad[n]), t, atol=0, rtol=0)
                assert res_r[key]["trainable"] == sorted(want)                 # the base is frozen
            assert any(t.abs().sum() > 0 for n, t in want.items() if n.endswith(".A"))
        full = {n: p.numel() for n, p in one.named_parameters() if ".lora." not in n}   # the base
        g = torch.Generator().manual_seed(0)
        lens = [9, 1, 14]
        ids = torch.randint(0, one.config.vocab_size, (sum(lens),), generator=g)
        pos = torch.cat([torch.arange(n) for n in lens])
        cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32)
        with torch.no_grad():
            hidden = one(ids, pos, cu)
            logits = one.logits(hidden)
        total_local = 0
        for r, res_r in enumerate(ranks):
            got = res_r[key]
            assert got["buffers_finite"]
            assert not got["whole_shapes"], f"rank {r} allocated whole-parameter tensors {got['whole_shapes']}"
            for name, (shape, local, is_dt) in got["params"].items():
                assert is_dt, name                                        # every parameter is a shard
                rows = shape[0]
                assert local[0] == min(-(-rows // 2), rows - r * -(-rows // 2)), (name, shape, local)
                n_local = torch.Size(local).numel()
                # exactly this rank's rows left the file, nothing more (the tied head is not read at all)
                assert got["reads"].get(_hf_name(name), 0) == n_local, (name, got["reads"].get(_hf_name(name)))
                total_local += n_local
            read = sum(got["reads"].values())
            assert read < sum(full.values()), (r, read, sum(full.values()))
            torch.testing.assert_close(torch.tensor(got["hidden"]), hidden, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(torch.tensor(got["logits"]), logits, atol=1e-5, rtol=1e-6)
        assert total_local == sum(full.values())                            # the two shards make the whole model
