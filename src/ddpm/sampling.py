"""Timestep grids, and samplers as free functions with one signature, each receiving its grid:

    sampler(diffusion, model, x_T, timesteps, *, generator=None, clip_denoised=True, progress=False,
            callback=None, **its own options) -> x_0

`timesteps` is an ascending list of 0-based timesteps (`timestep_grid` builds one: every step, uniform,
quadratic, trailing, log-SNR or Karras spacing, from `t_start`); the reverse process starts at x_T [B, ...], a
latent at timesteps[-1] (pure noise when that is T - 1; editing and the shared-latent figures start lower), and
steps down through the grid to the clean data. Each grid point is one network evaluation, except for `heun`
(second order: a grid of K points costs 2K - 1). `generator` (one
torch.Generator, or a `StackedGenerator` with one per sample so that a sample does not depend on its batch)
draws the noise of each step. `callback(t, x_t, pred_x0)` sees every step. Samplers run under
torch.inference_mode.

`SAMPLERS` says which grids and options each sampler takes; `run_sampler` builds the grid and refuses an
option that the sampler does not take. A new sampler is one function and one line in that table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm.diffusion import GaussianDiffusion, Generator, Model, randn
from ddpm.modes import Spacing, values

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------- shared pieces


SPACINGS = values(Spacing)  # timestep_grid's spacings


def timestep_subset(num_timesteps: int, steps: int | None, t_start: int | None = None,
                    spacing: str = "uniform") -> list[int]:
    """`steps` distinct timesteps over 0..t_start (default T - 1), ascending, both ends included.

    uniform: t_i = round(i t_start / (steps - 1)), i = 0..steps-1 (improved DDPM's even spacing);
    quad: t_i = round((i / (steps - 1))^2 t_start), denser near t = 0 (the DDIM paper's CIFAR-10 choice), where
    values that round alike are pushed up by one so all stay distinct;
    trailing: t_i = round(n - i n / steps) - 1 with n = t_start + 1, i = 0..steps-1 (Lin et al. 2024, sec. 3.3;
    diffusers' "trailing"): t_start is always kept, t = 0 only when every timestep is, and the last step
    jumps from the lowest kept timestep to the clean data. One step keeps t_start alone; steps=None keeps
    every timestep."""
    if spacing not in ("uniform", "quad", "trailing"):  # logsnr and karras need the schedule: timestep_grid
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    top = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= top < num_timesteps:
        raise ValueError(f"t_start must lie in 0..{num_timesteps - 1}; got {t_start}")
    if steps is None:
        return list(range(top + 1))
    if not isinstance(steps, int) or steps < 1 or steps > top + 1:
        raise ValueError(f"steps must be an integer in 1..{top + 1}; got {steps!r}")
    if steps == 1:
        return [top]
    if spacing == "uniform":  # distinct as they stand: the stride is at least 1
        return sorted({round(i * top / (steps - 1)) for i in range(steps)})
    if spacing == "trailing":  # distinct as they stand: the stride n / steps is at least 1
        n = top + 1
        return sorted({round(n - i * n / steps) - 1 for i in range(steps)})
    return _distinct([round((i / (steps - 1)) ** 2 * top) for i in range(steps)], top)


def _distinct(ts: list[int], top: int) -> list[int]:
    """Ascending timesteps made distinct (each at least one above the last), from 0 to top; needs len(ts) <= top + 1."""
    out: list[int] = []
    for t in sorted(ts):
        out.append(max(t, out[-1] + 1) if out else 0)
    out[-1] = top
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - 1)
    return out


def logsnr_subset(diffusion: GaussianDiffusion, steps: int | None, t_start: int | None = None) -> list[int]:
    """`steps` timesteps whose log-SNR lambda_t = log(alpha_t / sigma_t) is evenly spaced (the nearest
    timestep to each), as DPM-Solver recommends; uniform-in-t grids make its second-order steps overshoot
    (measured on the Gaussian oracle: std 0.39 instead of 0.30 at 20 steps, 0.306 with this grid)."""
    kept = timestep_subset(diffusion.num_timesteps, steps, t_start)
    if steps is None or len(kept) < 3:
        return kept
    lam = _log_snr(diffusion, kept[-1])
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    return _nearest_in_log_snr(lam, targets)


EDM_SIGMA_MAX = 80.0  # EDM's sigma_max (Karras et al. 2022, Table 1), for data in [-1, 1]


def karras_subset(diffusion: GaussianDiffusion, steps: int | None, t_start: int | None = None,
                  rho: float = 7.0) -> list[int]:
    """`steps` timesteps on EDM's grid (Karras et al. 2022, eq. 5): with sigma_t = sqrt((1 - abar_t) / abar_t),
    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..steps-1,
    each snapped to the timestep nearest in log sigma and made distinct as `logsnr_subset` does; the top point
    is t_start itself, where the sampler starts. sigma_min = sigma_0 and sigma_max = min(sigma_{t_start}, 80):
    EDM's 80 caps the paper's sigma_{T} = 157 and keeps zero terminal SNR's (sigma_{T-1} = 15406, then inf)
    from drawing half the grid above it (on the Gaussian oracle, 25 points: std 3% off with the cap, 4% at
    157, 20% uncapped with zero terminal SNR). rho = 7 puts the points densely at low noise, as EDM chose."""
    kept = timestep_subset(diffusion.num_timesteps, steps, t_start)
    if steps is None or len(kept) < 3:
        return kept
    lam = _log_snr(diffusion, kept[-1])  # lambda_t = -log sigma_t
    sigma_max = min(math.exp(-float(lam[-1])), EDM_SIGMA_MAX)
    hi, lo = sigma_max ** (1 / rho), math.exp(-float(lam[0]) / rho)  # sigma_max^(1/rho), sigma_min^(1/rho)
    sigmas = (hi + torch.linspace(0, 1, steps, dtype=torch.float64) * (lo - hi)) ** rho
    return _nearest_in_log_snr(lam, -torch.log(sigmas))


def _log_snr(diffusion: GaussianDiffusion, top: int) -> torch.Tensor:
    """lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)) for t = 0..top, decreasing in t; with zero terminal SNR
    lambda_{T-1} = -inf is replaced by lambda_{T-2}, so that the grids stay finite (and still end at top)."""
    abar = diffusion.alphas_cumprod[: top + 1]
    lam = 0.5 * torch.log(abar / (1 - abar))
    return lam.clamp(min=float(lam[torch.isfinite(lam)].min()))


def _nearest_in_log_snr(lam: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """For each target lambda the timestep (an index into lam [top + 1], decreasing) nearest to it, made distinct
    from 0 to top: near t = 0 several targets share a timestep."""
    picked = torch.searchsorted(-lam, -targets).clamp(max=len(lam) - 1)  # first t with lambda_t <= target
    below = (picked - 1).clamp(min=0)
    nearer = torch.where((lam[below] - targets).abs() < (lam[picked] - targets).abs(), below, picked)
    return _distinct(nearer.tolist(), len(lam) - 1)


def timestep_grid(diffusion: GaussianDiffusion, steps: int | None = None, spacing: str = "uniform",
                  t_start: int | None = None) -> list[int]:
    """The ascending timesteps a sampler visits: every timestep 0..t_start (steps None), or `steps` of them
    spaced "uniform" / "quad" / "trailing" (`timestep_subset`), evenly in log-SNR ("logsnr", `logsnr_subset`) or
    on EDM's rho = 7 sigma grid ("karras", `karras_subset`)."""
    if spacing == "logsnr":
        return logsnr_subset(diffusion, steps, t_start)
    if spacing == "karras":
        return karras_subset(diffusion, steps, t_start)
    return timestep_subset(diffusion.num_timesteps, steps, t_start, spacing)


def _progress(seq, progress: bool, desc: str):
    if not progress:
        return seq
    from tqdm.auto import tqdm

    return tqdm(seq, desc=desc, leave=False)


def _eps_and_x0(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, t: torch.Tensor,
                clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (eps, x0) predictions whatever its mean_type; x0 clipped when asked and eps recomputed
    from the clipped x0, so the two stay consistent (DDIM appendix; as common implementations do)."""
    p = diffusion.p_mean_variance(model, x, t, clip_denoised)
    return diffusion.predict_eps_from_x0(x, t, p.pred_x0), p.pred_x0


def _noise(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """z ~ N(0, I) shaped like x: the one place a sampler draws noise (one generator per sample allowed)."""
    return randn(tuple(x.shape), generator, x.device, x.dtype)


def _p_sample(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, t: int, generator: Generator,
              clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 2 (lines 3-4) from x_t [B, ...]: (x_{t-1} = mu_theta(x_t, t) + sigma_t z, pred_x0);
    z = 0 at the last step (t = 0)."""
    p = diffusion.p_mean_variance(model, x, _full(x, t), clip_denoised)
    if t == 0:
        return p.mean, p.pred_x0
    return p.mean + torch.exp(0.5 * p.log_variance) * _noise(x, generator), p.pred_x0


def _abar(diffusion: GaussianDiffusion, t: int) -> float:
    """abar_t, with abar = 1 at t = -1 (the clean data)."""
    return 1.0 if t < 0 else float(diffusion.alphas_cumprod[t])


def _sigma(diffusion: GaussianDiffusion, t: int) -> float:
    """EDM's noise level sigma_t = sqrt((1 - abar_t) / abar_t): 0 at t = -1, inf at abar_t = 0."""
    a = _abar(diffusion, t)
    return math.sqrt((1 - a) / a) if a > 0 else math.inf


def _full(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- samplers


def _every_timestep(timesteps: list[int]) -> bool:
    return list(timesteps) == list(range(len(timesteps)))


@torch.inference_mode()
def ancestral(diffusion: GaussianDiffusion, model: Model, x_T: torch.Tensor, timesteps: list[int], *,
              generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
              callback: Callback | None = None) -> torch.Tensor:
    """Algorithm 2 of the paper over `timesteps` t_1 < ... < t_S.

    Every timestep 0..t_S: the paper's sampler on the diffusion's own tables. A subset: improved DDPM's
    respacing (sec. 4): the kept timesteps define a shorter process with beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}
    (`respace`), whose own tables give the posterior and the variances (fixedlarge, fixedsmall and the
    learned_range bounds), so each step goes to the previous kept timestep, never to t - 1; the model is
    called with the original timesteps t_i."""
    if not _every_timestep(timesteps):
        short = respace(diffusion, list(timesteps))
        index = torch.tensor(list(timesteps), device=x_T.device)

        def on_original_t(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return model(x, index[i])

        def report(i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            callback(timesteps[i], x, pred_x0)

        return ancestral(short, on_original_t, x_T, list(range(len(timesteps))), generator=generator,
                         clip_denoised=clip_denoised, progress=progress,
                         callback=report if callback is not None else None)
    x = x_T  # line 1: x_T ~ N(0, I), drawn by the caller
    for i in _progress(reversed(timesteps), progress, "sampling"):  # line 2: for t = T, ..., 1
        x_prev, pred_x0 = _p_sample(diffusion, model, x, i, generator, clip_denoised)  # lines 3-4
        if callback is not None:
            callback(i, x, pred_x0)
        x = x_prev
    return x  # line 6


def respace(diffusion: GaussianDiffusion, kept: list[int]) -> GaussianDiffusion:
    """A diffusion on the kept timesteps (improved DDPM sec. 4): beta_i = 1 - abar_{t_i} / abar_{t_{i-1}},
    with the same mean, variance and loss types."""
    abar = diffusion.alphas_cumprod[torch.tensor(kept)]
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return GaussianDiffusion(1 - abar / prev, mean_type=diffusion.mean_type, var_type=diffusion.var_type,
                             loss_type=diffusion.loss_type, hybrid_lambda=diffusion.hybrid_lambda,
                             loss_weight=diffusion.loss_weight, min_snr_gamma=diffusion.min_snr_gamma)


def ddim_sigma(a_t: float, a_s: float, eta: float) -> float:
    """DDIM's eq. 16: the std of a step's fresh noise from abar_t to abar_s, eta times the posterior's,
    eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s) (a_s = 1 after the last grid point: 0)."""
    return eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))


@torch.inference_mode()
def ddim(diffusion: GaussianDiffusion, model: Model, x_T: torch.Tensor, timesteps: list[int], *,
         generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
         callback: Callback | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021) over `timesteps`; from t to the previous grid point s (eq. 12):

        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)          (eq. 16)

    with abar = 1 after the last grid point. eta = 0 is deterministic (over all T steps, the probability-flow
    ODE's discretisation); eta = 1 over every timestep is ancestral sampling with the posterior variance
    (fixedsmall). x0_hat and eps_hat come from any mean_type; with clip_denoised, x0_hat is clipped to [-1, 1]
    and eps_hat recomputed from it."""
    kept = list(timesteps)
    x = x_T
    for j in _progress(range(len(kept) - 1, -1, -1), progress, "ddim"):  # eq. 12 from t = kept[j] to s
        t, s = kept[j], (kept[j - 1] if j > 0 else -1)
        eps, x0 = _eps_and_x0(diffusion, model, x, _full(x, t), clip_denoised)
        if callback is not None:
            callback(t, x, x0)
        a_t, a_s = _abar(diffusion, t), _abar(diffusion, s)
        sigma = ddim_sigma(a_t, a_s, eta)
        # x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
    return x


@torch.inference_mode()
def dpmpp2m(diffusion: GaussianDiffusion, model: Model, x_T: torch.Tensor, timesteps: list[int], *,
            generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
            callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in the data prediction.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i, D_i = x0_hat at t_{i-1}:
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D,
        D = (1 + 1 / (2 r_i)) D_i - (1 / (2 r_i)) D_{i-1}   (D = D_i on the first step, first order)
    The last step lands on the clean data (sigma = 0) with first order: x_0 = D_i. Its grid is evenly spaced
    in log-SNR (`logsnr_subset`), each point a network evaluation. Deterministic: `generator` is unused."""
    kept = list(timesteps)

    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        a = _abar(diffusion, t)
        alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
        if alpha == 0:  # zero terminal SNR: h = inf on the first step, which is first order anyway (DDIM's)
            return alpha, sigma, -math.inf
        return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)

    x = x_T
    prev_x0, prev_h = None, None
    for j in _progress(range(len(kept) - 1, -1, -1), progress, "dpm-solver++"):
        t, s = kept[j], (kept[j - 1] if j > 0 else -1)
        _, x0 = _eps_and_x0(diffusion, model, x, _full(x, t), clip_denoised)
        if callback is not None:
            callback(t, x, x0)
        _, sigma_t, lam_t = alpha_sigma_lambda(t)
        alpha_s, sigma_s, lam_s = alpha_sigma_lambda(s)
        if s < 0:  # to the clean data: x_0 = D (the limit sigma_s -> 0)
            x = x0
            break
        h = lam_s - lam_t
        if prev_x0 is None:
            d = x0  # first order (DPM-Solver++ 1 = DDIM)
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


@torch.inference_mode()
def heun(diffusion: GaussianDiffusion, model: Model, x_T: torch.Tensor, timesteps: list[int], *,
         generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
         callback: Callback | None = None, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
         S_noise: float = 1.0, denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """EDM's second-order sampler with churn (Karras et al. 2022, Algorithm 2) on this discrete VP schedule.

    In EDM's variables sigma_t = sqrt((1 - abar_t) / abar_t) and x~ = x_t / sqrt(abar_t); the denoiser
    D(x~; sigma_t) is the model's x0_hat at timestep t given x_t = sqrt(abar_t) x~, and d = (x~ - D) / sigma is
    its eps_hat (x~ = x_0 + sigma eps). The grid sigma_{t_K} > ... > sigma_{t_1}, then 0 (the clean data);
    K = len(timesteps) steps, from sigma_i to the next sigma_{i+1}:
        gamma = min(S_churn / K, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0     (line 4)
        sigma^ = (1 + gamma) sigma_i, taken at the timestep t^ >= t_i nearest in log sigma (line 6)
        x^ = x_i + sqrt(sigma^2 - sigma_i^2) S_noise z                                    (line 7)
        x_{i+1} = x^ + (sigma_{i+1} - sigma^) d(x^; sigma^)                               (lines 8-9, Euler)
        x_{i+1} = x^ + (sigma_{i+1} - sigma^) (d(x^; sigma^) + d(x_{i+1}; sigma_{i+1})) / 2 (lines 10-12, Heun)
    the correction skipped on the last step (sigma_{i+1} = 0: x_0 = D). Network evaluations: 2K - 1, the
    second one of each step at the next grid point (EDM's 18 steps are 35). The defaults (S_churn 0) are the
    deterministic Heun sampler, which draws no noise. With zero terminal SNR sigma_T = inf: no churn there,
    and its step, x_{i+1} = D + sigma_{i+1} d (line 9 rewritten, finite), stays first order (2K - 2 evaluations).
    Its default grid is EDM's (`karras_subset`).

    `denoised_fn(D)`, when given, replaces every denoiser output D (both evaluations of a step) before d is
    formed from it, d = (x~ - D') / sigma: the hook of a projection such as DDNM's onto A x = y
    (`ddpm.restoration.ddnm_heun`). The last step returns D' itself."""
    kept = list(timesteps)
    K = len(kept)
    log_sigma = 0.5 * torch.log((1 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod)  # [T], inf at abar = 0
    x = x_T  # at timestep kept[-1], in the model's (VP) scaling
    for j in _progress(range(K - 1, -1, -1), progress, "heun"):
        t, s = kept[j], (kept[j - 1] if j > 0 else -1)
        sigma_t, sigma_s = _sigma(diffusion, t), _sigma(diffusion, s)
        gamma = min(S_churn / K, math.sqrt(2) - 1) if S_tmin <= sigma_t <= S_tmax and math.isfinite(sigma_t) else 0.0
        t_hat = t
        if gamma > 0:  # line 6, by timestep: the t^ >= t whose log sigma is nearest to log((1 + gamma) sigma_t)
            t_hat = t + int((log_sigma[t:] - math.log((1 + gamma) * sigma_t)).abs().argmin())
        sigma_hat = _sigma(diffusion, t_hat)
        if t_hat != t:  # line 7: noise up from sigma_t to sigma^, in x~ and back to the model's scaling
            z = _noise(x, generator)
            x_tilde = x / math.sqrt(_abar(diffusion, t)) + math.sqrt(sigma_hat**2 - sigma_t**2) * S_noise * z
            x = x_tilde * math.sqrt(_abar(diffusion, t_hat))
        d, denoised = _eps_and_x0(diffusion, model, x, _full(x, t_hat), clip_denoised)  # line 8
        if denoised_fn is not None:
            denoised = denoised_fn(denoised)
            d = diffusion.predict_eps_from_x0(x, _full(x, t_hat), denoised)
        if callback is not None:
            callback(t_hat, x, denoised)
        x_next = denoised + sigma_s * d  # line 9, x^ + (sigma_{i+1} - sigma^) d with x^ = D + sigma^ d
        if sigma_s > 0 and math.isfinite(sigma_hat):  # lines 10-12: the second evaluation, at the next grid point
            x_s = x_next * math.sqrt(_abar(diffusion, s))
            d_next, denoised_next = _eps_and_x0(diffusion, model, x_s, _full(x, s), clip_denoised)
            if denoised_fn is not None:
                d_next = diffusion.predict_eps_from_x0(x_s, _full(x, s), denoised_fn(denoised_next))
            x_next = x / math.sqrt(_abar(diffusion, t_hat)) + (sigma_s - sigma_hat) * (d + d_next) / 2
        x = x_next * math.sqrt(_abar(diffusion, s))  # back to the model's scaling at s (the data itself at s = -1)
    return x


@torch.inference_mode()
def ddim_invert(diffusion: GaussianDiffusion, model: Model, x0: torch.Tensor, timesteps: list[int], *,
                clip_denoised: bool = True, progress: bool = False, callback: Callback | None = None) -> torch.Tensor:
    """DDIM inversion: x0 [B, ...] deterministically to a latent at timesteps[-1], the eta = 0 map of `ddim`
    run forwards (Song et al. 2021, sec. 4.3), so that `ddim(diffusion, model, x_T, timesteps)` maps it back.

    From the grid point s to the next one t (s = clean data before the first):
        x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat                                 (eq. 12, eta = 0)
    with (x0_hat, eps_hat) predicted at (x_s, s), where `ddim` predicts them at (x_t, t): the same ODE
    discretised from the other end, so the round trip error shrinks with the step size. On the first step x0_hat
    is x0 itself and eps_hat the model's at (x0, t_1) (no prediction exists at the clean data; abar_{t_1} is close
    to 1 on the usual grids). K = len(timesteps) network evaluations; `callback(t, x, x0_hat)` sees each."""
    kept = list(timesteps)
    x = x0
    for j in _progress(range(len(kept)), progress, "ddim inversion"):
        t, s = kept[j], (kept[j - 1] if j > 0 else -1)
        at = t if s < 0 else s  # the model has no prediction at the clean data: the first step asks it at t_1
        eps, x0_hat = _eps_and_x0(diffusion, model, x, _full(x, at), clip_denoised)
        if s < 0:
            x0_hat = x
        if callback is not None:
            callback(at, x, x0_hat)
        a_t = _abar(diffusion, t)
        x = math.sqrt(a_t) * x0_hat + math.sqrt(1 - a_t) * eps
    return x


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Sampler:
    """A sampler's row in `SAMPLERS`: its function, the grid spacings it runs on (its default first; none:
    every timestep only, so it takes no `steps`), and the names of its own keyword options."""

    fn: Callable[..., torch.Tensor]
    spacings: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(ancestral),  # the paper's Algorithm 2, every timestep
    "respaced": Sampler(ancestral, ("uniform", "quad", "trailing")),  # Algorithm 2 on a subset (improved DDPM)
    "ddim": Sampler(ddim, ("uniform", "quad", "trailing"), ("eta",)),  # DDIM; eta = 0 deterministic
    "dpmpp2m": Sampler(dpmpp2m, ("logsnr",)),  # DPM-Solver++(2M)
    # EDM's Heun sampler with churn (S_churn 0: deterministic); `steps` grid points cost 2 steps - 1 evaluations
    "heun": Sampler(heun, ("karras", "uniform", "trailing"), ("S_churn", "S_tmin", "S_tmax", "S_noise")),
}


def check_sampler(name: str, steps: int | None = None, spacing: str | None = None,
                  options: dict | None = None) -> Sampler:
    """The table row of `name`, refusing (ValueError, naming the sampler and the option) what it does not take."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    if spacing is not None and spacing not in spec.spacings:
        takers = sorted(n for n, s in SAMPLERS.items() if spacing in s.spacings)
        if not takers:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        plural = "samplers" if len(takers) > 1 else "sampler"
        raise ValueError(f"spacing {spacing!r} applies to the {' and '.join(takers)} {plural}, not {name!r}")
    if steps is not None and not spec.spacings:
        raise ValueError(f"{name} sampling runs all timesteps; use 'respaced' or 'ddim' for steps={steps}")
    for key in options or {}:
        if key not in spec.options:
            takers = sorted(n for n, s in SAMPLERS.items() if key in s.options)
            where = f" (only {', '.join(takers)} takes it)" if takers else ""
            raise ValueError(f"sampler {name!r} takes no option {key!r}{where}")
    return spec


def run_sampler(name: str, diffusion: GaussianDiffusion, model: Model, x_T: torch.Tensor, *,
                steps: int | None = None, spacing: str | None = None, t_start: int | None = None,
                generator: Generator = None, clip_denoised: bool = True, progress: bool = False,
                callback: Callback | None = None, **options) -> torch.Tensor:
    """Sampler `name` from x_T on its grid: `steps` grid points (None: every timestep), one network evaluation
    each (heun: 2 steps - 1 in all), with `spacing` (None: the sampler's default) over 0..t_start (default
    T - 1); `options` are its own (`SAMPLERS[name].options`)."""
    spec = check_sampler(name, steps, spacing, options)
    grid = timestep_grid(diffusion, steps, spacing or (spec.spacings or ("uniform",))[0], t_start)
    return spec.fn(diffusion, model, x_T, grid, generator=generator, clip_denoised=clip_denoised, progress=progress,
                   callback=callback, **options)


# ---------------------------------------------------------------------------------------------- conditioning


@torch.inference_mode()
def inpaint(diffusion: GaussianDiffusion, model: Model, x_known: torch.Tensor, mask: torch.Tensor, *,
            generator: Generator = None, resample: int = 1, clip_denoised: bool = True, progress: bool = False,
            x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Inpainting with an unconditional model (RePaint, Lugmayr et al. 2022, Algorithm 1 with jump length 1).

    x_known [B, ...] in [-1, 1]; mask [B, ...] (or broadcastable to it) of 0/1, 1 where the pixel is known.
    Every timestep, over all T:
        x_{t-1}^known   ~ q(x_{t-1} | x_0 = x_known)          (RePaint eq. 8; x_known itself at the last step)
        x_{t-1}^unknown ~ p_theta(x_{t-1} | x_t)               (eq. 9)
        x_{t-1} = mask * known + (1 - mask) * unknown          (eq. 10)
    and, `resample` - 1 times, x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and the step is
    repeated, letting the two regions agree. The last step (t = 0) runs once: nothing is re-noised there, so
    T * resample - (resample - 1) model calls. The output equals x_known exactly where mask = 1.
    """
    if resample < 1:
        raise ValueError(f"resample must be >= 1; got {resample}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold 0 (unknown) and 1 (known) only")
    known_b = torch.broadcast_to(mask, x_known.shape).bool()  # [B, ...]
    x = _noise(x_known, generator) if x_T is None else x_T
    for i in _progress(range(diffusion.num_timesteps - 1, -1, -1), progress, "inpainting"):
        rounds = resample if i > 0 else 1
        for r in range(rounds):
            unknown, _ = _p_sample(diffusion, model, x, i, generator, clip_denoised)
            known = diffusion.q_sample(x_known, _full(x, i - 1), _noise(x, generator)) if i > 0 else x_known
            x_prev = torch.where(known_b, known, unknown)
            if r < rounds - 1:  # jump back one step: x_t ~ q(x_t | x_{t-1})
                beta = diffusion._extract("betas", _full(x, i), x)
                x = torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * _noise(x, generator)
        x = x_prev
    return x


@torch.inference_mode()
def edit(diffusion: GaussianDiffusion, model: Model, x0: torch.Tensor, t_edit: int, *, sampler: str = "ancestral",
         steps: int | None = None, generator: Generator = None, clip_denoised: bool = True,
         progress: bool = False, **options) -> torch.Tensor:
    """Edit an image (SDEdit, Meng et al. 2022): x0 [B, ...] in [-1, 1] is noised to t_edit with q(x_t | x_0)
    (DDPM eq. 4), then the named sampler (`SAMPLERS`) runs the reverse process from there (`t_start = t_edit`;
    `steps` counts the timesteps in 0..t_edit). Small t_edit keeps the image; T - 1 forgets it."""
    if not 0 <= t_edit < diffusion.num_timesteps:
        raise ValueError(f"t_edit must lie in 0..{diffusion.num_timesteps - 1}; got {t_edit}")
    check_sampler(sampler, steps, None, options)
    x_t = diffusion.q_sample(x0, _full(x0, t_edit), _noise(x0, generator))
    return run_sampler(sampler, diffusion, model, x_t, steps=steps, t_start=t_edit, generator=generator,
                       clip_denoised=clip_denoised, progress=progress, **options)
