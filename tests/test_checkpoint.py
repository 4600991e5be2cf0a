"""Checkpoints survive crashes: atomic writes, manifests, checksums, keep-last-K, safe loading."""

import builtins
import errno
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ddpm import checkpoint as ckpt


def _tensors(seed=0, n=1000):
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(n, generator=g), "ema/w": torch.randn(n, generator=g), "rng/cpu": torch.get_rng_state()}


def _assert_same(a, b, where="state"):
    """Deep equality with exact types: ints stay ints, tuples stay tuples, tensors bitwise with their dtype."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _listing(root):
    return sorted(p.name for p in Path(root).iterdir())


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_is_bitwise_with_adam_state_and_rng(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    flat, skeleton = ckpt.flatten_state(opt.state_dict(), "optim")
    rng_state = torch.get_rng_state()
    expected_draw = torch.rand(4)  # what the RNG gives right after the state saved
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        **{f"model/{k}": v for k, v in net.state_dict().items()}, **flat,
        "rng/cpu": rng_state,
        "extra/transposed": base.t(),  # not contiguous
        "extra/base": base, "extra/row": base[1], "extra/alias": base,  # all share base's memory
        "extra/bf16": torch.randn(3, dtype=torch.bfloat16), "extra/f64": torch.randn(2, dtype=torch.float64),
        "extra/i64": torch.tensor([2**40, -3]), "extra/bool": torch.tensor([True, False]),
        "extra/empty": torch.zeros(0, 5), "extra/scalar": torch.tensor(7.5),
    }
    path = ckpt.save_checkpoint(tmp_path, 7, tensors, {"optimizer": skeleton, "note": "x", "lr": 0.1, "n": 3})

    c = ckpt.load_checkpoint(path)
    assert c.step == 7 and c.path == path
    _assert_same({"optimizer": skeleton, "note": "x", "lr": 0.1, "n": 3, "step": 7}, c.state)
    assert sorted(c.tensors) == sorted(tensors)
    for k, v in tensors.items():
        _assert_same(v, c.tensors[k], k)
    torch.set_rng_state(c.tensors["rng/cpu"])
    assert torch.equal(torch.rand(4), expected_draw)

    restored = ckpt.unflatten_state(c.tensors, c.state["optimizer"], "optim")
    _assert_same(opt.state_dict(), restored)  # int parameter keys, tuple betas, tensor steps: all as they were
    net2 = torch.nn.Linear(4, 3)
    net2.load_state_dict({k[len("model/"):]: v for k, v in c.tensors.items() if k.startswith("model/")})
    opt2 = torch.optim.Adam(net2.parameters(), lr=1.0)
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    x = torch.randn(5, 4)
    for n, o in ((net, opt), (net2, opt2)):  # the same next step from the original and the restored optimizer
        o.zero_grad()
        n(x).square().sum().backward()
        o.step()
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_flatten_unflatten_is_an_exact_inverse_through_json():
    t = torch.arange(6.0)
    obj = {
        "state": {0: {"m": t, "step": torch.tensor(3.0)}, 11: {"m": t + 1}},
        "groups": [{"params": [0, 11], "betas": (0.9, 0.999), "amsgrad": False, "foreach": None, "eps": 1e-8}],
        "mixed": {1: "a", "1": "b", None: 2, False: 3, 2.5: (t[:2], [])},
        "__tensor__": 5, "__list__": {"__tuple__": [1]},  # strings that look like placeholders
        "empty": {}, "nested": [[1, [2.0, "x"]], ()],
    }
    flat, skeleton = ckpt.flatten_state(obj, "opt")
    assert sorted(flat) == ["opt/mixed/2.5/0", "opt/state/0/m", "opt/state/0/step", "opt/state/11/m"]
    skeleton = json.loads(json.dumps(skeleton))  # as it comes back from state.json
    _assert_same(obj, ckpt.unflatten_state(flat, skeleton, "opt"))
    _assert_same(t, ckpt.unflatten_state(*ckpt.flatten_state(t, "x"), "x"))

    with pytest.raises(ckpt.CheckpointError, match="opt/a/b"):  # two places, one tensor key
        ckpt.flatten_state({"a/b": t, "a": {"b": t}}, "opt")
    with pytest.raises(ckpt.CheckpointError, match="Path at opt/where"):
        ckpt.flatten_state({"where": Path(".")}, "opt")
    with pytest.raises(ckpt.CheckpointError, match="lacks tensor opt/state/0/m"):
        ckpt.unflatten_state({}, skeleton, "opt")
    with pytest.raises(ckpt.CheckpointError, match="outside"):
        ckpt.unflatten_state(flat, skeleton, "other")


# ------------------------------------------------------------------------------------------ how files are written


def test_writes_are_atomic_fsynced_and_in_order(tmp_path, monkeypatch):
    """Each file: a temp file beside it (inside ckpt_root, not $TMPDIR), fsync'd, renamed, folder fsync'd;
    the manifest last; then the folder renamed into place and ckpt_root fsync'd."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsync'd descriptors")
    elsewhere = tmp_path / "TMPDIR"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    root = tmp_path.resolve() / "ckpts"  # as /proc names it
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = ckpt.save_checkpoint(root, 12, _tensors(), {})
    monkeypatch.undo()

    assert target == root / "step_000000012" and _listing(root) == ["step_000000012"]
    assert _listing(elsewhere) == []
    tmp = root / f".tmp-step_000000012-{os.getpid()}"
    for src, dst in [e[1:] for e in events if e[0] == "replace"]:
        assert Path(src).parent == Path(dst).parent and Path(dst).is_relative_to(root), (src, dst)
    file_renames = [i for i, e in enumerate(events) if e[0] == "replace" and Path(e[2]).parent == tmp]
    assert [Path(events[i][2]).name for i in file_renames] == ["tensors.safetensors", "state.json", "MANIFEST.json"]
    for i in file_renames:
        src = events[i][1]
        assert ("fsync", src) in events[:i], f"{src} renamed before it was fsync'd"
        assert events[i + 1] == ("fsync", str(tmp)), "folder not fsync'd after the rename"
    folder_rename = events.index(("replace", str(tmp), str(target)))
    assert folder_rename > file_renames[-1]
    assert ("fsync", str(root)) in events[folder_rename:]
    manifest = json.loads((target / "MANIFEST.json").read_text())
    assert manifest["step"] == 12 and manifest["format"] == ckpt.FORMAT_VERSION
    for name in ("tensors.safetensors", "state.json"):
        assert manifest["files"][name]["size"] == (target / name).stat().st_size


def test_keep_last_k_after_completion(tmp_path):
    for s in range(1, 6):
        ckpt.save_checkpoint(tmp_path / "two", s * 10, _tensors(s), {}, keep=2)
        ckpt.save_checkpoint(tmp_path / "all", s * 10, _tensors(s), {}, keep=0)
    assert [ckpt.load_checkpoint(p).step for p in ckpt.list_checkpoints(tmp_path / "two")] == [40, 50]
    assert _listing(tmp_path / "two") == ["step_000000040", "step_000000050"]  # nothing hidden left behind
    assert [ckpt.load_checkpoint(p).step for p in ckpt.list_checkpoints(tmp_path / "all")] == [10, 20, 30, 40, 50]
    # the checkpoint just written survives pruning even when older folders hold higher steps
    ckpt.save_checkpoint(tmp_path / "two", 5, _tensors(5), {}, keep=2)
    assert [ckpt.load_checkpoint(p).step for p in ckpt.list_checkpoints(tmp_path / "two")] == [5, 50]


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 4, _tensors(1), {"v": "old"})
    path = ckpt.save_checkpoint(tmp_path, 4, _tensors(2), {"v": "new"})
    c = ckpt.load_checkpoint(path)
    assert c.state["v"] == "new" and torch.equal(c.tensors["model/w"], _tensors(2)["model/w"])
    assert _listing(tmp_path) == ["step_000000004"]


# ------------------------------------------------------------------------------------------ failures while writing


class _FullDisk:
    """Makes the n-th call of os.fsync / os.replace / a file write in ckpt fail as a full disk would (a write
    first writes half its bytes)."""

    def __init__(self, monkeypatch, what, n):
        self.left = n
        if what in ("fsync", "replace"):
            real = getattr(os, what)
            monkeypatch.setattr(os, what, lambda *a: self.tick() or real(*a))
        else:
            monkeypatch.setattr(ckpt, "open", lambda *a, **k: _HalfWriter(builtins.open(*a, **k), self), raising=False)

    def tick(self):
        self.left -= 1
        if self.left == 0:
            raise OSError(errno.ENOSPC, "No space left on device")


class _HalfWriter:
    def __init__(self, f, disk):
        self.f, self.disk = f, disk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        try:
            self.disk.tick()
        except OSError:
            self.f.write(data[: len(data) // 2])
            raise
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()


@pytest.mark.parametrize("what", ["fsync", "replace", "write"])
@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
def test_a_save_failing_anywhere_leaves_no_trace(tmp_path, monkeypatch, what, resave):
    """Fail the 1st, 2nd, ... call until a save gets through: every failed save leaves the folder as it was
    (no partial step folder, no temp folder) and the earlier checkpoints loadable with their contents."""
    failures = 0
    for n in range(1, 50):
        root = tmp_path / f"run{n}"
        ckpt.save_checkpoint(root, 1, _tensors(1), {"v": 1})
        ckpt.save_checkpoint(root, 2, _tensors(2), {"v": 2})
        before = _listing(root)
        step = 2 if resave else 3
        with monkeypatch.context() as m:
            _FullDisk(m, what, n)
            try:
                ckpt.save_checkpoint(root, step, _tensors(9), {"v": 9})
            except ckpt.CheckpointError as e:
                failures += 1
                assert "disk full?" in str(e) and str(root / f"step_00000000{step}") in str(e)
                assert isinstance(e.__cause__, OSError)
            else:
                break
        assert _listing(root) == before, f"call {n}"
        for s in (1, 2):
            c = ckpt.load_checkpoint(root / f"step_00000000{s}")
            assert c.step == s and c.state["v"] == s and torch.equal(c.tensors["model/w"], _tensors(s)["model/w"])
        assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root)).step == 2
    else:
        pytest.fail("the save never got through")
    assert failures >= {"fsync": 7, "replace": 4, "write": 3}[what]  # each stage of the save was hit
    c = ckpt.load_checkpoint(ckpt.latest_checkpoint(root))  # the save that got through is complete
    assert c.step == step and c.state["v"] == 9
    assert not [p for p in _listing(root) if p.startswith(".")]


def test_leftovers_of_killed_saves_are_recovered(tmp_path):
    """A save killed between its two renames of a re-save leaves the old folder aside: readers still find it,
    the next save puts it back. Temp folders of dead processes go; a live process's are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    scratch = tmp_path / "scratch"
    ckpt.save_checkpoint(scratch, 3, _tensors(3), {})
    os.replace(scratch / "step_000000003", tmp_path / f".old-step_000000003-{dead.pid}")
    (tmp_path / f".tmp-step_000000003-{dead.pid}").mkdir()  # the new copy, never renamed in
    (tmp_path / f".tmp-step_000000008-{dead.pid}" / "junk").mkdir(parents=True)
    (tmp_path / f".tmp-step_000000009-{live}").mkdir()
    scratch.rmdir()

    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == f".old-step_000000003-{dead.pid}" and ckpt.load_checkpoint(latest).step == 3
    ckpt.save_checkpoint(tmp_path, 4, _tensors(4), {})
    assert _listing(tmp_path) == [f".tmp-step_000000009-{live}", "step_000000003", "step_000000004"]
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "step_000000003").tensors["model/w"], _tensors(3)["model/w"])


# A process that imports torch once, then forks a child per command, so a restart after kill -9 costs no torch
# import (~2 s on the test machine). Commands, one a line:
#   save ROOT STEP        the child saves STEP+1, STEP+1 again (a re-save), STEP+2, ... and prints "saved S" each time
#   crash ROOT N RESAVE   the child saves step 1, then SIGKILLs itself at the N-th os.fsync / os.replace /
#                         shutil.rmtree call of its next save (of step 1 again if RESAVE, else step 2); it prints
#                         "completed" if that save made fewer calls
#   reap PID              this parent waits for the child and prints "reaped PID STATUS"
_ZYGOTE = r"""
import os, shutil, signal, sys, traceback
import torch
from ddpm import checkpoint as ckpt

def crash_at(n):
    calls = [0]
    def arm(module, name):
        real = getattr(module, name)
        def hooked(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(module, name, hooked)
    arm(os, "fsync"); arm(os, "replace"); arm(shutil, "rmtree")

for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "reap":
        _, status = os.waitpid(int(args[0]), 0)
        print("reaped", args[0], status, flush=True)
        continue
    pid = os.fork()
    if pid:
        print("child", pid, flush=True)
        continue
    try:
        torch.set_num_threads(1)
        root = args[0]
        if cmd == "crash":
            n, resave = int(args[1]), args[2] == "1"
            ckpt.save_checkpoint(root, 1, {"model/w": torch.full((1000,), 1.0)}, {"v": 1}, keep=1)
            crash_at(n)
            ckpt.save_checkpoint(root, 1 if resave else 2, {"model/w": torch.full((1000,), 2.0)}, {"v": 2}, keep=1)
            print("completed", flush=True)
            os._exit(0)
        step = int(args[1])
        while True:
            step += 1
            w = torch.randn(1_000_000, generator=torch.Generator().manual_seed(step))  # 4 MB
            for _ in range(2):
                ckpt.save_checkpoint(root, step, {"model/w": w}, {"s": step}, keep=1)
                print("saved", step, flush=True)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)
"""


def _proc_state(pid):
    """The state and kernel wait channel of a process, as /proc tells them (for a failure message)."""
    if pid is None:
        return "none"
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        wchan = open(f"/proc/{pid}/wchan").read()
        return f"pid {pid} state {state} wchan {wchan or '-'}"
    except OSError as e:
        return f"pid {pid}: {e}"


class _Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=lambda: [self.lines.put(x.split()) for x in self.proc.stdout], daemon=True)
        self.reader.start()
        self.saved = [0]  # every step a child reported as saved
        self.child = None

    def until(self, word, pid=None):
        """Read the parent's and children's lines up to the next one that starts with `word`.

        The wait is long on purpose: a SIGKILLed child inside fsync dies only when the fsync returns, and on a
        fresh CI machine, still writing back the gigabytes of the venv just installed, one fsync has taken over
        20 s. The limit only turns a hang into a failure that says what the child was doing."""
        while True:
            try:
                msg = self.lines.get(timeout=180)
            except queue.Empty:
                raise AssertionError(f"no {word!r} line in 180 s; the child: {_proc_state(pid or self.child)}; the "
                                     f"zygote: {_proc_state(self.proc.pid)}, exit code {self.proc.poll()}; its "
                                     f"reader thread alive: {self.reader.is_alive()}") from None
            if msg[0] == "saved":
                self.saved.append(int(msg[1]))
            if msg[0] == word:
                return msg

    def fork(self, *command):
        self.proc.stdin.write(" ".join(map(str, command)) + "\n")
        self.child = int(self.until("child")[1])
        return self.child

    def kill_and_reap(self, pid, kill=True):
        if kill:
            os.kill(pid, signal.SIGKILL)
        self.proc.stdin.write(f"reap {pid}\n")
        self.child = None
        return int(self.until("reaped", pid)[2])

    def close(self):
        if self.child is not None:  # a failed assertion must not leave a saver running
            self.kill_and_reap(self.child)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def zygote():
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    z = _Zygote()
    yield z
    z.close()


@pytest.mark.alone  # beside a second xdist worker a killed child was once not reaped within 180 s (RESULTS)
def test_kill_minus_nine_at_random_moments_never_loses_a_completed_checkpoint(tmp_path, zygote):
    root = tmp_path / "ckpts"
    rng = random.Random(0)
    step, mid_save, previous = 0, 0, None
    for kill in range(20):
        pid = zygote.fork("save", root, step)
        if kill == 0:
            zygote.until("saved")
        time.sleep(rng.uniform(0.0, 0.12))
        if previous is not None:  # the new saver has saved once: the dead one's leftovers are gone
            zygote.until("saved")
            assert not [n for n in _listing(root) if n.endswith(f"-{previous}")]
        assert zygote.kill_and_reap(pid) == signal.SIGKILL
        mid_save += any(n.endswith(f"-{pid}") for n in _listing(root))

        latest = ckpt.latest_checkpoint(root)
        assert latest is not None, f"kill {kill}: no checkpoint left"
        c = ckpt.load_checkpoint(latest, verify=True)
        assert c.step >= max(zygote.saved), f"kill {kill}: step {max(zygote.saved)} was saved, the latest is {c.step}"
        assert c.state["s"] == c.step
        assert torch.equal(c.tensors["model/w"], torch.randn(1_000_000, generator=torch.Generator().manual_seed(c.step)))
        step, previous = c.step, pid
    assert mid_save >= 1  # some kills did land inside a save, leaving its temp folder behind


@pytest.mark.alone
@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
def test_kill_minus_nine_at_every_step_of_a_save(tmp_path, zygote, resave):
    """SIGKILL before each fsync, rename and folder deletion of a save in turn, with keep=1 (the old checkpoint
    is the only one): the old or the new checkpoint is always there, whole; the next save cleans up."""
    step = 1 if resave else 2
    for n in range(1, 60):
        root = tmp_path / f"kill{n}"
        pid = zygote.fork("crash", root, n, int(resave))
        status = zygote.kill_and_reap(pid, kill=False)
        if status == 0:
            break
        assert status == signal.SIGKILL
        latest = ckpt.latest_checkpoint(root)
        assert latest is not None, f"kill before call {n}: no checkpoint left"
        c = ckpt.load_checkpoint(latest, verify=True)
        assert c.step in (1, step) and c.state["v"] in (1, 2), f"kill before call {n}"
        assert c.state["step"] == c.step and torch.equal(c.tensors["model/w"], torch.full((1000,), float(c.state["v"])))
        ckpt.save_checkpoint(root, 3, {"model/w": torch.zeros(3)}, {}, keep=1)
        assert _listing(root) == ["step_000000003"], f"kill before call {n}"
    else:
        pytest.fail("the save never completed")
    assert n >= 10  # the save made that many calls, each one a kill point above


# ------------------------------------------------------------------------------------------ refusing bad input


def test_non_finite_weights_are_never_written(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, 1, _tensors(), {})
    t = _tensors()
    t["model/w"][3] = float("nan")
    t["ema/w"][0] = float("inf")
    with pytest.raises(ckpt.CheckpointError, match=r"step_000000002.*model/w, ema/w$"):
        ckpt.save_checkpoint(tmp_path, 2, t, {})
    many = {f"model/p{i}": torch.full((2,), float("-inf")) for i in range(7)}
    with pytest.raises(ckpt.CheckpointError, match=r"model/p0, .*, model/p4 \.\.\. \(7 in all\)"):
        ckpt.save_checkpoint(tmp_path, 2, many, {})
    with pytest.raises(ckpt.CheckpointError, match="not plain JSON"):
        ckpt.save_checkpoint(tmp_path, 2, _tensors(), {"p": Path(".")})
    assert _listing(tmp_path) == [first.name]
    ok = ckpt.save_checkpoint(tmp_path, 3, {**_tensors(), "optim/m": torch.tensor([float("inf")])}, {})
    assert ckpt.load_checkpoint(ok).tensors["optim/m"].isinf().all()  # only weights must be finite
    with pytest.raises(ckpt.CheckpointError):
        ckpt.save_checkpoint(tmp_path / "never", 1, {"model/w": torch.tensor([float("nan")])}, {})
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------ damaged checkpoints


def _truncate(p):
    data = (p / "tensors.safetensors").read_bytes()
    (p / "tensors.safetensors").write_bytes(data[: len(data) // 2])


def _flip(p):
    data = bytearray((p / "tensors.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10
    (p / "tensors.safetensors").write_bytes(bytes(data))


def _garble_state(p):
    (p / "state.json").write_text("{not json")


def _garble_manifest(p):
    (p / "MANIFEST.json").write_text('{"format": 1, "step": ')


@pytest.mark.parametrize("damage, verify, message", [
    (_truncate, True, "truncated or damaged: size mismatch"),
    (_truncate, False, "cannot parse .*tensors.safetensors as safetensors"),
    (_flip, True, "tensors.safetensors is corrupt: sha256 checksum mismatch"),
    (_garble_state, True, "state.json is truncated or damaged"),
    (_garble_state, False, "cannot parse .*state.json as JSON"),
    (lambda p: (p / "tensors.safetensors").unlink(), True, "cannot read .*tensors.safetensors"),
    (lambda p: (p / "MANIFEST.json").unlink(), True, "not a complete checkpoint: MANIFEST.json is missing"),
    (_garble_manifest, False, "unreadable manifest .*MANIFEST.json"),
], ids=["truncated", "truncated-noverify", "flipped-byte", "bad-state", "bad-state-noverify", "missing-tensors",
        "no-manifest", "bad-manifest"])
def test_damaged_checkpoints_fail_naming_the_path(tmp_path, damage, verify, message):
    older = ckpt.save_checkpoint(tmp_path, 2, _tensors(), {"a": 1})
    path = ckpt.save_checkpoint(tmp_path, 3, _tensors(), {"a": 1})
    damage(path)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path))) as e:
        ckpt.load_checkpoint(path, verify=verify)
    assert re.search(message, str(e.value)), str(e.value)
    if "MANIFEST" in message:  # never listed: the newest complete one is the older checkpoint
        with pytest.warns(UserWarning, match=f"incomplete.*{path.name}"):
            assert ckpt.latest_checkpoint(tmp_path) == older


def test_step_comes_from_inside(tmp_path):
    a = ckpt.save_checkpoint(tmp_path, 5, _tensors(), {})
    b = ckpt.save_checkpoint(tmp_path, 9, _tensors(), {})
    b.rename(tmp_path / "step_000000001")  # misleading names
    a.rename(tmp_path / "step_000000099")
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_000000001" and ckpt.load_checkpoint(latest).step == 9
    assert [ckpt.load_checkpoint(p).step for p in ckpt.list_checkpoints(tmp_path)] == [5, 9]
    state = tmp_path / "step_000000099" / "state.json"
    state.write_text(state.read_text().replace('"step": 5', '"step": 6'))
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_checkpoint(tmp_path / "step_000000099", verify=False)


# ------------------------------------------------------------------------------------------ foreign files


class _RunsShell:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _OpensFile:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@pytest.mark.parametrize("evil", [_RunsShell, _OpensFile])
def test_malicious_pickle_is_refused_unexecuted(tmp_path, evil):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": evil(sentinel)}, bad)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"refused {bad}: the file tries to load code")):
        ckpt.safe_torch_load(bad)
    assert not sentinel.exists()
    good = tmp_path / "good.pt"
    sd = {"w": torch.ones(3), "b": torch.arange(2), "meta": {"epoch": 4}}
    torch.save(sd, good)
    _assert_same(sd, ckpt.safe_torch_load(good))


def test_safe_torch_load_refuses_old_torch_and_junk(tmp_path, monkeypatch):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(junk))):
        ckpt.safe_torch_load(junk)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1)}, good)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ckpt.CheckpointError, match=r"good\.pt.*torch >= 2\.6"):
        ckpt.safe_torch_load(good)
