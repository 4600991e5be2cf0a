"""Pieces shared by the project's own feature classifiers (`ddpm.metrics.digits`, `ddpm.metrics.fashion`), which
must come out the same on every machine: SGD on a network is chaotic in float32, so they train in float64 from
initial weights that are exact functions of integers drawn from numpy's `RandomState` (whose streams numpy keeps
stable)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def uniform(rs: np.random.RandomState, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """U(-bound, bound) in float64 from 24-bit integers: every step but the final product is exact, so every
    machine gets the same bits (torch's own uniform_ differs by an ulp between vectorised kernels)."""
    k = rs.randint(0, 2**24, size=shape).astype(np.float64)
    return torch.from_numpy(((k + 0.5) / 2**23 - 1.0) * bound)


def init_default_scale(net: nn.Module, rs: np.random.RandomState) -> None:
    """PyTorch's default scale for Conv2d/Linear, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases,
    drawn by `uniform`."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / float(np.sqrt(m.weight[0].numel()))
                m.weight.copy_(uniform(rs, tuple(m.weight.shape), bound))
                m.bias.copy_(uniform(rs, tuple(m.bias.shape), bound))


def as_nchw_float(images, side: int, what: str) -> torch.Tensor:
    """uint8 [N, 1, side, side] or [N, side, side, 1] (tensor or array) -> float64 [N, 1, side, side] in [0, 1];
    `what` names the images in the errors."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"{what} images must be uint8; got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, side, side):
        raise ValueError(f"{what} images must be [N, 1, {side}, {side}] or [N, {side}, {side}, 1]; got {tuple(x.shape)}")
    return x.to(torch.float64) / 255.0
