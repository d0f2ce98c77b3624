"""Training checkpoints for resume: torch.distributed.checkpoint (DCP) of the model and optimizer, plus a JSON of
everything else (step, scheduler, RNG, the step plan's fingerprint).

Layout under a phase's checkpoint folder:

    ckpt/step-000040/          DCP files (one per rank; sharded FSDP state is saved and loaded sharded)
    ckpt/step-000040/meta.json  {"step", "scheduler", "rng", "plan", "files": {name: sha256}} written by rank 0
                                AFTER the DCP save (every rank's files are complete then)
    ckpt/latest                 "step-000040 <sha256 of its meta.json>", replaced atomically (rename) last

A checkpoint without meta.json (a save killed half-way) is never `latest`; older complete ones are deleted after
the new one is published. Multi-rank saves write into one folder: a file system every rank sees.

Integrity and trust: torch.distributed.checkpoint reads `.metadata` with pickle (code runs on load). So before
dcp.load every file of the checkpoint is checked against the sha256 recorded in meta.json at save time (no file
missing, none extra), and meta.json against the digest in `latest`: pickle only ever reads bytes this code wrote.
A mismatch (a flipped byte, a torn or removed shard, a foreign file) is logged naming the file and the phase
restarts from its first step (deterministic: the same weights, only time is lost). This protects against damage
and accidents, not against someone who can write OUTPUT: with no secret key they can rewrite the digests too
(as they could the code or the published weights); keep OUTPUT as private as the code.
The data order needs no saving: the step plan is a pure function of (seed, epoch, token budgets), checked by
its fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import InputError
from .integrity import file_sha256, write_json
from .runtime import fault_point

log = logging.getLogger("spin_fast.checkpoint")


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
    fault_point("ckpt", step)                         # the shards are written, meta.json not yet
    if _rank() == 0:
        files = {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.is_file()}   # every rank's shards
        meta = {"step": step, "scheduler": scheduler.state_dict(), "plan": plan,
                "rng": {"torch": torch.get_rng_state().tolist()}, "files": files}
        write_json(path / "meta.json", meta, indent=None)
        tmp = folder / ".latest.tmp"
        tmp.write_text(f"{name} {file_sha256(path / 'meta.json')}\n")
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
    name = pointer.read_text().split()[:1]
    path = Path(folder) / name[0] if name else None
    return path if path is not None and (path / "meta.json").is_file() else None


def verify(folder: Path, path: Path) -> str | None:
    """None if the checkpoint `path` is the one we wrote (meta.json matches `latest`, every file its sha256 in
    meta.json, none missing or extra), else what is wrong, naming the file. Reads no pickle."""
    fields = (Path(folder) / "latest").read_text().split()
    if len(fields) != 2 or fields[0] != path.name:
        return f"{Path(folder) / 'latest'}: not a pointer written by spin_fast (no meta.json digest)"
    if file_sha256(path / "meta.json") != fields[1]:
        return f"{path / 'meta.json'}: differs from the sha256 recorded in {Path(folder) / 'latest'}"
    try:
        files = json.loads((path / "meta.json").read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{path / 'meta.json'}: no file checksums"
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != "meta.json"}
    for name in sorted(set(files) | present):
        if name not in present:
            return f"{path / name}: is missing"
        if name not in files:
            return f"{path / name}: is not one of the checkpoint's files (added after it was written)"
        if file_sha256(path / name) != files[name]:
            return f"{path / name}: differs from its sha256 in meta.json (changed or damaged after it was written)"
    return None


def usable(folder: Path) -> Path | None:
    """The latest checkpoint of `folder` if it verifies on rank 0 (all ranks get the verdict), else None: a damaged
    one is logged naming the file and the phase starts again from its first step."""
    verdict = [None, None]
    if _rank() == 0:
        found = latest(folder)
        if found is not None:
            problem = verify(folder, found)
            verdict = [None, problem] if problem else [found.name, None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    name, problem = verdict
    if problem and _rank() == 0:
        log.warning("checkpoint not used: %s; training this phase again from its first step", problem)
    return Path(folder) / name if name else None


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
