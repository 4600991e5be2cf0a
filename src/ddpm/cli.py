"""The `ddpm` command: arguments -> configuration dataclasses -> library calls. No math here.

Option names keep one meaning across commands:
    --run     an existing run directory that the command reads (train and convert: the one they write)
    --out     the file or folder that the command creates (never a run directory)
    --steps   train: optimizer steps; sample, eval fid and edit: network evaluations of the sampler
    --n       how many images (samples, results, test images)
Old spellings still accepted: `train --out RUN` and `convert --out RUN` (now --run), `export RUN OUT_DIR`'s
positional folder (now --out), `interpolate --steps` (now --points).

Exit codes: 0 done; 2 a usage or input error (a bad value, a missing or unreadable file, a run that cannot be
resumed as asked), with one line naming the option or the file; 1 a run that failed while working (training
stopped by non-finite steps); 130 / 143 after Ctrl-C / SIGTERM. Inputs are checked before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ddpm.modes import DatasetKind, Precision, Spacing, Task, values

EXIT_USAGE, EXIT_FAILED = 2, 1
SAMPLER_NAMES = ("ancestral", "respaced", "ddim", "dpmpp2m", "heun")  # ddpm.sampling.SAMPLERS (a test holds them equal)
SPACINGS = values(Spacing)  # --spacing's choices (ddpm.modes imports no torch)
PRECISIONS = values(Precision)  # --precision's choices
PRECISION_HELP = "the network's precision: autocast to bf16 (CPU or GPU) or fp16 (GPU); the sampler stays float32"
COMPILE_HELP = "torch.compile the network, on a GPU as CUDA graphs (minutes of compilation first; no gain on a CPU)"


class UsageError(ValueError):
    """A command line that cannot work (a missing file, a bad combination); the message names the option."""


# ---------------------------------------------------------------------------------------------- checks


def _need_file(path: str | None, option: str, what: str) -> Path:
    if not path:
        raise UsageError(f"{option} is required: {what}")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file or folder ({what})")
    return p


def _writable_out(path: str | Path, option: str = "--out") -> Path:
    """`path` can be written: an existing writable file or folder, or its nearest existing parent is a writable
    folder (nothing is created here)."""
    p = Path(path)
    if p.exists():
        if not os.access(p, os.W_OK):
            raise UsageError(f"{option} {path}: cannot write there (not writable)")
        return p
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write there ({parent} is not a writable folder)")
    return p


def _run_dir(path: str, option: str = "--run") -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UsageError(f"{option} {path} is not a run directory (no config.json there)")
    return p


def _parse_sampler_options(items: list[str] | None) -> dict[str, float]:
    """--sampler-option NAME=NUMBER (repeatable) as {NAME: NUMBER}."""
    options = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            options[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--sampler-option takes NAME=NUMBER, e.g. S_churn=40; got {item!r}") from None
    return options


def _sample_options(args: argparse.Namespace):
    from ddpm.generate import SampleOptions

    extra = _parse_sampler_options(args.sampler_option)
    return SampleOptions(sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                         class_label=getattr(args, "class_label", None), guidance=getattr(args, "guidance", 1.0),
                         compile=args.compile, precision=args.precision, extra=extra)


# ---------------------------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace) -> int:
    from ddpm.config import PRESETS, apply_overrides, preset, set_field

    cfg = preset(args.preset)
    if args.data is not None:
        if PRESETS[args.preset].data.dataset == "digits":
            raise UsageError(f"--data: the {args.preset} preset trains on scikit-learn's bundled digits and reads no "
                             "files; to train on your own images use --preset folder --data DIR (see the README)")
        cfg.data.path = args.data
    for flag, field in (("steps", "train.steps"), ("minutes", "train.minutes"), ("batch_size", "train.batch_size"),
                        ("seed", "train.seed"), ("ckpt_every", "train.ckpt_every"), ("task", "data.task"),
                        ("mask", "data.mask")):
        if getattr(args, flag) is not None:
            set_field(cfg, field, getattr(args, flag))
    if args.compile:
        set_field(cfg, "train.compile", True)
    apply_overrides(cfg, args.set or [])
    from ddpm.train import Trainer  # after validation: a bad value fails fast, before torch.nn is touched

    trainer = Trainer(cfg, args.run, resume=args.resume, force=args.force, weights_only=args.weights_only)
    code = trainer.train(progress=not args.quiet)
    if trainer.dist.main and code == 0:
        print(f"trained {cfg.preset} to step {trainer.step}: run directory {args.run}")
    return code


def _sample(args: argparse.Namespace) -> int:
    _run_dir(args.run)
    out = _writable_out(args.out)
    figures = args.progressive or args.share_from
    if not figures and out.suffix not in (".png", ".npz"):
        raise UsageError(f"--out must end in .png or .npz; got {out} (with --progressive or --share-from it is a folder)")
    share = []
    if args.share_from:
        try:
            share = [int(v) for v in args.share_from.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--share-from takes comma-separated timesteps; got {args.share_from!r}") from None
    from ddpm.generate import check_options, sample_to_file
    from ddpm.run import init_distributed, load_run, resolve_device

    d = init_distributed(args.device)
    device = resolve_device(args.device)
    run = load_run(args.run, ema=not args.raw_weights, device=device)
    if figures:
        from ddpm import evaluate

        if args.progressive:
            evaluate.progressive(run, out, n=args.n, seed=args.seed, frames=args.frames, device=device)
            print(f"wrote {out / 'progressive.png'}, {out / 'progressive.gif'} and progressive.json")
        if share:
            evaluate.share_from(run, out, share, k=args.n, seed=args.seed, device=device)
            print(f"wrote {out / 'share_from.png'} and share_from.json")
        return 0
    opts = _sample_options(args)
    check_options(run, opts, device)
    sample_to_file(run, args.n, out, seed=args.seed, batch_size=_batch_size(args, run, device), opts=opts, device=device,
                   rank=d.rank, world=d.world, progress=not args.quiet)  # under OUT.lock: one writer per output
    if d.main:
        print(f"wrote {args.n} samples from {args.run} (step {run.step}, {opts.sampler}) to {out}")
    return 0


def _eval_bound(args: argparse.Namespace) -> int:
    """bpd and rate-distortion: the bound over the run's data set split."""
    _run_dir(args.run)
    out_dir = _writable_out(args.out or Path(args.run) / "eval")
    from ddpm import evaluate
    from ddpm.run import load_run, resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run, device=device)
    fn = evaluate.eval_bpd if args.metric == "bpd" else evaluate.eval_rate_distortion
    report = fn(run, out_dir / args.metric, split=args.split, n=args.n, batch_size=_batch_size(args, run, device),
                seed=args.seed, device=device, data_path=args.data, progress=not args.quiet)
    print(json.dumps(report, indent=2))
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    # every input is checked before a sample is drawn or a folder made
    if bool(args.run) == bool(args.samples):
        raise UsageError("ddpm eval fid needs exactly one of --run RUN (sample from it) or --samples FILE.npz")
    if args.samples:
        samples_path = _need_file(args.samples, "--samples", "an .npz of uint8 images [N, H, W, C] under arr_0")
    else:
        _run_dir(args.run)
    if args.features == "inception":
        _need_file(args.ref, "--ref", "reference images: a folder, an .npz of uint8 [N, H, W, C] or a CIFAR-10 archive")
        _need_file(args.inception_weights, "--inception-weights",
                   "the FID Inception weights file (README: FID without downloads)")
    fashion_data = _fashion_data(args) if args.features == "fashion" else None
    default_out = Path(args.run) / "eval" if args.run else samples_path.parent / "eval"
    out_dir = _writable_out(args.out or default_out)
    import numpy as np

    from ddpm.generate import check_options, sample_to_file
    from ddpm.run import load_run, resolve_device

    device = resolve_device(args.device)
    if args.run:
        run = load_run(args.run, device=device)
        opts = _sample_options(args)
        check_options(run, opts, device)
        samples_path = out_dir / f"samples_{args.n}_seed{args.seed}.npz"
        if not samples_path.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            sample_to_file(run, args.n, samples_path, seed=args.seed, batch_size=_batch_size(args, run, device),
                           opts=opts, device=device, progress=not args.quiet)
    try:
        samples = np.load(samples_path)["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--samples {samples_path}: not an .npz of images under arr_0 ({e})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.features == "digits":
        from ddpm.metrics.digits import evaluate_digits

        rep = evaluate_digits(samples)
        report = {"samples": str(samples_path), "n": int(samples.shape[0]), **_asdict(rep)}
        name = "fid_digits.json"
    elif args.features == "fashion":
        import torch

        from ddpm.data import to_model_range
        from ddpm.images import save_grid
        from ddpm.metrics.fashion import evaluate_fashion

        rep = evaluate_fashion(samples, fashion_data)
        report = {"samples": str(samples_path), "data": fashion_data, **_asdict(rep)}
        name = "fid_fashion.json"
        save_grid(to_model_range(torch.from_numpy(samples[:64]).permute(0, 3, 1, 2)), out_dir / "fid_fashion.png")
    else:
        from ddpm.metrics.inception import fidelity_metrics

        rep = fidelity_metrics(samples, args.ref, inception_weights=args.inception_weights,
                               cache_dir=out_dir / "ref_stats", batch_size=args.batch_size or 64, device=str(device))
        report = {"samples": str(samples_path), "ref": args.ref, **_asdict(rep)}
        name = "fid.json"
    (out_dir / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _fashion_data(args: argparse.Namespace) -> str:
    """--features fashion: the Fashion-MNIST folder (--data, else the run's data.path), its four files checked."""
    from ddpm.config import Config
    from ddpm.data import idx_files

    cfg = Config.load(Path(args.run) / "config.json") if args.run else None
    if cfg is not None and (cfg.model.in_channels, cfg.model.resolution) != (1, 28):
        raise UsageError(f"--features fashion scores 1-channel 28x28 images; --run {args.run} makes "
                         f"{cfg.model.in_channels}-channel {cfg.model.resolution}x{cfg.model.resolution} ones")
    path = args.data or (cfg.data.path if cfg is not None and cfg.data.dataset is DatasetKind.IDX else None)
    if not path:
        raise UsageError("--features fashion needs the Fashion-MNIST IDX folder: pass --data DIR"
                         + (f" (--run {args.run} trained on no IDX data.path)" if args.run else ""))
    try:
        for split in ("train", "test"):
            idx_files(path, split)
    except FileNotFoundError as e:
        raise UsageError(f"--data {path}: {e}") from None
    return str(path)


def _asdict(obj) -> dict:
    import dataclasses

    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dataclasses.asdict(obj).items()}


def _interpolate(args: argparse.Namespace) -> int:
    _run_dir(args.run)
    a, b = _need_file(args.a, "--a", "the first image"), _need_file(args.b, "--b", "the second image")
    out = _writable_out(args.out)
    from ddpm import evaluate
    from ddpm.images import read_input_image
    from ddpm.run import load_run, resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run, device=device)
    m = run.config.model
    a_u8 = read_input_image(a, m.resolution, m.in_channels, "--a")
    b_u8 = read_input_image(b, m.resolution, m.in_channels, "--b")
    info = evaluate.interpolate(run, out, a_u8, b_u8, t=args.t, steps=args.points, seed=args.seed, device=device)
    print(json.dumps(info, indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    _need_file(args.from_path, "--from", "a diffusers model folder or a port .ckpt/.pth file")
    _writable_out(args.run, "--run")
    from ddpm.convert import write_run

    path = write_run(args.from_path, args.run, preset_name=args.preset, step=args.step, resolution=args.resolution,
                     force=args.force)
    print(f"converted {args.from_path} into run directory {args.run} ({path.name})")
    return 0


def _export(args: argparse.Namespace) -> int:
    _run_dir(args.run)
    out = args.out or args.out_dir
    if not out:
        raise UsageError("--out is required: the diffusers pipeline folder to write")
    _writable_out(out)
    from ddpm.convert import export_diffusers, scheduler_config_for
    from ddpm.run import load_run

    run = load_run(args.run, ema=not args.raw_weights)
    path = export_diffusers(run.model, out, scheduler_config_for(run.config.diffusion))
    print(f"wrote a diffusers DDPMPipeline folder to {path}")
    return 0


def _inpaint_or_edit(args: argparse.Namespace) -> int:
    _run_dir(args.run)
    image_path = _need_file(args.image, "--image", "the image file")
    mask_path = _need_file(args.mask, "--mask", "white where the pixel is known") if args.command == "inpaint" else None
    out = _writable_out(args.out)
    if out.suffix != ".png":
        raise UsageError(f"--out must end in .png; got {out}")
    import torch

    from ddpm.data import to_model_range
    from ddpm.images import read_input_image, save_grid
    from ddpm.run import load_run, resolve_device, sample_generator
    from ddpm.sampling import check_sampler, edit, inpaint

    if args.command == "edit":
        check_sampler(args.sampler, args.steps)
    device = resolve_device(args.device)
    run = load_run(args.run, device=device)
    m = run.config.model
    image = to_model_range(read_input_image(image_path, m.resolution, m.in_channels))[None].to(device)
    known = read_input_image(mask_path, m.resolution, 1, "--mask", like=f"--image {image_path}") \
        if args.command == "inpaint" else None  # white = known; checked with the image, before any work
    x = image.expand(args.n, -1, -1, -1)
    gens = sample_generator(args.seed, args.command, range(args.n), device)
    model = run.conditioned(batch=args.n)  # class-conditional runs: the null label
    if args.command == "inpaint":
        mask = known.to(device).float()[None] / 255.0
        mask = (mask > 0.5).to(x.dtype).expand(args.n, m.in_channels, -1, -1)
        result = inpaint(run.diffusion, model, x, mask, generator=gens, resample=args.resample)
    else:
        result = edit(run.diffusion, model, x, args.t, sampler=args.sampler, steps=args.steps, generator=gens)
    path = save_grid(torch.cat([image, result]), out, nrow=args.n + 1)
    print(f"wrote {path}: the input, then {args.n} results")
    return 0


def _images_out(path: str) -> Path:
    out = _writable_out(path)
    if out.suffix not in (".png", ".npz"):
        raise UsageError(f"--out must end in .npz (uint8 [N, H, W, C] under arr_0) or .png; got {out}")
    return out


def _mask(arg: str | None, task: str, resolution: int):
    """--mask: None, a named mask, or a mask image (white = known) -> uint8 [1, R, R] tensor; checked here."""
    from ddpm.restoration import MASKS

    if arg is None or arg in MASKS:
        return arg
    if task != "inpaint":
        raise UsageError(f"--mask applies to --task inpaint only, not {task}")
    path = _need_file(arg, "--mask", f"{' or '.join(MASKS)}, or a mask image: white where the pixel is known")
    from ddpm.images import read_input_image

    return (read_input_image(path, resolution, 1, "--mask").float() / 255.0 > 0.5).float()


def _operator(task: str, shape: tuple[int, int, int], mask, where: str):
    from ddpm.restoration import operator

    try:
        return operator(task, shape, mask)
    except ValueError as e:
        raise UsageError(f"--task {task} {where}: {e}") from None


def _degrade(args: argparse.Namespace) -> int:
    src = _need_file(args.input, "--input", "clean images: a PNG, a folder of PNGs or an .npz of uint8 [N, H, W, C]")
    out = _images_out(args.out)
    if args.noise < 0:
        raise UsageError(f"--noise must be >= 0; got {args.noise}")
    import torch

    from ddpm.data import to_model_range
    from ddpm.images import read_images, write_images

    images = read_images(src)
    c, h, w = images.shape[1:]
    op = _operator(args.task, (c, h, w), _mask(args.mask, args.task, h), f"on --input {src} ({h}x{w}, {c} channels)")
    y = op.A(to_model_range(images).double())
    if args.noise > 0:  # y = A x + sigma n, in the model's [-1, 1] units
        y = y + args.noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(args.seed), dtype=y.dtype)
    path = write_images(y.float(), out)
    print(f"wrote {images.shape[0]} degraded images ({args.task}, {list(y.shape[1:])} each) to {path}")
    return 0


def _restore_sampler_options(args: argparse.Namespace) -> dict:
    """`ddpm restore`'s --sampler-option NAME=NUMBER as heun's options, refusing them for DDNM's own steps and
    refusing time travel with heun (usage errors naming the option)."""
    from ddpm.sampling import check_sampler

    options = _parse_sampler_options(args.sampler_option)
    if args.sampler != "heun":
        if options:
            raise UsageError(f"--sampler-option {', '.join(options)}: options of --sampler heun (S_churn, S_tmin, "
                             "S_tmax, S_noise); DDNM's own steps take --eta")
        return options
    try:
        check_sampler("heun", options=options)
    except ValueError as e:
        raise UsageError(f"--sampler-option: {e}") from None
    travel = [o for o, v in (("--travel-length", args.travel_length), ("--travel-repeat", args.travel_repeat)) if v != 1]
    if travel:
        raise UsageError(f"{', '.join(travel)}: time travel runs on DDNM's own steps (--sampler ddim), not heun")
    if args.steps is not None and args.steps < 2:
        raise UsageError(f"--steps {args.steps}: --sampler heun needs 2 or more grid points")
    return options


def _restore(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args.run)
    src = _need_file(args.input, "--input", "degraded images: a PNG, a folder of PNGs or an .npz of uint8 "
                                           "[N, h, w, C] at the degraded size")
    out = _images_out(args.out)
    for name, v in (("--travel-length", args.travel_length),
                    ("--travel-repeat", args.travel_repeat)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1; got {v}")
    if args.noise is not None and args.noise < 0:
        raise UsageError(f"--noise must be >= 0; got {args.noise}")
    if args.eta < 0 or (args.eta_rule == "ddnm" and args.eta > 1):
        raise UsageError(("--eta must lie in [0, 1] with --eta-rule ddnm" if args.eta_rule == "ddnm" else
                          "--eta must be >= 0") + f"; got {args.eta}")
    if args.eta_rule != "ddim" and args.sampler == "heun":
        raise UsageError("--eta-rule: an option of DDNM's own steps (--sampler ddim); heun's noise is S_churn's")
    if args.t_start is not None and args.sampler == "heun":
        raise UsageError("--t-start: an option of DDNM's own steps (--sampler ddim); heun starts from noise")
    sampler_options = _restore_sampler_options(args)
    from ddpm.config import Config

    cfg = Config.load(run_dir / "config.json")
    R, C, T = cfg.model.resolution, cfg.model.in_channels, cfg.diffusion.num_timesteps
    if args.steps is not None and not 1 <= args.steps <= T:
        raise UsageError(f"--steps must lie in 1..{T} (the run's timesteps); got {args.steps}")
    if args.t_start is not None and not 1 <= args.t_start <= T - 1:
        raise UsageError(f"--t-start must lie in 1..{T - 1} (the run's timesteps); got {args.t_start}")
    if args.t_start is not None and args.steps is not None and args.steps > args.t_start + 1:
        raise UsageError(f"--steps {args.steps} with --t-start {args.t_start}: at most {args.t_start + 1} steps lie "
                         f"in 0..{args.t_start}")
    trained = cfg.data.task
    if trained is None:  # DDNM: any task, the default grid 100 steps
        if args.task is None:
            raise UsageError("--task is required for an unconditional run: the degradation to undo (e.g. sr4)")
        task, mask = args.task, _mask(args.mask, args.task, R)
        steps = min(args.steps, T) if args.steps is not None else min(100, T if args.t_start is None else args.t_start + 1)
    else:  # trained on pairs: its own task, ancestral over all T unless --steps
        if args.task is not None and args.task != trained:
            raise UsageError(f"--task {args.task}: --run {args.run} was trained on {trained} pairs (data.task) and "
                             f"restores {trained} inputs only (an unconditional run restores any task with DDNM)")
        ddnm_only = [o for o, v, d in (("--noise", args.noise or 0.0, 0.0), ("--travel-length", args.travel_length, 1),
                                       ("--travel-repeat", args.travel_repeat, 1), ("--eta-rule", args.eta_rule, "ddim"),
                                       ("--t-start", args.t_start, None))
                     if v != d]
        if ddnm_only and not args.consistent:
            raise UsageError(f"{', '.join(ddnm_only)}: DDNM's options, for unconditional runs or with --consistent; "
                             f"--run {args.run} was trained on {trained} pairs and samples with its condition "
                             "(--steps, --eta)")
        if args.mask is not None and args.mask != cfg.data.mask:
            raise UsageError(f"--mask {args.mask}: --run {args.run} was trained with the mask {cfg.data.mask!r} "
                             "(data.mask) and restores with that one only")
        task, mask, steps = trained.value, cfg.data.mask, args.steps
    op = _operator(task, (C, R, R), mask, f"on --run {args.run} ({R}x{R}, {C} channel{'s' if C > 1 else ''})")
    from ddpm.images import check_images, read_images

    dc, dh, dw = op.degraded_shape(op.shape)
    images = read_images(src, channels=dc)
    why = f"--task {task} on --run {args.run} ({R}x{R}" + (", trained on its pairs)" if trained else ")")
    check_images(images, (dc, dh, dw), src, "--input", why)
    from ddpm.generate import RestoreOptions, restore_to_file
    from ddpm.run import load_run, resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run, device=device, conditional=True)
    from ddpm.restoration import default_noise, travel_moves

    ddnm_steps = trained is None or args.consistent
    noise = (default_noise(task) if args.noise is None else args.noise) if ddnm_steps else 0.0
    heun = args.sampler == "heun"
    if heun:
        if noise > 0:
            why = f"--noise {noise:.2g}" if args.noise is not None else \
                f"--task {task} assumes the 8-bit rounding's noise ({noise:.2g}; --noise 0 to take y as exact)"
            raise UsageError(f"--sampler heun takes noiseless inputs only, and {why}: DDNM+ for noisy inputs "
                             "runs on DDNM's own steps (--sampler ddim)")
        steps = args.steps if args.steps is not None else 50
    opts = RestoreOptions(steps=steps, eta=args.eta, eta_rule=args.eta_rule, sigma_y=noise, t_start=args.t_start,
                          travel_length=args.travel_length, travel_repeat=args.travel_repeat,
                          consistent=args.consistent and trained is not None, sampler=args.sampler,
                          sampler_options=sampler_options)
    report = restore_to_file(run, op, images, out, seed=args.seed, batch_size=_batch_size(args, run, device),
                             opts=opts, device=device, progress=not args.quiet)
    how = f"DDNM, {steps} steps" if trained is None else \
        f"conditional with DDNM's steps, {T if steps is None else steps} steps" if args.consistent else \
        f"conditional, {'ancestral, ' + str(T) if steps is None else 'DDIM, ' + str(steps)} steps"
    if heun:
        churn = "".join(f", {k} {v:g}" for k, v in sampler_options.items())
        how = ("DDNM" if trained is None else "conditional with DDNM's projection" if args.consistent else "conditional") \
            + f" in Heun's sampler, {steps} grid points ({2 * steps - 1} network evaluations{churn})"
    if ddnm_steps and not heun and (args.eta != 1.0 or args.eta_rule != "ddim"):
        how += f", eta {args.eta:g}" + (" by DDNM's code's rule" if args.eta_rule == "ddnm" else "")
    if args.t_start is not None:
        how += f", from A+ y noised to t = {args.t_start}"
    if noise > 0:
        how += f", DDNM+ for input noise of std {noise:.2g}" + (" (8-bit rounding's)" if args.noise is None else "")
    if opts.travel_length > 1 or opts.travel_repeat > 1:
        evals = sum(q < p for p, q in travel_moves(T if steps is None else steps, opts.travel_length, opts.travel_repeat))
        how += f", time travel: {evals} network evaluations"
    tail = "" if report.worst is None else \
        f"; max |A x - y| = {report.worst:.2e} before rounding to 8 bits (over the {report.restored} made now)"
    print(f"wrote {report.n} restored images ({task}, {how}) to {report.path}{tail}")
    return 0


# ---------------------------------------------------------------------------------------------- the parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every default, without "(default: None)" for options that have none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _add_run(p: argparse.ArgumentParser, what: str, *extra: str, required: bool = True) -> None:
    p.add_argument("--run", "--run-dir", *extra, dest="run", required=required, metavar="RUN",
                   help=f"{what} (under torchrun spell it --run-dir: torchrun takes --run for its own --run-path)")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {v}")
    return v


BATCH_HELP = ("images per network call (default: chosen for the machine and the image size, "
              "ddpm.runtime.default_batch_size: 256 for 8x8 images on 2 CPU threads, 64 from 28x28 up)")


def _batch_size(args: argparse.Namespace, run, device) -> int:
    """--batch-size, or the machine's default for the run's images."""
    from ddpm.runtime import default_batch_size

    if args.batch_size is not None:
        return args.batch_size
    return default_batch_size(run.config.model.resolution ** 2, device)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")


def _add_sampler(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--sampler", default="ancestral", choices=SAMPLER_NAMES,
                   help=f"{what}ancestral (the paper's 1000 steps), respaced (improved DDPM), ddim, dpmpp2m "
                        "(DPM-Solver++(2M)), heun (EDM's second order: --steps grid points cost 2 x steps - 1 "
                        "evaluations)")
    p.add_argument("--steps", type=int, help=f"{what}network evaluations of the fast samplers (default: every timestep)")
    p.add_argument("--eta", type=float, help=f"{what}DDIM's eta (default 0: deterministic; 1: stochastic)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help=f"{what}the timestep grid: ddim and respaced take uniform (their default), quad (denser "
                        "near t = 0) or trailing (from T down, for zero terminal SNR); dpmpp2m runs on logsnr; heun "
                        "on karras (its default), uniform or trailing")
    p.add_argument("--sampler-option", action="append", metavar="NAME=NUMBER",
                   help=f"{what}another option of the sampler, e.g. heun's S_churn=40, S_tmin, S_tmax, S_noise "
                        "(repeatable; an option the sampler does not take is an error)")


def build_parser() -> argparse.ArgumentParser:
    from ddpm.config import PRESETS

    p = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020).",
                                epilog="`ddpm COMMAND --help` for each command's options and defaults.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what, description=what, formatter_class=_Formatter, **kwargs)

    t = command("train", "train a model (default: the digits preset on the CPU, a few minutes)")
    t.add_argument("--preset", default="digits", choices=list(PRESETS), help="the recipe")
    _add_run(t, "the run directory to write (config.json, checkpoints/, tb/, grids/, log.jsonl)", "--out")
    t.add_argument("--data", help="dataset path: CIFAR-10 archive or folder, a folder of images, an LSUN LMDB "
                                  "(the digits preset takes none)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's, train.steps)")
    t.add_argument("--minutes", type=float, help="also stop after this many minutes of training, then checkpoint "
                   "and draw the final grid as at the last step (train.minutes; --resume continues)")
    t.add_argument("--batch-size", type=int, help="global batch size, split across ranks (default: the preset's)")
    t.add_argument("--seed", type=int, help="seeds weights, data order, t and noise (default: train.seed, 0)")
    t.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default: the preset's)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    t.add_argument("--weights-only", action="store_true", help="with --resume: accept a checkpoint without optimizer state")
    t.add_argument("--force", action="store_true", help="start afresh in a directory that holds another run "
                                                         "(its files are moved to RUN/replaced/)")
    t.add_argument("--task", choices=values(Task),
                   help="train on pairs (SR3): each batch degraded by this task's operator, as `ddpm degrade`, "
                        "the network conditioned on it (data.task); restore with `ddpm restore`")
    t.add_argument("--mask", choices=("center", "half"), help="with --task inpaint: the hidden region (data.mask)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the network (train.compile; minutes of compilation first, no gain on a CPU)")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override any configuration field, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    s = command("sample", "draw samples from a run's EMA weights")
    _add_run(s, "the run directory (the sampler settings come from it)")
    s.add_argument("--n", "--num-samples", dest="n", type=int, default=64,
                   help="how many (under torchrun spell it --num-samples: torchrun takes --n for one of its options)")
    s.add_argument("--out", required=True, help=".png (a grid) or .npz (uint8 [N, H, W, C] under arr_0); with "
                                                "--progressive or --share-from a folder")
    s.add_argument("--seed", type=int, default=0, help="sample i's noise depends on (seed, i) alone")
    s.add_argument("--batch-size", type=_positive_int, help=BATCH_HELP)
    _add_sampler(s)
    s.add_argument("--class", dest="class_label", type=int, help="class to draw (class-conditional runs)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale, with --class "
                                                               "(1: the plain conditional model)")
    s.add_argument("--raw-weights", action="store_true", help="use the raw trained weights instead of the EMA")
    s.add_argument("--progressive", action="store_true",
                   help="Figure 6: predicted x_0 along one reverse run (--out is a folder; --n samples)")
    s.add_argument("--frames", type=int, default=10, help="with --progressive: how many steps to show")
    s.add_argument("--share-from", metavar="T1,T2,...",
                   help="Figure 7: --n samples sharing x_t for each listed 0-based timestep, e.g. 999,750,500,250 "
                        "(--out is a folder)")
    s.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    _add_device(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_sample)

    e = command("eval", "the paper's evaluations: fid, bpd, rate-distortion (`ddpm eval METRIC --help`)")
    metrics = e.add_subparsers(dest="metric", required=True, metavar="METRIC")

    f = metrics.add_parser("fid", formatter_class=_Formatter, help="FID, IS and KID of samples (torch-fidelity)",
                           description="FID, IS and KID of a run's samples, or of an .npz made elsewhere")
    _add_run(f, "the run to sample from (its sampler settings are used)", required=False)
    f.add_argument("--samples", help="instead of --run: an .npz of uint8 images [N, H, W, C] under arr_0")
    f.add_argument("--n", "--num-samples", dest="n", type=int, default=50_000, help="with --run: samples to generate")
    f.add_argument("--ref", help="inception features: reference images (a folder, an .npz of uint8 [N, H, W, C] or "
                                 "the CIFAR-10 archive); statistics are cached")
    f.add_argument("--inception-weights", help="inception features: the local FID Inception weights file")
    f.add_argument("--features", choices=["inception", "digits", "fashion"], default="inception",
                   help="inception (FID/IS/KID), digits or fashion (a classifier's Frechet distance, precision and "
                        "recall; needs no --ref)")
    f.add_argument("--data", help="fashion features: the Fashion-MNIST IDX folder (default: the run's data.path)")
    f.add_argument("--out", help="output folder (default: RUN/eval, or eval/ beside --samples)")
    f.add_argument("--batch-size", type=_positive_int, help=BATCH_HELP)
    f.add_argument("--seed", type=int, default=0, help="with --run: the sampling seed")
    _add_sampler(f, "with --run: ")
    f.add_argument("--compile", action="store_true", help="with --run: " + COMPILE_HELP)
    f.add_argument("--precision", choices=PRECISIONS, default="fp32", help="with --run: " + PRECISION_HELP)
    _add_device(f)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_eval_fid)

    for name, what in (("bpd", "Table 2: the test-set NLL bound in bits/dim, with its terms per t"),
                       ("rate-distortion", "Figure 5: rate and distortion of progressive lossy compression")):
        b = metrics.add_parser(name, formatter_class=_Formatter, help=what, description=what)
        _add_run(b, "the run directory")
        b.add_argument("--split", default="test", choices=["train", "test"], help="the data set split")
        b.add_argument("--n", "--num-samples", dest="n", type=int, help="the first N images (default: all)")
        b.add_argument("--data", help="dataset path when it differs from the run's data.path")
        b.add_argument("--out", help="output folder (default: RUN/eval)")
        b.add_argument("--batch-size", type=_positive_int, help=BATCH_HELP)
        b.add_argument("--seed", type=int, default=0, help="image i's noise depends on (seed, i) alone")
        _add_device(b)
        b.add_argument("--quiet", action="store_true", help="no progress bar")
        b.set_defaults(func=_eval_bound)

    i = command("interpolate", "Figure 8: interpolate two images through x_t")
    _add_run(i, "the run directory")
    i.add_argument("--a", required=True, help="first image file")
    i.add_argument("--b", required=True, help="second image file")
    i.add_argument("--t", type=int, default=500, help="encoding timestep (0-based)")
    i.add_argument("--points", "--steps", dest="points", type=int, default=8,
                   help="interpolation points (--steps is the old spelling)")
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--seed", type=int, default=0, help="the encoding and decoding noise")
    _add_device(i)
    i.set_defaults(func=_interpolate)

    for name, what in (("inpaint", "fill the unknown pixels of an image (RePaint)"),
                       ("edit", "noise an image to t and denoise it (SDEdit)")):
        q = command(name, what)
        _add_run(q, "the run directory")
        q.add_argument("--image", required=True, help="the image file")
        if name == "inpaint":
            q.add_argument("--mask", required=True, help="mask image: white where the pixel is known, black to fill")
            q.add_argument("--resample", type=int, default=10, help="RePaint resampling rounds per step")
        else:
            q.add_argument("--t", type=int, default=500, help="noise level to edit from (0-based timestep)")
            q.add_argument("--sampler", default="ancestral", choices=SAMPLER_NAMES, help="the reverse process")
            q.add_argument("--steps", type=int, help="network evaluations of the fast samplers (default: every "
                                                     "timestep up to --t)")
        q.add_argument("--n", type=int, default=4, help="how many results")
        q.add_argument("--out", required=True, help="PNG grid: the input, then the results")
        q.add_argument("--seed", type=int, default=0, help="result i's noise depends on (seed, i) alone")
        _add_device(q)
        q.set_defaults(func=_inpaint_or_edit)

    tasks = values(Task)
    mask_help = "inpaint: center (hide the central square), half (hide the right half), or a mask image (white = known)"
    g = command("degrade", "apply a task's degradation A to clean images (to make pairs, or inputs for restore)")
    g.add_argument("--task", required=True, choices=tasks,
                   help="sr2/sr4/sr8 (k x k average pooling), colorize (channel mean), inpaint (a mask), deblur "
                        "(circular Gaussian blur, std 1.5 pixels)")
    g.add_argument("--input", required=True, help="clean images: a PNG, a folder of PNGs or an .npz of uint8 "
                                                  "[N, H, W, C] under arr_0")
    g.add_argument("--out", required=True, help=".npz (uint8 [N, h, w, C] under arr_0) or .png (one image as it is, "
                                                "several as a grid)")
    g.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to A x, in the [-1, 1] units")
    g.add_argument("--mask", help=mask_help)
    g.add_argument("--seed", type=int, default=0, help="the noise's seed")
    g.set_defaults(func=_degrade)

    r = command("restore", "undo a degradation: with an unconditional run by DDNM (training-free null-space method), "
                           "with a run trained on pairs (ddpm train --task) by sampling with its condition")
    _add_run(r, "the run directory")
    r.add_argument("--input", required=True, help="degraded images at the degraded size: a PNG, a folder of PNGs or "
                                                  "an .npz of uint8 [N, h, w, C] under arr_0 (sr4 on 28x28: 7x7)")
    r.add_argument("--out", required=True, help=".npz (uint8 [N, H, W, C] at the run's size) or .png; an interrupted "
                                                "restore continues from OUT.parts/")
    r.add_argument("--task", choices=tasks, help="the degradation the input went through (as `ddpm degrade`); a run "
                                                 "trained on pairs: its own task (default)")
    r.add_argument("--mask", help=mask_help)
    r.add_argument("--steps", type=int, help="network evaluations (uniform grid; default: 100, or every timestep "
                                             "when the run has fewer; a run trained on pairs: ancestral over every "
                                             "timestep, --steps K: DDIM on K)")
    r.add_argument("--sampler", default="ddim", choices=("ddim", "heun"),
                   help="ddim: DDNM's own steps (with --eta, --noise and time travel); heun: DDNM's projection inside "
                        "EDM's Heun sampler on its Karras grid, --steps grid points (default 50) costing 2 x steps "
                        "- 1 network evaluations, noiseless inputs only")
    r.add_argument("--sampler-option", action="append", metavar="NAME=NUMBER",
                   help="an option of --sampler heun: S_churn=10, S_tmin, S_tmax, S_noise (repeatable)")
    r.add_argument("--eta", type=float, default=1.0,
                   help="the fresh noise of each step, by --eta-rule (ddim: 1 is q(x_s | x_t, x0), DDNM's Algorithm 1)")
    r.add_argument("--eta-rule", default="ddim", choices=("ddim", "ddnm"),
                   help="DDNM's steps: ddim (sigma = eta x the posterior's std, DDIM's eq. 16) or ddnm (sigma = eta "
                        "x sqrt(1 - abar_s), eta in [0, 1]: DDNM's released code, which uses 0.85)")
    r.add_argument("--noise", type=float,
                   help="std of the noise in the input, in [-1, 1] units (DDNM+; 0: exact consistency). Default: "
                        "for deblur the 8-bit rounding's, 0.0023, which the blur's inverse would amplify up to "
                        "1000x; for the other tasks 0"),
    r.add_argument("--t-start", type=int, metavar="K",
                   help="DDNM's steps: start at timestep K (below the run's T - 1) from the input's A+ y noised to "
                        "it, with the --steps grid points in 0..K (Chung et al. 2022's shortcut; default: from "
                        "noise at T - 1)")
    r.add_argument("--travel-length", type=int, default=1, help="time travel: jump back this many grid points")
    r.add_argument("--travel-repeat", type=int, default=1, help="time travel: walk each stretch this many times")
    r.add_argument("--consistent", action="store_true",
                   help="a run trained on pairs: sample with DDNM's steps (its x0 projected onto A x = y at every "
                        "step), so that the output agrees with the input; DDNM's --noise and time travel apply. "
                        "An unconditional run is always consistent")
    r.add_argument("--seed", type=int, default=0, help="image i's noise depends on (seed, i) alone")
    r.add_argument("--batch-size", type=_positive_int, help=BATCH_HELP)
    _add_device(r)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_restore)

    c = command("convert", "released weights (diffusers folder or the PyTorch port) -> a run directory")
    c.add_argument("--from", dest="from_path", required=True, help="diffusers model/pipeline folder, or a port .ckpt/.pth")
    _add_run(c, "the run directory to create", "--out")
    c.add_argument("--preset", help="recipe whose diffusion settings apply (default: cifar10 for 32x32, "
                   "lsun-church for 256x256)")
    c.add_argument("--resolution", type=int, help="port files: the image size (default: inferred, the first "
                                                  "attention level taken as 16x16)")
    c.add_argument("--step", type=int, default=0, help="training step to record (e.g. 790000)")
    c.add_argument("--force", action="store_true", help="replace a run already in the directory")
    c.set_defaults(func=_convert)

    x = command("export", "a run -> a diffusers DDPMPipeline folder")
    _add_run(x, "the run directory")
    x.add_argument("--to", default="diffusers", choices=["diffusers"], help="the format")
    x.add_argument("--out", help="the pipeline folder to write")
    x.add_argument("out_dir", nargs="?", help=argparse.SUPPRESS)  # the old positional spelling of --out
    x.add_argument("--raw-weights", action="store_true", help="export the raw trained weights instead of the EMA")
    x.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from ddpm.config import ConfigError

    args = build_parser().parse_args(argv)
    from ddpm.runtime import keep_freed_memory

    keep_freed_memory()  # large tensors reused without page faults (see there); DDPM_KEEP_FREED_MEMORY=0: off
    name = args.command + (f" {args.metric}" if args.command == "eval" else "")
    from ddpm.images import ImageMismatchError
    from ddpm.lock import LockedError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"ddpm {name}: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (LockedError, ImageMismatchError) as e:  # refused before any work: another writer, an unfit input
        print(f"ddpm {name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:  # missing or unreadable files, bad values (ConversionError too)
        print(f"ddpm {name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        from ddpm.checkpoint import CheckpointError
        from ddpm.train import TrainingDiverged, TrainingError

        if not isinstance(e, (CheckpointError, TrainingError)):
            raise
        print(f"ddpm {name}: error: {e}", file=sys.stderr)
        return EXIT_FAILED if isinstance(e, TrainingDiverged) else EXIT_USAGE
