"""Ancestral sampling rate against the batch size for the small presets' networks (issue 23: the default
`--batch-size` of `ddpm sample`, `ddpm.runtime.default_batch_size`). Untrained weights (the rate does not
depend on them), 2 threads, every batch size timed once per round, medians of 3 rounds.

    .venv/bin/python benchmarks/batch_rate.py digits|fashion

Prints one line: batch: img-steps/s for each batch size.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ddpm import GaussianDiffusion, UNet, beta_schedule
from ddpm.runtime import keep_freed_memory

# name -> (UNet arguments, image side, batch sizes, img-steps per timing)
NETWORKS = {"digits": ((1, 32, (1, 2), 2, (4,), 0.0, 8), 8, (64, 128, 256, 512, 1024), 2048),
            "fashion": ((1, 32, (1, 2, 2), 2, (7,), 0.0, 28), 28, (16, 64, 256), 256)}


def main() -> None:
    torch.set_num_threads(2)
    keep_freed_memory()  # the ddpm commands' allocator setting
    args, side, batches, work = NETWORKS[sys.argv[1] if len(sys.argv) > 1 else "digits"]
    net = UNet(*args).eval()
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))

    def steps(batch: int, k: int) -> None:
        x = torch.randn(batch, 1, side, side)
        with torch.inference_mode():
            for i in range(k):
                p = diffusion.p_mean_variance(net, x, torch.full((batch,), 999 - i))
                x = p.mean + (0.5 * p.log_variance).exp() * torch.randn_like(x)

    rates: dict[int, list[float]] = {b: [] for b in batches}
    for b in batches:
        steps(b, 2)  # warm-up: oneDNN picks its kernels per shape
    for _ in range(3):
        for b in batches:
            k = max(2, work // b)
            t0 = time.perf_counter()
            steps(b, k)
            rates[b].append(b * k / (time.perf_counter() - t0))
    print(sys.argv[1] if len(sys.argv) > 1 else "digits",
          " | ".join(f"{b}: {statistics.median(v):.0f}" for b, v in rates.items()))


if __name__ == "__main__":
    main()
