"""Linear degradations y = A x, their pseudo-inverses A+, and the training-free restorer that inverts them with
any unconditional model: the null-space method (DDNM, Wang, Yu & Zhang, ICLR 2023).

Every operator works on images x [B, C, H, W] in [-1, 1] and has
    A(x)       the degradation, [B, C', h, w] = degraded_shape((C, H, W)) per image
    pinv(y)    the pseudo-inverse A+ y, [B, C, H, W]
    project(x) A+ A x, the orthogonal projection onto the row space of A (P P = P, and A A+ A = A)
and `operator(task, shape, mask)` builds the one for a `ddpm.modes.Task`. A+ is the Moore-Penrose inverse
in each case (for the blur: of the blur with its negligible frequencies removed, see `Blur`), so
A+ y + (I - A+ A) x is consistent with y exactly: A of it is y.

RePaint (Lugmayr et al. 2022), the inpainting special case over every timestep with known pixels noised to
x_t, stays `ddpm.sampling.inpaint`; `ddnm` with an inpainting operator is the same idea on any grid, replacing
the predicted x_0 instead of x_t.

This module knows no networks: the model is a callable model(x_t, t) as everywhere in `ddpm.diffusion`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ddpm.diffusion import GaussianDiffusion, Generator, Model, randn
from ddpm.modes import Task, parse_enum
from ddpm.sampling import Callback, _abar, _full, _progress, ddim_sigma, heun

Shape = tuple[int, int, int]  # (C, H, W) of one image


# ---------------------------------------------------------------------------------------------- operators


class Operator:
    """A linear degradation; subclasses define `A`, `pinv` and `degraded_shape`."""

    shape: Shape  # (C, H, W) of the clean images it takes

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the paper's name)
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def degraded_shape(self, shape: Shape) -> Shape:
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A+ A x [B, C, H, W]: the part of x that y = A x determines (the rest, x - project(x), is A's null space)."""
        return self.pinv(self.A(x))

    # DDNM+'s hooks (`ddnm` with noisy y): the split of a step's noise, and the two uses of it. Here the noise of
    # A+ y is counted as sigma_y per pixel, exact for A+ with orthogonal columns (sr, colorize, masks); `Blur`
    # counts it per frequency.

    def step_noise(self, sigma: float, c: float, sigma_y: float) -> StepNoise:
        """`StepNoise` of a step with noise std `sigma` and x_0 coefficient `c` for y with noise std sigma_y."""
        return step_noise(sigma, c, sigma_y)

    def pinv_scaled(self, r: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """A+ (lam r) for a residual r in y's space: lam * A+ r."""
        return lam * self.pinv(r)

    def shaped_noise(self, z: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """The fresh noise of a step from white noise z [B, C, H, W]: gamma * z."""
        return gamma * z

    def _check(self, x: torch.Tensor, shape: Shape, what: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"{type(self).__name__}.{what} takes [B, {', '.join(map(str, shape))}]; "
                             f"got {tuple(x.shape)}")


@dataclass(frozen=True)
class AvgPool(Operator):
    """k-fold super-resolution: A averages each k x k block (the matrix: row i holds 1/k^2 on the k^2 pixels of
    block i, per channel), so the degraded image is [C, H/k, W/k]. A A^T = I / k^2, hence A+ = k^2 A^T: every
    block filled with its value, nearest-neighbour upsampling. A+ A replaces each block by its mean."""

    shape: Shape
    k: int

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self._check(x, self.shape, "A")
        return F.avg_pool2d(x, self.k)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.degraded_shape(self.shape), "pinv")
        return y.repeat_interleave(self.k, dim=-2).repeat_interleave(self.k, dim=-1)

    def degraded_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        return c, h // self.k, w // self.k


@dataclass(frozen=True)
class ChannelMean(Operator):
    """Colorization: A averages the C channels of each pixel (the matrix: row p holds 1/C on pixel p of every
    channel), a 1-channel image [1, H, W]. A A^T = I / C, hence A+ = C A^T: the gray value copied to every
    channel. A+ A replaces each pixel's colour by its gray; the null space is the colour at zero mean."""

    shape: Shape

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self._check(x, self.shape, "A")
        return x.mean(dim=1, keepdim=True)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.degraded_shape(self.shape), "pinv")
        return y.repeat(1, self.shape[0], 1, 1)

    def degraded_shape(self, shape: Shape) -> Shape:
        return 1, shape[1], shape[2]


@dataclass(frozen=True, eq=False)  # eq=False: the mask is a tensor
class Mask(Operator):
    """Inpainting: A multiplies by a 0/1 mask m (the matrix: diagonal, m on the diagonal), 1 where the pixel is
    known. The degraded image keeps the full size with the unknown pixels 0 (mid-gray); A = A^T = A A = A+."""

    shape: Shape
    mask: torch.Tensor  # [1 or C, H, W] of 0/1, float

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self._check(x, self.shape, "A")
        return x * self.mask.to(x.device, x.dtype)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.shape, "pinv")
        return y * self.mask.to(y.device, y.dtype)

    def degraded_shape(self, shape: Shape) -> Shape:
        return tuple(shape)


BLUR_SIGMA = 1.5  # the deblurring task's Gaussian std in pixels
BLUR_CUTOFF = 1e-3  # frequencies whose gain is below this are treated as lost (below 8-bit levels after the blur)
ROUNDING_STD = 2 / 255 / math.sqrt(12)  # 8-bit rounding's noise std in [-1, 1] units: uniform over one level


def default_noise(task: Task | str) -> float:
    """The sigma_y a restore assumes for 8-bit inputs of `task` unless told: the rounding's std for the blur,
    whose A+ amplifies it up to 1 / cutoff times (measured on Fashion-MNIST: PSNR 14.3 dB at 0, 24.5 at this),
    0 for the others, whose A+ does not amplify it (so their outputs keep A x = y exactly)."""
    return ROUNDING_STD if parse_enum(Task, task, "task") is Task.DEBLUR else 0.0


@dataclass(frozen=True, eq=False)
class Blur(Operator):
    """Deblurring: A is a circular convolution with a Gaussian of std `sigma` pixels (the matrix: block-circulant,
    diagonal in the 2-D Fourier basis with the kernel's transfer function K [H, W], real and positive for a
    symmetric Gaussian), A x = F^-1 (K F x) per channel, same size.

    A Gaussian's K falls to 1e-10 and below at high frequencies, where 1 / K would amplify float rounding by as
    much. As in DDNM's and DDRM's SVD treatment, frequencies with K < `cutoff` are counted as singular values 0:
    A uses K_c = K where K >= cutoff, else 0 (a change below 2 * cutoff / 255 of a level on an 8-bit image), and
        A+ = F^-1 (conj(K_c) / (|K_c|^2 + eps)) F   on the kept frequencies, 0 on the others.
    With eps = 0 (the default) that is the exact Moore-Penrose inverse of A, so A A+ A = A and A+ A is the
    projection onto the kept frequencies; eps > 0 (Tikhonov) tames noise in y at the price of exact consistency.
    A band-limited image (no content where K < cutoff) is recovered exactly from A x."""

    shape: Shape
    sigma: float = BLUR_SIGMA
    eps: float = 0.0
    cutoff: float = BLUR_CUTOFF
    K: torch.Tensor = field(init=False, repr=False)  # [H, W] float64: K_c
    K_pinv: torch.Tensor = field(init=False, repr=False)  # [H, W] float64: the pseudo-inverse's multiplier

    def __post_init__(self):
        _, h, w = self.shape

        def wrapped(n: int) -> torch.Tensor:  # circular distance to pixel 0
            i = torch.arange(n, dtype=torch.float64)
            return torch.minimum(i, n - i)

        g = torch.exp(-(wrapped(h)[:, None] ** 2 + wrapped(w)[None, :] ** 2) / (2 * self.sigma**2))
        K = torch.fft.fft2(g / g.sum()).real  # the kernel is even about pixel 0: its transform is real
        K = torch.where(K >= self.cutoff, K, torch.zeros_like(K))
        K_pinv = torch.where(K > 0, K / (K**2 + self.eps), torch.zeros_like(K))
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "K_pinv", K_pinv)

    def _filter(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.fft2(x) * k.to(x.device)).real.to(x.dtype)

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self._check(x, self.shape, "A")
        return self._filter(x, self.K)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.shape, "pinv")
        return self._filter(y, self.K_pinv)

    def degraded_shape(self, shape: Shape) -> Shape:
        return tuple(shape)

    def step_noise(self, sigma: float, c: float, sigma_y: float) -> StepNoise:
        """DDNM+'s split per frequency: white noise of std sigma_y in y is, in the orthonormal 2-D Fourier basis,
        std sigma_y at every frequency f, and A+ multiplies it by K_pinv(f): up to 1 / cutoff = 1000 at the
        frequencies the blur nearly removes. So lam(f) and gamma(f) are `step_noise`'s with sigma_y K_pinv(f) for
        sigma_y: a frequency takes y's value only once the step's noise can hide what it brings. [H, W] tensors
        (float64); noiseless y: the scalar split."""
        if sigma_y <= 0:
            return step_noise(sigma, c, sigma_y)
        noise = c * sigma_y * self.K_pinv.abs()  # the x_0 correction's noise std per frequency at lam 1
        lam = torch.where(noise > sigma, sigma / noise.clamp_min(1e-300), torch.ones_like(noise))
        gamma = (sigma**2 - (lam * noise) ** 2).clamp_min(0).sqrt()
        return StepNoise(lam=lam, gamma=gamma)

    def pinv_scaled(self, r: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        if not isinstance(lam, torch.Tensor):
            return super().pinv_scaled(r, lam)
        self._check(r, self.shape, "pinv_scaled")
        return self._filter(r, self.K_pinv * lam)

    def shaped_noise(self, z: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        if not isinstance(gamma, torch.Tensor):
            return super().shaped_noise(z, gamma)
        return self._filter(z, gamma)  # gamma is even in f like K, so the filtered noise stays real


MASKS = ("center", "half")  # the named masks of `named_mask`


def named_mask(name: str, height: int, width: int) -> torch.Tensor:
    """A 0/1 mask [1, H, W] (1 = known): "center" hides the central H/2 x W/2 square, "half" the right half."""
    m = torch.ones(1, height, width)
    if name == "center":
        m[:, height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2] = 0
    elif name == "half":
        m[:, :, width // 2:] = 0
    else:
        raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASKS)} or give a mask image")
    return m


SR_FACTORS = {Task.SR2: 2, Task.SR4: 4, Task.SR8: 8}


def operator(task: Task | str, shape: Shape, mask: torch.Tensor | str | None = None, *,
             blur_sigma: float = BLUR_SIGMA, blur_eps: float = 0.0) -> Operator:
    """The degradation of `task` for clean images of `shape` (C, H, W). `mask` (inpaint only): a 0/1 tensor
    [H, W], [1, H, W] or [C, H, W] (1 = known), or a name in MASKS. Refuses (ValueError, with the expected
    shape) what the task cannot do with such images: a size that k does not divide, colorizing one channel."""
    task = parse_enum(Task, task, "task")
    c, h, w = (int(v) for v in shape)
    shape = (c, h, w)
    if mask is not None and task is not Task.INPAINT:
        raise ValueError(f"a mask applies to the inpaint task only, not {task.value!r}")
    if task in SR_FACTORS:
        k = SR_FACTORS[task]
        if h % k or w % k:
            raise ValueError(f"task {task.value} averages {k}x{k} blocks: the images must be a multiple of {k} in "
                             f"height and width; the run's are {h}x{w}")
        return AvgPool(shape, k)
    if task is Task.COLORIZE:
        if c < 2:
            raise ValueError(f"task colorize needs images with colour channels; these have {c} channel (a gray run "
                             "cannot be colorized)")
        return ChannelMean(shape)
    if task is Task.INPAINT:
        if mask is None:
            raise ValueError(f"task inpaint needs a mask: {' or '.join(MASKS)}, or a 0/1 mask of {h}x{w}")
        if isinstance(mask, str):
            mask = named_mask(mask, h, w)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3 or mask.shape[0] not in (1, c) or tuple(mask.shape[1:]) != (h, w):
            raise ValueError(f"the mask is {tuple(mask.shape)}, but the images need one of {h}x{w} "
                             f"([{h}, {w}], [1, {h}, {w}] or [{c}, {h}, {w}])")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("the mask must hold 0 (unknown) and 1 (known) only")
        return Mask(shape, mask)
    if task is Task.DEBLUR:
        return Blur(shape, sigma=blur_sigma, eps=blur_eps)
    raise AssertionError(f"no operator for task {task}")  # every Task member is handled above


# ---------------------------------------------------------------------------------------------- null-space restoration


def travel_moves(n: int, length: int = 1, repeat: int = 1) -> list[tuple[int, int]]:
    """The (from, to) moves between grid positions n-1 (the start) .. 0, and -1 (the clean data), of DDNM's time
    travel (RePaint's jump schedule on grid positions): down one position per move, and at every `length`-th
    position (from the top, while `length` positions remain above it and above 0) jump back up `length`
    positions and redo them, `repeat` - 1 times. length 1 and repeat 1: straight down, n moves."""
    if length < 1 or repeat < 1:
        raise ValueError(f"time travel needs length >= 1 and repeat >= 1; got {length}, {repeat}")
    jumps = {p: repeat - 1 for p in range(n - 1 - length, 0, -length)} if repeat > 1 else {}
    moves, p = [], n - 1
    while p >= 0:
        moves.append((p, p - 1))
        p -= 1
        if jumps.get(p, 0) > 0:
            jumps[p] -= 1
            moves.append((p, p + length))
            p += length
    return moves


@dataclass(frozen=True)
class StepNoise:
    """DDNM+'s per-step split (Wang et al. 2023, eq. 19) for y with noise of std sigma_y: the correction is scaled
    by lam so that the noise it brings, c lam sigma_y (c the step's coefficient of x_0), fits within the step's
    own noise sigma, and the fresh noise drawn is gamma = sqrt(sigma^2 - (c lam sigma_y)^2): the total stays sigma."""

    lam: float | torch.Tensor  # lambda_t: 1 where sigma >= c sigma_y, else sigma / (c sigma_y); [H, W] per frequency
    gamma: float | torch.Tensor  # the std of the fresh noise drawn (`Blur`: per frequency)

    @property
    def draws(self) -> bool:
        """Whether the step draws fresh noise: gamma > 0 (anywhere)."""
        return bool(torch.as_tensor(self.gamma).gt(0).any())


def step_noise(sigma: float, c: float, sigma_y: float) -> StepNoise:
    """`StepNoise` for a step with noise std `sigma` and x_0 coefficient `c`; sigma_y 0: lam 1, gamma sigma."""
    if sigma_y <= 0 or sigma >= c * sigma_y:
        lam = 1.0
    else:
        lam = sigma / (c * sigma_y)
    return StepNoise(lam=lam, gamma=math.sqrt(max(sigma**2 - (c * lam * sigma_y) ** 2, 0.0)))


ETA_RULES = ("ddim", "ddnm")  # how `ddnm`'s eta sets each step's fresh noise


def step_sigma(a_t: float, a_s: float, eta: float, rule: str = "ddim") -> float:
    """The std of the fresh noise of a DDIM-form step from abar_t to abar_s (a_s = 1: the last step, 0):
    "ddim": eta times the posterior's, sqrt((1 - a_s) / (1 - a_t) (1 - a_t / a_s)) (DDIM eq. 16); "ddnm": eta
    sqrt(1 - a_s), DDNM's code's rule."""
    return eta * math.sqrt(1 - a_s) if rule == "ddnm" else ddim_sigma(a_t, a_s, eta)


@torch.inference_mode()
def ddnm(diffusion: GaussianDiffusion, model: Model, y: torch.Tensor, op: Operator, timesteps: list[int], *,
         generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
         callback: Callback | None = None, eta: float = 1.0, eta_rule: str = "ddim", sigma_y: float = 0.0,
         travel_length: int = 1, travel_repeat: int = 1, x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Restore x [B, C, H, W] from y = A x (+ noise of std sigma_y) [B, *op.degraded_shape] with an unconditional
    model: DDNM (Wang et al. 2023, Algorithm 1) on the sampler grid `timesteps` (any `timestep_grid`).

    From grid point t to the previous one s (abar = 1 after the last), with x0_hat the model's prediction at x_t
    (clipped to [-1, 1] with clip_denoised):
        x0_c = x0_hat - lam_t A+ (A x0_hat - y) = lam_t A+ y + (I - lam_t A+ A) x0_hat     (DDNM eq. 13; lam = 1)
        x_s  = sqrt(abar_s) x0_c + sqrt(1 - abar_s - sigma^2) eps_c + gamma_t z           (DDIM eq. 12)
    with eps_c = (x_t - sqrt(abar_t) x0_c) / sqrt(1 - abar_t), the noise x_t holds given x0_c, and sigma by
    `eta_rule`:
    - "ddim" (the default): DDIM's eq. 16, sigma = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)).
      eta = 1 (the default) draws x_s from q(x_s | x_t, x0_c), the step of ancestral sampling with the posterior
      variance, as DDNM's Algorithm 1 writes it; eta < 1 less noise.
    - "ddnm": the rule of DDNM's released code, sigma = eta sqrt(1 - abar_s) with eta in [0, 1] (0.85 there):
      x_s = sqrt(abar_s) x0_c + sqrt(1 - abar_s) (sqrt(1 - eta^2) eps_c + eta z). A fixed share eta^2 of x_s's
      noise variance is fresh at every step, however fine the grid. DDIM's eta 1 on a 100-point grid of the
      linear schedule renews 9-18% of it from t = 999 down to t = 110, then more up to 95% at the last step; 0.85 renews 72%.
    Noiseless y (sigma_y 0): lam = 1 and gamma = sigma, and the output (x0_c of the last step) satisfies
    A x = y to float precision. DDNM+ (sigma_y > 0): lam_t and gamma_t from `op.step_noise` (eq. 19), the noise
    of A+ y counted as sigma_y per pixel (exact for sr, colorize and masks, whose A+ has orthogonal columns of
    norm 1 up to the block size) or, for the blur, per frequency (`Blur.step_noise`: sigma_y times A+'s gain
    there); at the last step sigma = 0, so lam = 0 there.

    Time travel (sec. 3.3): with travel_length L > 1 or travel_repeat r > 1, the grid is walked by
    `travel_moves`: at every L-th grid point x jumps back up L points with q(x_t' | x_t) =
    N(sqrt(abar_t' / abar_t) x_t, (1 - abar_t' / abar_t) I) and the L steps are redone, r - 1 times, letting the
    range and null-space parts agree. Network evaluations: len(timesteps) plus L (r - 1) per jump point.
    `callback(t, x_t, x0_c)` sees every step. x_T defaults to N(0, I) noise shaped like A+ y on a grid from
    T - 1. A grid that starts lower, at t0 (`timestep_grid(..., t_start=t0)`), starts from y's own estimate
    noised to t0 instead, x_t0 = sqrt(abar_t0) A+ y + sqrt(1 - abar_t0) z (Chung et al. 2022, "come closer,
    diffuse faster"): x_t0's range part then agrees with y from the first step, and its null-space part holds
    the noise alone (variance 1 - abar_t0, where x_t0 from the prior has abar_t0 var(x0) more); all the grid's
    points lie in 0..t0."""
    if sigma_y < 0:
        raise ValueError(f"sigma_y must be >= 0; got {sigma_y}")
    if eta_rule not in ETA_RULES:
        raise ValueError(f"eta_rule must be one of {', '.join(ETA_RULES)}; got {eta_rule!r}")
    if eta < 0 or (eta_rule == "ddnm" and eta > 1):
        raise ValueError(f"eta must lie in {'[0, 1]' if eta_rule == 'ddnm' else '[0, inf)'} with eta_rule "
                         f"{eta_rule!r}; got {eta}")
    expected = (y.shape[0], *op.degraded_shape(op.shape))
    if tuple(y.shape) != expected:
        raise ValueError(f"y must be {list(expected)} for this operator; got {list(y.shape)}")
    kept = list(timesteps)
    if x_T is None:
        x = randn(tuple(y.shape[:1]) + tuple(op.shape), generator, y.device, y.dtype)
        if kept[-1] < diffusion.num_timesteps - 1:  # a lower start: A+ y noised to it
            a = _abar(diffusion, kept[-1])
            x = math.sqrt(a) * op.pinv(y) + math.sqrt(1 - a) * x
    else:
        x = x_T
    moves = travel_moves(len(kept), travel_length, travel_repeat)
    for p, q in _progress(moves, progress, "ddnm"):
        t = kept[p]
        if q > p:  # time travel: x_t -> x_t' ~ q(x_t' | x_t), t' above t
            ratio = _abar(diffusion, kept[q]) / _abar(diffusion, t)
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * randn(tuple(x.shape), generator, x.device, x.dtype)
            continue
        s = kept[q] if q >= 0 else -1
        tt = _full(x, t)
        x0 = diffusion.p_mean_variance(model, x, tt, clip_denoised).pred_x0
        a_t, a_s = _abar(diffusion, t), _abar(diffusion, s)
        sigma = step_sigma(a_t, a_s, eta, eta_rule)
        keep = math.sqrt(max(1 - a_s - sigma**2, 0.0))  # the coefficient of eps_c
        c = math.sqrt(a_s) - keep * math.sqrt(a_t / (1 - a_t))  # x_s's coefficient of x0_c (through eps_c too)
        split = op.step_noise(sigma, c, sigma_y)
        x0 = x0 - op.pinv_scaled(op.A(x0) - y, split.lam)  # the range of A+ A from y, its null space from the model
        if callback is not None:
            callback(t, x, x0)
        eps = diffusion.predict_eps_from_x0(x, tt, x0)
        x = math.sqrt(a_s) * x0 + keep * eps
        if split.draws:
            x = x + op.shaped_noise(randn(tuple(x.shape), generator, x.device, x.dtype), split.gamma)
    return x


def ddnm_heun(diffusion: GaussianDiffusion, model: Model, y: torch.Tensor, op: Operator, timesteps: list[int], *,
              generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
              callback: Callback | None = None, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
              S_noise: float = 1.0, x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Restore x [B, C, H, W] from noiseless y = A x [B, *op.degraded_shape]: DDNM's null-space step inside EDM's
    Heun sampler with churn (`ddpm.sampling.heun`) instead of DDIM's step.

    Every denoiser output D of the sampler (both evaluations of each step) is replaced by its projection onto
    A x = y, D' = D - A+ (A D - y) = A+ y + (I - A+ A) D (DDNM eq. 13 with lam = 1), and d = (x~ - D') / sigma is
    formed from it; the last step returns D', so the output satisfies A x = y to float precision. The null-space
    part follows the unconditional sampler: with an isotropic prior's Bayes denoiser it is exactly the
    unconditional Heun output's. K = len(timesteps) grid points cost 2K - 1 network evaluations, with EDM's
    churn options as `heun` takes them. Noisy y (DDNM+) and time travel belong to `ddnm`'s DDIM steps only.
    x_T defaults to N(0, I) noise shaped like A+ y."""
    expected = (y.shape[0], *op.degraded_shape(op.shape))
    if tuple(y.shape) != expected:
        raise ValueError(f"y must be {list(expected)} for this operator; got {list(y.shape)}")
    x = randn(tuple(y.shape[:1]) + tuple(op.shape), generator, y.device, y.dtype) if x_T is None else x_T
    return heun(diffusion, model, x, timesteps, generator=generator, clip_denoised=clip_denoised, progress=progress,
                callback=callback, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise,
                denoised_fn=lambda x0: x0 - op.pinv(op.A(x0) - y))
