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
