"""What keeps a run's files trustworthy: JSON with finite numbers only, written atomically; sha256 checksums of
the folders we publish, verified before use; the single-writer lock on an output.

- `dumps` / `write_json`: NaN and ±inf become `null` (JSON has no such numbers: `json.dumps` would write the bare
  token `NaN`, which no strict parser reads), then `allow_nan=False` guards every write. `write_json` goes through a
  temp file and a rename, so a reader never sees half a file.
- `write_checksums` / `verify_checksums`: `checksums.json` lists the sha256 of every file of a folder; it is
  written last by us, so a file that differs from it was changed or damaged after we wrote it. `file_sha256`
  remembers digests by (path, size, mtime, inode), so verifying a folder and fingerprinting it read it once.
- `OutputLock`: a lock file (pid, host, process start time) created with O_EXCL; a second run into the same output
  stops with one line naming the holder; a lock whose process is gone (same host) is taken over with a message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

from .errors import InputError

log = logging.getLogger("spin_fast.integrity")
CHECKSUMS = "checksums.json"


# --- JSON -----------------------------------------------------------------------------------------------------------

def finite(obj):
    """A copy of obj (dicts, lists, tuples, numbers, strings) with NaN / ±inf floats replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kw)


def write_json(path, obj, *, indent: int | None = 2) -> None:
    """obj as strict JSON into path, atomically (temp file in the same folder + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(obj, indent=indent) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- checksums ------------------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """sha256 of a file's bytes (remembered per path, size, mtime and inode: a rewritten file is hashed again)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS and not p.name.startswith("."))


def write_checksums(folder) -> None:
    """folder/checksums.json: {relative path: sha256} of every file in it (hidden files excepted)."""
    folder = Path(folder)
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)}
    write_json(folder / CHECKSUMS, {"format": "spin_fast.checksums/1", "sha256": sums})


def verify_checksums(folder, *, fix: str) -> None:
    """InputError naming the first file of `folder` that is missing, extra or differs from its checksums.json
    (absent: an error too, the folder was not published by us). fix: what the message tells the user to do."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / CHECKSUMS}: missing or unreadable ({type(e).__name__}), so {folder} cannot be "
                         f"verified; {fix}") from None
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    for name in sorted(set(sums) | present):
        path = folder / name
        if name not in present:
            problem = "is missing"
        elif name not in sums:
            problem = f"is not listed in {CHECKSUMS} (added after the folder was written)"
        elif file_sha256(path) != sums[name]:
            problem = f"differs from the sha256 in {CHECKSUMS} (changed or damaged after it was written)"
        else:
            continue
        raise InputError(f"{path}: {problem}; {fix}")


# --- the single-writer lock -----------------------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]          # field 22; the command name may contain spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                     # someone else's live process
    return start is None or _start_time(pid) in (None, start)


class OutputLock:
    """`with OutputLock(path):` holds the lock file `path` for this process (one run per output)."""

    def __init__(self, path):
        self.path = Path(path)
        self.held = False
        # what it guards, for the messages: a folder's OUTPUT/.lock guards the folder, OUT.jsonl.lock guards OUT.jsonl
        name = self.path.name
        self.target = self.path.parent if name == ".lock" or not name.endswith(".lock") else \
            self.path.with_name(name[:-len(".lock")])

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue                            # released, or being written right now: look again
                pid = holder.get("pid")
                if isinstance(pid, int) and (holder.get("host") != me["host"] or _alive(pid, holder.get("start"))):
                    raise InputError(
                        f"{self.target} is in use by another run (pid {pid} on {holder.get('host')}, "
                        f"since {holder.get('since')}): wait for it to end, or delete {self.path} if it is gone")
                stale = self.path.with_name(f"{self.path.name}.stale{os.getpid()}")
                try:
                    os.rename(self.path, stale)         # atomic: of two runs taking over, one wins
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                log.warning("%s: took over the lock of pid %s on %s (that process is gone)", self.path, pid,
                            holder.get("host"))
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise InputError(f"{self.path}: could not take the lock (other runs keep creating it)")

    def _holder(self) -> dict | None:
        """The lock's content; None if it vanished or is too fresh to judge; {"pid": None} if it is unreadable
        and old (its writer died between creating and writing it)."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except ValueError:
            pass
        if age < 5:
            time.sleep(0.5)
            return None
        return {"pid": None, "host": "?"}

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False
