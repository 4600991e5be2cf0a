"""Conditioning by concatenation (SR3, Saharia et al. 2021; Palette, Saharia et al. 2022): a network trained on
pairs (x0, y = A x0) predicts eps from x_t stacked with a condition image c made from y, and restores by sampling
from p(x0 | y) with the condition fixed at every network call.

The condition has the clean image's shape [B, C, H, W], so the same network input serves every task:
    c = A+ y   the degraded image brought back to the clean size by the operator's pseudo-inverse
               (sr: nearest upsampling; colorize: the gray copied to every channel; inpaint: the masked image)
    c = y      for the blur, whose y is already full size: A+ of an 8-bit y would multiply its rounding by up to
               1 / cutoff = 1000 at the frequencies the blur all but removes (`ddpm.restoration.Blur`)
Training (`ddpm.train`) and restoring (`ddpm.generate.restore_batch`) both make it with `condition` and feed it
with `concatenated`, so the two cannot disagree.

This module knows no networks and no schedules: the model is a callable net(x, t) as in `ddpm.diffusion`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddpm.diffusion import Model
from ddpm.restoration import Blur, Operator


def condition(op: Operator, y: torch.Tensor) -> torch.Tensor:
    """The condition image c [B, C, H, W] (op.shape) of degraded images y [B, *op.degraded_shape]: A+ y, or y
    itself for the blur (see the module's docstring)."""
    if isinstance(op, Blur):
        op._check(y, op.shape, "condition")
        return y
    return op.pinv(y)


def condition_from_clean(op: Operator, x0: torch.Tensor) -> torch.Tensor:
    """The condition of clean images x0 [B, C, H, W]: `condition(op, A x0)`, the training pairs made on the fly."""
    return condition(op, op.A(x0))


def concatenated(net: Callable[..., torch.Tensor], cond: torch.Tensor) -> Model:
    """`net` as a `model(x_t, t)` callable that sees [x_t, c] stacked on the channels, [B, C + C_c, H, W], for a
    fixed condition c [B', C_c, H, W] with B' >= B (its first B rows used, so one condition serves a shorter
    last batch)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = cond[: x.shape[0]]
        if c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
            raise ValueError(f"the condition is {list(cond.shape)}, x_t {list(x.shape)}: they need one height, "
                             "width and enough rows")
        return net(torch.cat([x, c.to(x.dtype)], dim=1), t)

    return model
