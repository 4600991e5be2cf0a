"""One writer per run directory and per sampling output: a second writer is refused naming the holder, a lock
left by a killed process is taken over with a warning, and readers never need it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY, train_log, train_tiny

from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.cli import main
from ddpm.lock import LOCK_FILE, LockedError, RunLock, StaleLockWarning, _proc_start

TRAIN = ["--batch-size", "16", *TINY]
WAIT_S = 120  # the bound on every wait for a subprocess (they import torch first, on a shared 2-core machine)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_holder(path: Path, pid: int, proc_start: int | None = None) -> None:
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
                                "command": "ddpm train --out RUN", "proc_start": proc_start}))


def _wait_for(what: str, cond, proc: subprocess.Popen) -> None:
    """Poll `cond` until true; fail if `proc` ends first or WAIT_S pass."""
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert proc.poll() is None, f"the subprocess ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s"
        time.sleep(0.02)


def _holder_written(lock: Path) -> bool:
    try:
        return json.loads(lock.read_text() or "null") is not None
    except (OSError, ValueError):
        return False


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# `ddpm ARGS` with every training step and sampled batch DELAY seconds later (results unchanged), so that the
# test stops it mid-run however fast the machine is
_SLOWED = """
import sys, time
import ddpm.generate, ddpm.train
from ddpm.cli import main

def later(f, delay=float(sys.argv[1])):
    return lambda *a, **k: (time.sleep(delay), f(*a, **k))[1]

ddpm.train.Trainer.train_step = later(ddpm.train.Trainer.train_step)
ddpm.generate.sample_batch = later(ddpm.generate.sample_batch)
sys.argv = ["ddpm", *sys.argv[2:]]
sys.exit(main(sys.argv[1:]))
"""


def _ddpm(*args: str, delay: float = 0.0) -> subprocess.Popen:
    cmd = ["-c", _SLOWED, str(delay)] if delay else ["-m", "ddpm"]
    return subprocess.Popen([sys.executable, *cmd, *args], stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------------ the lock itself


def test_second_holder_is_refused_naming_the_first_and_release_frees_it(tmp_path, recwarn):
    path = tmp_path / LOCK_FILE
    with RunLock(path, "run directory R"):
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LockedError) as e:  # a second writer, here in the same process: refused all the same
            RunLock(path, "run directory R").acquire()
        msg = str(e.value)
        assert msg.startswith("run directory R is in use by process ") and f"process {os.getpid()} on host " in msg
        assert held["started"] in msg and str(path) in msg
    assert not path.exists()  # a clean release leaves nothing behind, so the next holder warns of nothing
    RunLock(path, "run directory R").acquire().release()
    assert not [w for w in recwarn if issubclass(w.category, StaleLockWarning)]


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    path, pid = tmp_path / LOCK_FILE, _dead_pid()
    _write_holder(path, pid)
    with pytest.warns(StaleLockWarning, match=rf"stale lock of run directory R: its holder, process {pid} on host .* "
                                              "no longer runs"):
        lock = RunLock(path, "run directory R").acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_holder_on_this_host_is_refused_even_where_flock_says_free(tmp_path):
    """A filesystem whose flock does not exclude (NFS with local_lock): the pid in the file still does, and a pid
    reused by another process (another start time) does not count as the holder."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / LOCK_FILE
        _write_holder(path, sleeper.pid, _proc_start(sleeper.pid))
        with pytest.raises(LockedError, match=f"in use by process {sleeper.pid} on host "):
            RunLock(path, "run directory R").acquire()
        _write_holder(path, sleeper.pid, _proc_start(sleeper.pid) - 1)
        with pytest.warns(StaleLockWarning, match=f"process {sleeper.pid} "):
            RunLock(path, "run directory R").acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------ two trainers


def test_second_trainer_is_refused_and_the_first_trains_as_if_alone(tmp_path, capsys):
    steps = ["--ckpt-every", "2", "--set", "train.keep_checkpoints=2"]  # keep-last-2 deletes one on the way
    solo = train_tiny(tmp_path / "solo", 6, *steps)
    run = tmp_path / "run"
    first = _ddpm("train", "--out", str(run), "--steps", "6", *steps, *TRAIN, delay=0.2)
    try:
        _wait_for("first checkpoint", lambda: latest_checkpoint(run / "checkpoints") is not None, first)
        os.kill(first.pid, signal.SIGSTOP)  # mid-run for certain while the others try
        assert first.poll() is None, "the first trainer finished before the test could stop it"
        before = _snapshot(run)
        for extra in (["--resume"], ["--force"], []):
            capsys.readouterr()
            assert main(["train", "--out", str(run), "--steps", "10", *extra, *TRAIN]) == 2, extra
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert f"ddpm train: error: run directory {run} is in use by process {first.pid} on host " in err
            assert "ddpm train --out" in err and str(run / LOCK_FILE) in err
            assert _snapshot(run) == before, extra  # nothing read into, written, moved aside or deleted
        # readers need no lock: sampling from the checkpoints of a run in training works
        assert main(["sample", "--run", str(run), "--n", "2", "--sampler", "ddim", "--steps", "2",
                     "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=WAIT_S)
        assert first.returncode == 0, err[-2000:]
    finally:
        first.kill()
    assert not (run / LOCK_FILE).exists()
    a, b = load_checkpoint(latest_checkpoint(run / "checkpoints")), load_checkpoint(latest_checkpoint(solo / "checkpoints"))
    assert a.step == b.step == 6 and sorted(a.tensors) == sorted(b.tensors)
    for k, v in b.tensors.items():  # weights, EMA and Adam moments, bit for bit
        assert torch.equal(a.tensors[k], v), k
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(p.name for p in (solo / "checkpoints").iterdir())
    assert (run / "log.jsonl").read_text() == (solo / "log.jsonl").read_text()


def test_lock_of_a_killed_trainer_is_taken_over_on_resume(tmp_path):
    run = tmp_path / "run"
    first = _ddpm("train", "--out", str(run), "--steps", "100000", "--ckpt-every", "1", *TRAIN)
    try:
        _wait_for("first checkpoint", lambda: latest_checkpoint(run / "checkpoints") is not None, first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=WAIT_S)
    finally:
        first.kill()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid  # left behind by kill -9
    step = load_checkpoint(latest_checkpoint(run / "checkpoints")).step
    with pytest.warns(StaleLockWarning, match=rf"its holder, process {first.pid} on host .* no longer runs"):
        assert main(["train", "--out", str(run), "--steps", str(step + 1), "--resume", *TRAIN]) == 0
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == step + 1
    assert not (run / LOCK_FILE).exists()
    # the log: every step once, as trained (the killed process's lines written as they came, those past its last
    # checkpoint dropped on resume)
    assert [e["step"] for e in train_log(run)] == list(range(1, step + 2))


# ------------------------------------------------------------------------------------------ two samplers


def test_second_sampler_on_one_output_is_refused_and_the_first_completes(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", 2)
    sample = ["sample", "--run", str(run), "--n", "6", "--batch-size", "1", "--sampler", "ddim", "--steps", "5", "--quiet"]
    assert main([*sample, "--out", str(tmp_path / "solo.npz")]) == 0
    out = tmp_path / "out.npz"
    lock, parts = tmp_path / "out.npz.lock", tmp_path / "out.npz.parts"
    first = _ddpm(*sample, "--out", str(out), delay=0.2)
    try:
        _wait_for("sampling lock", lambda: _holder_written(lock), first)
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None and not out.exists(), "the first sampler finished before the test could stop it"
        before = _snapshot(parts) if parts.exists() else {}
        capsys.readouterr()
        assert main([*sample, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ddpm sample: error: sampling output {out} is in use by process {first.pid} on host ")
        assert str(lock) in err and err.count("\n") == 1
        assert (_snapshot(parts) if parts.exists() else {}) == before and not out.exists()
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=WAIT_S)
        assert first.returncode == 0, err[-2000:]
    finally:
        first.kill()
    np.testing.assert_array_equal(np.load(out)["arr_0"], np.load(tmp_path / "solo.npz")["arr_0"])
    assert not lock.exists() and not parts.exists()
