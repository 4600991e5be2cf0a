"""Sample quality against network evaluations for each sampler on a trained digits run (the fast-sampler issue's
table): the digit-classifier Frechet distance (and its ratio to the real-data floor) and the confident fraction.

    .venv/bin/python benchmarks/digits_samplers.py --run RUN [--n 500] [--nfe 10 20 50 100 1000]
        [--samplers ancestral ddim dpmpp2m respaced]

`ancestral` runs once with all T steps (the reference); the others once per NFE.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpm import load_run
from ddpm.generate import SampleOptions, sample_batch
from ddpm.images import to_nhwc_uint8
from ddpm.metrics.digits import evaluate_digits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    p.add_argument("--samplers", nargs="+", default=["ancestral", "ddim", "dpmpp2m", "respaced"])
    args = p.parse_args()
    run = load_run(args.run)
    print(f"run {args.run} (step {run.step}), {args.n} samples each, seed 0\n")
    print("| sampler | NFE | Frechet | ratio to floor | confident | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.samplers:
        for k in [run.diffusion.num_timesteps] if name == "ancestral" else args.nfe:
            t0 = time.perf_counter()
            steps = None if k == run.diffusion.num_timesteps else k
            x = sample_batch(run, range(args.n), 0, SampleOptions(sampler=name, steps=steps), torch.device("cpu"))
            dt = time.perf_counter() - t0
            rep = evaluate_digits(to_nhwc_uint8(x))
            print(f"| {name} | {k} | {rep.frechet:.3f} | {rep.ratio:.2f} | {rep.confident_fraction:.3f} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
