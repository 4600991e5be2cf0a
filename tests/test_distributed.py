"""torchrun with 2 gloo processes on the CPU: the same training as one process with the whole batch, the
same samples, and checkpoints that resume with another world size."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm import load_run
from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.cli import main
from ddpm.lock import LOCK_FILE, RunLock

TINY = ["--set", "model.ch=32", "--set", "model.ch_mult=1,2", "--set", "model.attn_resolutions=4",
        "--set", "diffusion.num_timesteps=40", "--set", "train.sample_every=0", "--set", "train.warmup=2",
        "--set", "data.hflip=true", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ddpm", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert res.returncode == 0 or not check, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume_with_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--batch-size", "16", *TINY]

    def weights(run):
        c = load_checkpoint(latest_checkpoint(run / "checkpoints"))
        return c, {k: v for k, v in c.tensors.items() if k.startswith(("model/", "ema/"))}

    # one step: the same gradients up to the order of float32 sums
    assert main(["train", "--out", str(one), "--steps", "1", *common]) == 0
    _torchrun(2, "train", "--out", str(two), "--steps", "1", *common)
    (ca, a), (cb, b) = weights(one), weights(two)
    assert ca.step == cb.step == 1 and cb.state["world_size"] == 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-9, msg=k)
    # three steps (2-rank resume): Adam divides by sqrt(v), so on parameters whose gradients are ~0 (biases
    # ahead of a group norm) it turns rounding into steps of its own; the networks still compute the same
    # function, and all weights together agree to 1e-3 in norm
    assert main(["train", "--out", str(one), "--steps", "3", "--resume", *common]) == 0
    _torchrun(2, "train", "--out", str(two), "--steps", "3", "--resume", *common)
    (_, a), (_, b) = weights(one), weights(two)
    flat_a, flat_b = torch.cat([v.flatten() for v in a.values()]), torch.cat([b[k].flatten() for k in a])
    assert (flat_a - flat_b).norm() <= 1e-3 * flat_a.norm()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 5, 10, 20, 30, 39])
    for ema in (True, False):
        fa, fb = load_run(one, ema=ema).model(x, t), load_run(two, ema=ema).model(x, t)
        assert (fa - fb).norm() <= 1e-3 * fa.norm()
    # the 2-rank checkpoint resumes in one process
    assert main(["train", "--out", str(two), "--steps", "5", "--resume", *common]) == 0
    assert load_checkpoint(latest_checkpoint(two / "checkpoints")).step == 5

    # sampling: 2 ranks give exactly the images of 1 rank with the same seed
    s1, s2 = tmp_path / "s1.npz", tmp_path / "s2.npz"
    assert main(["sample", "--run", str(one), "--n", "10", "--batch-size", "3", "--out", str(s1), "--seed", "4", "--quiet"]) == 0
    _torchrun(2, "sample", "--run-dir", str(one), "--num-samples", "10", "--batch-size", "3", "--out", str(s2), "--seed", "4", "--quiet")
    np.testing.assert_array_equal(np.load(s1)["arr_0"], np.load(s2)["arr_0"])


@pytest.mark.slow
def test_two_ranks_are_refused_together_while_another_process_writes_the_run(tmp_path):
    """Rank 0 takes the run's lock and tells the others: both exit 2 at once (no rank waits at a barrier for a
    rank 0 that has gone), and nothing is written."""
    run = tmp_path / "run"
    with RunLock(run / LOCK_FILE, f"run directory {run}"):
        res = _torchrun(2, "train", "--out", str(run), "--steps", "1", "--batch-size", "16", *TINY, check=False)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    assert res.returncode != 0
    assert f"ddpm train: error: run directory {run} is in use by process {os.getpid()} on host " in res.stderr
    assert f"ddpm train: error: rank 0 could not take the lock: run directory {run} is in use by process " in res.stderr
    # neither hung (the run returned within _torchrun's timeout) and neither aborted; torchrun's agent stops the
    # other worker once the first has exited, so one or both report the usage code
    assert res.stderr.count("exitcode  : 2") >= 1 and "SIGABRT" not in res.stderr


@pytest.mark.slow
def test_two_compiled_ranks_with_gradient_accumulation_train_like_one_eager_process(tmp_path):
    """torch.compile over DistributedDataParallel, with no_sync on the first of two micro-batches: the same
    step as one eager process (traced with the aot_eager backend: the same graphs as Inductor's input)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--batch-size", "16", "--set", "train.grad_accum=2", *TINY]
    assert main(["train", "--out", str(one), "--steps", "1", *common]) == 0
    _torchrun(2, "train", "--out", str(two), "--steps", "1", "--compile", *common, DDPM_COMPILE_BACKEND="aot_eager")
    a, b = (load_checkpoint(latest_checkpoint(r / "checkpoints")) for r in (one, two))
    assert b.state["config"]["train"]["compile"] is True and b.state["world_size"] == 2
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        if k.startswith(("model/", "ema/")):
            torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=1e-5, atol=1e-6, msg=k)  # a lost all-reduce: 1e-3
