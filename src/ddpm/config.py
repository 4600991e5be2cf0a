"""Typed run configuration: model, diffusion, data and training sections, the presets, and `--set` overrides.

A run directory holds the resolved configuration as `config.json`; `Config.from_dict(config.to_dict())`
round-trips it. Validation happens here, before any model is built, and names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ddpm.modes import (
    BetaSchedule,
    DatasetKind,
    LossType,
    LossWeight,
    MeanType,
    Precision,
    Preview,
    Task,
    TimestepSampler,
    VarType,
    check_diffusion_modes,
    parse_enum,
)


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of range; the message names the field."""


@dataclass
class ModelConfig:
    in_channels: int = 3  # image channels (1 for digits)
    ch: int = 128  # base width of the U-Net
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per level
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1  # dropout inside the residual blocks
    resolution: int = 32  # image height = width
    num_classes: int | None = None  # class-conditional model (classifier-free guidance) when set
    cond_channels: int = 0  # extra input channels: a condition image concatenated to x_t (SR3); data.task sets it


@dataclass
class DiffusionConfig:
    schedule: BetaSchedule = BetaSchedule.LINEAR  # beta schedule
    num_timesteps: int = 1000  # T
    beta_start: float = 1e-4  # beta_1 of the linear / quad schedules
    beta_end: float = 0.02  # beta_T of the linear / quad schedules
    mean_type: MeanType = MeanType.EPS  # what the network predicts
    var_type: VarType = VarType.FIXED_LARGE  # the reverse process's variances
    loss_type: LossType = LossType.SIMPLE  # the training loss
    loss_weight: LossWeight = LossWeight.NONE  # per-t weight of L_simple: none, or min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # min_snr's gamma: the SNR above which a timestep's weight stops growing
    timestep_sampler: TimestepSampler = TimestepSampler.UNIFORM  # how training draws t (importance: improved DDPM)
    zero_terminal_snr: bool = False  # rescale the betas to abar_T = 0 (Lin et al. 2024); needs mean_type v or x0


@dataclass
class DataConfig:
    dataset: DatasetKind = DatasetKind.DIGITS  # which kind of data (ddpm.data.build_dataset)
    path: str | None = None  # where the data lies (not used for digits)
    hflip: bool = True  # random horizontal flips while training
    num_workers: int = 0  # DataLoader worker processes for decoded datasets
    task: Task | None = None  # train on pairs (SR3): x0 with y = A x0 of this task (ddpm.restoration) as condition
    mask: str | None = None  # data.task inpaint: the hidden region, center or half (one fixed mask)


@dataclass
class TrainConfig:
    steps: int = 800_000  # optimizer steps
    minutes: float = 0.0  # also stop after this many minutes of training in this invocation (0: no limit)
    batch_size: int = 128  # global batch (split across ranks)
    lr: float = 2e-4  # Adam learning rate after warm-up
    warmup: int = 5000  # linear warm-up steps
    adam_eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # global gradient-norm clip (<= 0: off)
    ema_decay: float = 0.9999  # EMA of the weights, updated every step
    ema_warmup: bool = False  # after n updates use min(ema_decay, (1 + n) / (10 + n)): a short run's EMA forgets its start
    seed: int = 0  # seeds weights, data order, flips, t and noise
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    precision: Precision = Precision.FP32  # the network's arithmetic (autocast)
    compile: bool = False  # torch.compile the network (ddpm.nn.compiled; for GPUs: no gain on a CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    class_dropout: float = 0.1  # class-conditional models: label dropped to "null" this often (CFG)
    log_every: int = 50  # TensorBoard scalars every N steps
    sample_every: int = 5000  # EMA sample grid every N steps (0: never)
    preview: Preview = Preview.DDIM  # the grids' sampler: ddim (eta 1, preview_steps) | ancestral (all T steps)
    preview_steps: int = 50  # network evaluations per preview sample with ddim
    ckpt_every: int = 5000  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 3  # keep the last K checkpoints
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row


@dataclass
class Config:
    preset: str = "cifar10"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: the modes as their strings, as config.json and checkpoints hold them."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: _plain(v) for k, v in items})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown configuration section(s): {', '.join(sorted(unknown))}")
        cfg = cls(preset=str(d.get("preset", "custom")))
        for section in ("model", "diffusion", "data", "train"):
            for key, value in (d.get(section) or {}).items():
                set_field(cfg, f"{section}.{key}", value)
        validate(cfg)
        return cfg

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read configuration {path}: {e}") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------- presets

# Sized for a 2-core CPU: the default `ddpm train` in under 5 minutes on the slowest one measured (263 s on an
# AVX2-only EPYC, family 25 model 1; 0.1-0.3 s a step). Batch 128 runs 1.3x more images a second than 64 on this
# small network, so 900 steps of 128 (lr scaled by sqrt 2, the EMA warmed up) replace 2,500 of 64 (about 490 s of
# steps there), at the same quality: Frechet ratio 0.92 and 0.83 (training seeds 0, 1) against 1.02 and 0.88
# (benchmarks/RESULTS.md).
DIGITS = Config(
    preset="digits",
    model=ModelConfig(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.0, resolution=8),
    data=DataConfig(dataset=DatasetKind.DIGITS, hflip=False),  # digits are not mirror-symmetric
    train=TrainConfig(steps=900, batch_size=128, lr=1.4e-3, warmup=100, ema_decay=0.999, ema_warmup=True,
                      log_every=25, sample_every=450, ckpt_every=500),
)

CIFAR10 = Config(preset="cifar10", data=DataConfig(dataset=DatasetKind.CIFAR10, hflip=True))


def _large(name: str, dataset: DatasetKind, hflip: bool, steps: int) -> Config:
    return Config(
        preset=name,
        model=ModelConfig(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, resolution=256),
        diffusion=DiffusionConfig(var_type=VarType.FIXED_SMALL),
        data=DataConfig(dataset=dataset, hflip=hflip),
        train=TrainConfig(steps=steps, batch_size=64, lr=2e-5, warmup=5000),
    )


# Your own folder of images (README, "Train on your own images"): centre-cropped and resized to
# model.resolution; a CIFAR-10-like network at half the width, for 32x32 by default.
FOLDER = Config(
    preset="folder",
    model=ModelConfig(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32),
    data=DataConfig(dataset=DatasetKind.FOLDER, hflip=True),
    train=TrainConfig(steps=200_000, batch_size=64, lr=2e-4, warmup=1000, ema_decay=0.9995, sample_every=10_000,
                      ckpt_every=5000),
)


def _idx(name: str, path: str | None) -> Config:
    """MNIST-like 1-channel 28x28 images with their labels (`--set model.num_classes=10` makes the run class-
    conditional), the paper's diffusion unchanged (T = 1000, linear betas, eps, L_simple, fixedlarge).

    Sized for `ddpm train` in 30 minutes on 2 CPU cores, whatever the CPU: training stops after 29 minutes of
    wall time (train.minutes; or at 50,000 steps, which a GPU reaches first), checkpoints and draws its grid of
    64 EMA samples (DDIM, 50 steps: seconds). The step count depends on the machine (4,912 in 30 minutes on the
    project's AMD EPYC with AVX-512; an AVX2-only CPU does fewer), so the recipe must give its best at any
    stopping point. Measured there (benchmarks/RESULTS.md, "Thirty minutes side by side"; Frechet distance of
    1,000 DDIM-50 samples on the fashion evaluation):
    - the network: a training step at batch 64 took 0.63 s of one core; ch 64 took 2.2 s, attention at 14x14
      too 0.90 s; so ch 32, 28 -> 14 -> 7 with attention at 7x7 (1.6M parameters).
    - the EMA: 0.999 with warm-up (train.ema_warmup: the decay of update n is min(0.999, (1 + n) / (10 + n))):
      31.7, 12.9 and 10.3 at 10, 20 and 30 minutes, against 360.6, 49.3 and 8.9 without the warm-up, whose
      EMA still holds 24% of the initial weights after 10 minutes (0.999 ** 1442). Only ~5 epochs: no dropout.
    For long runs: model.ch=64, model.dropout=0.1, train.ema_decay=0.9995, train.minutes=0 and more train.steps;
    for a fixed number of steps, train.minutes=0 and --steps N.

    No flips: Fashion-MNIST's sandals, sneakers and ankle boots all point their toes to the left (the mean
    image's right half is 1.7x to 2.5x brighter than its left for those classes), so a flip makes a shoe the
    data never shows; and digits are not mirror-symmetric.
    """
    return Config(
        preset=name,
        model=ModelConfig(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,),
                          dropout=0.0, resolution=28),
        data=DataConfig(dataset=DatasetKind.IDX, path=path, hflip=False),
        train=TrainConfig(steps=50_000, minutes=29.0, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999,
                          ema_warmup=True, log_every=25, sample_every=50_000, ckpt_every=500),
    )


# Flips: the paper flips every data set but LSUN bedroom; its code also turns them off for LSUN cat. We follow
# the code that produced the released models: flips on for CelebA-HQ and church, off for bedroom and cat.
PRESETS: dict[str, Config] = {
    "digits": DIGITS,
    "cifar10": CIFAR10,
    "folder": FOLDER,
    # Debian's dataset-fashion-mnist installs the data there, so `ddpm train --preset fashion` needs no --data
    "fashion": _idx("fashion", "/usr/share/datasets/fashion-mnist"),
    "mnist": _idx("mnist", None),  # the original MNIST digits' four IDX files: pass --data
    "celebahq256": _large("celebahq256", DatasetKind.FOLDER, True, 500_000),
    "lsun-bedroom": _large("lsun-bedroom", DatasetKind.LMDB, False, 2_400_000),
    "lsun-church": _large("lsun-church", DatasetKind.LMDB, True, 1_200_000),
    "lsun-cat": _large("lsun-cat", DatasetKind.LMDB, False, 1_800_000),
}


def preset(name: str) -> Config:
    """A fresh copy of a preset configuration."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config.from_dict(PRESETS[name].to_dict())


# ---------------------------------------------------------------------------------------------- overrides


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Parse a `--set` string (or a JSON value) into the field's declared type, or raise naming the field."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return parse_enum(annotation, value, name, error=ConfigError)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            value = [v for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of integers, got {value!r}")
        return tuple(_coerce(v, args[0], name) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {annotation}")  # pragma: no cover


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` (e.g. "train.lr") from a string or JSON value, typed by the dataclass."""
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r} must look like section.field=value (sections: model, diffusion, data, train)")
    section_name, key = dotted.split(".", 1)
    section = getattr(cfg, section_name, None)
    if section_name == "preset" or section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"unknown configuration section {section_name!r} in {dotted!r} (sections: model, diffusion, data, train)")
    hints = get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"unknown configuration key {dotted!r}; {section_name} has: {', '.join(hints)}")
    setattr(section, key, _coerce(value, hints[key], dotted))


def apply_overrides(cfg: Config, items: list[str]) -> Config:
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- validation

def _mode_fields() -> dict[str, type[Enum]]:
    """Dotted field -> its enum, read from the sections' annotations (nothing listed by hand)."""
    sections = {name: hint for name, hint in get_type_hints(Config).items() if dataclasses.is_dataclass(hint)}
    return {f"{name}.{key}": hint for name, cls in sections.items() for key, hint in get_type_hints(cls).items()
            if isinstance(hint, type) and issubclass(hint, Enum)}


CHOICES: dict[str, type[Enum]] = _mode_fields()  # every mode field and its enum, e.g. "diffusion.var_type": VarType


def _need(ok: bool, name: str, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} {why}, got {_plain(value)!r}")


def check_model(m: ModelConfig, prefix: str = "model.") -> None:
    """The network's rules, for `Config.validate` and for `UNet` (which passes prefix ""): raises ConfigError
    naming the field as `prefix + name`."""

    def need(ok: bool, key: str, why: str) -> None:
        _need(ok, prefix + key, why, getattr(m, key))

    for key in ("in_channels", "num_res_blocks"):
        need(getattr(m, key) >= 1, key, "must be a positive integer")
    need(m.ch >= 32 and m.ch % 32 == 0, "ch", "must be a positive multiple of 32 (group norm with 32 groups)")
    need(len(m.ch_mult) >= 1 and all(c >= 1 for c in m.ch_mult), "ch_mult", "must be one or more positive integers")
    levels = len(m.ch_mult) - 1
    need(m.resolution >= 1 and m.resolution % (2**levels) == 0, "resolution",
         f"must be divisible by 2^{levels} (ch_mult has {len(m.ch_mult)} levels, each but the last halves it)")
    sizes = tuple(m.resolution // 2**i for i in range(len(m.ch_mult)))
    # a size no level has would silently give a network without attention
    need(all(r in sizes for r in m.attn_resolutions), "attn_resolutions",
         f"must be feature-map sizes of the levels, {sizes} for resolution {m.resolution}")
    need(0.0 <= m.dropout < 1.0, "dropout", "must lie in [0, 1)")
    need(m.num_classes is None or m.num_classes >= 1, "num_classes", "must be a positive integer or none")
    need(m.cond_channels >= 0, "cond_channels", "must be >= 0 (0: no condition image)")


def check_diffusion(d: DiffusionConfig) -> None:
    """A training recipe's diffusion settings (modes already parsed): what GaussianDiffusion refuses
    (`ddpm.modes.check_diffusion_modes`), and what a run asks more. Learned variances are trained by the hybrid
    loss and predict eps (improved DDPM); GaussianDiffusion itself evaluates and samples them under any loss."""

    def need(ok: bool, key: str, why: str) -> None:
        _need(ok, f"diffusion.{key}", why, getattr(d, key))

    need(d.num_timesteps >= 1, "num_timesteps", "must be a positive integer")
    need(0 < d.beta_start <= d.beta_end < 1 or d.schedule in (BetaSchedule.JSD, BetaSchedule.COSINE), "beta_start",
         "must satisfy 0 < beta_start <= beta_end < 1")
    need(d.min_snr_gamma > 0, "min_snr_gamma", "must be positive")
    check_diffusion_modes(d.var_type, d.loss_type, prefix="diffusion.", error=ConfigError, mean_type=d.mean_type,
                          loss_weight=d.loss_weight,
                          zero_terminal_snr=d.zero_terminal_snr or d.schedule is BetaSchedule.JSD)
    need(d.var_type is not VarType.LEARNED_RANGE or d.loss_type is LossType.HYBRID, "loss_type",
         "must be 'hybrid' when diffusion.var_type is 'learned_range' (its VLB term trains the variances)")
    need(d.mean_type is MeanType.EPS or d.var_type is not VarType.LEARNED_RANGE, "mean_type",
         "must be eps with learned variances")


TASK_MASKS = ("center", "half")  # the named masks of ddpm.restoration.MASKS (a test holds them equal)


def check_task(cfg: Config) -> None:
    """A run trained on pairs: data.task (a string set directly is parsed) sets model.cond_channels to the image
    channels (the condition A+ y has the clean image's shape, `ddpm.conditional`), and a contradictory explicit
    value is refused; data.mask names the inpainting task's fixed mask; a pairs folder needs a task."""
    d, m = cfg.data, cfg.model
    if d.task is not None:
        d.task = parse_enum(Task, d.task, "data.task", error=ConfigError)
    if d.task is None:
        _need(m.cond_channels == 0, "model.cond_channels", "is set by data.task (a condition image needs a task to "
              "make it); without one it must be 0", m.cond_channels)
        _need(d.dataset is not DatasetKind.PAIRS, "data.task", "is needed by data.dataset 'pairs' (the degradation "
              "its input/ images went through, e.g. sr4)", None)
        _need(d.mask is None, "data.mask", "applies to data.task 'inpaint' only", d.mask)
        return
    if m.cond_channels == 0:
        m.cond_channels = m.in_channels
    _need(m.cond_channels == m.in_channels, "model.cond_channels", f"must be model.in_channels ({m.in_channels}) "
          f"with data.task {d.task.value!r}: the condition A+ y has the image's channels (or leave it 0 to have it "
          "set)", m.cond_channels)
    if d.task is Task.INPAINT:
        _need(d.mask in TASK_MASKS, "data.mask", f"must be one of {', '.join(TASK_MASKS)} with data.task 'inpaint'",
              d.mask)
        _need(not (d.hflip and d.dataset is DatasetKind.PAIRS), "data.hflip", "must be false for inpainting pairs "
              "(a flipped input/ image no longer matches the fixed mask)", d.hflip)
    else:
        _need(d.mask is None, "data.mask", "applies to data.task 'inpaint' only", d.mask)


def validate(cfg: Config) -> None:
    """Range checks that need no model; raises ConfigError naming the field. Mode strings set directly
    (`cfg.diffusion.var_type = "fixedsmall"`) are turned into their enum members here."""
    for name, enum_cls in CHOICES.items():
        section, key = name.split(".")
        setattr(getattr(cfg, section), key, parse_enum(enum_cls, _get(cfg, name), name, error=ConfigError))
    check_model(cfg.model)
    check_diffusion(cfg.diffusion)
    check_task(cfg)
    t = cfg.train

    def need(ok: bool, name: str, why: str) -> None:
        _need(ok, name, why, _get(cfg, name))

    for name in ("train.steps", "train.batch_size", "train.grad_accum", "train.max_bad_steps"):
        need(_get(cfg, name) >= 1, name, "must be a positive integer")
    need(t.lr > 0, "train.lr", "must be positive")
    need(math.isfinite(t.minutes) and t.minutes >= 0, "train.minutes", "must be >= 0 (0: no time limit)")
    need(t.warmup >= 0, "train.warmup", "must be >= 0")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must lie in [0, 1)")
    need(t.adam_eps > 0, "train.adam_eps", "must be positive")
    need(0.0 <= t.class_dropout < 1.0, "train.class_dropout", "must lie in [0, 1)")
    need(t.preview_steps >= 1, "train.preview_steps", "must be a positive integer")
    for name in ("train.log_every", "train.sample_every", "train.ckpt_every"):
        need(_get(cfg, name) >= 0, name, "must be >= 0")


def _plain(value: Any) -> Any:
    """A mode as its string (config.json, messages); other values as they are."""
    return value.value if isinstance(value, Enum) else value


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def diff_configs(a: Config, b: Config, keys: tuple[str, ...]) -> list[str]:
    """Lines 'field: old -> new' for the listed dotted fields that differ."""
    return [f"{k}: {_plain(_get(a, k))!r} -> {_plain(_get(b, k))!r}" for k in keys if _get(a, k) != _get(b, k)]
