"""The run manifest, `manifest.json` in a run's folder: what the run computes from, written when it starts.

    {"format", "code_version", "world_size", "config": the resolved config,
     "inputs": {"model": sha256 of the weights and config, "tokenizer": ..., "data.sft": [sha256 per path], ...},
     "history": [{"event": "start" | "resume" | "resume-force", "time", "world_size", "code_version", "changed"}]}

`--resume` compares the current run with it and refuses at the first key that would change what was already
computed (an input's content, a config value, the code version), naming it, unless `--resume-force` (then the
change is recorded in `history` and the manifest describes the run from there on). Harmless keys may differ:
those that only change what is shown or how often it is saved (progress, log_every, checkpoint_every), how far the
loop goes (loop.iterations, convergence threshold), where things are (paths: their contents are compared instead),
the device and the world size (N ranks compute what one process does, to fp32 rounding).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from . import __version__
from .config import Config, all_keys, to_dict
from .errors import InputError
from .integrity import file_sha256, write_json

NAME = "manifest.json"
FORMAT = "spin_fast.manifest/1"
# config keys that may differ on --resume: presentation, save cadence, how far the loop runs, where things are
HARMLESS = {"resume", "resume_force", "device", "output", "ref_cache", "model.path", "data.sft", "data.pairs",
            "data.generated", "train.progress", "train.log_every", "train.tensorboard", "train.checkpoint_every",
            "train.max_bad_steps", "loop.iterations", "loop.convergence_threshold", "loop.continued_sft_baseline"}
INPUT_PATHS = ("data.sft", "data.pairs", "data.generated")


def code_version() -> str:
    """The package version + a sha256 of its sources (spin_fast/**.py and, in a checkout, csrc/)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted([*root.rglob("*.py"), *(root.parent / "csrc").glob("*.[ch]pp")]):
        h.update(p.relative_to(root.parent).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:12]}"


def path_fingerprint(path) -> str:
    """sha256 of a data file, or of a folder's files (name + sha256 each)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise InputError(f"{path}: does not exist")
    h = hashlib.sha256(b"spin_fast.folder-files/1\n")
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()} {file_sha256(p)}\n".encode())
    return h.hexdigest()


def build(cfg: Config, tokenizer, world_size: int) -> dict:
    from .refcache import folder_fingerprint, tokenizer_fingerprint
    inputs = {"model": folder_fingerprint(cfg.model.path), "tokenizer": tokenizer_fingerprint(tokenizer)}
    for key in INPUT_PATHS:
        section, name = key.split(".")
        paths = getattr(getattr(cfg, section), name)
        if paths:
            inputs[key] = [path_fingerprint(p) for p in paths]
    config = to_dict(cfg)
    return {"format": FORMAT, "code_version": code_version(), "world_size": world_size, "config": config,
            "inputs": inputs}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every key that changes what is computed, inputs first, then the config in
    its declaration order, then the code version."""
    diffs = []
    a, b = old.get("inputs", {}), new["inputs"]
    for k in dict.fromkeys([*b, *a]):
        if a.get(k) != b.get(k):
            diffs.append((f"inputs.{k}", a.get(k), b.get(k)))
    a, b = _flat(old.get("config", {})), _flat(new["config"])
    keys = all_keys()
    for k in dict.fromkeys([*keys, *b, *a]):
        # a key the old manifest lacks (added to the config since) held its default then: the behaviour it names
        # did not exist, the default keeps the old one
        was = a[k] if k in a or k not in keys else json.loads(json.dumps(keys[k][1], default=str))
        if k not in HARMLESS and was != b.get(k):
            diffs.append((k, was, b.get(k)))
    if old.get("code_version") != new["code_version"]:
        diffs.append(("code_version", old.get("code_version"), new["code_version"]))
    return diffs


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse(diffs, folder) -> None:
    key, was, now_ = diffs[0]
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    raise InputError(f"--resume: {key} differs from the run in {folder} ({_show(was)} there, {_show(now_)} "
                     f"now){more}: resuming would mix two setups in one run; restore it, choose a new "
                     f"--output, or pass --resume-force to continue anyway (recorded in {NAME})")


def check_finished(folder, cfg: Config, tokenizer, world_size: int) -> None:
    """--resume of a finished --pairs run (nothing left to compute, its summary is re-reported): InputError at the
    first key that differs from its manifest, as for an interrupted run, unless --resume-force; a user who changed
    train.lr must not be handed the old run's result as if it were the new one's. Nothing is written."""
    path = Path(folder) / NAME
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__}: {e}); the finished run's setup cannot be "
                         f"checked; choose a new --output") from None
    # the code version may differ: nothing is computed by this code
    diffs = [d for d in differences(old, build(cfg, tokenizer, world_size)) if d[0] != "code_version"]
    if diffs and not cfg.resume_force:
        _refuse(diffs, folder)


def check_and_write(folder, cfg: Config, tokenizer, world_size: int) -> dict:
    """At the start of a run (rank 0): refuse a used folder without --resume, compare on --resume (InputError at
    the first differing key, unless --resume-force), then write the manifest. Returns it."""
    folder = Path(folder)
    path = folder / NAME
    new = build(cfg, tokenizer, world_size)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    event = {"event": "start", "time": now, "world_size": world_size, "code_version": new["code_version"]}
    if path.is_file():
        if not cfg.resume:
            raise InputError(f"{folder} already holds a run ({NAME}): pass --resume to continue it, or choose a new "
                             f"--output")
        try:
            old = json.loads(path.read_text())
            history = list(old["history"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: unreadable ({type(e).__name__}: {e}); restore it, or choose a new --output") \
                from None
        diffs = differences(old, new)
        if diffs and not cfg.resume_force:
            _refuse(diffs, folder)
        event["event"] = "resume-force" if diffs else "resume"
        event["changed"] = {k: [was, now_] for k, was, now_ in diffs}
    elif cfg.resume and any(folder.glob("iter*")) and not cfg.resume_force:
        raise InputError(f"--resume: {folder} has no {NAME} (written by an older version, or not a spin_fast run): "
                         f"its setup cannot be checked; pass --resume-force to continue it anyway")
    else:
        history = []
    new["history"] = history + [event]
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, new)
    return new
