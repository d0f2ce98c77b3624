"""integrity.py and runtime's process guards: strict JSON (NaN -> null), folder checksums naming the damaged file,
the single-writer lock (a live holder refuses with its pid, a dead one is taken over), and torchrun workers that
die with their launcher."""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spin_fast import demo
from spin_fast.integrity import OutputLock, dumps, verify_checksums, write_checksums, write_json


def test_json_is_strict_nan_becomes_null(tmp_path):
    obj = {"loss": float("nan"), "norm": [1.0, float("inf"), -float("inf")], "n": 3, "s": "NaN", "t": (0.5,)}
    text = dumps(obj)
    assert json.loads(text) == {"loss": None, "norm": [1.0, None, None], "n": 3, "s": "NaN", "t": [0.5]}
    write_json(tmp_path / "a.json", obj)
    strict = json.loads((tmp_path / "a.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict["loss"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]               # no temp file left behind


def test_checksums_name_the_changed_file(tmp_path):
    folder = tmp_path / "iter0"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub" / "x.json").write_text("{}")
    write_checksums(folder)
    verify_checksums(folder, fix="redo")                                   # as written: fine
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[1000] ^= 0x01                                                     # one flipped bit, same size
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"iter0/model.safetensors: differs from the sha256 .*; redo"):
        verify_checksums(folder, fix="redo")
    data[1000] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="extra.bin: is not listed"):
        verify_checksums(folder, fix="redo")
    (folder / "extra.bin").unlink()
    (folder / "sub" / "x.json").unlink()
    with pytest.raises(ValueError, match="sub/x.json: is missing"):
        verify_checksums(folder, fix="redo")
    (folder / "checksums.json").unlink()
    with pytest.raises(ValueError, match="checksums.json: missing or unreadable"):
        verify_checksums(folder, fix="redo")


def _holder(tmp_path, pid, host=None):
    path = tmp_path / "out" / ".lock"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "then"}))
    return path


def test_lock_message_names_what_it_guards(tmp_path):
    # OUTPUT/.lock guards the folder; generate's OUT.jsonl.lock guards OUT.jsonl (the message said "." before)
    for lock, target in ((tmp_path / "out" / ".lock", tmp_path / "out"),
                         (tmp_path / "gen.jsonl.lock", tmp_path / "gen.jsonl")):
        with OutputLock(lock):
            with pytest.raises(ValueError, match=rf"^{re.escape(str(target))} is in use by another run \(pid {os.getpid()} "):
                OutputLock(lock).acquire()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    path = tmp_path / "out" / ".lock"
    with OutputLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match=rf"out is in use by another run \(pid {os.getpid()} on "):
            OutputLock(path).acquire()
    assert not path.exists()                                               # released
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, sleeper.pid)
        with pytest.raises(ValueError, match=f"pid {sleeper.pid}"):
            OutputLock(path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    _holder(tmp_path, sleeper.pid)                                         # now a dead pid on this host: stale
    with caplog.at_level(logging.WARNING, logger="spin_fast.integrity"):
        lock = OutputLock(path)
        lock.acquire()
    assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {sleeper.pid}" in caplog.text
    lock.release()
    _holder(tmp_path, sleeper.pid, host="elsewhere")                       # another host: cannot tell, refuse
    with pytest.raises(ValueError, match="on elsewhere"):
        OutputLock(path).acquire()


def test_second_run_into_the_same_output_refuses_naming_the_holder(tmp_path):
    # a run holds OUTPUT (a live process's lock): `spin_fast.train` into it stops with one line, writes nothing
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, sleeper.pid)
        model = tmp_path / "model"
        demo.init_model(model, demo.build_tokenizer(model), hidden=32, layers=1, heads=4, seed=0)
        rows = demo.write_jsonl(tmp_path / "rows.jsonl", demo.make_rows(8, seed=0))
        r = subprocess.run([sys.executable, "-m", "spin_fast.train", "--model", str(model), "--data.sft", str(rows),
                            "--output", str(tmp_path / "out"), "--max-length", "64", "--max-prompt-length", "32",
                            "--micro-batch-tokens", "128", "--tokens-per-step", "128", "--max-new-tokens", "8"],
                           capture_output=True, text=True, timeout=300)   # (lengths within the tiny model's 128)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"in use by another run (pid {sleeper.pid}" in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")                      # a zombie has exited (its reaper may be slow)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_workers_die_with_the_torchrun_launcher(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from spin_fast.runtime import init_runtime
        rt = init_runtime("cpu")
        open(os.path.join({str(tmp_path)!r}, f"pid{{rt.rank}}"), "w").write(str(os.getpid()))
        time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"pid{r}").is_file() and (tmp_path / f"pid{r}").read_text() for r in (0, 1)):
            assert time.time() < deadline and launcher.poll() is None, "workers did not start"
            time.sleep(0.2)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
        assert not any(_gone(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 10
        while not all(_gone(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    finally:
        launcher.kill()
        for r in (0, 1):
            f = tmp_path / f"pid{r}"
            if f.is_file() and f.read_text() and not _gone(int(f.read_text())):
                os.kill(int(f.read_text()), signal.SIGKILL)
