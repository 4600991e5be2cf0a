"""Real images on a laptop: `ddpm train --preset fashion` (about 30 minutes on 2 CPU cores), then 1,000 samples
with the paper's ancestral sampler (1000 steps) and with DDIM at eta 1 (50 steps), each scored by the
Fashion-MNIST classifier (`ddpm.metrics.fashion`: Frechet distance to the test set against the floor of as many
real training images, precision and recall, k = 3).

    .venv/bin/python benchmarks/fashion.py [--out benchmarks/out/fashion] [--data /usr/share/datasets/fashion-mnist]
        [--steps N] [--n 1000] [--set section.field=value ...] [--skip-train] [--samplers ancestral ddim]

Prints one markdown row per sampler for benchmarks/RESULTS.md (with the CPU's lscpu model and vector flags) and
writes result.json in --out. A smoke run: `--steps 2 --n 16 --set diffusion.num_timesteps=50`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")  # the ones the kernels use
SAMPLERS = {"ancestral": [], "ddim": ["--sampler", "ddim", "--steps", "50", "--eta", "1"]}  # 1000 and 50 steps


def cpu() -> str:
    """lscpu's model name and which of FLAGS it lists, e.g. "AMD EPYC, 2 CPUs (avx2 avx512f avx512_bf16)"."""
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                    check=True).stdout.splitlines() if ":" in line)
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    flags = set(info.get("Flags", "").split())
    model = info.get("Model name", "?").strip()
    return f"{model}, {info.get('CPU(s)', '?').strip()} CPUs ({' '.join(f for f in FLAGS if f in flags) or 'no AVX2'})"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/out/fashion")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--n", type=int, default=1000, help="samples per sampler")
    p.add_argument("--batch-size", type=int, default=250, help="samples per network call")
    p.add_argument("--set", action="append", default=[], help="a training override, as ddpm train --set")
    p.add_argument("--skip-train", action="store_true", help="reuse the run in --out/run")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    args = p.parse_args()
    out = Path(args.out)
    run = out / "run"
    ddpm = [sys.executable, "-m", "ddpm"]
    train_s = None
    if not args.skip_train:
        cmd = [*ddpm, "train", "--preset", "fashion", "--data", args.data, "--run", str(run), "--force"]
        cmd += (["--steps", str(args.steps)] if args.steps else []) + [x for s in args.set for x in ("--set", s)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        train_s = time.perf_counter() - t0
    config = json.loads((run / "config.json").read_text())

    from ddpm.metrics.fashion import evaluate_fashion

    rows = []
    for name in args.samplers:
        samples = out / f"samples_{name}_{args.n}.npz"
        t0 = time.perf_counter()
        subprocess.run([*ddpm, "sample", "--run", str(run), "--n", str(args.n), "--out", str(samples),
                        "--batch-size", str(args.batch_size), "--quiet", *SAMPLERS[name]], check=True)
        sample_s = time.perf_counter() - t0
        rep = evaluate_fashion(np.load(samples)["arr_0"], args.data)
        rows.append({"sampler": name, "sample_seconds": sample_s, **dataclasses.asdict(rep)})
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "steps": config["train"]["steps"],
              "overrides": args.set, "train_seconds": train_s, "n": args.n, "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("| date | CPU | steps | train | sampler | sampling | Frechet | floor | ratio | precision | recall | "
          "confident |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {result['date']} | {result['cpu']} | {result['steps']} | "
              f"{'-' if train_s is None else f'{train_s:.0f} s'} | {r['sampler']} | {r['sample_seconds']:.0f} s | "
              f"{r['frechet']:.2f} | {r['floor']:.2f} | {r['ratio']:.2f} | {r['precision']:.3f} "
              f"({r['floor_precision']:.3f}) | {r['recall']:.3f} ({r['floor_recall']:.3f}) | "
              f"{r['confident_fraction']:.3f} ({r['floor_confident_fraction']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
