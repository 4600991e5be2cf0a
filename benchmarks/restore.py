"""Image-to-image on Fashion-MNIST test images: each task's degradation y = A x (8-bit, as `ddpm degrade` writes
it), then the baselines, the training-free restorer (DDNM, `ddpm restore` on an unconditional run) at several
step counts, and models trained on pairs (`ddpm train --task`), scored against the truth.

    .venv/bin/python benchmarks/restore.py --run RUN [--cond sr4=RUN_SR4 ...] [--n 500] [--steps 20 100]
        [--long-n 200 --long-steps 1000 --long-tasks sr4 inpaint-center] [--tasks sr4 sr2 inpaint-center inpaint-half deblur]
        [--sigma-y 0.0023] [--travel L R] [--eta ddnm:0.85 ddim:0.5] [--skip-plain] [--heun 25 50 --heun-churn 10]
        [--t-start 500 700]
        [--cond-consistent]
        [--out benchmarks/out/restore]
        [--data /usr/share/datasets/fashion-mnist]

The images: the first --n of the 10,000 test images (the same for every method). Per method:
- PSNR and SSIM against the truth (torchmetrics, images in [0, 1], per image then averaged; SSIM with its 11x11
  Gaussian window, sigma 1.5),
- consistency: the mean and the largest |A x_hat - A A+ y| over every degraded pixel, in [-1, 1] units, before
  the output is rounded to 8 bits (A A+ y is y's part in the range of A: y itself for super-resolution, y with
  the hidden pixels' 8-bit mid-gray 1/255 set to 0 for inpainting, y without the blur's lost frequencies),
- the fashion evaluation of the 8-bit outputs (`ddpm.metrics.fashion`): Frechet distance against the test set and
  its floor at the same n (real training images), and the classifier's accuracy on the outputs against the true
  labels (its accuracy on the clean test images is the truth row's),
- the wall time.
Baselines: super-resolution by nearest and bicubic upsampling of y; inpainting by A+ y (the hidden pixels
mid-gray); deblurring by y itself and by the regularised inverse A+ y. The long row (--long-steps) runs on the
first --long-n images only, and its rows say so.

Writes result.json, one markdown table per task, and a comparison PNG per task (rows: the input upsampled by
nearest neighbour, the bicubic or A+ y baseline, the training-free restorer at its most steps, each model
trained on pairs, the truth) in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion import cpu  # noqa: E402

from ddpm.data import load_idx, to_model_range, to_uint8  # noqa: E402
from ddpm.generate import RestoreOptions, restore_batch  # noqa: E402
from ddpm.restoration import ETA_RULES, operator  # noqa: E402

TASKS = {"sr4": ("sr4", None), "sr2": ("sr2", None), "inpaint-center": ("inpaint", "center"),
         "inpaint-half": ("inpaint", "half"), "deblur": ("deblur", None)}


def baselines(task: str, op, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The methods that need no model, each x_hat [N, 1, 28, 28] in [-1, 1] from y in [-1, 1]."""
    kind = TASKS[task][0]
    if kind.startswith("sr"):
        size = op.shape[1:]
        return {"nearest": F.interpolate(y, size=size, mode="nearest"),
                "bicubic": F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)}
    if kind == "inpaint":
        return {"A+ y (hidden pixels mid-gray)": op.pinv(y)}
    return {"y itself": y, "A+ y (regularised inverse)": op.pinv(y).clamp(-1, 1)}


def scores(x: torch.Tensor, truth: torch.Tensor, y: torch.Tensor, op, labels: np.ndarray, data: str) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from ddpm.metrics.fashion import classifier, evaluate_fashion, fashion_outputs

    a, b = (x.double() + 1) / 2, (truth.double() + 1) / 2
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    gap = (op.A(x.double()) - op.A(op.pinv(y.double()))).abs()  # against A A+ y: what DDNM keeps
    x8 = to_uint8(x)
    _, probs = fashion_outputs(x8, classifier(data))
    out = {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "consistency_mean": float(gap.mean()),
           "consistency_max": float(gap.max()), "accuracy": float((probs.argmax(1) == labels).mean())}
    rep = evaluate_fashion(x8, data)
    return {**out, "frechet": rep.frechet, "floor": rep.floor}


def restore(run, op, y: torch.Tensor, steps: int | None, batch: int, seed: int, **options) -> torch.Tensor:
    out = []
    for s in range(0, len(y), batch):
        x, _ = restore_batch(run, op, y[s : s + batch], range(s, min(s + batch, len(y))), seed,
                             RestoreOptions(steps=steps, **options), torch.device("cpu"))
        out.append(x)
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run", help="an unconditional fashion run (the training-free restorer's model; needed for "
                   "every DDNM row, not for --cond alone with --steps --long-steps)")
    p.add_argument("--cond", action="append", default=[], metavar="TASK=RUN",
                   help="a run trained on pairs of TASK (`ddpm train --task`), sampled with --cond-steps")
    p.add_argument("--cond-steps", type=int, default=100, help="DDIM steps (eta 1) of the models trained on pairs")
    p.add_argument("--cond-consistent", action="store_true",
                   help="also each model trained on pairs with DDNM's steps (ddpm restore --consistent)")
    p.add_argument("--travel", type=int, nargs=2, metavar=("L", "R"),
                   help="also DDNM with time travel (length L, repeat R) at every --steps, with the plain rows' noise "
                        "and with each --eta")
    p.add_argument("--skip-plain", action="store_true",
                   help="leave out the plain DDNM rows (DDIM eta 1) at --steps: only the --eta, --travel, --sigma-y "
                        "and --heun rows")
    p.add_argument("--eta", nargs="*", default=[], metavar="RULE:ETA",
                   help="also DDNM with this eta at every --steps, by its rule (ddpm restore --eta-rule): ddim "
                        "(eta x the posterior's std; the plain rows' eta 1) or ddnm (eta x sqrt(1 - abar_s), DDNM's "
                        "code: 0.85)")
    p.add_argument("--t-start", type=int, nargs="*", default=[], metavar="K",
                   help="also DDNM started at each timestep K from A+ y noised to it (ddpm restore --t-start), at "
                        "every --steps, with the plain rows' noise and with each --eta")
    p.add_argument("--heun", type=int, nargs="*", default=[],
                   help="also DDNM in EDM's Heun sampler (ddpm restore --sampler heun) on these many grid points "
                        "(2 x points - 1 network evaluations)")
    p.add_argument("--heun-churn", type=float, nargs="*", default=[10.0],
                   help="its S_churn values (S_tmin 0.05, S_tmax 50, S_noise 1.003, as benchmarks/fashion.py)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--n", type=int, default=500, help="test images per method")
    p.add_argument("--steps", type=int, nargs="*", default=[20, 100], help="DDNM step counts on all --n images")
    p.add_argument("--sigma-y", type=float, nargs="*", default=[],
                   help="also DDNM+ with these noise levels of y ([-1, 1] units; 8-bit rounding: about 0.0023) at "
                        "each of --steps")
    p.add_argument("--long-n", type=int, default=200)
    p.add_argument("--long-steps", type=int, nargs="*", default=[1000], help="DDNM step counts on --long-n images")
    p.add_argument("--long-tasks", nargs="*", default=["sr4", "inpaint-center"], choices=list(TASKS),
                   help="the tasks that get the --long-steps rows")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="the restorers' seed (ddpm restore --seed): image i's noise "
                   "from (seed, i) alone")
    p.add_argument("--out", default="benchmarks/out/restore")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()
    etas = []
    for spec in args.eta:
        rule, _, value = spec.partition(":")
        try:
            etas.append((rule, float(value)))
        except ValueError:
            p.error(f"--eta {spec}: RULE:ETA, e.g. ddnm:0.85")
        if rule not in ETA_RULES:
            p.error(f"--eta {spec}: the rule is ddim or ddnm")
    from ddpm.run import load_run

    def seeded(*a, **options):
        return restore(*a, seed=args.seed, **options)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run is None and (args.steps or args.heun or args.long_steps):
        p.error("--run: the DDNM rows (--steps, --long-steps, --heun) need an unconditional run; pass --steps "
                "--long-steps (no values) to score only --cond runs and the baselines")
    run = load_run(args.run) if args.run else None
    conds = {}
    for spec in args.cond:
        task, _, path = spec.partition("=")
        conds[task] = load_run(path, conditional=True)
    images, labels = load_idx(args.data, "test")
    truth_all, labels_all = to_model_range(images), labels.numpy()
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "threads": torch.get_num_threads(), "run": args.run,
              "seed": args.seed,
              "step": run.step if run else None, "n": args.n, "long_n": args.long_n, "rows": []}
    for task in args.tasks:
        kind, mask = TASKS[task]
        op = operator(kind, (1, 28, 28), mask)
        methods = []  # (name, n, make)
        truth, lab = truth_all[: args.n], labels_all[: args.n]
        y = to_model_range(to_uint8(op.A(truth)))  # the 8-bit degraded images `ddpm degrade` writes
        for name, x in baselines(task, op, y).items():
            methods.append((name, args.n, lambda x=x: x))
        for k in [] if args.skip_plain else args.steps:
            methods.append((f"DDNM, {k} steps", args.n, lambda k=k, op=op, y=y: seeded(run, op, y, k, args.batch_size)))
        for sy in args.sigma_y:
            for k in args.steps:
                methods.append((f"DDNM+, sigma_y {sy:g}, {k} steps", args.n,
                                lambda k=k, op=op, y=y, sy=sy: seeded(run, op, y, k, args.batch_size, sigma_y=sy)))
        for rule, e in etas:
            for k in args.steps:
                methods.append((f"DDNM, {k} steps, eta {e:g} ({rule}'s rule)", args.n,
                                lambda k=k, op=op, y=y, rule=rule, e=e: seeded(run, op, y, k, args.batch_size, eta=e,
                                                                                eta_rule=rule)))
        variants = [(f", time travel L {args.travel[0]} r {args.travel[1]}",
                     {"travel_length": args.travel[0], "travel_repeat": args.travel[1]})] if args.travel else []
        variants += [(f", from A+ y at t = {t0}", {"t_start": t0}) for t0 in args.t_start]
        for suffix, extra in variants:  # each with the plain rows' noise and each --eta, at every --steps
            for rule, e in ([] if args.skip_plain else [("ddim", 1.0)]) + etas:
                for k in args.steps:
                    noise = "" if (rule, e) == ("ddim", 1.0) else f", eta {e:g} ({rule}'s rule)"
                    methods.append((f"DDNM, {k} steps{noise}{suffix}", args.n,
                                    lambda k=k, op=op, y=y, rule=rule, e=e, extra=extra: seeded(
                                        run, op, y, k, args.batch_size, eta=e, eta_rule=rule, **extra)))
        for k in args.heun:
            for churn in args.heun_churn:
                churned = {"S_churn": churn, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003} if churn else {}
                methods.append((f"DDNM in Heun's sampler, {k} points ({2 * k - 1} evaluations), S_churn {churn:g}",
                                args.n, lambda k=k, op=op, y=y, o=churned: seeded(
                                    run, op, y, k, args.batch_size, sampler="heun", sampler_options=o)))
        for k in args.long_steps if task in args.long_tasks else []:
            methods.append((f"DDNM, {k} steps (first {args.long_n})", args.long_n,
                            lambda k=k, op=op, y=y: seeded(run, op, y[: args.long_n], k, args.batch_size)))
        if task in conds:
            methods.append((f"trained on pairs (step {conds[task].step}), DDIM {args.cond_steps}", args.n,
                            lambda c=conds[task], op=op, y=y: seeded(c, op, y, args.cond_steps, args.batch_size)))
            if args.cond_consistent:
                methods.append((f"trained on pairs (step {conds[task].step}), DDNM's steps {args.cond_steps}", args.n,
                                lambda c=conds[task], op=op, y=y: seeded(c, op, y, args.cond_steps, args.batch_size,
                                                                          consistent=True)))
        methods.append(("truth", args.n, lambda truth=truth: truth))
        shown = {}
        for name, n, make in methods:
            t0 = time.perf_counter()
            with torch.inference_mode():
                x = make()
            seconds = time.perf_counter() - t0
            row = {"task": task, "method": name, "n": n, "seconds": seconds,
                   **scores(x, truth[:n], y[:n], op, lab[:n], args.data)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            shown[name] = x[:8]
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        picture(task, op, y[:8], shown, out / f"restore_{task}.png")
    print(table(result))
    return 0


def picture(task: str, op, y: torch.Tensor, shown: dict[str, torch.Tensor], path: Path) -> None:
    """Rows: y upsampled by nearest neighbour (inpainting: as given), the strongest baseline, the training-free
    restorer at its most steps, each model trained on pairs, the truth."""
    from ddpm.images import save_grid

    size = op.shape[1:]
    rows = [F.interpolate(y, size=size, mode="nearest") if y.shape[-1] != size[-1] else y]
    names = list(shown)
    baseline = [m for m in names if m.startswith(("bicubic", "A+ y"))]
    ddnm = [m for m in names if m.startswith("DDNM")]
    rows += [shown[m] for m in baseline[-1:] + ddnm[-1:]]
    rows += [shown[m] for m in names if m.startswith("trained on pairs")]
    rows.append(shown["truth"])
    save_grid(torch.cat(rows), path, nrow=8)


def table(result: dict) -> str:
    lines = [f"{result['date']}, {result['cpu']}, {result['threads']} threads; run {result['run']} at step "
             f"{result['step']}", ""]
    for task in dict.fromkeys(r["task"] for r in result["rows"]):
        lines += [f"**{task}**", "", "| method | n | PSNR | SSIM | consistency mean / max | Frechet (floor) | "
                  "accuracy | time |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if r["task"] == task:
                lines.append(f"| {r['method']} | {r['n']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                             f"{r['consistency_mean']:.1e} / {r['consistency_max']:.1e} | {r['frechet']:.2f} "
                             f"({r['floor']:.2f}) | {r['accuracy']:.3f} | {r['seconds']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
