"""Generating many samples from a run: seeded per sample, batched, streamed to disk, resumable, and shared
across torchrun ranks, so that the images are the same whatever the batch size or the number of ranks. The
same machinery restores degraded images (`restore_to_file`): with DDNM for an unconditional run, by sampling
with the condition concatenated for a run trained on pairs (`ddpm.conditional`).

Each finished batch is written at once as `<out>.parts/part_<start>_<end>.npy` (atomically); an interrupted
run skips the parts already on disk, and the final file is assembled from the parts without holding all of
them in memory. The parts folder also holds `job.json` (the run, its step, the seed and options; a restore's
inputs too), and parts of another job are refused rather than continued.

One writer per output: rank 0 holds `<out>.lock` (`ddpm.lock.RunLock`) while the parts and the file are
written, so a second run on the same `out` is refused instead of sharing `<out>.parts/`; `sample_to_file`
holds it from the first sample to the assembled file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddpm.conditional import concatenated, condition
from ddpm.data import to_model_range
from ddpm.images import save_grid, to_nhwc_uint8
from ddpm.nn.compiled import compile_network
from ddpm.restoration import Operator, ddnm, ddnm_heun
from ddpm.run import DistInfo, Run, amp_dtype, lock_for_writing, sample_generator
from ddpm.sampling import check_sampler, run_sampler, timestep_grid


@dataclass
class SampleOptions:
    sampler: str = "ancestral"  # a name in ddpm.sampling.SAMPLERS
    steps: int | None = None  # network evaluations for the fast samplers (None: all T)
    eta: float | None = None  # DDIM's eta (None: the sampler's default, 0)
    spacing: str | None = None  # the timestep grid: a `ddpm.modes.Spacing` value (None: the sampler's default)
    class_label: int | None = None  # class-conditional runs: the class to draw (None: unconditional)
    guidance: float = 1.0  # classifier-free guidance scale (1: plain conditional)
    clip_denoised: bool = True  # clip the predicted x_0 to [-1, 1] at every step, as the paper's sampler
    compile: bool = False  # torch.compile the network, CUDA graphs on a GPU (ddpm.nn.compiled)
    precision: str = "fp32"  # the network's: fp32, or bf16 / fp16 autocast (the sampler's arithmetic stays float32)
    extra: dict[str, float] = field(default_factory=dict)  # the sampler's other options, e.g. heun's S_churn

    def sampler_options(self) -> dict:
        """The options given for the sampler itself (eta when set, and `extra`); SAMPLERS says which it takes."""
        return ({} if self.eta is None else {"eta": self.eta}) | self.extra


def check_options(run: Run, opts: SampleOptions, device: torch.device) -> None:
    """Refuse, before any work, a sampler option the sampler does not take, a class or guidance the run
    cannot use, or a precision the device cannot run (ValueError / ConfigError naming the option)."""
    check_sampler(opts.sampler, opts.steps, opts.spacing, opts.sampler_options())
    run.conditioned(opts.class_label, opts.guidance)
    amp_dtype(opts.precision, device, "precision")


def with_precision(net: Callable, precision: str, device: torch.device) -> Callable:
    """`net` called under autocast at `precision` ("fp32": `net` itself), its output returned in float32, so that
    only the network runs in low precision: the means, variances and noise of every step stay float32."""
    dtype = amp_dtype(precision, device, "precision")
    if dtype is None:
        return net

    def call(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return net(*args, **kwargs).float()

    return call


def sample_batch(run: Run, indices: range, seed: int, opts: SampleOptions, device: torch.device,
                 progress: bool = False, callback=None, net: Callable | None = None) -> torch.Tensor:
    """Samples [len(indices), C, H, W] in [-1, 1] for the given global sample indices. `net`: the network to
    call instead of run.model (generate_to_parts passes the compiled one once for all its batches)."""
    check_options(run, opts, device)
    m = run.config.model
    gens = sample_generator(seed, "sample", indices, device)
    x_T = gens.randn((len(indices), m.in_channels, m.resolution, m.resolution), device)
    if net is None and opts.compile:
        net = compile_network(run.model, sampling=True)
    net = with_precision(run.model if net is None else net, opts.precision, device)
    model = run.conditioned(opts.class_label, opts.guidance, len(indices), net)
    return run_sampler(opts.sampler, run.diffusion, model, x_T, steps=opts.steps, spacing=opts.spacing,
                       generator=gens, clip_denoised=opts.clip_denoised, progress=progress, callback=callback,
                       **opts.sampler_options())


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _output_lock(out: Path, rank: int, world: int) -> AbstractContextManager:
    """`<out>.lock`, held by rank 0 (the others wait for it: `ddpm.run.lock_for_writing`); a context manager."""
    lock = lock_for_writing(out.with_name(out.name + ".lock"), f"sampling output {out}", DistInfo(rank, world))
    return nullcontext() if lock is None else lock


def sample_to_file(run: Run, n: int, out: str | Path, seed: int = 0, batch_size: int = 64,
                   opts: SampleOptions | None = None, device: str | torch.device = "cpu", rank: int = 0,
                   world: int = 1, progress: bool = True) -> Path:
    """`generate_to_parts` on every rank, then `assemble` on rank 0, under one hold of the output's lock (a
    LockedError on every rank if another run writes `out`). Returns `out` (complete on rank 0's return)."""
    out = Path(out)
    with _output_lock(out, rank, world):
        parts = _generate_parts(run, n, out, seed, batch_size, opts or SampleOptions(), torch.device(device), rank,
                                world, progress)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's parts are on disk
        if rank == 0:
            _assemble(parts, n, out)
    return out


def generate_to_parts(run: Run, n: int, out: str | Path, seed: int = 0, batch_size: int = 64,
                      opts: SampleOptions | None = None, device: str | torch.device = "cpu", rank: int = 0,
                      world: int = 1, progress: bool = True) -> Path:
    """Make samples 0..n-1 (this rank's share: batches b with b % world == rank) into `<out>.parts/`,
    skipping parts already there, holding the output's lock meanwhile. Returns the parts folder."""
    out = Path(out)
    with _output_lock(out, rank, world):
        return _generate_parts(run, n, out, seed, batch_size, opts or SampleOptions(), torch.device(device), rank,
                               world, progress)


def _generate_parts(run: Run, n: int, out: Path, seed: int, batch_size: int, opts: SampleOptions,
                    device: torch.device, rank: int, world: int, progress: bool) -> Path:
    check_options(run, opts, device)
    compiled = []  # compiled once, on the first batch still to make

    def make(b: range) -> torch.Tensor:
        if opts.compile and not compiled:
            compiled.append(compile_network(run.model, sampling=True))
        return sample_batch(run, b, seed, opts, device, net=compiled[0] if compiled else None)

    job = _job(run, seed, options={k: v for k, v in dataclasses.asdict(opts).items() if k != "compile"})
    return _make_parts(n, out, make, batch_size, rank, world, progress, "samples", job=job)


def _make_parts(n: int, out: Path, make: Callable[[range], torch.Tensor], batch_size: int, rank: int = 0,
                world: int = 1, progress: bool = False, desc: str = "samples", job: dict | None = None) -> Path:
    """Images 0..n-1 into `<out>.parts/`, one part a batch: `make(indices)` -> [b, C, H, W] in [-1, 1] for the
    batches b with b % world == rank that are not there yet. `job`: a description of the work (the same on
    every rank), kept as job.json; parts of another job are refused (ValueError, on every rank alike) rather
    than mixed in."""
    parts = _parts_dir(out)
    together = world > 1 and torch.distributed.is_initialized()
    if job is not None:
        _claim_parts(parts, job)  # every rank reads the same folder, so every rank refuses alike
    if together:
        torch.distributed.barrier()  # every rank has checked before rank 0 writes job.json
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        if job is not None and not (parts / "job.json").exists():
            (parts / "job.json").write_text(json.dumps(job, indent=1) + "\n")
    if together:
        torch.distributed.barrier()
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    mine = [b for i, b in enumerate(batches) if i % world == rank]
    done = sorted((int(f.stem.split("_")[1]), int(f.stem.split("_")[2])) for f in parts.glob("part_*.npy"))
    todo = [r for b in mine for r in _uncovered(b, done)]  # parts of an earlier batch size count as made
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=n - sum(len(b) for b in todo) * world, desc=desc, dynamic_ncols=True)
    for b in todo:
        x = make(b)
        _atomic_save_npy(parts / f"part_{b.start:09d}_{b.stop:09d}.npy", to_nhwc_uint8(x))
        if bar is not None:
            bar.update(len(b) * world)
    if bar is not None:
        bar.close()
    return parts


def _uncovered(b: range, done: list[tuple[int, int]]) -> list[range]:
    """The stretches of b that no part [start, stop) in `done` (sorted) holds."""
    out, start = [], b.start
    for lo, hi in done:
        if hi <= start or lo >= b.stop:
            continue
        if lo > start:
            out.append(range(start, lo))
        start = max(start, hi)
    if start < b.stop:
        out.append(range(start, b.stop))
    return out


def _job(run: Run, seed: int, **what) -> dict:
    """The job.json of a parts folder: the run (resolved path and step), the seed and `what` else decides the images."""
    return {"run": str(Path(run.path).resolve()), "step": run.step, "seed": seed, **what}


def _claim_parts(parts: Path, job: dict) -> None:
    """Refuse a parts folder left by another job (another run, input or option): its images would be mixed in."""
    if not parts.exists():
        return
    try:
        old = json.loads((parts / "job.json").read_text())
    except (OSError, ValueError):
        old = None
    if old != job:
        what = "no job.json" if old is None else ", ".join(k for k in job if old.get(k) != job[k]) + " differ"
        raise ValueError(f"{parts} holds the parts of another job ({what}): delete it, or write another --out")


def assemble(parts: Path, n: int, out: str | Path) -> Path:
    """Join the parts into `out`: .npz (uint8 [N, H, W, C] under `arr_0`, streamed) or .png (a grid), holding
    the output's lock meanwhile."""
    out = Path(out)
    with _output_lock(out, 0, 1):
        return _assemble(parts, n, out)


def _assemble(parts: Path, n: int, out: Path) -> Path:
    files = sorted(parts.glob("part_*.npy"))
    covered = sum(int(f.stem.split("_")[2]) - int(f.stem.split("_")[1]) for f in files)
    if covered != n:
        raise RuntimeError(f"{parts} holds {covered} of {n} samples; run the same command again to finish")
    first = np.load(files[0], mmap_mode="r")
    shape, dtype = (n, *first.shape[1:]), first.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if out.suffix == ".npz":
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": shape})
                for p in files:
                    f.write(np.ascontiguousarray(np.load(p)).tobytes())
    elif out.suffix == ".png":
        arr = np.concatenate([np.load(p) for p in files])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(x, tmp.with_suffix(".png"))
        tmp = tmp.with_suffix(".png")
    else:
        raise ValueError(f"--out must end in .npz or .png; got {out}")
    os.replace(tmp, out)
    for p in files:
        p.unlink()
    (parts / "job.json").unlink(missing_ok=True)
    parts.rmdir()
    return out


# ---------------------------------------------------------------------------------------------- restoring


@dataclass
class RestoreOptions:
    steps: int | None = None  # grid points (uniform); None: DDNM 100 (or T), a run trained on pairs all T (ancestral)
    eta: float = 1.0  # DDIM's eta of each step (DDNM, and a run trained on pairs with steps set)
    eta_rule: str = "ddim"  # DDNM's steps: ddim (eta x the posterior's std) or ddnm (eta x sqrt(1 - abar_s))
    sigma_y: float = 0.0  # DDNM+: the std of the noise in y, [-1, 1] units (DDNM's steps only)
    travel_length: int = 1  # DDNM's time travel (DDNM's steps only)
    travel_repeat: int = 1
    consistent: bool = False  # a run trained on pairs: DDNM's steps with its network, A x = y (unconditional: always)
    sampler: str = "ddim"  # ddim (DDNM's own steps, with eta) or heun (EDM's, 2 steps - 1 evaluations; noiseless y)
    sampler_options: dict = field(default_factory=dict)  # heun's S_churn, S_tmin, S_tmax, S_noise
    t_start: int | None = None  # DDNM's steps: the grid's top, from A+ y noised to it (None: T - 1, from noise)


@dataclass
class RestoreReport:
    path: Path  # the file written
    n: int  # images in it
    restored: int  # of them made by this call (the others were parts on disk from an interrupted one)
    worst: float | None  # max |A x - y| over those, before the 8-bit rounding (None: none made)


def restore_batch(run: Run, op: Operator, y: torch.Tensor, indices: range, seed: int, opts: RestoreOptions,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [b, C, H, W] in [-1, 1], the y it was made consistent with) for degraded images y [b, *op.degraded_shape]
    in [-1, 1], image i's noise from (seed, "restore", indices[i]) alone.

    An unconditional run: DDNM (`ddpm.restoration.ddnm`) on `opts.steps` uniform grid points with y's part in
    the range of A, A A+ y (an inpainting input's 8-bit mid-gray hidden pixels are 1/255, not 0; a blurred
    image's lost frequencies). A run trained on pairs (`Run.task`): its network with the condition of y
    concatenated at every call (`ddpm.conditional`), ancestral over all T (steps None) or DDIM with eta; with
    `opts.consistent`, DDNM's steps with that network (every step's x0 projected onto A x = A A+ y, so the
    output agrees with y as an unconditional run's does), on `opts.steps` grid points (None: all T);
    `opts.t_start` puts the grid's top there, started from A+ y noised to it (`ddnm`).
    `opts.sampler` heun: the same projection inside EDM's Heun sampler (`ddnm_heun`) on its Karras grid of
    `opts.steps` points, or for a run trained on pairs without `consistent`, that sampler with the condition."""
    gens = sample_generator(seed, "restore", indices, device)
    y = y.to(device)
    model = run.conditioned(batch=y.shape[0]) if run.task is None else concatenated(run.model, condition(op, y))
    if run.task is None or opts.consistent:
        y = op.A(op.pinv(y))
        if opts.sampler == "heun":
            grid = timestep_grid(run.diffusion, opts.steps, "karras")
            return ddnm_heun(run.diffusion, model, y, op, grid, generator=gens, **opts.sampler_options), y
        grid = timestep_grid(run.diffusion, opts.steps, t_start=opts.t_start)
        x = ddnm(run.diffusion, model, y, op, grid, generator=gens, sigma_y=opts.sigma_y, eta=opts.eta,
                 eta_rule=opts.eta_rule, travel_length=opts.travel_length, travel_repeat=opts.travel_repeat)
        return x, y
    x_T = gens.randn((y.shape[0], *op.shape), device)
    if opts.sampler == "heun":
        x = run_sampler("heun", run.diffusion, model, x_T, steps=opts.steps, generator=gens, **opts.sampler_options)
    elif opts.steps is None:
        x = run_sampler("ancestral", run.diffusion, model, x_T, generator=gens)
    else:
        x = run_sampler("ddim", run.diffusion, model, x_T, steps=opts.steps, eta=opts.eta, generator=gens)
    return x, y


def restore_to_file(run: Run, op: Operator, images: torch.Tensor, out: str | Path, seed: int = 0,
                    batch_size: int = 64, opts: RestoreOptions | None = None, device: str | torch.device = "cpu",
                    progress: bool = True) -> RestoreReport:
    """`restore_batch` over degraded uint8 images [N, *op.degraded_shape], batch by batch into `<out>.parts/`
    (resumable: a second call after an interruption makes only the missing batches, the same images), then
    `out` (.npz uint8 [N, H, W, C] under arr_0, or .png), under the output's lock. The parts' job.json holds the
    run, its step, the inputs' digest and the options: parts of another job are refused."""
    out, opts, device = Path(out), opts or RestoreOptions(), torch.device(device)
    n = images.shape[0]
    job = _job(run, seed, task=str(run.task or "ddnm"), operator=_describe(op),
               inputs=hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(), shape=list(images.shape),
               options=dataclasses.asdict(opts))
    worst, made = [], []

    def make(b: range) -> torch.Tensor:
        x, y = restore_batch(run, op, to_model_range(images[b.start : b.stop]), b, seed, opts, device)
        worst.append(float((op.A(x) - y).abs().max()))
        made.append(len(b))
        return x

    with _output_lock(out, 0, 1):
        parts = _make_parts(n, out, make, batch_size, progress=progress, desc="restore", job=job)
        _assemble(parts, n, out)
    return RestoreReport(path=out, n=n, restored=sum(made), worst=max(worst) if worst else None)


def _describe(op: Operator) -> str:
    """An operator's fields as text, its tensors (a mask, a blur's multipliers) by digest, for job.json."""
    fields = []
    for f in dataclasses.fields(op):
        v = getattr(op, f.name)
        if isinstance(v, torch.Tensor):
            v = hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        fields.append(f"{f.name}={v}")
    return f"{type(op).__name__}({', '.join(fields)})"
