"""A run on disk and what is built from it: the network and the diffusion from its configuration, its
checkpoints in one layout (`save_run`, `load_run`), the device and precision names, derived seeds and
per-sample generators, and the one place that binds a class label (and guidance) to the network.

Training (`ddpm.train`) writes runs and `ddpm.convert` makes them from released weights, both through
`save_run`; sampling and the evaluations read them through `load_run` and never import the training loop.

Layout: RUN/config.json (the resolved `Config`) and RUN/checkpoints/step_XXXXXXXXX/ (`ddpm.checkpoint`), whose
tensors are `model/<key>` (raw weights), `ema/<key>` (EMA weights) and optionally `optim/...` (the optimizer),
and whose state holds `format`, `step` and `config` besides what the writer adds.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddpm import checkpoint as ckpt
from ddpm.config import Config, ConfigError
from ddpm.diffusion import GaussianDiffusion, Model, StackedGenerator
from ddpm.lock import LockedError, RunLock
from ddpm.modes import Precision, Task, VarType, parse_enum
from ddpm.nn import UNet
from ddpm.restoration import Operator, operator
from ddpm.runtime import cpu_has_native_bf16
from ddpm.schedule import beta_schedule, rescale_zero_terminal_snr

RUN_FORMAT_VERSION = 1  # the layout of a run checkpoint's state (its `format` field; the manifest has its own)


# ---------------------------------------------------------------------------------------------- builders


def build_diffusion(cfg: Config) -> GaussianDiffusion:
    """The run's diffusion: betas (rescaled to zero terminal SNR when asked), mean, variance and loss types and
    the loss weighting, all from `cfg.diffusion`. (How training draws t, `timestep_sampler`, is the trainer's.)"""
    d = cfg.diffusion
    betas = beta_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    if d.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return GaussianDiffusion(betas, mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type,
                             loss_weight=d.loss_weight, min_snr_gamma=d.min_snr_gamma)


def build_model(cfg: Config) -> UNet:
    """The run's network; learned variances give it 2 x C output channels (the network knows no diffusion)."""
    m = cfg.model
    out = 2 * m.in_channels if cfg.diffusion.var_type == VarType.LEARNED_RANGE else m.in_channels
    return UNet.from_config(m, out_channels=out)


def build_operator(cfg: Config) -> Operator | None:
    """The degradation A of a run trained on pairs (data.task, with data.mask for inpainting) for its images
    [in_channels, resolution, resolution]; None for an unconditional run. A task the images cannot take (sr8 of
    28 x 28, colorizing one channel) is a ConfigError naming data.task."""
    m, d = cfg.model, cfg.data
    if d.task is None:
        return None
    try:
        return operator(d.task, (m.in_channels, m.resolution, m.resolution), d.mask)
    except ValueError as e:
        raise ConfigError(f"data.task {d.task.value}: {e}") from None


# ---------------------------------------------------------------------------------------------- devices, precision


AMP_DTYPES = {Precision.FP32: None, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def amp_dtype(precision: Precision | str, device: torch.device, field: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None: float32, no autocast), refusing what `device` cannot run;
    `field` names the setting in the error."""
    kind = parse_enum(Precision, precision, field, error=ConfigError)
    if kind is Precision.FP16 and device.type != "cuda":
        raise ConfigError(f"{field} fp16 needs a CUDA device (use bf16 on the CPU)")
    if kind is Precision.BF16 and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"{field} bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in its flags), so "
                      "bf16 is emulated and runs slower than float32 here (benchmarks/RESULTS.md); fp32 is faster",
                      SlowPrecisionWarning, stacklevel=2)
    return AMP_DTYPES[kind]


class SlowPrecisionWarning(UserWarning):
    """A precision that this machine can run only slower than float32."""


def resolve_device(name: str, field: str = "--device") -> torch.device:
    """"auto" (this rank's GPU under torchrun, else the first, else the CPU) or a torch device name; a CUDA
    device on a machine without one is an error naming `field`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{field} {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field} is {name!r} but no CUDA device is available")
    return dev


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local)


def lock_for_writing(path: str | Path, what: str, d: DistInfo) -> RunLock | None:
    """Rank 0 takes the `RunLock` at `path` (returned, held; the caller releases it); the other ranks get None,
    and only once rank 0 holds it, so that no rank writes before. If rank 0 is refused, every rank raises the
    LockedError (under torchrun all exit, instead of waiting at the next barrier). Ranks without a process
    group (world > 1 simulated in one process) do not wait."""
    lock, refusal = None, None
    if d.main:
        try:
            lock = RunLock(path, what).acquire()
        except LockedError as e:
            refusal = e
    if d.world > 1 and dist.is_initialized():
        box = [None if refusal is None else str(refusal)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and refusal is None:
            refusal = LockedError(f"rank 0 could not take the lock: {box[0]}")
        if refusal is not None:  # every rank has the outcome before any exits: a rank leaving mid-broadcast
            dist.barrier()       # closes the sockets under the others (gloo aborts them)
            dist.destroy_process_group()
    if refusal is not None:
        raise refusal
    return lock


# ---------------------------------------------------------------------------------------------- randomness


def derived_seed(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed for one purpose at one index (a training step, a sample): independent streams without
    any saved RNG state."""
    digest = hashlib.blake2b(f"{seed}/{purpose}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, purpose, index) alone."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, purpose, index))


def sample_generator(seed: int, purpose: str, indices: range | list[int], device: torch.device | str = "cpu"
                     ) -> StackedGenerator:
    """One generator per sample index (EDM's stacked generator): row i of every draw depends on
    (seed, purpose, indices[i]) alone, so a sample does not depend on the batch it is drawn in."""
    return StackedGenerator([generator(seed, purpose, i, device) for i in indices])


# ---------------------------------------------------------------------------------------------- conditioning


def with_labels(net: Callable[..., torch.Tensor], y: torch.Tensor) -> Model:
    """`net(x, t, y)` as a `model(x, t)` callable; y int64 [B'] with B' >= B, its first B labels used, so one
    label tensor serves a shorter last batch."""
    return lambda x, t: net(x, t, y[: x.shape[0]])


def conditioned(net: Callable[..., torch.Tensor], num_classes: int | None, label: int | None = None,
                guidance: float = 1.0, batch: int = 1, device: torch.device | str = "cpu") -> Model:
    """The callable the samplers see for a network trained with `num_classes` (None: unconditional), without a
    condition image (a run trained on pairs takes one through `ddpm.conditional.concatenated`).

    label None on a class-conditional network draws unconditionally (the null label, index num_classes); a
    label with guidance != 1 is classifier-free guidance (`ddpm.guidance`). A label for an unconditional
    network, a label out of range, or guidance without a label is an error."""
    if num_classes is None:
        if label is not None:
            raise ValueError("--class needs a class-conditional run (model.num_classes); this run has no labels")
        if guidance != 1.0:
            raise ValueError("--guidance needs a class-conditional run (model.num_classes) and --class")
        return net
    if label is None:
        if guidance != 1.0:
            raise ValueError("--guidance needs --class: guidance steers towards a class")
        label = num_classes
    elif not 0 <= label < num_classes:
        raise ValueError(f"--class must lie in 0..{num_classes - 1}; got {label}")
    y = torch.full((batch,), label, device=device, dtype=torch.long)
    if label == num_classes or guidance == 1.0:
        return with_labels(net, y)
    from ddpm.guidance import guided_model

    return guided_model(net, y, guidance, null_label=num_classes)


# ---------------------------------------------------------------------------------------------- runs on disk


@dataclass
class Run:
    """A trained run: `model` (EMA weights unless ema=False, eval mode), its `diffusion`, `config`, `step`."""

    model: nn.Module
    diffusion: GaussianDiffusion
    config: Config
    step: int
    path: Path

    @property
    def task(self) -> Task | None:
        """The task of a run trained on pairs (data.task): its network needs a condition image; None: unconditional."""
        return self.config.data.task

    def conditioned(self, label: int | None = None, guidance: float = 1.0, batch: int = 1,
                    net: Callable[..., torch.Tensor] | None = None) -> Model:
        """The run's network (or `net`, a compiled or low-precision form of it) as a `model(x, t)` callable,
        conditioned and guided as asked (see `conditioned`). A run trained on pairs is refused (NeedsCondition)."""
        if self.task is not None:
            raise NeedsCondition(needs_condition_message(self.path, self.task))
        device = next(self.model.parameters()).device
        return conditioned(self.model if net is None else net, self.config.model.num_classes, label, guidance,
                           batch, device)


def checkpoint_contents(cfg: Config, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                        optimizer: tuple[dict[str, torch.Tensor], dict] | None = None, extra: dict | None = None,
                        more: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a run's checkpoint in the one layout: `model` and `ema` state dicts under "model/"
    and "ema/", `optimizer` the (tensors, skeleton) pair of `ddpm.checkpoint.flatten_state` under "optim";
    the state holds format, step, config, the optimizer skeleton and `extra`. `more`: further tensors, each
    key under its own prefix (the importance sampler's "importance/...")."""
    tensors = {f"model/{k}": v for k, v in model.items()} | {f"ema/{k}": v for k, v in ema.items()}
    tensors.update(more or {})
    skeleton = None
    if optimizer is not None:
        opt_tensors, skeleton = optimizer
        tensors.update(opt_tensors)
    state = {"format": RUN_FORMAT_VERSION, "step": step, "config": cfg.to_dict(), "optimizer": skeleton, **(extra or {})}
    return tensors, state


def save_run(run_dir: str | Path, cfg: Config, step: int, model: dict[str, torch.Tensor],
             ema: dict[str, torch.Tensor], optimizer: tuple[dict[str, torch.Tensor], dict] | None = None,
             extra: dict | None = None, keep: int = 3, write_config: bool = False,
             more: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint of the run at `step` (`checkpoint_contents`) into RUN/checkpoints,
    crash-safe, keeping the last `keep`; with write_config also RUN/config.json. Returns the checkpoint."""
    run_dir = Path(run_dir)
    if write_config:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    tensors, state = checkpoint_contents(cfg, step, model, ema, optimizer, extra, more)
    return ckpt.save_checkpoint(run_dir / "checkpoints", step, tensors, state, keep=keep)


def split_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under `prefix/` ("model", "ema") in a checkpoint's tensors."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


class NeedsCondition(ValueError):
    """A run trained on pairs (data.task) asked to generate without a condition image."""


def needs_condition_message(run_dir: str | Path, task: Task) -> str:
    return (f"run {run_dir} was trained on {task.value} pairs (data.task): its network needs a condition image, so "
            f"it cannot generate unconditionally; use `ddpm restore --run {run_dir} --input LOW --out OUT`")


def load_run(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu",
             conditional: bool = False) -> Run:
    """Load the newest complete checkpoint of a run directory. The sampler settings (schedule, variance type)
    always come from the run's own configuration. A run trained on pairs (`Run.task`) is loaded only with
    `conditional` (the caller gives the network its condition, `ddpm.conditional`); else NeedsCondition says to
    use `ddpm restore`, so that no unconditional command runs its network on a missing condition."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {cfg_path} is missing")
    cfg = Config.load(cfg_path)
    if cfg.data.task is not None and not conditional:
        raise NeedsCondition(needs_condition_message(run_dir, cfg.data.task))
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}")
    c = ckpt.load_checkpoint(path)
    sd = split_state(c.tensors, "ema" if ema else "model")
    if not sd:
        raise ckpt.CheckpointError(f"checkpoint {path} holds no {'EMA' if ema else 'raw'} weights")
    model = build_model(cfg)
    model.load_state_dict(sd)
    model.to(device).eval().requires_grad_(False)
    return Run(model=model, diffusion=build_diffusion(cfg), config=cfg, step=int(c.state["step"]), path=run_dir)
