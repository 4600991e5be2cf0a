"""torchrun with 2 gloo processes on the CPU: the same training as one process with the whole batch, the
same samples, and checkpoints that resume with another world size."""

import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.cli import main

TINY = ["--set", "model.ch=32", "--set", "model.ch_mult=1,2", "--set", "model.attn_resolutions=4",
        "--set", "diffusion.num_timesteps=40", "--set", "train.sample_every=0", "--set", "train.warmup=2",
        "--set", "data.hflip=true", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ddpm", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume_with_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--out", str(one), "--steps", "3", "--batch-size", "16", *TINY]) == 0
    _torchrun(2, "train", "--out", str(two), "--steps", "3", "--batch-size", "16", *TINY)
    a = load_checkpoint(latest_checkpoint(one / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(two / "checkpoints"))
    assert a.step == b.step == 3 and b.state["world_size"] == 2
    for k in a.tensors:
        if k.startswith(("model/", "ema/")):
            torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=1e-4, atol=1e-6, msg=k)
    # the 2-rank checkpoint resumes in one process
    assert main(["train", "--out", str(two), "--steps", "5", "--batch-size", "16", "--resume", *TINY]) == 0
    assert load_checkpoint(latest_checkpoint(two / "checkpoints")).step == 5

    # sampling: 2 ranks give exactly the images of 1 rank with the same seed
    s1, s2 = tmp_path / "s1.npz", tmp_path / "s2.npz"
    assert main(["sample", "--run", str(one), "--n", "10", "--batch-size", "3", "--out", str(s1), "--seed", "4", "--quiet"]) == 0
    _torchrun(2, "sample", "--run", str(one), "--n", "10", "--batch-size", "3", "--out", str(s2), "--seed", "4", "--quiet")
    np.testing.assert_array_equal(np.load(s1)["arr_0"], np.load(s2)["arr_0"])
