"""Loss-aware sampling of the training timesteps (improved DDPM, Nichol & Dhariwal 2021, sec. 3.3).

L_vlb = sum_t L_t has terms of very different size (the first few dominate), so drawing t uniformly gives a noisy
estimate of it. Drawing t with p_t proportional to sqrt(E[L_t^2]) and weighting each example's loss by
1 / (T p_t) keeps the estimate unbiased, E_{t ~ p}[L_t / (T p_t)] = (1 / T) sum_t L_t, with a lower variance.
E[L_t^2] comes from the last `history` losses seen at t; until every t has that many, t is uniform (weights 1).

The state is one table of losses [T, history] and the number of them filled [T]: `state_dict` goes into the
checkpoint, so that a resumed run draws the same t. The training loop (`ddpm.train`) draws t for the whole
global batch from one generator, and updates every rank's copy with the losses of all ranks, in the global
batch's order: the copies never diverge.
"""

from __future__ import annotations

import math

import torch


class ImportanceSampler:
    """p_t = (1 - uniform_prob) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + uniform_prob / T once warmed up.

    Args:
        num_timesteps: T.
        history: losses kept per t (10, as improved DDPM).
        uniform_prob: the uniform share of p (0.001, as improved DDPM's code): no t ever gets p_t = 0, and so no
            weight 1 / (T p_t) is unbounded.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        if num_timesteps < 1 or history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"ImportanceSampler needs T >= 1, history >= 1 and uniform_prob in [0, 1]; got "
                             f"{num_timesteps}, {history}, {uniform_prob}")
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)  # [T, history], oldest first
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)  # [T]: how many of each row are filled

    def warmed_up(self) -> bool:
        """Whether every t holds `history` losses (before that, t is drawn uniformly)."""
        return bool((self.counts == self.history).all())

    def probs(self) -> torch.Tensor:
        """p_t, float64 [T], summing to 1: uniform until warmed up."""
        T = self.num_timesteps
        if not self.warmed_up():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        root = self.losses.pow(2).mean(1).sqrt()  # sqrt(E[L_t^2]) [T]
        total = root.sum()
        if not total > 0:  # every loss 0 (a degenerate model): nothing to prefer
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        return (1 - self.uniform_prob) * root / total + self.uniform_prob / T

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t int64 [batch] ~ p on the CPU. Until warmed up it is `torch.randint(0, T, (batch,), generator=g)`, the
        uniform sampler's own draw, so that a run's first steps are those of a uniform run bit for bit."""
        if not self.warmed_up():
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator)
        return torch.multinomial(self.probs(), batch, replacement=True, generator=generator)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """1 / (T p_t) for t [B] (float64, on t's device): the weights that make sum_t p_t w_t L_t = mean_t L_t.
        Exactly 1 until warmed up."""
        if not self.warmed_up():  # not T * (1 / T), which can miss 1 by an ulp
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        return (1.0 / (self.num_timesteps * self.probs())).to(t.device)[t]

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Add each example's (unweighted) loss [B] to the history of its t [B], in batch order; a full row drops
        its oldest. Non-finite losses are skipped: a step the trainer discards must not poison p for good."""
        if t.shape != losses.shape or t.ndim != 1:
            raise ValueError(f"t and losses must both be [B]; got {tuple(t.shape)} and {tuple(losses.shape)}")
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if not math.isfinite(li):
                continue
            n = int(self.counts[ti])
            if n < self.history:
                self.losses[ti, n] = li
                self.counts[ti] = n + 1
            else:
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole state: {"losses": [T, history] float64, "counts": [T] int64} (copies)."""
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict`'s output, refusing one of another T or history."""
        losses, counts = state["losses"], state["counts"]
        if tuple(losses.shape) != tuple(self.losses.shape) or tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(f"importance sampler state of shape {tuple(losses.shape)} does not fit T = "
                             f"{self.num_timesteps}, history = {self.history}")
        self.losses = losses.to(torch.float64).cpu().clone()
        self.counts = counts.to(torch.int64).cpu().clone()
