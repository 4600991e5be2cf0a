"""Every setting that takes one of a fixed set of names: one Enum each, a comment per member, defined here and
nowhere else. The configuration's fields are typed by them, the command line's choices and the library's
arguments are read through them; config.json and the command line hold their string values.

This module imports no torch, so that `ddpm.config` and the parser of `ddpm.cli` can use it.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

M = TypeVar("M", bound=Enum)


class Mode(str, Enum):
    """A member is its string value: equal to it, hashed as it, and printed as it (str and f-strings), so
    messages, JSON and dictionaries keyed by the strings read the same as before the enums."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{m}" is the value on every Python (3.11 prints Class.NAME otherwise)


class BetaSchedule(Mode):
    LINEAR = "linear"  # beta_t evenly spaced from beta_start to beta_end (the paper)
    QUAD = "quad"  # sqrt(beta_t) evenly spaced, then squared
    CONST = "const"  # beta_t = beta_end for every t
    JSD = "jsd"  # beta_t = 1 / (T - t): 1/T, 1/(T-1), ..., 1
    COSINE = "cosine"  # abar_t = cos^2(((t/T + s) / (1 + s)) pi / 2), betas capped at max_beta


class MeanType(Mode):
    EPS = "eps"  # the model predicts the noise epsilon (the paper's choice, eq. 11)
    X0 = "x0"  # the model predicts x_0
    XPREV = "xprev"  # the model predicts the posterior mean of x_{t-1} directly
    V = "v"  # the model predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)


class VarType(Mode):
    FIXED_LARGE = "fixedlarge"  # sigma_t^2 = beta_t (t = 0 uses the posterior variance of t = 1)
    FIXED_SMALL = "fixedsmall"  # sigma_t^2 = beta~_t, the posterior variance (clipped at t = 0)
    LEARNED_RANGE = "learned_range"  # the model's second half of channels v interpolates log beta~ .. log beta


class LossType(Mode):
    SIMPLE = "simple"  # L_simple (eq. 14): MSE on the mean_type target, t uniform
    KL = "kl"  # the true variational bound term L_t (eq. 5, L_0 from eq. 13), bits/dim
    HYBRID = "hybrid"  # improved DDPM: L_simple + hybrid_lambda * L_vlb, the VLB term trains only the variance


class LossWeight(Mode):
    NONE = "none"  # L_simple as the paper has it: every t weighted 1
    MIN_SNR = "min_snr"  # Min-SNR-gamma (Hang et al. 2023): the weight min(SNR_t, gamma) expressed for the target


class TimestepSampler(Mode):
    UNIFORM = "uniform"  # t ~ U{0..T-1}, as the paper trains
    IMPORTANCE = "importance"  # improved DDPM sec. 3.3: p_t ~ sqrt(E[L_t^2]), losses weighted by 1 / (T p_t)


class DatasetKind(Mode):
    DIGITS = "digits"  # scikit-learn's bundled 8x8 digits, [1, 8, 8]; no path
    CIFAR10 = "cifar10"  # the CIFAR-10 python archive (or its extracted folder), [3, 32, 32]
    FOLDER = "folder"  # a folder of image files, center-cropped and resized
    LMDB = "lmdb"  # an LSUN LMDB (or a folder of images in its place)
    IDX = "idx"  # a folder of the four IDX files of MNIST, Fashion-MNIST or KMNIST, [1, 28, 28] with labels
    PAIRS = "pairs"  # a folder with input/ (degraded, data.task's size) and target/ (clean) images, same names


class Precision(Mode):
    FP32 = "fp32"  # float32 throughout, no autocast
    BF16 = "bf16"  # the network under bfloat16 autocast (CPU or GPU); weights and optimizer state float32
    FP16 = "fp16"  # the network under float16 autocast with gradient scaling (CUDA only)


class Preview(Mode):
    DDIM = "ddim"  # DDIM with eta 1 on train.preview_steps timesteps: seconds on a CPU (the default)
    ANCESTRAL = "ancestral"  # the paper's sampler over all T timesteps: minutes on a CPU


class Spacing(Mode):
    UNIFORM = "uniform"  # the fast samplers' timesteps evenly spaced
    QUAD = "quad"  # quadratically spaced, denser near t = 0 (the DDIM paper's CIFAR-10 choice)
    LOGSNR = "logsnr"  # evenly spaced in log-SNR (DPM-Solver's choice)
    TRAILING = "trailing"  # round(T - i T / K) - 1: always holds T - 1, steps back from T (Lin et al. 2024)
    KARRAS = "karras"  # EDM's sigma grid (rho = 7), each point snapped to the timestep nearest in log sigma


class Task(Mode):
    """An image-to-image task: a linear degradation y = A x (`ddpm.restoration.operator`) and its inverse problem."""

    SR2 = "sr2"  # super-resolution x2: A = 2 x 2 average pooling, A+ = nearest upsampling
    SR4 = "sr4"  # super-resolution x4: 4 x 4 average pooling
    SR8 = "sr8"  # super-resolution x8: 8 x 8 average pooling
    COLORIZE = "colorize"  # A = the mean of the channels (a 1-channel image), A+ = copy it to every channel
    INPAINT = "inpaint"  # A = a 0/1 pixel mask (a mask image, or "center" / "half"), A+ = A^T = the mask
    DEBLUR = "deblur"  # A = a circular Gaussian blur, A+ its (regularised) inverse in the Fourier domain


def values(enum_cls: type[Enum]) -> tuple[str, ...]:
    """The members' string values in definition order, e.g. for argparse `choices`."""
    return tuple(m.value for m in enum_cls)


def parse_enum(enum_cls: type[M], value: object, field: str, error: type[ValueError] = ValueError) -> M:
    """Accept an enum member or its string value; anything else raises `error` naming `field` and the choices."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(v) for v in values(enum_cls))
        raise error(f"{field} must be one of {choices}; got {value!r}") from None


def check_diffusion_modes(var_type: VarType, loss_type: LossType, prefix: str = "",
                          error: type[ValueError] = ValueError, *, mean_type: MeanType = MeanType.EPS,
                          loss_weight: LossWeight = LossWeight.NONE, zero_terminal_snr: bool = False) -> None:
    """Refuse what GaussianDiffusion cannot compute. `prefix` ("diffusion." for the configuration) makes the
    message name the field. (A run's configuration asks more of a training recipe: `ddpm.config.check_diffusion`.)

    - the hybrid loss trains the learned variances, so it needs var_type learned_range;
    - min_snr weights the MSE of a target (eps, v or x0, Hang et al. 2023): the kl loss is the bound itself and
      is not reweighted, and xprev has no published weight;
    - with zero terminal SNR (abar_T = 0) x_T is pure noise: the eps it holds says nothing of x_0, and
      x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by 0 there, so eps prediction is undefined at t = T.
    """
    if loss_type is LossType.HYBRID and var_type is not VarType.LEARNED_RANGE:
        raise error(f"{prefix}loss_type 'hybrid' trains learned variances: it needs {prefix}var_type "
                    f"'learned_range'; got {var_type.value!r}")
    if loss_weight is LossWeight.MIN_SNR and loss_type is LossType.KL:
        raise error(f"{prefix}loss_weight 'min_snr' weights L_simple: {prefix}loss_type 'kl' is the variational bound "
                    "and is not reweighted (use loss_type 'simple' or 'hybrid')")
    if loss_weight is LossWeight.MIN_SNR and mean_type is MeanType.XPREV:
        raise error(f"{prefix}loss_weight 'min_snr' is defined for {prefix}mean_type 'eps', 'v' and 'x0'; got 'xprev'")
    if zero_terminal_snr and mean_type is MeanType.EPS:
        raise error(f"{prefix}mean_type 'eps' is undefined with zero terminal SNR (abar_T = 0, as {prefix}zero_terminal_snr "
                    f"and the jsd schedule give: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by 0 at t = T); "
                    f"use {prefix}mean_type 'v' (or 'x0')")
