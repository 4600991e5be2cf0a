"""The fused group-norm kernel's two ways of cutting the work (`ddpm.nn.fused`, `_fused_cpu.c`), against each other
and torch's operators, interleaved in one process, 2 threads.

The items path (work items of whole samples, or of blocks of their groups when the batch is small) is the kernel as
it was before session 17; the rows path (blocks of 128 rows of one sample, a parallel loop per pass) is the one it
now takes where the items would be narrower than 64 channels. Both give the same bits (tests/test_fused.py), so the
choice changes the speed only. Layers: inference forward, or forward + backward (--train), each call on another of
a pool of inputs (up to 300 MB), so that none starts in cache; medians of the rounds. With --networks, whole
forwards: the fashion preset's network at batch 1 and 8, the CelebA-HQ network (256 x 256) at batch 1 and the
CIFAR-10 network at batch 64, each path forced and with torch's operators (fused_norm=False).

    .venv/bin/python benchmarks/gn_paths.py [--train] [--rounds 5] [--networks]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpm import UNet
from ddpm.nn import fused
from ddpm.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from fashion import cpu  # noqa: E402

SHAPES = [(1, 128, 256, 256), (4, 128, 256, 256), (1, 256, 64, 64), (2, 256, 32, 32), (8, 128, 32, 32),
          (4, 128, 64, 64), (1, 32, 28, 28), (4, 32, 28, 28), (8, 32, 28, 28), (8, 64, 14, 14), (1, 64, 7, 7),
          (16, 128, 32, 32), (64, 32, 28, 28), (64, 64, 14, 14),
          # the CIFAR-10 network's sampling layers at batch 64 (0.5-1.5 MB a sample), where two AMD CPUs sampled
          # faster with torch's operators than with the kernel (RESULTS, sessions 14 and 15)
          (64, 128, 32, 32), (64, 256, 32, 32), (64, 384, 32, 32), (64, 256, 16, 16)]
VARIANTS = {"items": 1, "rows": 2, "chosen": 0, "torch ops": None}  # fused._path, or None: fused_norm=False
POOL_BYTES = 300e6


def call(x: torch.Tensor, norm: torch.nn.GroupNorm, dy: torch.Tensor, train: bool, kernel: bool) -> None:
    with torch.inference_mode(not train):
        y = fused.group_norm_act(x, norm, fused=kernel)
        if train:
            torch.autograd.grad(y, [x], dy)


def layers(train: bool, rounds: int) -> None:
    shapes = [s for s in SHAPES if not train or s[0] * s[1] * s[2] * s[3] <= 8e6]
    times: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for shape in shapes:
            norm = torch.nn.GroupNorm(32, shape[1], eps=1e-6)
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            pool = [torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(train)
                    for _ in range(max(2, min(30, int(POOL_BYTES // (4 * numel)))))]
            dy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            for name, path in VARIANTS.items():
                fused._path = path or 0

                for x in pool[:2]:
                    call(x, norm, dy, train, path is not None)
                t0 = time.perf_counter()
                for x in pool:
                    call(x, norm, dy, train, path is not None)
                times.setdefault((shape, name), []).append((time.perf_counter() - t0) / len(pool) * 1e3)
    fused._path = 0
    print(f"\n{'forward + backward' if train else 'inference forward'}, ms per call, medians of {rounds} rounds\n")
    print("| shape | items (before) | rows | chosen | torch ops | items / chosen | torch / chosen |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        m = {name: statistics.median(times[shape, name]) for name in VARIANTS}
        print(f"| {shape} | {m['items']:.3f} | {m['rows']:.3f} | {m['chosen']:.3f} | {m['torch ops']:.3f} | "
              f"{m['items'] / m['chosen']:.2f} | {m['torch ops'] / m['chosen']:.2f} |")


def networks(rounds: int) -> None:
    cases = [("fashion", 1, UNet(1, 32, (1, 2, 2), 2, (7,), 0.0, 28)),
             ("fashion", 8, UNet(1, 32, (1, 2, 2), 2, (7,), 0.0, 28)),
             ("CelebA-HQ", 1, UNet(3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0, 256)),
             # sampling at speed.py's batch, where two AMD CPUs' speed.py rows read faster without the kernel
             ("CIFAR-10", 64, UNet(3, 128, (1, 2, 2, 2), 2, (16,), 0.1, 32))]
    print(f"\nwhole forwards (inference), ms, medians of {rounds} rounds\n")
    print("| network | batch | items (before) | chosen | torch ops | items / chosen | torch / chosen |")
    print("|---|---|---|---|---|---|---|")
    for label, batch, net in cases:
        net.eval()
        res = net.config.resolution
        x, t = torch.randn(batch, net.config.in_channels, res, res), torch.full((batch,), 500)
        times: dict[str, list[float]] = {}
        with torch.inference_mode():
            net(x, t)
            t0 = time.perf_counter()
            net(x, t)
            calls = max(1, int(0.5 / (time.perf_counter() - t0)))  # about half a second per timing
            for r in range(rounds + 1):
                for name in ("items", "chosen", "torch ops"):
                    path = VARIANTS[name]
                    fused._path = path or 0
                    net.set_fused_norm(path is not None)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        net(x, t)
                    if r:  # the first round warms up
                        times.setdefault(name, []).append((time.perf_counter() - t0) / calls * 1e3)
        fused._path = 0
        m = {name: statistics.median(v) for name, v in times.items()}
        print(f"| {label} | {batch} | {m['items']:.1f} | {m['chosen']:.1f} | {m['torch ops']:.1f} | "
              f"{m['items'] / m['chosen']:.2f} | {m['torch ops'] / m['chosen']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", action="store_true", help="forward + backward instead of the inference forward")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--networks", action="store_true", help="whole forwards instead of single layers")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    if not fused.status()[0]:
        raise SystemExit(f"the kernel is off here: {fused.status()[1]}")
    print(f"{time.strftime('%Y-%m-%d')}, {cpu()}, 2 threads")
    if args.networks:
        networks(args.rounds)
    else:
        layers(args.train, args.rounds)


if __name__ == "__main__":
    main()
