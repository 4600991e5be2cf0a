"""The training issue's bar: the default `ddpm train` (digits) in at most 10 minutes on this machine, and
1,000 samples from `ddpm sample` within 1.5x of the real-data floor of the digit-classifier Frechet distance.

    .venv/bin/python benchmarks/digits_quality.py [--out benchmarks/out/digits] [--n 1000] [--sampler ancestral]
        [--precision fp32|bf16] [--skip-train]

Prints a markdown row for benchmarks/RESULTS.md and writes result.json in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/out/digits")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--skip-train", action="store_true", help="reuse the run in --out/run")
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--steps", type=int)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--precision", default="fp32", help="the network's precision while sampling (ddpm sample)")
    args = p.parse_args()
    out = Path(args.out)
    run = out / "run"
    ddpm = [sys.executable, "-m", "ddpm"]
    train_s = None
    if not args.skip_train:
        t0 = time.perf_counter()
        extra = [x for s in args.set for x in ("--set", s)]
        subprocess.run([*ddpm, "train", "--out", str(run), "--force", *extra], check=True)
        train_s = time.perf_counter() - t0
    samples = out / f"samples_{args.sampler}_{args.steps or 'all'}_{args.precision}.npz"
    t0 = time.perf_counter()
    cmd = [*ddpm, "sample", "--run", str(run), "--n", str(args.n), "--out", str(samples), "--batch-size", "500",
           "--sampler", args.sampler, "--precision", args.precision]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    subprocess.run(cmd, check=True)
    sample_s = time.perf_counter() - t0

    from ddpm.metrics.digits import evaluate_digits

    rep = evaluate_digits(np.load(samples)["arr_0"])
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "train_seconds": train_s, "sample_seconds": sample_s, "n": args.n,
        "sampler": args.sampler, "steps": args.steps, "precision": args.precision, "frechet": rep.frechet, "floor": rep.floor, "ratio": rep.ratio,
        "confident_fraction": rep.confident_fraction, "class_histogram": list(map(int, rep.class_histogram)),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"| {result['date']} | {train_s and round(train_s)} s | {round(sample_s)} s | {args.sampler} {args.steps or ''} {args.precision} | "
          f"{rep.frechet:.3f} | {rep.floor:.3f} | {rep.ratio:.2f} | {rep.confident_fraction:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
