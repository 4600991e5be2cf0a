"""Classifier-free guidance (Ho & Salimans 2022) for a class-conditional model `model(x, t, y)`."""

from __future__ import annotations

from collections.abc import Callable

import torch


def guided_model(model: Callable[..., torch.Tensor], y: torch.Tensor, scale: float, null_label: int
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `model(x_t, t)` callable returning eps_uncond + scale (eps_cond - eps_uncond), from one batched call
    of size 2B. scale = 1 is the conditional model, 0 the unconditional one. For learned-variance outputs
    ([B, 2C, ...]) only the first C channels are guided; the variance channels are the conditional ones."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        labels = torch.cat([y[:B], torch.full((B,), null_label, device=y.device, dtype=y.dtype)])
        out = model(torch.cat([x, x]), torch.cat([t, t]), labels)
        cond, uncond = out[:B], out[B:]
        C = x.shape[1]
        eps = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1) if out.shape[1] > C else eps

    return guided
