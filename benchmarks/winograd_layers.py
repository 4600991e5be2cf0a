"""Winograd F(4x4, 3x3) against the direct 3x3 convolution (oneDNN through F.conv2d), layer by layer, at the
shapes of the CIFAR-10 and digits networks: inference (no autograd) and training (forward + backward for x,
weight and bias), in the channels-last layout the U-Net runs in on the CPU and in the plain layout. Both
kernels run interleaved in one process; each entry is the best of `--reps` timings. Prints a markdown table
for benchmarks/RESULTS.md; the rule in `ddpm.nn.winograd.Conv3x3.uses_winograd` follows from it.

    .venv/bin/python benchmarks/winograd_layers.py [--reps 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ddpm.nn.winograd import best_ms, conv3x3_winograd

# (batch, C_in, C_out, H = W, where): CIFAR-10 at the training batch 16 and the sampling batch 64; digits at 64
SHAPES = [
    (16, 128, 128, 32, "CIFAR level 0"), (16, 256, 128, 32, "CIFAR level 0, up"), (16, 128, 256, 16, "CIFAR level 1, first"),
    (16, 256, 256, 16, "CIFAR level 1"), (16, 512, 256, 16, "CIFAR level 1, up"), (16, 256, 256, 8, "CIFAR level 2"),
    (16, 256, 256, 4, "CIFAR level 3"), (64, 128, 128, 32, "CIFAR level 0, sampling"),
    (64, 256, 256, 16, "CIFAR level 1, sampling"), (64, 32, 32, 8, "digits level 0"), (64, 64, 32, 8, "digits level 0, up"),
    (64, 64, 64, 4, "digits level 1"), (64, 128, 64, 4, "digits level 1, up"),
    (64, 32, 32, 28, "fashion level 0"), (64, 64, 32, 28, "fashion level 0, up"), (64, 64, 64, 28, "fashion ch 64 level 0"),
    (16, 64, 64, 32, "width 64 at 32x32"), (16, 128, 64, 32, "width 64 at 32x32, up"), (64, 96, 96, 16, "width 96 at 16x16"),
]


def time_kernel(conv, x, w, b, gy, train: bool, reps: int) -> float:
    if train:
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        return best_ms(lambda: torch.autograd.grad(conv(*leaves), leaves, gy), reps, warmup=2)
    with torch.no_grad():
        return best_ms(lambda: conv(x, w, b), reps, warmup=2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"\n{time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32; "
          f"ms per call, best of {args.reps}; speed-up = direct / Winograd\n")
    print("| layer | N x C_in -> C_out x H x W | inference CL: direct, Winograd, speed-up | training CL | training plain |")
    print("|---|---|---|---|---|")
    for N, C, K, H, where in SHAPES:
        x = torch.randn(N, C, H, H)
        w = torch.randn(K, C, 3, 3) / (3 * C ** 0.5)
        b = torch.randn(K)
        cells = []
        for fmt, train in ((torch.channels_last, False), (torch.channels_last, True), (torch.contiguous_format, True)):
            xx = x.contiguous(memory_format=fmt)
            gy = torch.randn(N, K, H, H).contiguous(memory_format=fmt)
            kernels = {"direct": lambda x_, w_, b_: F.conv2d(x_, w_, b_, padding=1), "winograd": conv3x3_winograd}
            ms = {name: time_kernel(conv, xx, w, b, gy, train, args.reps) for name, conv in kernels.items()}
            cells.append(f"{ms['direct']:.1f}, {ms['winograd']:.1f}, **{ms['direct'] / ms['winograd']:.2f}x**")
        print(f"| {where} | {N} x {C} -> {K} x {H} x {H} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
