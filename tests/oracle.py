"""The analytic Gaussian oracle: the Bayes-optimal denoiser for data x0 ~ N(m, s^2) per dimension.

With abar = abar_t, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian, and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)
    E[x0  | x_t] = m + sqrt(abar) s^2 (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)
    E[v   | x_t] = sqrt(1 - abar) (sqrt(abar) (1 - s^2) x_t - m) / (abar s^2 + 1 - abar)
(v = sqrt(abar) eps - sqrt(1 - abar) x0 is linear in both, so E[v | x_t] = sqrt(abar) E[eps | x_t] -
sqrt(1 - abar) E[x0 | x_t], which simplifies to the last line; it is finite at abar = 0, where it is -m)
and the best x_{t-1} prediction is the posterior mean applied to E[x0 | x_t]. Written here from the closed
forms (float64, from the betas alone) so it shares no code with the library.
"""

from __future__ import annotations

import torch


def abar_of(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), 0)


class GaussianOracle:
    def __init__(self, betas: torch.Tensor, m: float, s: float, mean_type: str = "eps"):
        self.betas = betas.double()
        self.abar = abar_of(betas)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.m, self.s, self.mean_type = m, s, mean_type

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        a = self.abar[t].reshape(shape)
        x = x_t.double()
        denom = a * self.s**2 + 1 - a
        if self.mean_type == "eps":
            out = torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.m) / denom
        elif self.mean_type == "v":
            out = torch.sqrt(1 - a) * (torch.sqrt(a) * (1 - self.s**2) * x - self.m) / denom
        else:
            x0 = self.m + torch.sqrt(a) * self.s**2 * (x - torch.sqrt(a) * self.m) / denom
            if self.mean_type == "x0":
                out = x0
            else:  # xprev: the posterior mean, eq. 7, of E[x0 | x_t]
                b = self.betas[t].reshape(shape)
                ap = self.abar_prev[t].reshape(shape)
                out = b * torch.sqrt(ap) / (1 - a) * x0 + (1 - ap) * torch.sqrt(1 - b) / (1 - a) * x
        return out.to(x_t.dtype)


def sampler_moments(betas: torch.Tensor, m: float, s: float, var_type: str) -> tuple[float, float]:
    """Mean and std of the ancestral sampler's output with the oracle and no clipping.

    Each step is x_{t-1} = A_t x_t + C_t + sigma_t z with z ~ N(0, 1) (z = 0 at the last step), so the
    mean and variance follow a scalar recursion from x_T ~ N(0, 1)."""
    b = betas.double()
    abar = abar_of(b)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = b * (1 - abar_prev) / (1 - abar)
    mu, var = 0.0, 1.0
    for t in range(len(b) - 1, -1, -1):
        a, ap, beta = abar[t].item(), abar_prev[t].item(), b[t].item()
        denom = a * s**2 + 1 - a
        # E[x0 | x_t] = g x_t + h
        g = a**0.5 * s**2 / denom
        h = m - a * s**2 * m / denom
        c1 = beta * ap**0.5 / (1 - a)
        c2 = (1 - ap) * (1 - beta) ** 0.5 / (1 - a)
        A, C = c1 * g + c2, c1 * h
        if t == 0:
            sigma2 = 0.0
        elif var_type == "fixedlarge":
            sigma2 = beta
        else:
            sigma2 = post_var[t].item()
        mu, var = A * mu + C, A * A * var + sigma2
    return mu, var**0.5
