"""Process setup shared by the entry points: device, torch.distributed under torchrun, and a clean exit.

Under torchrun (WORLD_SIZE set) every rank joins a process group: NCCL on CUDA, gloo on CPU. Without torchrun a
CUDA run still joins a 1-process group (FSDP2's mixed precision needs one); a CPU run does not (plain model, no
FSDP overhead).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool          # a process group is initialised (FSDP, collectives)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str | None = "auto", *, need_group_on_cuda: bool = False) -> Runtime:
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("config device: cuda requested but torch.cuda.is_available() is False")
        dev = torch.device(f"cuda:{local}")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise InputError(f"config device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    distributed = False
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _die_with_launcher()
    if not dist.is_initialized():
        if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
            distributed = True
        elif need_group_on_cuda and dev.type == "cuda":
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=dev)
            distributed = True
    else:
        distributed = True
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(rank, world, local, dev, distributed)


def on_rank0(rt: Runtime, fn):
    """fn() on rank 0 alone (it looks at or writes the output folder); its result, or its refusal (InputError),
    on every rank: a refusal stops every rank, none waits for the others forever."""
    result, error = None, None
    if rt.is_main:
        try:
            result = fn()
        except InputError as e:
            error = str(e)
    if rt.distributed:
        import torch.distributed as dist
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise InputError(error)
    return result


def _die_with_launcher() -> None:
    """A torchrun worker asks the kernel for SIGKILL when its parent (the launcher) dies: a `kill -9` of torchrun
    must not leave workers training (and writing) on their own. Linux only (prctl PR_SET_PDEATHSIG); every file
    we write is atomic or resumable, so SIGKILL at any point is safe."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:                   # the launcher died before the request: nobody to wait for
        os._exit(1)


def shutdown(rt: Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist
        dist.barrier()  # no rank tears down the group while another is still in a collective
        dist.destroy_process_group()


def run_main(main) -> None:
    """`python -m spin_fast.X` wrapper: bad input (InputError, whose message names the file/row/key/argument) and
    an OSError of the environment (a full disk, a permission, with its path) print one line and exit 2, no
    traceback; any other exception is a bug of ours and keeps its traceback. Under torchrun every rank that
    stops prints its line ("error (rank R): ...") and exits at once, without waiting for the others in a
    collective: the launcher then stops the remaining ranks (checks that only rank 0 makes are broadcast first, so
    every rank stops with the same line; a rank whose collective broke because a peer exited says so in one line).
    After a distributed run, the interpreter's finalisation is skipped."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        main()
    except Exception as e:
        if isinstance(e, InputError):
            line = " ".join(str(e).split("\n"))
        elif isinstance(e, OSError):
            line = f"{type(e).__name__}: {e}"
        elif world > 1 and _peer_stopped(e):
            # this rank waited in a collective for a rank that stopped (which printed why): no traceback here
            line = f"stopped: another rank stopped ({str(e).splitlines()[0][:160]})"
        else:
            raise                                             # a bug of ours: the traceback is the report
        rank = int(os.environ.get("RANK", "0"))
        print(f"{f'error (rank {rank})' if world > 1 and rank != 0 else 'error'}: {line}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2) if world > 1 else sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the process group is destroyed. Skip interpreter finalisation: with a
        # `tokenizers` tokenizer loaded, gloo's teardown at exit aborts ("terminate called without an active
        # exception", SIGABRT) in about 1 run of 8 (torch 2.13, reproduced with a 10-line script), which would
        # turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _peer_stopped(e: BaseException) -> bool:
    """A collective failed because another rank's process went away (its connection dropped), as opposed to an
    error of this rank's own. (A dead peer under NCCL leaves the others waiting; torchrun stops them.)"""
    import torch.distributed as dist
    return isinstance(e, getattr(dist, "DistNetworkError", ())) or (isinstance(e, RuntimeError) and any(
        k in str(e) for k in ("Connection reset by peer", "Connection closed by peer")))


def fault_point(phase: str, count: int) -> None:
    """Crash-test hook: with SPIN_FAST_FAULT="phase:count" (or "phase:count@rank": that rank only) in the
    environment, SIGKILL this process when `phase` reaches `count` (rows generated, cache micro-batches, optimizer
    steps, files written, ...). Lets the resume tests kill a run at an exact point of each phase, deterministically;
    a no-op otherwise (one dict lookup)."""
    want = os.environ.get("SPIN_FAST_FAULT")
    if not want:
        return
    point, _, rank = want.partition("@")
    if point == f"{phase}:{count}" and (not rank or rank == os.environ.get("RANK", "0")):
        import signal
        print(f"SPIN_FAST_FAULT: SIGKILL at {point} on rank {os.environ.get('RANK', '0')}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
