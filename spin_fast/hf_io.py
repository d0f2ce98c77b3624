"""Hugging Face folders in and out: config.json -> ModelConfig, safetensors -> Transformer, and back.

Loading builds the model on the meta device (no memory), then reads each tensor from safetensors and
puts it straight into place as the parameter, so peak memory is one copy of the weights. Saving writes
safetensors (sharded with model.safetensors.index.json above `max_shard_bytes`), config.json and the
tokenizer / generation files, so `transformers.AutoModelForCausalLM.from_pretrained` loads the result.

Anything we would compute differently from transformers is refused with the list of what is supported.
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
from .model import ModelConfig, Transformer, rope_inv_freq

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' config-class defaults for keys a config.json may omit
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# tensors a checkpoint may carry that are derived, not learned
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def _unsupported(source, what: str) -> InputError:
    return InputError(f"{source}: {what}. Supported: model_type in {SUPPORTED_MODEL_TYPES}, rope_type in "
                      f"{SUPPORTED_ROPE_TYPES}, hidden_act 'silu', full (non-sliding) causal attention, "
                      f"mlp_bias false, partial_rotary_factor 1.0")


def _rope(hf: dict, source) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either the transformers-4 (rope_theta + rope_scaling) or the
    transformers-5 (rope_parameters) spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _unsupported(source, f"rope_type {rope_type!r}")
    if float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise _unsupported(source, "partial_rotary_factor != 1.0")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        if "factor" not in merged:
            raise _unsupported(source, "rope_scaling 'linear' without 'factor'")
        return float(theta), {"rope_type": "linear", "factor": float(merged["factor"])}
    need = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [k for k in need if k not in merged]
    if missing:
        raise _unsupported(source, f"rope_scaling 'llama3' is missing {missing}")
    orig = merged.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), {"rope_type": "llama3", **{k: float(merged[k]) for k in need},
                          "original_max_position_embeddings": int(orig)}


def config_from_hf(hf: dict, source="config.json") -> ModelConfig:
    """Validate a Hugging Face config dict and translate it; `source` names the file in errors."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(source, f"model_type {mt!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise InputError(f"{source}: field {key!r} must be a positive int, got {hf.get(key)!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(source, f"hidden_act {act!r}")
    if hf.get("mlp_bias", False):
        raise _unsupported(source, "mlp_bias true")
    max_pos = int(hf.get("max_position_embeddings", DEFAULT_MAX_POSITIONS[mt]))
    if mt == "mistral":
        sw = hf["sliding_window"] if "sliding_window" in hf else 4096   # MistralConfig's default
        if sw is not None and int(sw) < max_pos:
            raise _unsupported(source, f"sliding_window={sw} < max_position_embeddings={max_pos} (sliding "
                                       f"window attention in effect)")
    if mt == "qwen2":
        lt = hf.get("layer_types") or []
        if hf.get("use_sliding_window", False) or any(t != "full_attention" for t in lt):
            raise _unsupported(source, "use_sliding_window true / sliding_attention layers")
    for key in ("sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key):
            raise _unsupported(source, f"{key}={hf[key]!r}")
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = _rope(hf, source)
    qkv_bias = mt == "qwen2" or bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=int(kv), head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=max_pos,
            # LlamaConfig / MistralConfig / Qwen2Config all default to untied
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)),
            model_type=mt, bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos, hf_config=dict(hf))
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


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


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def load_model(folder, device="cpu", dtype: torch.dtype = torch.float32, attn_backend: str = "auto") -> Transformer:
    """A Transformer with the weights of the HF folder, on `device` in `dtype`, in eval mode."""
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = Transformer(cfg, attn_backend)
    expected = {_hf_name(n): n for n, _ in model.named_parameters()}
    files = _weight_files(folder)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise InputError(f"{folder}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    tied_head = model.lm_head is None  # some tied checkpoints also store lm_head.weight: ignored
    unexpected = sorted(n for n in set(files) - set(expected)
                        if not n.endswith(IGNORED_TENSOR_SUFFIXES) and not (n == "lm_head.weight" and tied_head))
    if unexpected:
        raise InputError(f"{folder}: unexpected tensor(s) {unexpected[:8]} for a {cfg.model_type} model "
                         f"(a different architecture?)")
    modules = dict(model.named_modules())
    by_file: dict[Path, list[str]] = {}
    for hf_name in expected:
        by_file.setdefault(files[hf_name], []).append(hf_name)
    for path, names in by_file.items():
        if not path.is_file():
            raise InputError(f"{path}: shard named in the index does not exist (needed for {names[0]})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for hf_name in names:
                    ours = expected[hf_name]
                    mod_name, _, attr = ours.rpartition(".")
                    mod = modules[mod_name]
                    want = tuple(getattr(mod, attr).shape)
                    try:
                        t = f.get_tensor(hf_name)
                    except Exception as e:
                        raise InputError(f"{path}: cannot read tensor {hf_name} ({e})") from None
                    if tuple(t.shape) != want:
                        raise InputError(f"{path}: tensor {hf_name} has shape {tuple(t.shape)}, expected {want} "
                                         f"from config.json")
                    # one copy: the loaded tensor becomes the parameter (cast/moved once, then the CPU copy is freed)
                    setattr(mod, attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        except ValueError:
            raise
        except Exception as e:  # safetensors header / buffer errors
            raise InputError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def state_dict_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors; a tied model carries no lm_head.weight (as transformers saves it)."""
    return {_hf_name(n): p.detach() for n, p in model.named_parameters()}


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
        names = {n for n, _ in model.named_parameters()}
        if set(state_dict) != names:
            raise ValueError(f"state_dict keys differ from the model's parameters: missing "
                             f"{sorted(names - set(state_dict))[:4]}, unexpected {sorted(set(state_dict) - names)[:4]}")
        tensors = {_hf_name(n): t.detach() for n, t in state_dict.items()}
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
