"""The fast-sampler issue's other two rows on the digits preset:

1. test-set bits/dim with fixed variances (the default run, read as fixedlarge and as fixedsmall) against
   learned variances (the same preset trained with `diffusion.var_type=learned_range`, `loss_type=hybrid`);
2. class accuracy of classifier-free guided samples: a class-conditional run (`model.num_classes=10`),
   `--per-class` samples of each class at each guidance scale, classified by the deterministic digit classifier.

    .venv/bin/python benchmarks/digits_variants.py --base benchmarks/out/digits/run [--out benchmarks/out/variants]

Runs that already exist in --out are reused (delete them to retrain). Prints markdown tables and writes
variants.json in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpm import load_run
from ddpm.evaluate import _eval_images, bpd_of_images
from ddpm.generate import SampleOptions, sample_batch
from ddpm.images import to_nhwc_uint8
from ddpm.metrics.digits import digits_probs, evaluate_digits
from ddpm.run import build_diffusion

VARIANTS = {
    "learned": ["diffusion.var_type=learned_range", "diffusion.loss_type=hybrid"],
    "cond": ["model.num_classes=10"],
}


def train(run: Path, sets: list[str], threads: int) -> subprocess.Popen | None:
    if (run / "config.json").exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "ddpm", "train", "--out", str(run), "--force"]
    for s in sets:
        cmd += ["--set", s]
    log = open(run.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def bpd_rows(base: Path, learned: Path, n: int) -> list[dict]:
    rows = []
    fixed = load_run(base)
    images = _eval_images(fixed, "test", n, None)
    for var in ("fixedlarge", "fixedsmall"):
        cfg = dataclasses.replace(fixed.config, diffusion=dataclasses.replace(fixed.config.diffusion, var_type=var))
        run = dataclasses.replace(fixed, diffusion=build_diffusion(cfg))
        rows.append(_bpd_row(f"fixed ({var})", run, images))
    rows.append(_bpd_row("learned (learned_range, hybrid loss)", load_run(learned), images))
    return rows


def _bpd_row(name: str, run, images: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    res = bpd_of_images(run, images, batch_size=100, progress=False)
    n = res.total.shape[0]
    row = {"variant": name, "run": str(run.path), "step": run.step, "n": n, "bpd": float(res.total.mean()),
           "stderr": float(res.total.std() / n**0.5), "decoder": float(res.terms[:, 0].mean()),
           "prior": float(res.prior.mean()), "seconds": time.perf_counter() - t0}
    print(f"| {name} | {n} | {row['bpd']:.3f} ± {row['stderr']:.3f} | {row['decoder']:.3f} | {row['seconds']:.0f} |",
          flush=True)
    return row


def guidance_rows(cond: Path, per_class: int, scales: list[float], sampler: str, steps: int | None) -> list[dict]:
    run = load_run(cond)
    rows = []
    for scale in scales:
        t0 = time.perf_counter()
        images, labels = [], []
        for c in range(10):
            opts = SampleOptions(sampler=sampler, steps=steps, class_label=c, guidance=scale)
            x = sample_batch(run, range(c * per_class, (c + 1) * per_class), 0, opts, torch.device("cpu"))
            images.append(to_nhwc_uint8(x))
            labels.append(np.full(per_class, c))
        images, labels = np.concatenate(images), np.concatenate(labels)
        probs = digits_probs(images)
        pred = probs.argmax(1)
        rep = evaluate_digits(images)
        row = {"scale": scale, "n": len(labels), "accuracy": float((pred == labels).mean()),
               "accuracy_confident": float(((pred == labels) & (probs.max(1) >= 0.9)).mean()),
               "frechet": rep.frechet, "ratio": rep.ratio, "confident": rep.confident_fraction,
               "per_class": [float((pred[labels == c] == c).mean()) for c in range(10)],
               "seconds": time.perf_counter() - t0}
        print(f"| {scale:g} | {row['n']} | {row['accuracy']:.3f} | {min(row['per_class']):.2f} | "
              f"{row['frechet']:.3f} | {row['ratio']:.2f} | {row['confident']:.3f} | {row['seconds']:.0f} |", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="benchmarks/out/digits/run", help="a trained default digits run (fixed variances)")
    p.add_argument("--out", default="benchmarks/out/variants")
    p.add_argument("--bpd-n", type=int, default=300, help="test images for bits/dim")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--steps", type=int)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    procs = {name: train(out / name, sets, threads=1) for name, sets in VARIANTS.items()}
    for name, proc in procs.items():
        if proc is not None and proc.wait() != 0:
            print(f"training {name} failed; see {out / name}.log", file=sys.stderr)
            return 1
    print(f"trained in {time.perf_counter() - t0:.0f} s (both runs side by side, one thread each)\n")

    print("| variance | test images | bits/dim | decoder L_0 | seconds |\n|---|---|---|---|---|")
    bpd = bpd_rows(Path(args.base), out / "learned", args.bpd_n)
    print("\n| guidance scale | samples | class accuracy | worst class | Frechet | ratio | confident | seconds |\n"
          "|---|---|---|---|---|---|---|---|")
    guided = guidance_rows(out / "cond", args.per_class, args.scales, args.sampler, args.steps)
    (out / "variants.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                                   "bpd": bpd, "guidance": guided}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
