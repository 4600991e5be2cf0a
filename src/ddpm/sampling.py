"""Samplers: free functions with one signature.

    sampler(diffusion, model, x_T, *, steps=None, generator=None, clip_denoised=True, progress=False,
            callback=None, t_start=None) -> x_0

x_T [B, ...] is the starting noise (or, with `t_start`, a latent at timestep t_start: the reverse process
then starts there, which editing and the shared-latent figures use). `generator` (one torch.Generator, or a
list with one per sample so that a sample does not depend on its batch) draws the noise of each step.
`callback(t, x_t, pred_x0)` sees every step. Samplers run under torch.inference_mode.
"""

from __future__ import annotations

from typing import Callable

import torch

from ddpm.diffusion import GaussianDiffusion, Generator, Model, randn

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _timesteps(diffusion: GaussianDiffusion, t_start: int | None) -> range:
    T = diffusion.num_timesteps
    start = T - 1 if t_start is None else int(t_start)
    if not 0 <= start < T:
        raise ValueError(f"t_start must lie in 0..{T - 1}; got {t_start}")
    return range(start, -1, -1)


def _progress(steps, progress: bool, desc: str):
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, leave=False)


@torch.inference_mode()
def ancestral(
    diffusion: GaussianDiffusion,
    model: Model,
    x_T: torch.Tensor,
    *,
    steps: int | None = None,
    generator: Generator = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: Callback | None = None,
    t_start: int | None = None,
) -> torch.Tensor:
    """Algorithm 2 of the paper, over all T steps (`steps` must be None or T)."""
    if steps is not None and steps != diffusion.num_timesteps:
        raise ValueError(f"ancestral sampling runs all {diffusion.num_timesteps} steps; use a fast sampler for {steps}")
    x = x_T
    B = x.shape[0]
    for i in _progress(_timesteps(diffusion, t_start), progress, "sampling"):
        t = torch.full((B,), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, clip_denoised)
        if callback is not None:
            callback(i, x, p.pred_x0)
        if i > 0:  # line 4: z ~ N(0, I) if t > 1, else z = 0
            z = randn(tuple(x.shape), generator, x.device, x.dtype)
            x = p.mean + torch.exp(0.5 * p.log_variance) * z  # line 4: x_{t-1} = mu + sigma_t z
        else:
            x = p.mean
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ancestral": ancestral}
