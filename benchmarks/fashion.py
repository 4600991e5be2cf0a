"""Real images on a laptop: `ddpm train --preset fashion` (about 30 minutes on 2 CPU cores), then 1,000 samples
with the paper's ancestral sampler (1000 steps) and with DDIM at eta 1 (50 steps), each scored by the
Fashion-MNIST classifier (`ddpm.metrics.fashion`: Frechet distance to the test set against the floor of as many
real training images, precision and recall, k = 3).

    .venv/bin/python benchmarks/fashion.py [--out benchmarks/out/fashion] [--data /usr/share/datasets/fashion-mnist]
        [--steps N | --minutes 10 20 30] [--n 1000] [--set section.field=value ...] [--skip-train]
        [--samplers ancestral ddim ...: see SAMPLERS] [--seed S]

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
# name -> `ddpm sample` options; the number is the network evaluations (heun: 2 steps - 1)
SAMPLERS = {"ancestral": [], "ddim": ["--sampler", "ddim", "--steps", "50", "--eta", "1"],
            "ddim-eta0": ["--sampler", "ddim", "--steps", "50", "--eta", "0"],
            "dpmpp2m": ["--sampler", "dpmpp2m", "--steps", "50"],
            "heun": ["--sampler", "heun", "--steps", "25"],
            "ddim-20": ["--sampler", "ddim", "--steps", "20", "--eta", "1"],
            "ddim-eta0-20": ["--sampler", "ddim", "--steps", "20", "--eta", "0"],
            "dpmpp2m-20": ["--sampler", "dpmpp2m", "--steps", "20"],
            "heun-20": ["--sampler", "heun", "--steps", "10"]}
# Heun with EDM's churn: S_tmin, S_tmax and S_noise as EDM's ImageNet-64 example (0.05, 50, 1.003), two amounts
for churn in (10, 40):
    for name, steps in ((f"heun-churn{churn}", "25"), (f"heun-churn{churn}-20", "10")):
        SAMPLERS[name] = ["--sampler", "heun", "--steps", steps, *(x for o in (
            f"S_churn={churn}", "S_tmin=0.05", "S_tmax=50", "S_noise=1.003") for x in ("--sampler-option", o))]


def cpu() -> str:
    """lscpu's model name, family and model (three machines have all been "AMD EPYC") and which of FLAGS it
    lists, e.g. "AMD EPYC family 26 model 2, 2 CPUs (avx2 avx512f avx512_bf16)"."""
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                    check=True).stdout.splitlines() if ":" in line)
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    flags = set(info.get("Flags", "").split())
    model = info.get("Model name", "?").strip()
    if info.get("CPU family") and info.get("Model"):
        model += f" family {info['CPU family'].strip()} model {info['Model'].strip()}"
    return f"{model}, {info.get('CPU(s)', '?').strip()} CPUs ({' '.join(f for f in FLAGS if f in flags) or 'no AVX2'})"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/out/fashion")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--minutes", type=float, nargs="+",
                   help="train for these wall minutes instead of --steps, scoring a snapshot at each (e.g. 10 20 30: "
                        "`ddpm train --minutes 10`, then `--resume` twice; starting a process is not counted)")
    p.add_argument("--n", type=int, default=1000, help="samples per sampler")
    p.add_argument("--batch-size", type=int, default=250, help="samples per network call")
    p.add_argument("--set", action="append", default=[], help="a training override, as ddpm train --set")
    p.add_argument("--skip-train", action="store_true", help="reuse the run in --out/run")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (ddpm sample --seed)")
    p.add_argument("--samplers", nargs="+", default=["ancestral", "ddim"], choices=list(SAMPLERS))
    args = p.parse_args()
    out = Path(args.out)
    run = out / "run"
    ddpm = [sys.executable, "-m", "ddpm"]
    sets = [x for s in args.set for x in ("--set", s)]
    segments = [None] if not args.minutes else sorted(args.minutes)
    rows, done, train_s = [], 0.0, None
    from ddpm.metrics.fashion import evaluate_fashion

    for k, mark in enumerate(segments):
        if not args.skip_train:
            cmd = [*ddpm, "train", "--preset", "fashion", "--data", args.data, "--run", str(run), "--quiet", *sets]
            cmd += ["--force"] if k == 0 else ["--resume"]
            if mark is not None:
                cmd += ["--minutes", f"{mark - done:g}", "--steps", str(args.steps or 10**7)]
                done = mark
            elif args.steps:
                cmd += ["--steps", str(args.steps)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            train_s = time.perf_counter() - t0 + (train_s or 0.0)
        step = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"]
        for name in args.samplers:
            seed = "" if args.seed == 0 else f"_seed{args.seed}"
            samples = out / f"samples_{name}_{args.n}{'' if mark is None else f'_{mark:g}min'}{seed}.npz"
            samples.unlink(missing_ok=True)  # ddpm sample would take a file of the same name as work to resume
            t0 = time.perf_counter()
            subprocess.run([*ddpm, "sample", "--run", str(run), "--n", str(args.n), "--out", str(samples),
                            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--quiet", *SAMPLERS[name]],
                           check=True)
            sample_s = time.perf_counter() - t0
            rep = evaluate_fashion(np.load(samples)["arr_0"], args.data)
            rows.append({"minutes": mark, "steps": step, "train_seconds": train_s, "sampler": name, "seed": args.seed,
                         "sample_seconds": sample_s, **dataclasses.asdict(rep)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "overrides": args.set, "n": args.n, "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| date | CPU | minutes | steps | train | sampler | sampling | Frechet | floor | ratio | precision | recall | "
          "confident |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        train = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:g}"
        print(f"| {result['date']} | {result['cpu']} | {minutes} | "
              f"{r['steps']} | {train} | {r['sampler']} | {r['sample_seconds']:.0f} s | "
              f"{r['frechet']:.2f} | {r['floor']:.2f} | {r['ratio']:.2f} | {r['precision']:.3f} "
              f"({r['floor_precision']:.3f}) | {r['recall']:.3f} ({r['floor_recall']:.3f}) | "
              f"{r['confident_fraction']:.3f} ({r['floor_confident_fraction']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
