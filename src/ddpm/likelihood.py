"""Likelihood pieces of the variational bound: Gaussian KL, the discretized Gaussian decoder (eq. 13),
bits per dimension, and the rate-distortion curve of progressive lossy compression (paper section 4.3).

All functions are elementwise over tensors of any shape and compute in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, num_levels: int = 256
) -> torch.Tensor:
    """log p(x) under the paper's decoder L_0 (eq. 13), elementwise, in nats.

    x holds 8-bit data scaled to [-1, 1] (levels 2k/255 - 1). Each level owns a bin of width 2/255; the edge
    bins extend to -inf and +inf. Uses the exact normal CDF (the original code used a tanh approximation),
    evaluated in the tail where it is accurate.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    inv_std = torch.exp(-torch.as_tensor(log_scale, dtype=torch.float64))
    half_bin = 1.0 / (num_levels - 1)
    upper = (x - mean + half_bin) * inv_std
    lower = (x - mean - half_bin) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(z < upper): the bin at -1 reaches -inf
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(z > lower): the bin at +1 reaches +inf
    # Mass of an interior bin: take the difference on the side of the mean where it does not cancel.
    centred = (upper + lower) / 2
    delta = torch.where(
        centred > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mid = torch.log(delta.clamp(min=1e-12))
    edge = 1.0 - half_bin  # between the last interior level and the edge level
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, log_mid))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


@dataclass
class BpdResult:
    """The variational bound of a batch, in bits per dimension (paper Table 2, "NLL Test")."""

    total: torch.Tensor  # [B] prior + sum of terms: the NLL upper bound
    prior: torch.Tensor  # [B] L_T = KL(q(x_T | x_0) || N(0, I))
    terms: torch.Tensor  # [B, T] terms[:, 0] = L_0 (decoder NLL), terms[:, t] = L_t, a KL, for t >= 1
    x0_mse: torch.Tensor  # [B, T] mean squared error of the predicted x_0 from x_t, on the [-1, 1] scale


@dataclass
class RateDistortion:
    """Progressive lossy compression (paper section 4.3, Figure 5), averaged over a set of images."""

    t: torch.Tensor  # [T] timesteps 0..T-1
    rate: torch.Tensor  # [T] bits/dim received once x_t is known: L_T + sum_{s >= t} L_s (decoder term excluded)
    distortion: torch.Tensor  # [T] RMSE on the 0..255 scale of the x_0 predicted from x_t


def rate_distortion(result: BpdResult) -> RateDistortion:
    """Rate and distortion per timestep from `GaussianDiffusion.bpd` results (float64, averaged over B).

    Sending x_T costs L_T bits; each further x_{t-1} costs L_t (Algorithm 3 with relative entropy coding), so
    the rate once x_t is known is L_T + sum_{s=t+1}^{T-1} L_s; the receiver's best guess of x_0 from x_t is
    the predicted x_0, whose RMSE (on the 0..255 scale) is the distortion. The decoder term L_0 is not a
    transmission cost and is left out, as in the paper.
    """
    T = result.terms.shape[1]
    kl = result.terms.double().mean(0).clone()  # [T]
    kl[0] = 0.0
    # rate at t counts L_{t+1}..L_{T-1} (those KL terms were sent to reach x_t) plus the prior.
    after = torch.flip(torch.cumsum(torch.flip(kl, [0]), 0), [0])  # after[t] = sum_{s >= t} kl[s]
    sent = torch.cat([after[1:], after.new_zeros(1)])  # sum_{s > t} kl[s]
    rate = result.prior.double().mean() + sent
    distortion = torch.sqrt(result.x0_mse.double().mean(0)) * 127.5
    return RateDistortion(t=torch.arange(T), rate=rate, distortion=distortion)
