"""Classifier-free guidance (Ho & Salimans 2022) for a class-conditional model `model(x, t, y)`."""

from __future__ import annotations

from collections.abc import Callable

import torch


def guided_model(model: Callable[..., torch.Tensor], y: torch.Tensor, scale: float, null_label: int
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `model(x_t, t)` callable for the samplers, from a conditional `model(x [B, C, ...], t [B], y [B])`.

    Returns eps~ = eps(x_t, null) + scale (eps(x_t, y) - eps(x_t, null)) (Ho & Salimans, eq. 6 written with
    w = scale - 1), both predictions from one batched call of size 2B. scale = 1 gives the conditional model
    and scale = 0 the unconditional one, exactly. For learned-variance outputs ([B, 2C, ...]) only the first
    C channels are guided; the variance channels are the conditional ones. y is int64 [B'] with B' >= B: the
    first B labels are used, so one label tensor serves a shorter last batch.
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[0], x.shape[1]
        if y.shape[0] < B:
            raise ValueError(f"y holds {y.shape[0]} labels for a batch of {B}")
        labels = torch.cat([y[:B], torch.full((B,), null_label, device=y.device, dtype=y.dtype)])  # [2B]
        out = model(torch.cat([x, x]), torch.cat([t, t]), labels)  # [2B, C or 2C, ...]
        cond, uncond = out[:B], out[B:]
        # lerp(start, end, w) = start + w (end - start), exact at w = 0 and w = 1
        eps = torch.lerp(uncond[:, :C], cond[:, :C], scale)
        return torch.cat([eps, cond[:, C:]], dim=1) if out.shape[1] > C else eps

    return guided
