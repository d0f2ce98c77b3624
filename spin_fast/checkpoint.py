"""Training checkpoints for resume: torch.distributed.checkpoint (DCP) of the model and optimizer, plus a JSON of
everything else (step, scheduler, RNG, the step plan's fingerprint).

Layout under a phase's checkpoint folder:

    ckpt/step-000040/          DCP files (one per rank; sharded FSDP state is saved and loaded sharded)
    ckpt/step-000040/meta.json  {"step", "scheduler", "rng", "plan"} written by rank 0 AFTER the DCP save
    ckpt/latest                 "step-000040", replaced atomically (rename) once meta.json is on disk

A checkpoint without meta.json (a save killed half-way) is never `latest`; older complete ones are deleted after
the new one is published. Multi-rank saves write into one folder: a file system every rank sees.
The data order needs no saving: the step plan is a pure function of (seed, epoch, token budgets), checked by
its fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import InputError
from .integrity import write_json


def plan_fingerprint(steps) -> str:
    h = hashlib.sha256(b"spin_fast.plan/1\n")
    for s in steps:
        h.update(s.units.astype("int64").tobytes() + b"|")
    return h.hexdigest()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(folder: Path, step: int, model, optimizer, scheduler, plan: str, keep: int = 1) -> Path:
    """Save after optimizer step `step` (1-based count of finished steps). Collective under FSDP."""
    import torch.distributed.checkpoint as dcp
    folder = Path(folder)
    name = f"step-{step:06d}"
    path = folder / name
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(path))
    if _rank() == 0:
        meta = {"step": step, "scheduler": scheduler.state_dict(), "plan": plan,
                "rng": {"torch": torch.get_rng_state().tolist()}}
        write_json(path / "meta.json", meta, indent=None)
        tmp = folder / ".latest.tmp"
        tmp.write_text(name)
        os.replace(tmp, folder / "latest")
        done = sorted(p for p in folder.glob("step-*") if (p / "meta.json").is_file() and p.name != name)
        for old in done[: max(0, len(done) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def latest(folder: Path) -> Path | None:
    pointer = Path(folder) / "latest"
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load(path: Path, model, optimizer, scheduler, plan: str) -> int:
    """Restore model, optimizer, scheduler and RNG in place; returns the number of finished steps.
    InputError if the checkpoint was written for another step plan (other data, seed or budgets)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    meta = json.loads((Path(path) / "meta.json").read_text())
    if meta["plan"] != plan:
        raise InputError(f"{path}: checkpoint belongs to another step plan (data, seed, epochs or token budgets "
                         f"changed); delete it or restore the settings to resume")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(torch.tensor(meta["rng"]["torch"], dtype=torch.uint8))
    return int(meta["step"])
