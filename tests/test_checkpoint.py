"""Checkpoints survive crashes: atomic writes, manifests, checksums, keep-last-K, safe loading."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddpm import checkpoint as ckpt


def _tensors(seed=0, n=1000):
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(n, generator=g), "ema/w": torch.randn(n, generator=g), "rng/cpu": torch.get_rng_state()}


def test_round_trip_with_optimizer_state(tmp_path):
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    flat, skeleton = ckpt.flatten_state(opt.state_dict(), "optim")
    tensors = {**_tensors(), **flat}
    path = ckpt.save_checkpoint(tmp_path, 7, tensors, {"optimizer": skeleton, "note": "x"})
    c = ckpt.load_checkpoint(path)
    assert c.step == 7 and c.state["note"] == "x"
    for k, v in tensors.items():
        assert torch.equal(c.tensors[k], v), k
    restored = ckpt.unflatten_state(c.tensors, c.state["optimizer"], "optim")
    opt2 = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(restored)
    assert set(opt2.state_dict()["state"].keys()) == {0, 1}  # int keys come back as ints
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert json.loads((path / "MANIFEST.json").read_text())["step"] == 7


def test_keep_last_k(tmp_path):
    for s in range(1, 6):
        ckpt.save_checkpoint(tmp_path, s * 10, _tensors(s), {}, keep=2)
    assert [ckpt.load_checkpoint(p).step for p in ckpt.list_checkpoints(tmp_path)] == [40, 50]


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 1, _tensors(1), {})
    real = ckpt._write_file
    calls = {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "_write_file", failing)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, _tensors(2), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)).step == 1


def test_non_finite_weights_are_never_written(tmp_path):
    t = _tensors()
    t["model/w"][3] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="model/w"):
        ckpt.save_checkpoint(tmp_path, 1, t, {})
    assert ckpt.latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "state", "manifest"])
def test_damaged_checkpoints_fail_naming_the_path(tmp_path, damage):
    path = ckpt.save_checkpoint(tmp_path, 3, _tensors(), {"a": 1})
    if damage == "truncate":
        data = (path / "tensors.safetensors").read_bytes()
        (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((path / "tensors.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x10
        (path / "tensors.safetensors").write_bytes(bytes(data))
    elif damage == "state":
        (path / "state.json").write_text("{not json")
    else:
        (path / "MANIFEST.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.load_checkpoint(path)
    if damage == "manifest":
        with pytest.warns(UserWarning, match="incomplete"):
            assert ckpt.latest_checkpoint(tmp_path) is None


def test_step_comes_from_inside(tmp_path):
    a = ckpt.save_checkpoint(tmp_path, 5, _tensors(), {})
    b = ckpt.save_checkpoint(tmp_path, 9, _tensors(), {})
    b.rename(tmp_path / "step_000000001")  # a misleading name
    a.rename(tmp_path / "step_000000099")
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_000000001" and ckpt.load_checkpoint(latest).step == 9


_SAVER = """
import sys, torch
from ddpm import checkpoint as ckpt
root = sys.argv[1]
step = int(sys.argv[2])
while True:
    step += 1
    g = torch.Generator().manual_seed(step)
    ckpt.save_checkpoint(root, step, {"model/w": torch.randn(1_000_000, generator=g)}, {"s": step}, keep=2)
    print(step, flush=True)
"""


def test_kill_minus_nine_during_saves_never_loses_the_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    root = tmp_path / "ckpts"
    rng = random.Random(0)
    step = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(step)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save completed
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = ckpt.latest_checkpoint(root)
        c = ckpt.load_checkpoint(latest, verify=True)
        assert c.state["s"] == c.step
        expected = torch.randn(1_000_000, generator=torch.Generator().manual_seed(c.step))
        assert torch.equal(c.tensors["model/w"], expected)
        step = c.step


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Evil(sentinel)}, bad)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.safe_torch_load(bad)
    assert not sentinel.exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    assert torch.equal(ckpt.safe_torch_load(good)["w"], torch.ones(3))
