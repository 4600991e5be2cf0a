"""A tiny digits run for the tests that sample from a trained run (the command line's own path)."""

import json
from pathlib import Path

import torch

from ddpm.cli import main

TINY = ["--set", "model.ch=32", "--set", "model.ch_mult=1,2", "--set", "model.attn_resolutions=4",
        "--set", "diffusion.num_timesteps=40", "--set", "train.sample_every=0", "--set", "train.log_every=1",
        "--set", "train.warmup=2", "--quiet"]


def train_tiny(run: Path, steps: int = 2, *extra: str) -> Path:
    """`ddpm train` of the tiny network into `run` for `steps` steps at batch 16; returns `run`."""
    assert main(["train", "--out", str(run), "--steps", str(steps), "--batch-size", "16", *TINY, *extra]) == 0
    return run


def train_log(run: Path) -> list[dict]:
    """The run's log.jsonl: one entry a logged step (TINY logs every step), with its loss and `finite`."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in train_log(run)]


def dies_after(n: int, real, calls: list):
    """`real` that counts its calls in `calls` and raises KeyboardInterrupt on call n + 1 (an interrupted job)."""

    def fn(*a, **k):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(*a, **k)

    return fn


def perturbed(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """`net` with noise added to every parameter in place: a trained-looking network (the zero-initialised last
    layers of a fresh one would make every output 0)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net
