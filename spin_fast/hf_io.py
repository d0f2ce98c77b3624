"""Hugging Face folders in and out: config.json -> ModelConfig, safetensors -> Transformer, and back.

Loading builds the model on the meta device (no memory), then reads each tensor from safetensors and
puts it straight into place as the parameter, so peak memory is one copy of the weights. `load_model_sharded`
(FSDP training) shards the meta model first and reads only each rank's rows: no rank holds the whole model.
Both read through families.checkpoint_sources (our name -> checkpoint tensor and rows). Saving writes
safetensors (sharded with model.safetensors.index.json above `max_shard_bytes`), config.json and the
tokenizer / generation files, so `transformers.AutoModelForCausalLM.from_pretrained` loads the result.

Anything we would compute differently from transformers is refused with the list of what is supported
(families.py: per-family config translation and checkpoint names, e.g. Phi-3's fused q/k/v split on load and
fused back on save).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError
from .families import SUPPORTED_MODEL_TYPES, checkpoint_sources, config_from_hf, hf_name, to_checkpoint  # noqa: F401
from .model import ModelConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# tensors a checkpoint may carry that are derived, not learned
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(folder) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise InputError(f"{path}: must hold a JSON object, got {type(hf).__name__}")
    try:
        return config_from_hf(hf, source=str(path))
    except InputError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:   # a field of the wrong type, e.g. "eos": {}
        raise InputError(f"{path}: malformed config ({type(e).__name__}: {e})") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file holding it, from the shard index or a single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{index}: unreadable shard index ({e!r})") from None
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise InputError(f"{folder}: neither model.safetensors nor model.safetensors.index.json "
                         f"(only safetensors checkpoints are supported)")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:
        raise InputError(f"{single}: corrupt or unreadable safetensors file ({e})") from None


def _plan(folder: Path, model: Transformer) -> tuple[dict[str, tuple[str, int, int]], dict[str, Path], dict[str, int]]:
    """(sources, files, rows_of): our parameter -> (checkpoint tensor, rows) (families.checkpoint_sources: one
    tensor each, or a row block of a fused one, Phi-3), checkpoint tensor -> its file, fused tensor -> its total
    rows; after checking that the checkpoint holds exactly what the model needs."""
    cfg = model.config
    # LoRA adapters (lora.attach) are not in the checkpoint: lora.init_sharded_ fills them
    sources = checkpoint_sources(cfg, [n for n, _ in model.named_parameters() if ".lora." not in n])
    expected = {ck for ck, _, _ in sources.values()}
    rows_of = {}                                                   # fused tensor -> its total rows
    for ck, _, end in sources.values():
        rows_of[ck] = max(rows_of.get(ck, -1), end)
    files = _weight_files(folder)
    missing = sorted(expected - set(files))
    if missing:
        raise InputError(f"{folder}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    tied_head = model.lm_head is None  # some tied checkpoints also store lm_head.weight: ignored
    unexpected = sorted(n for n in set(files) - expected
                        if not n.endswith(IGNORED_TENSOR_SUFFIXES) and not (n == "lm_head.weight" and tied_head))
    if unexpected:
        raise InputError(f"{folder}: unexpected tensor(s) {unexpected[:8]} for a {cfg.model_type} model "
                         f"(a different architecture?)")
    for ours, (ck, _, _) in sources.items():
        if not files[ck].is_file():
            raise InputError(f"{files[ck]}: shard named in the index does not exist (needed for {ck})")
    return sources, files, rows_of


def _read_params(folder: Path, model: Transformer, rows, put) -> None:
    """For every parameter of (meta or sharded) `model`, read its rows [a, b) (rows(name); None: all of them) from
    the checkpoint and hand them to put(name, tensor). Only those rows leave the file (safetensors slices), one
    file open at a time; shapes are checked against config.json first."""
    sources, files, rows_of = _plan(folder, model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    by_file: dict[Path, list[str]] = {}
    for ours, (ck, _, _) in sources.items():
        by_file.setdefault(files[ck], []).append(ours)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for ours in names:
                    ck, start, end = sources[ours]
                    want = shapes[ours]
                    try:
                        sl = f.get_slice(ck)
                        full = tuple(sl.get_shape())
                    except Exception as e:
                        raise InputError(f"{path}: cannot read tensor {ck} ({e})") from None
                    if end == -1 and full != want:
                        raise InputError(f"{path}: tensor {ck} has shape {full}, expected {want} from config.json")
                    if end != -1 and (full[0] != rows_of[ck] or tuple(full[1:]) != want[1:]):
                        raise InputError(f"{path}: tensor {ck} has shape {full}, expected "
                                         f"{(rows_of[ck], *want[1:])} from config.json")
                    r = rows(ours)
                    try:
                        if r is None and end == -1:
                            t = f.get_tensor(ck)
                        else:                  # this rank's rows, of a row block of a fused tensor or not
                            a, b = (0, want[0]) if r is None else r
                            t = sl[start + a: start + b]
                    except Exception as e:
                        raise InputError(f"{path}: cannot read tensor {ck} ({e})") from None
                    put(ours, t)
        except (ValueError, InputError):
            raise
        except Exception as e:  # safetensors header / buffer errors
            raise InputError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def _init_buffers(model: Transformer, device) -> None:
    """The non-persistent (derived) buffers, computed from the config: after the meta build / to_empty they hold
    nothing. A buffer not listed here raises, so a new one cannot stay uninitialised silently."""
    other = sorted(n for n, _ in model.named_buffers() if n not in ("inv_freq", "inv_freq_local"))
    if other:
        raise AssertionError(f"buffers {other} are not (re)initialised by hf_io._init_buffers")
    model.init_rope(device)


def load_model(folder, device="cpu", dtype: torch.dtype = torch.float32, attn_backend: str = "auto") -> Transformer:
    """A Transformer with the whole weights of the HF folder, on `device` in `dtype`, in eval mode (one process,
    the sampler; FSDP training loads with load_model_sharded)."""
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = Transformer(cfg, attn_backend)
    modules = dict(model.named_modules())

    def put(ours, t):
        mod_name, _, attr = ours.rpartition(".")
        # one copy: the loaded tensor becomes the parameter (cast/moved once, then the CPU copy is freed)
        setattr(modules[mod_name], attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
    _read_params(folder, model, lambda n: None, put)
    _init_buffers(model, device)
    return model.eval()


def shard_rows(p) -> tuple[int, int] | None:
    """Rows [a, b) of the full parameter that this rank holds, for an FSDP2 parameter (a DTensor Shard(0) on a 1-D
    mesh: torch.chunk's split, ceil(rows / world) per rank, the last ranks shorter or empty); None if not sharded."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(p, DTensor):
        return None
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise AssertionError(f"sharded loading expects FSDP2's Shard(0) on a 1-D mesh, got {p.placements}")
    world, rank, n = p.device_mesh.size(), p.device_mesh.get_local_rank(), p.shape[0]
    chunk = -(-n // world)
    a = min(rank * chunk, n)
    b = min(a + chunk, n)
    if p.to_local().shape[0] != b - a:
        raise AssertionError(f"local shard of {tuple(p.shape)} has {p.to_local().shape[0]} rows, expected {b - a}")
    return a, b


def load_model_sharded(folder, prepare, device, dtype: torch.dtype = torch.float32,
                       attn_backend: str = "auto", lora_cfg=None, lora_seed: int = 0) -> Transformer:
    """The HF folder's model, sharded, without the whole model ever existing on any rank (torchtitan's way).

    Build on the meta device (no memory) in `dtype`; prepare(model): the trainer's activation checkpointing ->
    compile -> fully_shard per block and root (parameters become DTensor shards, still meta); `to_empty(device)`
    allocates this rank's shards only; then each rank reads from the safetensors files only its shards' rows
    (slices: the other ranks' rows never leave the file) and copies them into place; derived buffers are
    recomputed. Every rank reads its own rows, rather than rank 0 reading whole tensors and scattering them
    (set_model_state_dict(broadcast_from_rank0=True)): no whole tensor anywhere, no extra traffic, the same file
    access every rank had before. Returns the model in eval mode, like load_model.

    lora_cfg (train.lora, rank > 0): adapters are attached to the meta model before prepare (the base frozen, as
    lora.attach does to a whole model) and each rank's adapter shards get exactly the values a whole-model attach
    with lora_seed would give (lora.init_sharded_): LoRA runs never hold the whole base either."""
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = Transformer(cfg, attn_backend).to(dtype)
    _plan(folder, model)                                     # refuse a bad folder before sharding
    if lora_cfg is not None and lora_cfg.rank:
        from . import lora
        lora.attach(model, lora_cfg, seed=lora_seed)         # on meta: shapes and requires_grad only
    prepare(model)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    rows = {n: shard_rows(p) for n, p in params.items()}

    def put(ours, t):
        local = params[ours].to_local() if rows[ours] is not None else params[ours]
        with torch.no_grad():
            local.copy_(t.to(dtype))                         # shapes: the shard's rows (shard_rows checked them)
    _read_params(folder, model, rows.get, put)
    if lora_cfg is not None and lora_cfg.rank:
        lora.init_sharded_(model, lora_cfg, seed=lora_seed)
    _init_buffers(model, device)
    return model.eval()


def state_dict_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors (fused where the family's checkpoints are); a tied model carries no lm_head.weight
    (as transformers saves it)."""
    return to_checkpoint(model.config, {n: p.detach() for n, p in model.named_parameters()})


def save_model(model: Transformer, out_dir, tokenizer=None, source_dir=None, max_shard_bytes: int = 5 << 30,
               state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
    """Write an HF folder: safetensors (+ index when sharded), config.json, tokenizer and generation files.

    Tokenizer files are copied from `source_dir` when given, else `tokenizer.save_pretrained` is used.
    state_dict: the weights under our parameter names, when `model`'s own are not whole (an FSDP-sharded model
    gathered with get_model_state_dict(full_state_dict=True)); dtype: cast the saved tensors to it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # an older save's shards would otherwise shadow / mix with these
    if state_dict is None:
        tensors = state_dict_hf(model)                  # still on the model's device
    else:
        names = {n for n, _ in model.named_parameters() if ".lora." not in n}   # LoRA: merged state (lora.py)
        if set(state_dict) != names:
            raise ValueError(f"state_dict keys differ from the model's parameters: missing "
                             f"{sorted(names - set(state_dict))[:4]}, unexpected {sorted(set(state_dict) - names)[:4]}")
        tensors = to_checkpoint(model.config, {n: t.detach() for n, t in state_dict.items()})
    dtype = dtype or next(iter(tensors.values())).dtype
    nbytes = {k: t.numel() * dtype.itemsize for k, t in tensors.items()}
    shards, cur, size = [], [], 0                       # plan shards by size first ...
    for name in tensors:
        if cur and size + nbytes[name] > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes[name]
    shards.append(cur)
    meta = {"format": "pt"}
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):             # ... then copy to host one shard at a time
        host = {k: tensors[k].to(device="cpu", dtype=dtype).contiguous() for k in shard}
        save_file(host, str(out / fname), metadata=meta)
    if len(shards) > 1:
        weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, indent=2))
    hf = dict(model.config.hf_config)
    dtype_name = str(dtype).removeprefix("torch.")
    hf["torch_dtype"] = dtype_name
    hf["dtype"] = dtype_name
    hf["tie_word_embeddings"] = model.lm_head is None
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if not (out / "generation_config.json").exists():
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def load_tokenizer(folder):
    """The folder's tokenizer (transformers.AutoTokenizer), read from the folder alone: no hub look-up
    (local_files_only) and never code from the folder (trust_remote_code=False: a tokenizer_config.json whose
    `auto_map` names a .py file is refused, not run). Any failure is an InputError naming the folder."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as e:       # OSError, ValueError, json / sentencepiece errors: the folder's files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {first[:300]})") from None
