"""Fast samplers, inpainting, editing and guidance on the analytic Gaussian oracle."""

import pytest
import torch
from oracle import GaussianOracle, sampler_moments

from ddpm import GaussianDiffusion, beta_schedule
from ddpm.guidance import guided_model
from ddpm.sampling import ancestral, ddim, dpmpp2m, edit, inpaint, respace, respaced, timestep_subset

BETAS = beta_schedule("linear", 1000)
M, S = 0.1, 0.3
N = 20000


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _moments(x):
    x = x.flatten()
    return x.mean().item(), x.std().item()


# measured spread errors of the discretisations (std 0.30 wanted): DDIM 50 steps 0.276, 1000 steps 0.300;
# respaced (fixedsmall) 100 steps 0.272, 1000 steps 0.298; DPM-Solver++(2M) 20 steps 0.306, 50 steps 0.302
@pytest.mark.parametrize("sampler,steps,tol", [
    (ddim, 50, 0.10), (ddim, 1000, 0.01), (respaced, 100, 0.12), (respaced, 1000, 0.015), (dpmpp2m, 20, 0.03),
    (dpmpp2m, 50, 0.015),
])
def test_fast_samplers_recover_the_data_distribution(sampler, steps, tol):
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = Counting(GaussianOracle(BETAS, M, S, "eps"))
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sampler(d, model, x_T, steps=steps, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    mu, sd = _moments(x)
    assert model.calls == steps
    assert abs(mu - M) < 4 * S / (2 * N) ** 0.5 + 0.003
    assert abs(sd - S) / S < tol, sd
    if sampler in (ddim, dpmpp2m):  # deterministic: the same x_T gives the same output
        again = sampler(d, model, x_T, steps=steps, clip_denoised=False)
        torch.testing.assert_close(again, x, rtol=0, atol=0)


def test_more_steps_means_less_error():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = GaussianOracle(BETAS, M, S, "eps")
    x_T = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler in (ddim, dpmpp2m):
        errs = [abs(sampler(d, model, x_T, steps=k, clip_denoised=False).std().item() - S) for k in (10, 50, 200)]
        assert errs[0] > errs[1] > errs[2], (sampler.__name__, errs)


def test_respaced_with_every_step_is_ancestral():
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, M, S, "eps")
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    a = ancestral(d, model, x_T, generator=torch.Generator().manual_seed(5))
    b = respaced(d, model, x_T, steps=1000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_respaced_betas_by_hand():
    kept = timestep_subset(1000, 4)
    assert kept == [0, 333, 666, 999]
    short = respace(GaussianDiffusion(BETAS), kept)
    abar = torch.cumprod(1 - BETAS, 0)
    want = [1 - abar[0], 1 - abar[333] / abar[0], 1 - abar[666] / abar[333], 1 - abar[999] / abar[666]]
    torch.testing.assert_close(short.betas, torch.stack(want))
    torch.testing.assert_close(short.alphas_cumprod, abar[kept])


def test_ddim_eta_one_is_ancestral_fixedsmall():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = GaussianOracle(BETAS, M, S, "eps")
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = ddim(d, model, x_T, eta=1.0, generator=torch.Generator().manual_seed(3), clip_denoised=False)
    want_mu, want_sd = sampler_moments(BETAS, M, S, "fixedsmall")
    mu, sd = _moments(x)
    assert abs(mu - want_mu) < 4 * want_sd / (2 * N) ** 0.5
    assert abs(sd - want_sd) < 4 * want_sd / (2 * 2 * N) ** 0.5 + 1e-3


def test_steps_are_validated():
    d = GaussianDiffusion(BETAS)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="steps must be an integer in 1..1000"):
        ddim(d, GaussianOracle(BETAS, M, S), x, steps=1001)
    with pytest.raises(ValueError, match="steps must be"):
        respaced(d, GaussianOracle(BETAS, M, S), x, steps=0)
    with pytest.raises(ValueError, match="ancestral sampling runs all"):
        ancestral(d, GaussianOracle(BETAS, M, S), x, steps=50)


class CorrelatedOracle:
    """Bayes-optimal eps for x0 ~ N(0, Sigma) in 2-D: E[x0 | x_t] = sqrt(a) Sigma (a Sigma + (1 - a) I)^-1 x_t."""

    def __init__(self, betas, sigma):
        self.abar = torch.cumprod(1 - betas.double(), 0)
        self.sigma = sigma.double()

    def __call__(self, x, t):
        a = self.abar[t][:, None, None]  # [B, 1, 1]
        cov = a * self.sigma + (1 - a) * torch.eye(2, dtype=torch.float64)  # Cov(x_t) [B, 2, 2]
        a1 = a[:, 0]  # [B, 1]
        x0 = torch.sqrt(a1) * (self.sigma @ torch.linalg.solve(cov, x.double()[..., None]))[..., 0]
        return ((x.double() - torch.sqrt(a1) * x0) / torch.sqrt(1 - a1)).to(x.dtype)


def test_inpainting_keeps_known_pixels_and_matches_the_conditional():
    betas = beta_schedule("linear", 100, 1e-3, 0.2)
    d = GaussianDiffusion(betas, var_type="fixedsmall")
    rho, s = 0.8, 0.4
    sigma = torch.tensor([[s * s, rho * s * s], [rho * s * s, s * s]])
    known_value = 0.5
    n = 4000
    x_known = torch.zeros(n, 2, dtype=torch.float64)
    x_known[:, 0] = known_value
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(n, 2)
    x = inpaint(d, CorrelatedOracle(betas, sigma), x_known, mask, generator=torch.Generator().manual_seed(0),
                resample=8, clip_denoised=False)
    assert torch.equal(x[:, 0], x_known[:, 0])
    want_mean = rho * known_value  # E[x1 | x0 = v] for equal variances
    want_sd = s * (1 - rho**2) ** 0.5
    assert abs(x[:, 1].mean().item() - want_mean) < 0.05
    assert abs(x[:, 1].std().item() - want_sd) < 0.05


def test_edit_small_t_keeps_the_image_and_large_t_forgets_it():
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, M, S, "eps")
    image = torch.full((2000, 2), -0.6, dtype=torch.float64)
    near = edit(d, model, image, 5, generator=torch.Generator().manual_seed(0), clip_denoised=False)
    assert (near - image).abs().mean().item() < 0.06  # measured 0.034: the noise of 6 steps
    far = edit(d, model, image, 999, sampler=ddim, steps=50, generator=torch.Generator().manual_seed(0),
               clip_denoised=False)
    assert abs(far.mean().item() - M) < 0.02 and abs(far.std().item() - S) < 0.04  # DDIM-50 spread: 0.276


def test_guidance_is_the_affine_combination_in_one_call():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return y.to(x.dtype)[:, None].expand_as(x) * 1.0 + 0 * x

    null = 10
    y = torch.tensor([3, 7])
    x, t = torch.zeros(2, 4), torch.tensor([5, 5])
    for scale in (0.0, 1.0, 3.0):
        out = guided_model(model, y, scale, null)(x, t)
        want = null + scale * (y.float() - null)
        torch.testing.assert_close(out, want[:, None].expand(2, 4))
    assert calls == [4, 4, 4]
