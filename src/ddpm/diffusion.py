"""GaussianDiffusion: the forward process q, its posterior, the reverse process p and the training losses.

Timesteps are 0-based: t = 0..T-1 in code is t = 1..T in the paper, so `q_sample(x0, 0)` is the paper's x_1
and the decoder term L_0 belongs to t = 0. Every method takes a callable `model(x_t, t)` (x_t [B, ...] in
[-1, 1], t int64 [B]); nothing here knows about networks. The schedule's tables are float64 [T], each one
computed once in `__init__` (the public attributes `betas`, `alphas_cumprod`, `posterior_variance`, ...) and
moved to a device all together on that device's first use; a method reads table[t] there, cast to the input's
dtype.

Zero terminal SNR (`ddpm.schedule.rescale_zero_terminal_snr`, or the jsd schedule) makes abar_{T-1} = 0: every
table stays finite except sqrt_recip_alphas_cumprod and sqrt_recipm1_alphas_cumprod at t = T - 1 (1 / 0), which
only `predict_x0_from_eps` reads unguarded there; eps prediction is refused for such betas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ddpm.likelihood import (
    LN2,
    BpdResult,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from ddpm.modes import LossType, LossWeight, MeanType, VarType, check_diffusion_modes, parse_enum

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_CPU = torch.device("cpu")


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, identity is what matters
class Tables:
    """Every table [T] the methods read, all float64 and on one device; a field's name is the attribute of
    `GaussianDiffusion` that holds its CPU original. Timesteps 0-based; abar_t = prod_{s <= t} (1 - beta_s)."""

    betas: torch.Tensor  # beta_t
    log_betas: torch.Tensor  # log beta_t: learned_range's upper end
    alphas_cumprod: torch.Tensor  # abar_t
    alphas_cumprod_prev: torch.Tensor  # abar_{t-1}, 1 at t = 0
    sqrt_alphas_cumprod: torch.Tensor  # the mean coefficient of q(x_t | x_0) (eq. 4)
    one_minus_alphas_cumprod: torch.Tensor  # 1 - abar_t: the variance of q(x_t | x_0)
    log_one_minus_alphas_cumprod: torch.Tensor  # its log
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # the noise coefficient of q(x_t | x_0)
    sqrt_recip_alphas_cumprod: torch.Tensor  # 1 / sqrt(abar_t): x_0 from x_t and eps
    sqrt_recipm1_alphas_cumprod: torch.Tensor  # sqrt(1 / abar_t - 1)
    posterior_variance: torch.Tensor  # beta~_t of q(x_{t-1} | x_t, x_0) (eq. 7), 0 at t = 0
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t, at t = 0 that of t = 1
    posterior_mean_coef1: torch.Tensor  # the x_0 coefficient of mu~_t (eq. 7)
    posterior_mean_coef2: torch.Tensor  # the x_t coefficient of mu~_t
    fixedlarge_variance: torch.Tensor  # fixedlarge's sigma_t^2: beta_t, at t = 0 beta~ of t = 1
    fixedlarge_log_variance: torch.Tensor  # its log
    snr: torch.Tensor  # SNR_t = abar_t / (1 - abar_t); 0 at t = T with zero terminal SNR
    loss_weights: torch.Tensor  # the weight of L_simple at t: 1, or Min-SNR-gamma's for the mean type

    def to(self, device: torch.device) -> Tables:
        """All the tables moved to `device` at once (the same tensors where they already lie there)."""
        return Tables(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# the (variance, log variance) tables of the fixed reverse variances, by name in `Tables`
_FIXED_VARIANCES = {
    VarType.FIXED_LARGE: ("fixedlarge_variance", "fixedlarge_log_variance"),
    VarType.FIXED_SMALL: ("posterior_variance", "posterior_log_variance_clipped"),
}


@dataclass
class PMeanVariance:
    """p(x_{t-1} | x_t) for a batch: `mean`, `pred_x0` [B, ...]; variances broadcastable to x."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


class StackedGenerator:
    """One torch.Generator per sample (EDM's stacked random generator): row i of every draw comes from
    generator i alone, so a sample's noise does not depend on the batch it is drawn in."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
        """N(0, I) noise [B, ...] with B = len(self); each row drawn on its generator's device, then moved."""
        if len(self.generators) != shape[0]:
            raise ValueError(f"got {len(self.generators)} generators for a batch of {shape[0]}")
        where = {g.device for g in self.generators}
        if len(where) > 1:
            out = torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device)
                               for g in self.generators])
            return out
        # each row filled in place: the same numbers as torch.randn on each generator, 3x faster than stacking
        # separate draws (0.28 against 0.96 ms for 256 digits, one sampling step's noise)
        out = torch.empty(shape, dtype=dtype, device=where.pop() if where else device)
        for row, g in zip(out, self.generators, strict=True):
            row.normal_(generator=g)
        return out if device is None else out.to(device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape), x.device, x.dtype)


Generator = torch.Generator | StackedGenerator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise [B, ...] from one generator, or per sample from a `StackedGenerator` (a plain
    list of B generators is taken as one)."""
    if isinstance(generator, (list, tuple)):
        generator = StackedGenerator(generator)
    if isinstance(generator, StackedGenerator):
        return generator.randn(shape, device, dtype)
    if generator is not None and generator.device != torch.device(device):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class GaussianDiffusion:
    """The paper's diffusion model around fixed betas [T].

    Args:
        betas: float [T] (converted to float64), e.g. `beta_schedule("linear", 1000)`.
        mean_type: what the model predicts (a `ddpm.modes.MeanType` or its value, e.g. "eps").
        var_type: the reverse variances (a `VarType` or its value, e.g. "fixedlarge").
        loss_type: the training loss (a `LossType` or its value, e.g. "simple"; "hybrid" needs learned_range).
        hybrid_lambda: weight of L_vlb in the hybrid loss (improved DDPM uses 0.001).
        loss_weight: the per-t weight of L_simple (a `LossWeight` or its value): "none", or "min_snr" (Hang et
            al. 2023) with `min_snr_gamma`; not for loss_type "kl" (the bound) nor mean_type "xprev".
        min_snr_gamma: gamma of Min-SNR-gamma (their default 5).

    Betas ending at beta_T = 1 (zero terminal SNR) refuse mean_type "eps" (`ddpm.modes.check_diffusion_modes`).
    """

    def __init__(
        self,
        betas: torch.Tensor,
        mean_type: MeanType | str = "eps",
        var_type: VarType | str = "fixedlarge",
        loss_type: LossType | str = "simple",
        hybrid_lambda: float = 0.001,
        loss_weight: LossWeight | str = "none",
        min_snr_gamma: float = 5.0,
    ):
        self.mean_type = parse_enum(MeanType, mean_type, "mean_type")
        self.var_type = parse_enum(VarType, var_type, "var_type")
        self.loss_type = parse_enum(LossType, loss_type, "loss_type")
        self.loss_weight = parse_enum(LossWeight, loss_weight, "loss_weight")
        self.hybrid_lambda = float(hybrid_lambda)
        self.min_snr_gamma = float(min_snr_gamma)
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive; got {min_snr_gamma!r}")

        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.num_timesteps = T = int(betas.shape[0])
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        self.zero_terminal_snr = bool(abar[-1] == 0)  # beta_T = 1: x_T is pure noise
        check_diffusion_modes(self.var_type, self.loss_type, mean_type=self.mean_type, loss_weight=self.loss_weight,
                              zero_terminal_snr=self.zero_terminal_snr)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = betas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - abar
        self.log_one_minus_alphas_cumprod = torch.log(self.one_minus_alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.sqrt_recip_alphas_cumprod = abar.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) (eqs. 6-7)
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        # the posterior variance is 0 at t = 0: clip its log to that of t = 1, as the paper's code does
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if T > 1 else betas
        )
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        # fixedlarge: beta_t, but at t = 0 the posterior variance of t = 1 (a better decoder likelihood)
        self.fixedlarge_variance = torch.cat([self.posterior_variance[1:2], betas[1:]]) if T > 1 else betas
        self.fixedlarge_log_variance = torch.log(self.fixedlarge_variance)
        self.log_betas = torch.log(betas)
        self.snr = abar / (1 - abar)
        self.loss_weights = self._loss_weights()
        # one Tables per device, the CPU's holding the attributes above, the others made on first use. Keyed by
        # the device alone, it cannot grow with the number of calls, and a name always reads its own table
        # (a cache keyed by id(table) did both wrong once temporaries were passed: ids of freed ones come back)
        cpu = Tables(**{f.name: getattr(self, f.name) for f in fields(Tables)})
        self._device_tables: dict[torch.device, Tables] = {_CPU: cpu}

    # ---------------------------------------------------------------- helpers

    def _loss_weights(self) -> torch.Tensor:
        """The weight [T] of L_simple at each t. Min-SNR-gamma weights the x_0 error by min(SNR_t, gamma); the
        MSE of eps is SNR_t times it and that of v (SNR_t + 1) times it, hence min(SNR, gamma) / SNR for eps
        (written min(1, gamma / SNR): 1 at SNR = 0), min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
        if self.loss_weight is LossWeight.NONE:
            return torch.ones_like(self.snr)
        snr, gamma = self.snr, self.min_snr_gamma
        if self.mean_type is MeanType.EPS:
            return (gamma / snr).clamp(max=1.0)
        if self.mean_type is MeanType.V:
            return snr.clamp(max=gamma) / (snr + 1)
        if self.mean_type is MeanType.X0:
            return snr.clamp(max=gamma)
        raise AssertionError(self.mean_type)  # pragma: no cover - xprev is refused by check_diffusion_modes

    def _tables(self, device: torch.device) -> Tables:
        """All the tables on `device` (a tensor's device, so cuda:0 rather than cuda), moved there together on
        its first use: they are a few vectors [T], and copying them per call would cost a transfer each."""
        on_device = self._device_tables.get(device)
        if on_device is None:
            on_device = self._device_tables[device] = self._device_tables[_CPU].to(device)
        return on_device

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The table `name` of `Tables` at t [B], as x's dtype, shaped [B, 1, ..., 1] to broadcast against x
        [B, ...]; read on t's device."""
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be [B] with B = {x.shape[0]}; got shape {tuple(t.shape)}")
        table = getattr(self._tables(t.device), name)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return table[t].to(dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        return t.long()

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (eq. 4): (mean, variance, log_variance)."""
        t = self._check_t(t, x0.shape[0], x0.device)
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        var = self._extract("one_minus_alphas_cumprod", t, x0)
        log_var = self._extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, var, log_var

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (eq. 4): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise. x0, noise [B, ...]."""
        t = self._check_t(t, x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        return self._extract("sqrt_alphas_cumprod", t, x0) * x0 + self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) (eqs. 6-7): (mean [B, ...], variance, log_variance clipped) [B, 1, ...]."""
        t = self._check_t(t, x_t.shape[0], x_t.device)
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract(
            "posterior_mean_coef2", t, x_t
        ) * x_t
        var = self._extract("posterior_variance", t, x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, var, log_var

    # ---------------------------------------------------------------- reverse process

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 4 solved for x_0); x_t, eps [B, ...].
        Undefined where abar_t = 0 (zero terminal SNR, t = T - 1): not finite there."""
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1): the inverse of `predict_x0_from_eps`;
        x_t, x0 [B, ...]. Where abar_t = 0 (zero terminal SNR) it is x_t itself, the limit."""
        eps = (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )
        if self.zero_terminal_snr:  # the line above is inf / inf at abar = 0; the other schedules keep its bits
            eps = torch.where(self._extract("alphas_cumprod", t, x_t) == 0, x_t, eps)
        return eps

    def predict_v(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4); x0, eps [B, ...]."""
        return self._extract("sqrt_alphas_cumprod", t, x0) * eps - self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * x0

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v; x_t, v [B, ...]. Finite at every t (-v at abar_t = 0)."""
        return self._extract("sqrt_alphas_cumprod", t, x_t) * x_t - self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        ) * v

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v; x_t, v [B, ...] (x_t itself at abar_t = 0)."""
        return self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self._extract(
            "sqrt_alphas_cumprod", t, x_t
        ) * v

    def _predict_x0_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor) -> torch.Tensor:
        # the posterior mean (eq. 7) solved for x_0
        return (xprev - self._extract("posterior_mean_coef2", t, x_t) * x_t) / self._extract(
            "posterior_mean_coef1", t, x_t
        )

    def split_output(self, output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a learned-variance model's [B, 2C, ...] output into (mean part, v); v is None otherwise.

        The output comes back in x_t's dtype: a network run in bf16 (autocast) rounds its prediction only, and
        the means, variances, losses and samples built from it keep x_t's precision."""
        output = output.to(x_t.dtype)
        if self.var_type is VarType.LEARNED_RANGE:
            if output.shape[1] != 2 * x_t.shape[1]:
                raise ValueError(
                    f"var_type 'learned_range' needs 2 x {x_t.shape[1]} output channels; got {output.shape[1]}"
                )
            return output.chunk(2, dim=1)
        if output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} differs from x_t shape {tuple(x_t.shape)}")
        return output, None

    def p_variance(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor | None = None):
        """(variance, log_variance) of p(x_{t-1} | x_t): fixed tables, or the learned interpolation
        log sigma^2 = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 (improved DDPM eq. 15)."""
        if self.var_type is VarType.LEARNED_RANGE:
            if v is None:
                raise ValueError("var_type 'learned_range' needs the model's variance channels v")
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_var), log_var
        var, log_var = _FIXED_VARIANCES[self.var_type]
        return self._extract(var, t, x_t), self._extract(log_var, t, x_t)

    def p_mean_variance_from_output(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> PMeanVariance:
        """`p_mean_variance` for a model output already computed ([B, C, ...] or [B, 2C, ...])."""
        t = self._check_t(t, x_t.shape[0], x_t.device)
        out, v = self.split_output(output, x_t)
        variance, log_variance = self.p_variance(x_t, t, v)

        def clip(x: torch.Tensor) -> torch.Tensor:
            return x.clamp(-1.0, 1.0) if clip_denoised else x

        if self.mean_type is MeanType.XPREV:
            pred_x0 = clip(self._predict_x0_from_xprev(x_t, t, out))
            mean = out
        else:
            if self.mean_type is MeanType.EPS:
                pred_x0 = clip(self.predict_x0_from_eps(x_t, t, out))
            elif self.mean_type is MeanType.V:
                pred_x0 = clip(self.predict_x0_from_v(x_t, t, out))
            else:
                pred_x0 = clip(out)
            mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return PMeanVariance(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)

    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True) -> PMeanVariance:
        """p(x_{t-1} | x_t) (eqs. 1, 11): mean from the model's prediction via the posterior mean, fixed
        (or learned) variance. With clip_denoised the predicted x_0 is clipped to [-1, 1] first, as in the
        paper's sampler."""
        t = self._check_t(t, x_t.shape[0], x_t.device)
        return self.p_mean_variance_from_output(model(x_t, t), x_t, t, clip_denoised)

    def sample(
        self,
        model: Model,
        shape: tuple[int, ...],
        generator: Generator = None,
        clip_denoised: bool = True,
        progress: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Algorithm 2: x_T ~ N(0, I), then x_{t-1} = mean + sigma_t z for t = T..1. Returns x_0 [shape]."""
        from ddpm.sampling import ancestral

        if device is None:
            device = _model_device(model)
        x_T = randn(tuple(shape), generator, device)
        return ancestral(self, model, x_T, list(range(self.num_timesteps)), generator=generator,
                         clip_denoised=clip_denoised, progress=progress)

    # ---------------------------------------------------------------- losses and likelihood

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-example loss [B] for x0 [B, ...] in [-1, 1]; t ~ U{0..T-1} and noise ~ N(0, I) when None.

        "simple": mean over dimensions of (target - model output)^2, the target set by mean_type (eq. 14; v's
        is sqrt(abar_t) noise - sqrt(1 - abar_t) x0), times `loss_weights[t]` (1 unless loss_weight min_snr).
        "kl": the bound term L_t in bits/dim (KL for t > 0, the decoder NLL at t = 0); every mean_type reaches
        it through the predicted x_0.
        "hybrid": simple + hybrid_lambda * T * L_t with the mean held fixed in L_t (improved DDPM); min_snr
        weights the simple part only, the bound term (which trains the variances alone) stays unweighted.

        A caller that draws t itself with probabilities p_t (importance sampling) multiplies by 1 / (T p_t).
        """
        B = x0.shape[0]
        if t is None:
            where = x0.device if generator is None else generator.device
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=where).to(x0.device)
        t = self._check_t(t, B, x0.device)
        if noise is None:
            noise = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t)

        if self.loss_type is LossType.KL:
            return self._vb_terms_bpd(output, x0, x_t, t, clip_denoised=False)[0]

        out, v = self.split_output(output, x_t)
        if self.mean_type is MeanType.EPS:
            target = noise
        elif self.mean_type is MeanType.X0:
            target = x0
        elif self.mean_type is MeanType.V:
            target = self.predict_v(x0, t, noise)
        else:
            target = self.q_posterior(x0, x_t, t)[0]
        loss = mean_flat((target - out) ** 2)
        if self.loss_weight is not LossWeight.NONE:  # none multiplies by nothing: the paper's loss keeps its bits
            loss = loss * self._extract("loss_weights", t, loss)
        if self.loss_type is LossType.HYBRID:
            # the VLB term learns only the variance: the mean prediction is detached (improved DDPM sec. 3.1)
            frozen = torch.cat([out.detach(), v], dim=1)
            vb = self._vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)[0]
            loss = loss + self.hybrid_lambda * self.num_timesteps * vb  # lambda * L_vlb, L_vlb = T E_t[L_t]
        return loss

    def _vb_terms_bpd(
        self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_t in bits/dim [B]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, -log p(x_0|x_1) at t = 0.
        Also returns the predicted x_0 [B, ...]."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance_from_output(output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / LN2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / LN2
        return torch.where(t == 0, nll, kl).to(x0.dtype), p.pred_x0

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim [B]; exactly 0 with zero terminal SNR."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return (mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / LN2).to(x0.dtype)

    @torch.no_grad()
    def bpd(
        self,
        model: Model,
        x0: torch.Tensor,
        generator: Generator = None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> BpdResult:
        """The full variational bound (eq. 5) of x0 [B, ...] (8-bit data in [-1, 1]) in bits/dim.

        One pass over all T steps, each with its own x_t ~ q(x_t | x_0): total = L_T + sum_t L_t, as the
        paper's test-set NLL.
        """
        B, T = x0.shape[0], self.num_timesteps
        terms = x0.new_zeros(B, T, dtype=torch.float64)
        x0_mse = x0.new_zeros(B, T, dtype=torch.float64)
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="bits/dim", leave=False)
        for i in steps:
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, randn(tuple(x0.shape), generator, x0.device, x0.dtype))
            vb, pred_x0 = self._vb_terms_bpd(model(x_t, t), x0, x_t, t, clip_denoised)
            terms[:, i] = vb.double()
            x0_mse[:, i] = mean_flat((pred_x0 - x0).double() ** 2)
        prior = self.prior_bpd(x0).double()
        return BpdResult(total=prior + terms.sum(1), prior=prior, terms=terms, x0_mse=x0_mse)


def _model_device(model: Model) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")
