"""A run's folder: outputs that would destroy an input are refused, one writer at a time (the lock), and the
training phase alone (`--pairs`) works in OUTPUT.tmp and renames it to OUTPUT when complete, as the loop does
per iteration, so an OUTPUT that exists is a finished model.

    loop:     OUTPUT/{.lock, manifest.json, data/, iter{t}.work/, iter{t}/ ...}
    --pairs:  OUTPUT.tmp/{.lock, manifest.json, ckpt/, ref_logps.safetensors, metrics.jsonl, HF files}
              -> summary.json + checksums.json -> renamed to OUTPUT/
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import Config
from .errors import InputError
from .integrity import OutputLock, write_checksums, write_json

LOCK = ".lock"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(cfg: Config) -> None:
    """InputError if the output is the starting model's folder or inside it, one of the data paths, or a file."""
    out = Path(cfg.output).resolve()
    model = Path(cfg.model.path).resolve()
    if _inside(out, model):
        raise InputError(f"output {cfg.output} is {'the' if out == model else 'inside the'} model folder "
                         f"{cfg.model.path}: the run would overwrite its own starting model; choose another --output")
    for key in ("data.sft", "data.pairs", "data.generated"):
        section, name = key.split(".")
        for p in getattr(getattr(cfg, section), name):
            if Path(p).resolve() == out:
                raise InputError(f"output {cfg.output} is the {key} input {p}: choose another --output")
    if out.exists() and not out.is_dir():
        raise InputError(f"config output: {cfg.output} is an existing file; the output is a folder")


def folder(cfg: Config) -> Path:
    """Where the run writes while it runs: OUTPUT (the loop), OUTPUT.tmp (--pairs)."""
    out = Path(cfg.output)
    return out.with_name(out.name + ".tmp") if cfg.data.pairs else out


def lock(cfg: Config) -> OutputLock:
    return OutputLock(folder(cfg) / LOCK)


def finished_pairs_run(cfg: Config) -> dict | None:
    """--pairs into an OUTPUT that exists: its summary when it is a finished run and --resume was given (nothing
    is left to do); InputError otherwise. None when OUTPUT does not exist yet (or is an empty folder)."""
    out = Path(cfg.output)
    if (out / "summary.json").is_file():
        if not cfg.resume:
            raise InputError(f"output {out} already holds a finished training run (summary.json): choose a new "
                             f"--output")
        return json.loads((out / "summary.json").read_text())
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"output {out} exists and is not a finished run (no summary.json): choose a new --output, "
                         f"or empty it")
    return None


def publish_pairs(cfg: Config, held: OutputLock, summary: dict) -> None:
    """Rank 0, --pairs: summary.json and checksums.json last into OUTPUT.tmp, then OUTPUT.tmp -> OUTPUT."""
    tmp, out = folder(cfg), Path(cfg.output)
    shutil.rmtree(tmp / "ckpt", ignore_errors=True)         # superseded by the finished model
    write_json(tmp / "summary.json", summary)
    write_checksums(tmp)
    if out.is_dir():
        out.rmdir()                                         # an empty folder (checked at the start)
    os.replace(tmp, out)
    held.path = out / LOCK                                  # the lock moved with its folder
