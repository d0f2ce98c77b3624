"""Peak memory per phase, and handing a finished phase's memory back.

    with PhaseMemory(device) as m:          # generation, cache, training ...
        ...
    m.peak_mib                              # CPU: peak RSS of the process; CUDA: torch.cuda.max_memory_allocated

CPU: Linux keeps the resident high-water mark (VmHWM in /proc/self/status, what ru_maxrss reports) and resets it
when "5" is written to /proc/self/clear_refs, so each phase gets its own exact peak. Where that file cannot be
written (not Linux, a locked-down container) a thread samples the RSS (psutil) every 20 ms instead: a lower bound.

release(): after a phase, gc + (Linux) glibc's malloc_trim(0). PyTorch's CPU allocator is the C heap: freed
tensors below the mmap threshold stay in the heap arenas, resident, and the next phase (a new model copy,
optimizer states) is allocated on top of them, so the process peak is the sum of both phases instead of the max.
"""
from __future__ import annotations

import gc
import sys
import threading

import torch

MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark; False where that is not possible."""
    if _status_kib("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release() -> None:
    """Give a finished phase's memory back: collect cycles, then return the C heap's free pages to the OS."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):       # not glibc (musl): nothing to trim
            pass


MMAP_THRESHOLD = 1 << 20      # bytes


def limit_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc: serve allocations >= `threshold` with their own mmap, unmapped when freed (mallopt M_MMAP_THRESHOLD,
    which also turns off glibc's dynamic threshold). Why: the dynamic threshold grows to the largest block freed
    (up to 32 MiB), so a micro-batch's activations (MiB-sized tensors) land in the heap arenas and their pages stay
    resident after backward frees them; measured on SmolLM2-135M training (benchmarks/README.md, "Training
    memory"): RSS after a step 3966 -> 1693 MiB, a step's peak 4241 -> 3405 MiB, at no more CPU time. Set by the
    entry points (spin_fast.train), never at import; a user's MALLOC_MMAP_THRESHOLD_ is left in charge. Returns
    whether it was set (False: not glibc, or the variable is set)."""
    import os
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)) == 1     # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


class PhaseMemory:
    """Peak memory of the code inside the `with` (MiB): peak RSS on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: torch.device | str = "cpu", sample_s: float = 0.02):
        self.device = torch.device(device)
        self.sample_s = sample_s
        self.peak_mib = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "peak_rss"
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_hwm():
            self.kind = "sampled_rss"
            self._peak, self._stop = rss_bytes(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.sample_s):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._peak, rss_bytes()) / MIB
        else:
            self.peak_mib = _status_kib("VmHWM") * 1024 / MIB
        return False


def peak_record(phases: dict[str, PhaseMemory], distributed: bool = False) -> dict:
    """summary.json's `peak_memory`: MiB per phase; under torch.distributed the max over ranks (one rank's peak; the
    machine's total is about world x that on CPU)."""
    names = list(phases)
    vals = torch.tensor([phases[n].peak_mib for n in names], dtype=torch.float64)
    kinds = {phases[n].kind for n in names}
    out = {"unit": "MiB", "kind": "/".join(sorted(kinds)), "per": "rank (max)" if distributed else "process"}
    if distributed:
        import torch.distributed as dist
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        hi, total = vals.to(dev), vals.to(dev)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        vals = hi.cpu()
        out["sum_over_ranks"] = {n: round(float(v), 1) for n, v in zip(names, total.cpu().tolist())}
    return {**out, **{n: round(float(v), 1) for n, v in zip(names, vals.tolist())}}

