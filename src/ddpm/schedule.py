"""Beta schedules -> float64 tables [T].

The paper uses `linear` (1e-4 .. 0.02 over T = 1000). `quad`, `const` and `jsd` are the other schedules of the
paper's code; `cosine` is improved DDPM's (Nichol & Dhariwal 2021, eq. 17).
"""

from __future__ import annotations

import math

import torch

from ddpm.modes import BetaSchedule, parse_enum


def beta_schedule(
    name: str | BetaSchedule,
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """The betas of the forward process as a float64 tensor [T].

    Args:
        name: a `ddpm.modes.BetaSchedule` or its value ("linear", ...).
        num_timesteps: T.
        beta_start, beta_end: end points for "linear" and "quad"; "const" uses beta_end.
        cosine_s, max_beta: the offset and the cap of the cosine schedule.
    """
    kind = parse_enum(BetaSchedule, name, "beta schedule")
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer; got {num_timesteps!r}")
    T = num_timesteps
    if kind is BetaSchedule.LINEAR:
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif kind is BetaSchedule.QUAD:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif kind is BetaSchedule.CONST:
        betas = torch.full((T,), beta_end, dtype=torch.float64)
    elif kind is BetaSchedule.JSD:
        betas = 1.0 / torch.linspace(T, 1, T, dtype=torch.float64)
    elif kind is BetaSchedule.COSINE:
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    else:  # pragma: no cover - every member is handled above
        raise AssertionError(kind)
    if not (betas > 0).all() or not (betas <= 1).all():
        raise ValueError(f"betas must lie in (0, 1]; check beta_start={beta_start}, beta_end={beta_end}")
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas [T] whose terminal SNR is exactly 0 (Lin et al. 2024, Algorithm 1), float64.

    sqrt(abar_t) is shifted by its last value and scaled so that sqrt(abar_T) = 0 while sqrt(abar_1) keeps its
    value, then turned back into betas: beta_t = 1 - abar_t / abar_{t-1}. The last beta is exactly 1 (x_T is
    pure noise, whatever x_0), and beta_1 is kept bit for bit (the formula would give it back to rounding only).
    The schedules of this module all end at abar_T > 0 (the paper's linear one at 4e-5), so x_T still carries
    some of x_0 in training while sampling starts from N(0, I); this removes that mismatch, but it needs a model
    that does not predict eps (`GaussianDiffusion` refuses that).
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs a 1-D schedule of T >= 2 betas; got shape {tuple(betas.shape)}")
    root = torch.cumprod(1 - betas, 0).sqrt()  # sqrt(abar_t)
    first, last = root[0].clone(), root[-1].clone()
    if not first > last:
        raise ValueError("rescale_zero_terminal_snr needs a decreasing abar_t (betas in (0, 1))")
    root = (root - last) * (first / (first - last))  # root[-1] = 0 exactly: x - x
    abar = root**2
    out = 1 - abar[1:] / abar[:-1]  # the last one: 1 - 0 / abar_{T-1} = 1 exactly
    return torch.cat([betas[:1], out])
