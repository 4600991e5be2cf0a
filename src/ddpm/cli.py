"""The `ddpm` command: arguments -> configuration dataclasses -> library calls. No math here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def _train(args: argparse.Namespace) -> int:
    from ddpm.config import apply_overrides, preset, set_field

    cfg = preset(args.preset)
    if args.data is not None:
        cfg.data.path = args.data
    for flag, field in (("steps", "train.steps"), ("batch_size", "train.batch_size"), ("seed", "train.seed"),
                        ("ckpt_every", "train.ckpt_every")):
        if getattr(args, flag) is not None:
            set_field(cfg, field, getattr(args, flag))
    apply_overrides(cfg, args.set or [])
    from ddpm.train import Trainer  # after validation: a bad value fails fast, before torch.nn is touched

    trainer = Trainer(cfg, args.out, resume=args.resume, force=args.force, weights_only=args.weights_only)
    code = trainer.train(progress=not args.quiet)
    if trainer.dist.main and code == 0:
        print(f"trained {cfg.preset} to step {trainer.step}: run directory {args.out}")
    return code


def _sample(args: argparse.Namespace) -> int:
    import torch

    from ddpm.generate import SampleOptions, assemble, generate_to_parts
    from ddpm.train import init_distributed, load_run, resolve_device

    d = init_distributed(args.device)
    device = resolve_device(args.device)
    run = load_run(args.run, ema=not args.raw_weights, device=device)
    opts = SampleOptions(sampler=args.sampler, steps=args.steps, eta=args.eta, class_label=args.class_label,
                         guidance=args.guidance)
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz; got {out}")
    parts = generate_to_parts(run, args.n, out, seed=args.seed, batch_size=args.batch_size, opts=opts, device=device,
                              rank=d.rank, world=d.world, progress=not args.quiet)
    if d.world > 1:
        torch.distributed.barrier()
    if d.main:
        assemble(parts, args.n, out)
        print(f"wrote {args.n} samples from {args.run} (step {run.step}, {opts.sampler}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ddpm.config import PRESETS

    p = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: the digits preset on the CPU)")
    t.add_argument("--preset", default="digits", choices=list(PRESETS), help="recipe (default: digits)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--data", help="dataset path: CIFAR-10 archive or folder, image folder, LSUN LMDB")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size")
    t.add_argument("--seed", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--weights-only", action="store_true", help="with --resume: accept a checkpoint without optimizer state")
    t.add_argument("--force", action="store_true", help="start afresh in a directory that holds another run")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any configuration field")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="draw samples from a run's EMA weights")
    s.add_argument("--run", required=True)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", required=True, help=".png (a grid) or .npz (uint8 [N, H, W, C] under arr_0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--sampler", default="ancestral")
    s.add_argument("--steps", type=int, help="network evaluations for the fast samplers")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    s.add_argument("--class", dest="class_label", type=int, help="class to draw (class-conditional runs)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    s.add_argument("--raw-weights", action="store_true", help="use the raw trained weights instead of the EMA")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    from ddpm.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"ddpm {args.command}: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # CheckpointError, TrainingError among them
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 1
