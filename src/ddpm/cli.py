"""The `ddpm` command: arguments -> configuration dataclasses -> library calls. No math here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
SPACINGS = ("uniform", "quad", "logsnr")  # ddpm.sampling.SPACINGS, spelled here so that parsing imports no torch
PRECISIONS = ("fp32", "bf16", "fp16")  # ddpm.run.AMP_DTYPES
PRECISION_HELP = "the network's precision: autocast to bf16 (CPU or GPU) or fp16 (GPU); the sampler stays float32"
COMPILE_HELP = "torch.compile the network, on a GPU as CUDA graphs (minutes of compilation first; no gain on a CPU)"


def _train(args: argparse.Namespace) -> int:
    from ddpm.config import apply_overrides, preset, set_field

    cfg = preset(args.preset)
    if args.data is not None:
        cfg.data.path = args.data
    for flag, field in (("steps", "train.steps"), ("batch_size", "train.batch_size"), ("seed", "train.seed"),
                        ("ckpt_every", "train.ckpt_every")):
        if getattr(args, flag) is not None:
            set_field(cfg, field, getattr(args, flag))
    if args.compile:
        set_field(cfg, "train.compile", True)
    apply_overrides(cfg, args.set or [])
    from ddpm.train import Trainer  # after validation: a bad value fails fast, before torch.nn is touched

    trainer = Trainer(cfg, args.out, resume=args.resume, force=args.force, weights_only=args.weights_only)
    code = trainer.train(progress=not args.quiet)
    if trainer.dist.main and code == 0:
        print(f"trained {cfg.preset} to step {trainer.step}: run directory {args.out}")
    return code


def _sample(args: argparse.Namespace) -> int:
    from ddpm.generate import SampleOptions, sample_to_file
    from ddpm.run import init_distributed, load_run, resolve_device

    d = init_distributed(args.device)
    device = resolve_device(args.device)
    run = load_run(args.run, ema=not args.raw_weights, device=device)
    if args.progressive or args.share_from:
        from ddpm import evaluate

        out_dir = Path(args.out)
        if args.progressive:
            evaluate.progressive(run, out_dir, n=args.n, seed=args.seed, frames=args.frames, device=device)
            print(f"wrote {out_dir / 'progressive.png'}, {out_dir / 'progressive.gif'} and progressive.json")
        if args.share_from:
            ts = [int(v) for v in args.share_from.split(",") if v.strip()]
            evaluate.share_from(run, out_dir, ts, k=args.n, seed=args.seed, device=device)
            print(f"wrote {out_dir / 'share_from.png'} and share_from.json")
        return 0
    opts = SampleOptions(sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                         class_label=args.class_label, guidance=args.guidance, compile=args.compile,
                         precision=args.precision)
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz; got {out}")
    sample_to_file(run, args.n, out, seed=args.seed, batch_size=args.batch_size, opts=opts, device=device,
                   rank=d.rank, world=d.world, progress=not args.quiet)  # under OUT.lock: one writer per output
    if d.main:
        print(f"wrote {args.n} samples from {args.run} (step {run.step}, {opts.sampler}) to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ddpm import evaluate
    from ddpm.run import load_run, resolve_device

    device = resolve_device(args.device)
    out_dir = Path(args.out) if args.out else Path(args.run) / "eval"
    if args.metric == "fid":
        return _eval_fid(args, out_dir, device)
    run = load_run(args.run, device=device)
    fn = evaluate.eval_bpd if args.metric == "bpd" else evaluate.eval_rate_distortion
    report = fn(run, out_dir / args.metric, split=args.split, n=args.n, batch_size=args.batch_size, seed=args.seed,
                device=device, data_path=args.data, progress=not args.quiet)
    print(json.dumps(report, indent=2))
    return 0


def _eval_fid(args: argparse.Namespace, out_dir: Path, device) -> int:
    import numpy as np

    from ddpm.generate import SampleOptions, sample_to_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if args.samples:
        samples_path = Path(args.samples)
    else:
        from ddpm.run import load_run

        if not args.run:
            raise ValueError("ddpm eval fid needs --run RUN_DIR or --samples FILE.npz")
        run = load_run(args.run, device=device)
        n = args.n or 50_000
        samples_path = out_dir / f"samples_{n}_seed{args.seed}.npz"
        if not samples_path.exists():
            opts = SampleOptions(sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                                 compile=args.compile, precision=args.precision)
            sample_to_file(run, n, samples_path, seed=args.seed, batch_size=args.batch_size, opts=opts, device=device,
                           progress=not args.quiet)
    samples = np.load(samples_path)["arr_0"]
    if args.features == "digits":
        from ddpm.metrics.digits import evaluate_digits

        rep = evaluate_digits(samples)
        report = {"samples": str(samples_path), "n": int(samples.shape[0]), **_asdict(rep)}
        name = "fid_digits.json"
    else:
        from ddpm.metrics.inception import fidelity_metrics

        if not args.ref:
            raise ValueError("ddpm eval fid needs --ref (a folder of reference images or an .npz of uint8 [N, H, W, C])")
        if not args.inception_weights:
            raise ValueError("ddpm eval fid needs --inception-weights PATH (see the README: FID without downloads)")
        rep = fidelity_metrics(samples, args.ref, inception_weights=args.inception_weights,
                               cache_dir=out_dir / "ref_stats", batch_size=args.batch_size, device=str(device))
        report = {"samples": str(samples_path), "ref": args.ref, **_asdict(rep)}
        name = "fid.json"
    (out_dir / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _asdict(obj) -> dict:
    import dataclasses

    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dataclasses.asdict(obj).items()}


def _interpolate(args: argparse.Namespace) -> int:
    from ddpm import evaluate
    from ddpm.images import read_input_image
    from ddpm.run import load_run, resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run, device=device)
    m = run.config.model
    a = read_input_image(args.a, m.resolution, m.in_channels, "--a")
    b = read_input_image(args.b, m.resolution, m.in_channels, "--b")
    info = evaluate.interpolate(run, args.out, a, b, t=args.t, steps=args.steps, seed=args.seed, device=device)
    print(json.dumps(info, indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ddpm.convert import write_run

    path = write_run(args.from_path, args.out, preset_name=args.preset, step=args.step, resolution=args.resolution,
                     force=args.force)
    print(f"converted {args.from_path} into run directory {args.out} ({path.name})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ddpm.convert import export_diffusers, scheduler_config_for
    from ddpm.run import load_run

    if args.to != "diffusers":
        raise ValueError(f"--to must be diffusers; got {args.to}")
    run = load_run(args.run, ema=not args.raw_weights)
    out = export_diffusers(run.model, args.out_dir, scheduler_config_for(run.config.diffusion))
    print(f"wrote a diffusers DDPMPipeline folder to {out}")
    return 0


def _inpaint_or_edit(args: argparse.Namespace) -> int:
    import torch

    from ddpm.data import to_model_range
    from ddpm.images import read_input_image, save_grid
    from ddpm.run import load_run, resolve_device, sample_generator
    from ddpm.sampling import check_sampler, edit, inpaint

    device = resolve_device(args.device)
    if args.command == "edit":
        check_sampler(args.sampler, args.steps)
    run = load_run(args.run, device=device)
    m = run.config.model
    image = to_model_range(read_input_image(args.image, m.resolution, m.in_channels))[None].to(device)
    known = read_input_image(args.mask, m.resolution, 1, "--mask", like=f"--image {args.image}") \
        if args.command == "inpaint" else None  # white = known; checked with the image, before any work
    x = image.expand(args.n, -1, -1, -1)
    gens = sample_generator(args.seed, args.command, range(args.n), device)
    model = run.conditioned(batch=args.n)  # class-conditional runs: the null label
    if args.command == "inpaint":
        mask = known.to(device).float()[None] / 255.0
        mask = (mask > 0.5).to(x.dtype).expand(args.n, m.in_channels, -1, -1)
        out = inpaint(run.diffusion, model, x, mask, generator=gens, resample=args.resample)
    else:
        out = edit(run.diffusion, model, x, args.t, sampler=args.sampler, steps=args.steps, generator=gens)
    path = save_grid(torch.cat([image, out]), args.out, nrow=args.n + 1)
    print(f"wrote {path}: the input, then {args.n} results")
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
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the network (train.compile; minutes of compilation first, no gain on a CPU)")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any configuration field")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="draw samples from a run's EMA weights")
    s.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory (under torchrun spell it --run-dir: torchrun reads --run as its --run-path)")
    s.add_argument("--n", "--num-samples", dest="n", type=int, default=64,
                   help="how many (under torchrun spell it --num-samples: torchrun reads --n as one of its options)")
    s.add_argument("--out", required=True, help=".png (a grid) or .npz (uint8 [N, H, W, C] under arr_0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--sampler", default="ancestral")
    s.add_argument("--steps", type=int, help="network evaluations for the fast samplers")
    s.add_argument("--eta", type=float, help="DDIM's eta (default 0: deterministic)")
    s.add_argument("--spacing", choices=SPACINGS,
                   help="the timestep grid: ddim and respaced take uniform (their default) or quad (denser near "
                        "t = 0); dpmpp2m runs on logsnr")
    s.add_argument("--class", dest="class_label", type=int, help="class to draw (class-conditional runs)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    s.add_argument("--raw-weights", action="store_true", help="use the raw trained weights instead of the EMA")
    s.add_argument("--progressive", action="store_true",
                   help="Figure 6: predicted x_0 along one reverse run (--out is a folder; --n samples)")
    s.add_argument("--frames", type=int, default=10, help="with --progressive: how many steps to show")
    s.add_argument("--share-from", metavar="T1,T2,...",
                   help="Figure 7: --n samples sharing x_t for each listed t (--out is a folder)")
    s.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="the paper's evaluations: fid, bpd, rate-distortion")
    e.add_argument("metric", choices=["fid", "bpd", "rate-distortion"])
    e.add_argument("--run", "--run-dir", dest="run", help="run directory (the sampler settings come from it)")
    e.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    e.add_argument("--n", "--num-samples", dest="n", type=int, help="fid: samples to generate (default 50,000); bpd: test images (default all)")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--data", help="dataset path when it differs from the run's")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--samples", help="fid: an .npz of uint8 images [N, H, W, C] made elsewhere")
    e.add_argument("--ref", help="fid: reference images (folder or .npz); statistics are cached")
    e.add_argument("--inception-weights", help="fid: local file of the FID Inception weights")
    e.add_argument("--features", choices=["inception", "digits"], default="inception")
    e.add_argument("--sampler", default="ancestral")
    e.add_argument("--steps", type=int)
    e.add_argument("--eta", type=float)
    e.add_argument("--spacing", choices=SPACINGS)
    e.add_argument("--compile", action="store_true", help="fid: " + COMPILE_HELP)
    e.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fid: " + PRECISION_HELP)
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval)

    i = sub.add_parser("interpolate", help="Figure 8: interpolate two images through x_t")
    i.add_argument("--run", "--run-dir", dest="run", required=True)
    i.add_argument("--a", required=True, help="first image file")
    i.add_argument("--b", required=True, help="second image file")
    i.add_argument("--t", type=int, default=500, help="encoding timestep (0-based)")
    i.add_argument("--steps", type=int, default=8, help="interpolation points")
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--device", default="auto")
    i.set_defaults(func=_interpolate)

    for name, what in (("inpaint", "fill the unknown pixels of an image (RePaint)"),
                       ("edit", "noise an image to t and denoise it (SDEdit)")):
        q = sub.add_parser(name, help=what)
        q.add_argument("--run", "--run-dir", dest="run", required=True)
        q.add_argument("--image", required=True, help="the image file")
        if name == "inpaint":
            q.add_argument("--mask", required=True, help="mask image: white where the pixel is known, black to fill")
            q.add_argument("--resample", type=int, default=10, help="RePaint resampling rounds per step")
        else:
            q.add_argument("--t", type=int, default=500, help="noise level to edit from (0-based timestep)")
            q.add_argument("--sampler", default="ancestral")
            q.add_argument("--steps", type=int)
        q.add_argument("--n", type=int, default=4, help="how many results")
        q.add_argument("--out", required=True, help="PNG grid: the input, then the results")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto")
        q.set_defaults(func=_inpaint_or_edit)

    c = sub.add_parser("convert", help="released weights (diffusers folder or the PyTorch port) -> a run directory")
    c.add_argument("--from", dest="from_path", required=True, help="diffusers model/pipeline folder, or a port .ckpt/.pth")
    c.add_argument("--out", required=True, help="run directory to create")
    c.add_argument("--preset", help="recipe whose diffusion settings apply (default: cifar10 for 32x32, "
                   "lsun-church for 256x256)")
    c.add_argument("--resolution", type=int, help="port files: the image size (default: inferred, the first attention level taken as 16x16)")
    c.add_argument("--step", type=int, default=0, help="training step to record (e.g. 790000)")
    c.add_argument("--force", action="store_true")
    c.set_defaults(func=_convert)

    x = sub.add_parser("export", help="a run -> a diffusers DDPMPipeline folder")
    x.add_argument("--run", "--run-dir", dest="run", required=True)
    x.add_argument("--to", default="diffusers", choices=["diffusers"])
    x.add_argument("out_dir")
    x.add_argument("--raw-weights", action="store_true")
    x.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from ddpm.config import ConfigError

    args = build_parser().parse_args(argv)
    from ddpm.runtime import keep_freed_memory

    keep_freed_memory()  # large tensors reused without page faults (see there); DDPM_KEEP_FREED_MEMORY=0: off
    from ddpm.images import ImageMismatchError
    from ddpm.lock import LockedError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"ddpm {args.command}: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (LockedError, ImageMismatchError) as e:  # refused before any work: another writer, an unfit input
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:  # missing or unreadable files, bad values (ConversionError too)
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from ddpm.checkpoint import CheckpointError
        from ddpm.train import TrainingError

        if not isinstance(e, (CheckpointError, TrainingError)):
            raise
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 1
