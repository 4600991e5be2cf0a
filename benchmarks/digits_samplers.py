"""Sample quality against network evaluations for each sampler on a trained digits run (the fast-sampler issue's
table): the digit-classifier Frechet distance (and its ratio to the real-data floor) and the confident fraction.

    .venv/bin/python benchmarks/digits_samplers.py --run RUN [--n 500] [--nfe 10 20 50 100 1000]
        [--samplers ancestral ddim dpmpp2m respaced] [--eta 0 1] [--spacing uniform quad]

`ancestral` runs once with all T steps (the reference); the others once per NFE (at NFE = T, quad spacing
and respaced are skipped: they are the uniform grid and ancestral sampling then).
"""

from __future__ import annotations

import argparse
import statistics
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="several: each row gives the mean and the spread over seeds (Frechet from 500 samples moves by ~2)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    p.add_argument("--samplers", nargs="+", default=["ancestral", "ddim", "dpmpp2m", "respaced"])
    p.add_argument("--eta", type=float, nargs="+", default=[0.0, 1.0], help="DDIM's eta values (one row each)")
    p.add_argument("--spacing", nargs="+", default=["uniform", "quad"], help="ddim/respaced grids (one row each)")
    args = p.parse_args()
    run = load_run(args.run)
    print(f"run {args.run} (step {run.step}), {args.n} samples each, seeds {args.seeds}\n")
    print("| sampler | NFE | Frechet | ratio to floor | confident | seconds |")
    print("|---|---|---|---|---|---|")
    rows = [(n, e, sp) for n in args.samplers for e in (args.eta if n == "ddim" else [None])
            for sp in (args.spacing if n in ("ddim", "respaced") else [None])]
    for name, eta, spacing in rows:
        label = name + (f" eta={eta:g}" if name == "ddim" else "") + (" quad" if spacing == "quad" else "")
        for k in [run.diffusion.num_timesteps] if name == "ancestral" else args.nfe:
            if k == run.diffusion.num_timesteps and (spacing == "quad" or name == "respaced"):
                continue  # every timestep: the same as the uniform row / as ancestral (tested)
            steps = None if k == run.diffusion.num_timesteps else k
            opts = SampleOptions(sampler=name, steps=steps, eta=eta, spacing=spacing if steps is not None else None)
            reps, t0 = [], time.perf_counter()
            for seed in args.seeds:
                rep = evaluate_digits(to_nhwc_uint8(sample_batch(run, range(args.n), seed, opts, torch.device("cpu"))))
                reps.append((rep.frechet, rep.ratio, rep.confident_fraction))
            dt = (time.perf_counter() - t0) / len(args.seeds)
            cells = [_cell([r[i] for r in reps], digits) for i, digits in enumerate((3, 2, 3))]
            print(f"| {label} | {k} | {' | '.join(cells)} | {dt:.0f} |", flush=True)


def _cell(values: list[float], digits: int) -> str:
    """The value, or mean ± standard deviation over seeds."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


if __name__ == "__main__":
    main()
