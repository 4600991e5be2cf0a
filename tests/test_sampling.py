"""Fast samplers, inpainting, editing and guidance on the analytic Gaussian oracle.

With the oracle every step of DDIM, respaced ancestral sampling and RePaint is linear in x_t plus Gaussian
noise, so their exact output moments follow from short recursions written here from the papers' equations;
the sampled moments are checked against those (a few standard errors) and against the data's N(m, s^2).
"""

import math

import pytest
import torch
from oracle import GaussianOracle, abar_of, sampler_moments

from ddpm import GaussianDiffusion, beta_schedule
from ddpm.guidance import guided_model
from ddpm.sampling import (
    SAMPLERS,
    Sampler,
    check_sampler,
    ddim_invert,
    edit,
    inpaint,
    karras_subset,
    logsnr_subset,
    respace,
    run_sampler,
    timestep_grid,
    timestep_subset,
)
from ddpm.schedule import rescale_zero_terminal_snr

BETAS = beta_schedule("linear", 1000)
ABAR = abar_of(BETAS)
M, S = 0.1, 0.3
N = 20000  # rows of 2-D draws: 40,000 numbers per run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _by_name(name: str):
    """Sampler `name` called as scripts call it, through `run_sampler` (which builds its grid)."""

    def call(d, model, x_T, **kwargs):
        return run_sampler(name, d, model, x_T, **kwargs)

    call.__name__ = name
    return call


ancestral, respaced, ddim, dpmpp2m = (_by_name(n) for n in ("ancestral", "respaced", "ddim", "dpmpp2m"))


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _moments(x):
    x = x.flatten()
    return x.mean().item(), x.std().item()


def _x_T(n=N, seed=0):
    """n rows of 2-D draws; the default N's 40,000 numbers as [1000, 40]: the same draws (every operation but the
    2-D Gaussian's is elementwise, and that one takes its own rows) in 20 times fewer rows, each of which the
    samplers gather their tables for (a 1000-step ancestral run of the oracle: 3.3 s as [20000, 2], 0.7 s as
    [1000, 40], on one thread of an AVX2-only EPYC)."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.reshape(-1, 40) if n == N else x


def ddim_moments(kept, eta, abar=ABAR):
    """Exact (mean, std) of DDIM's output with the oracle: E[x0 | x_t] = g x_t + h, eps_hat = (x_t - sqrt(a)
    x0_hat) / sqrt(1 - a), and eq. 12 makes x_s = A x_t + C + sigma z."""
    mu, var = 0.0, 1.0
    for j in range(len(kept) - 1, -1, -1):
        a = abar[kept[j]].item()
        a_s = abar[kept[j - 1]].item() if j > 0 else 1.0
        den = a * S**2 + 1 - a
        g, h = math.sqrt(a) * S**2 / den, M * (1 - a) / den
        sig2 = eta**2 * (1 - a_s) / (1 - a) * (1 - a / a_s)
        c = math.sqrt(max(1 - a_s - sig2, 0.0))
        A = math.sqrt(a_s) * g + c * (1 - math.sqrt(a) * g) / math.sqrt(1 - a)
        C = math.sqrt(a_s) * h - c * math.sqrt(a) * h / math.sqrt(1 - a)
        mu, var = A * mu + C, A * A * var + sig2
    return mu, math.sqrt(var)


def _assert_moments(x, want_mu, want_sd, k=4.0):
    """Sample mean and std within k standard errors of the exact values."""
    n = x.numel()
    mu, sd = _moments(x)
    assert abs(mu - want_mu) < k * want_sd / math.sqrt(n), (mu, want_mu)
    assert abs(sd - want_sd) < k * want_sd / math.sqrt(2 * n), (sd, want_sd)


# ------------------------------------------------------------------------------------- timestep grids


def test_timestep_subsets_are_distinct_and_span_the_range():
    for T in (1, 2, 7, 1000):
        for steps in range(1, T + 1):
            kept = timestep_subset(T, steps)
            assert len(kept) == steps and kept[-1] == T - 1 and (steps == 1 or kept[0] == 0)
            assert all(a < b for a, b in zip(kept, kept[1:], strict=False))
    assert timestep_subset(1000, 4) == [0, 333, 666, 999]
    assert timestep_subset(1000, 3, t_start=10) == [0, 5, 10]
    assert timestep_subset(1000, None, t_start=3) == [0, 1, 2, 3]
    d = GaussianDiffusion(BETAS)
    for steps in (3, 5, 20, 100, 999, 1000):
        kept = logsnr_subset(d, steps)
        assert len(kept) == steps and kept[0] == 0 and kept[-1] == 999
        assert all(a < b for a, b in zip(kept, kept[1:], strict=False))


def test_quad_spacing_is_denser_near_zero_and_distinct():
    assert timestep_subset(1000, 4, spacing="quad") == [0, 111, 444, 999]  # round((i/3)^2 999)
    assert timestep_subset(1000, 3, t_start=10, spacing="quad") == [0, 2, 10]  # round(2.5) = 2: banker's rounding
    assert timestep_subset(10, 10, spacing="quad") == list(range(10))  # 0, 0, 0, 1, 2, 3, ... pushed apart
    for T in (2, 7, 100, 1000):
        for steps in range(2, T + 1, max(1, T // 50)):
            kept = timestep_subset(T, steps, spacing="quad")
            assert len(kept) == steps and kept[0] == 0 and kept[-1] == T - 1
            assert all(a < b for a, b in zip(kept, kept[1:], strict=False))
    kept = timestep_subset(1000, 50, spacing="quad")
    gaps = [b - a for a, b in zip(kept, kept[1:], strict=False)]
    assert gaps[0] < 3 and gaps[-1] > 35 and gaps == sorted(gaps)  # small steps at low noise, large at high
    with pytest.raises(ValueError, match="unknown spacing 'cubic'; choose one of uniform, quad"):
        timestep_subset(1000, 10, spacing="cubic")


def test_ddim_and_respaced_follow_the_quad_grid():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = GaussianOracle(BETAS, M, S, "eps")
    grid = timestep_subset(1000, 50, spacing="quad")
    seen: list[int] = []
    for eta in (0.0, 1.0):
        seen.clear()
        x = ddim(d, model, _x_T(seed=6), steps=50, eta=eta, spacing="quad", generator=torch.Generator().manual_seed(7),
                 clip_denoised=False, callback=lambda t, x, x0: seen.append(t))
        assert seen == grid[::-1]
        _assert_moments(x, *ddim_moments(grid, eta))
    seen.clear()
    respaced(d, model, _x_T(100), steps=50, spacing="quad", clip_denoised=False,
             callback=lambda t, x, x0: seen.append(t))
    assert seen == grid[::-1]


def test_steps_and_t_start_are_validated():
    d = GaussianDiffusion(BETAS)
    x = torch.zeros(2, 2)
    model = GaussianOracle(BETAS, M, S)
    with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.1000; got 1001"):
        ddim(d, model, x, steps=1001)
    with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.1000; got 0"):
        respaced(d, model, x, steps=0)
    with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.11; got 12"):
        dpmpp2m(d, model, x, steps=12, t_start=10)
    with pytest.raises(ValueError, match="steps must be an integer"):
        ddim(d, model, x, steps=2.5)
    with pytest.raises(ValueError, match="ancestral sampling runs all"):
        ancestral(d, model, x, steps=50)
    with pytest.raises(ValueError, match=r"t_start must lie in 0\.\.999; got 1000"):
        ddim(d, model, x, steps=10, t_start=1000)
    with pytest.raises(ValueError, match=r"t_edit must lie in 0\.\.999; got -1"):
        edit(d, model, x, -1)


def test_samplers_take_their_grid():
    """Called directly, a sampler runs on exactly the timesteps it is given (one network call each; heun's second
    evaluation of each step is at the next grid point, 2K - 1 calls), and run_sampler gives it the grid that
    timestep_grid builds."""
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    oracle = GaussianOracle(BETAS, M, S, "eps")
    grid = [0, 17, 400, 999]
    for name, spec in SAMPLERS.items():
        seen = []

        def model(x, t, seen=seen):
            seen.append(int(t[0]))
            return oracle(x, t)

        x = spec.fn(d, model, _x_T(16), grid, generator=torch.Generator().manual_seed(1), clip_denoised=False)
        want = [999, 400, 400, 17, 17, 0, 0] if name == "heun" else grid[::-1]
        assert seen == want and x.shape == (16, 2), name
    for spacing in ("uniform", "quad", "trailing", "logsnr", "karras"):
        want = {"logsnr": logsnr_subset(d, 12), "karras": karras_subset(d, 12)}.get(spacing) or timestep_subset(
            1000, 12, spacing=spacing)
        assert timestep_grid(d, 12, spacing) == want
    assert timestep_grid(d, None, "quad", t_start=5) == [0, 1, 2, 3, 4, 5]
    got = SAMPLERS["ddim"].fn(d, oracle, _x_T(64), timestep_grid(d, 20, "quad"), eta=0.5,
                              generator=torch.Generator().manual_seed(2), clip_denoised=False)
    want = ddim(d, oracle, _x_T(64), steps=20, spacing="quad", eta=0.5, generator=torch.Generator().manual_seed(2),
                clip_denoised=False)
    assert torch.equal(got, want)


def test_an_option_a_sampler_does_not_take_is_an_error():
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, M, S)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"sampler 'ancestral' takes no option 'eta' \(only ddim takes it\)"):
        run_sampler("ancestral", d, model, x, eta=0.5)
    with pytest.raises(ValueError, match="sampler 'ddim' takes no option 'churn'"):
        run_sampler("ddim", d, model, x, steps=5, churn=1.0)
    with pytest.raises(ValueError, match="spacing 'quad' applies to the ddim and respaced samplers, not 'dpmpp2m'"):
        run_sampler("dpmpp2m", d, model, x, steps=5, spacing="quad")
    with pytest.raises(ValueError, match="spacing 'logsnr' applies to the dpmpp2m sampler, not 'ddim'"):
        check_sampler("ddim", 5, "logsnr")
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ancestral, respaced, ddim, dpmpp2m, heun"):
        check_sampler("euler")
    with pytest.raises(ValueError, match=r"sampler 'ddim' takes no option 'S_churn' \(only heun takes it\)"):
        check_sampler("ddim", 5, None, {"S_churn": 1.0})
    with pytest.raises(ValueError, match="sampler 'respaced' takes no option 'eta'"):
        edit(d, model, x, 10, sampler="respaced", steps=5, eta=1.0)


def test_a_new_sampler_is_one_function_and_one_line(monkeypatch):
    """The extension point of the table: a deterministic first-order sampler (DDIM with eta 0 written out) is
    added with one entry and runs through run_sampler and `ddpm.generate`'s options unchanged."""

    def euler(diffusion, model, x_T, timesteps, *, generator=None, clip_denoised=True, progress=False,
              callback=None):
        x = x_T
        for j in range(len(timesteps) - 1, -1, -1):
            t, s = timesteps[j], (timesteps[j - 1] if j > 0 else -1)
            a_s = float(diffusion.alphas_cumprod[s]) if s >= 0 else 1.0
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            x0 = diffusion.p_mean_variance(model, x, tt, clip_denoised).pred_x0
            eps = diffusion.predict_eps_from_x0(x, tt, x0)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        return x

    monkeypatch.setitem(SAMPLERS, "euler", Sampler(euler, ("uniform", "quad")))  # the one line
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, M, S)
    got = run_sampler("euler", d, model, _x_T(64), steps=10, spacing="quad", clip_denoised=False)
    want = ddim(d, model, _x_T(64), steps=10, spacing="quad", clip_denoised=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sampler 'euler' takes no option 'eta'"):
        run_sampler("euler", d, model, _x_T(4), steps=10, eta=0.0)


# ------------------------------------------------------------------------------------- moments on the oracle


# exact std of DDIM(eta=0) with the oracle: 50 steps 0.2745, 1000 steps 0.2985 (the ODE's discretisation)
@pytest.mark.parametrize("steps,tol", [(50, 0.10), (1000, 0.02)])
def test_ddim_recovers_the_data_distribution(steps, tol):
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = Counting(GaussianOracle(BETAS, M, S, "eps"))
    x = ddim(d, model, _x_T(), steps=steps, clip_denoised=False)
    assert model.calls == steps
    _assert_moments(x, *ddim_moments(timestep_subset(1000, steps), 0.0))
    mu, sd = _moments(x)
    assert abs(mu - M) < 4 * S / math.sqrt(x.numel())
    assert abs(sd - S) / S < tol, sd
    # deterministic: the same x_T gives the same output (a slice: every operation is elementwise)
    again = ddim(d, model, _x_T()[:500], steps=steps, generator=torch.Generator().manual_seed(9), clip_denoised=False)
    assert torch.equal(again, x[:500])


def test_ddim_eta_one_is_ancestral_fixedsmall():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = GaussianOracle(BETAS, M, S, "eps")
    x = ddim(d, model, _x_T(seed=2), eta=1.0, generator=torch.Generator().manual_seed(3), clip_denoised=False)
    want_mu, want_sd = sampler_moments(BETAS, M, S, "fixedsmall")
    _assert_moments(x, want_mu, want_sd)
    # and the recursion above agrees with the oracle's ancestral recursion
    assert ddim_moments(list(range(1000)), 1.0) == pytest.approx((want_mu, want_sd), rel=1e-9)


def test_ddim_with_eta_on_a_short_grid_has_the_exact_moments():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = GaussianOracle(BETAS, M, S, "eps")
    for eta in (0.5, 1.0):
        x = ddim(d, model, _x_T(seed=4), steps=20, eta=eta, generator=torch.Generator().manual_seed(5),
                 clip_denoised=False)
        _assert_moments(x, *ddim_moments(timestep_subset(1000, 20), eta))


def test_ddim_reads_every_mean_type():
    d_eps = GaussianDiffusion(BETAS, mean_type="eps")
    x_T = _x_T(500)
    want = ddim(d_eps, GaussianOracle(BETAS, M, S, "eps"), x_T, steps=25, clip_denoised=False)
    for mean_type in ("x0", "xprev"):
        d = GaussianDiffusion(BETAS, mean_type=mean_type)
        got = ddim(d, GaussianOracle(BETAS, M, S, mean_type), x_T, steps=25, clip_denoised=False)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


# exact std of respaced ancestral sampling: fixedsmall 50 steps 0.252, 100 steps 0.272; fixedlarge 100 steps 0.311
@pytest.mark.parametrize("var_type,steps,tol", [
    ("fixedsmall", 50, 0.18), ("fixedsmall", 100, 0.11), ("fixedlarge", 100, 0.05),
])
def test_respaced_recovers_the_data_distribution(var_type, steps, tol):
    d = GaussianDiffusion(BETAS, var_type=var_type)
    model = Counting(GaussianOracle(BETAS, M, S, "eps"))
    x = respaced(d, model, _x_T(), steps=steps, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    assert model.calls == steps
    # the oracle at the kept original timesteps is the oracle of the respaced betas, so the ancestral recursion
    # on those betas gives the exact moments
    short = respace(d, timestep_subset(1000, steps))
    _assert_moments(x, *sampler_moments(short.betas, M, S, var_type))
    mu, sd = _moments(x)
    assert abs(mu - M) < 4 * S / math.sqrt(x.numel())
    assert abs(sd - S) / S < tol, sd


# measured std: 20 steps 0.306 (a uniform-in-t grid gives 0.39)
def test_dpmpp2m_recovers_the_data_distribution():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = Counting(GaussianOracle(BETAS, M, S, "eps"))
    x = dpmpp2m(d, model, _x_T(), steps=20, clip_denoised=False)
    assert model.calls == 20
    mu, sd = _moments(x)
    assert abs(mu - M) < 4 * S / math.sqrt(x.numel())
    assert abs(sd - S) / S < 0.03, sd
    again = dpmpp2m(d, model, _x_T()[:500], steps=20, generator=torch.Generator().manual_seed(9), clip_denoised=False)
    assert torch.equal(again, x[:500])


def test_more_steps_means_less_error():
    d = GaussianDiffusion(BETAS, var_type="fixedsmall")
    model = GaussianOracle(BETAS, M, S, "eps")
    x_T = _x_T(4000)
    for sampler in (ddim, dpmpp2m):
        errs = [abs(sampler(d, model, x_T, steps=k, clip_denoised=False).std().item() - S) for k in (10, 50, 200)]
        assert errs[0] > errs[1] > errs[2], (sampler.__name__, errs)


# ------------------------------------------------------------------------------------- respacing


def test_respaced_with_every_step_is_ancestral():
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, M, S, "eps")
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    a = ancestral(d, model, x_T, generator=torch.Generator().manual_seed(5))
    b = respaced(d, model, x_T, steps=1000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_respaced_betas_by_hand():
    kept = timestep_subset(1000, 4)
    short = respace(GaussianDiffusion(BETAS, var_type="fixedsmall"), kept)
    a = ABAR
    want = torch.stack([1 - a[0], 1 - a[333] / a[0], 1 - a[666] / a[333], 1 - a[999] / a[666]])
    torch.testing.assert_close(short.betas, want)
    torch.testing.assert_close(short.alphas_cumprod, a[kept])
    # the posterior variance of the jump 666 -> 333: beta_i (1 - abar_333) / (1 - abar_666)
    torch.testing.assert_close(short.posterior_variance[2], want[2] * (1 - a[333]) / (1 - a[666]))
    assert short.var_type.value == "fixedsmall" and short.num_timesteps == 4


def test_respaced_calls_the_model_with_the_original_timesteps():
    seen = []
    oracle = GaussianOracle(BETAS, M, S, "eps")

    def model(x, t):
        seen.append(sorted(set(t.tolist())))
        return oracle(x, t)

    reported = []
    d = GaussianDiffusion(BETAS)
    respaced(d, model, _x_T(8), steps=4, generator=torch.Generator().manual_seed(0),
             callback=lambda t, x, x0: reported.append(t))
    assert seen == [[999], [666], [333], [0]] and reported == [999, 666, 333, 0]
    reported.clear()
    ddim(d, oracle, _x_T(8), steps=3, t_start=500, callback=lambda t, x, x0: reported.append(t))
    assert reported == [500, 250, 0]


def test_respaced_learned_range_uses_the_respaced_bounds():
    """v = -1 is the lower bound beta~ (fixedsmall), v = +1 the upper bound beta (fixedlarge), of the respaced
    process: the same draws as those fixed types."""
    oracle = GaussianOracle(BETAS, M, S, "eps")
    x_T = _x_T(256)
    for v, var_type in ((-1.0, "fixedsmall"), (1.0, "fixedlarge")):
        def learned(x, t, v=v):
            return torch.cat([oracle(x, t), torch.full_like(x, v)], dim=1)

        got = respaced(GaussianDiffusion(BETAS, var_type="learned_range"), learned, x_T, steps=50,
                       generator=torch.Generator().manual_seed(7), clip_denoised=False)
        want = respaced(GaussianDiffusion(BETAS, var_type=var_type), oracle, x_T, steps=50,
                        generator=torch.Generator().manual_seed(7), clip_denoised=False)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_samplers_share_one_signature_and_clip_only_when_asked():
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, 0.9, 0.5, "eps")  # data beyond [-1, 1] a quarter of the time
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name in SAMPLERS:
        steps = None if name == "ancestral" else 5
        for clip in (True, False):
            gens = [torch.Generator().manual_seed(i) for i in range(64)]  # one generator per sample
            pred = []
            x = run_sampler(name, d, model, x_T, steps=steps, generator=gens, clip_denoised=clip, progress=False,
                            callback=lambda t, x_t, x0, pred=pred: pred.append(x0.abs().max().item()), t_start=None)
            assert x.shape == x_T.shape and len(pred) == (steps or 1000), name
            assert (x.abs().max().item() <= 1.0) == clip and (max(pred) <= 1.0) == clip, (name, clip)


# ------------------------------------------------------------------------------------- inpainting


class CorrelatedOracle:
    """Bayes-optimal eps for x0 ~ N(0, Sigma) in 2-D: E[x0 | x_t] = sqrt(a) Sigma (a Sigma + (1 - a) I)^-1 x_t."""

    def __init__(self, betas, sigma):
        self.abar = abar_of(betas)
        self.sigma = sigma.double()
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        a = self.abar[t][:, None, None]  # [B, 1, 1]
        cov = a * self.sigma + (1 - a) * torch.eye(2, dtype=torch.float64)  # Cov(x_t) [B, 2, 2]
        a1 = a[:, 0]  # [B, 1]
        x0 = torch.sqrt(a1) * (self.sigma @ torch.linalg.solve(cov, x.double()[..., None]))[..., 0]
        return ((x.double() - torch.sqrt(a1) * x0) / torch.sqrt(1 - a1)).to(x.dtype)


def repaint_moments(betas, sigma, known, resample):
    """Exact mean and std of RePaint's unknown coordinate (mask [1, 0], x_known = [known, .]) with the
    correlated oracle and fixedsmall variances: each step is linear in x_t with fresh Gaussian noise, so the
    2-D mean and covariance follow a recursion."""
    b = betas.double()
    abar = abar_of(b)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    eye = torch.eye(2, dtype=torch.float64)
    Pk, Pu = torch.diag(torch.tensor([1.0, 0.0])).double(), torch.diag(torch.tensor([0.0, 1.0])).double()
    k0 = torch.tensor([known, 0.0], dtype=torch.float64)
    mu, cov = torch.zeros(2, dtype=torch.float64), eye.clone()
    for t in range(len(b) - 1, -1, -1):
        a, ap, beta = abar[t], abar_prev[t], b[t]
        G = a.sqrt() * sigma.double() @ torch.linalg.inv(a * sigma.double() + (1 - a) * eye)  # E[x0|x_t] = G x_t
        A = beta * ap.sqrt() / (1 - a) * G + (1 - ap) * (1 - beta).sqrt() / (1 - a) * eye  # posterior mean, eq. 7
        var_p = beta * (1 - ap) / (1 - a) if t > 0 else 0.0
        rounds = resample if t > 0 else 1
        for r in range(rounds):
            # unknown: p(x_{t-1} | x_t); known: q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_known, 1 - abar_{t-1})
            m_prev = Pu @ A @ mu + ap.sqrt() * (Pk @ k0)
            c_prev = Pu @ (A @ cov @ A.T + var_p * eye) @ Pu + (1 - ap) * Pk
            if r < rounds - 1:  # back to t: q(x_t | x_{t-1})
                mu, cov = (1 - beta).sqrt() * m_prev, (1 - beta) * c_prev + beta * eye
        mu, cov = m_prev, c_prev
    return mu[1].item(), cov[1, 1].sqrt().item()


def test_inpainting_keeps_known_pixels_and_approaches_the_conditional():
    betas = beta_schedule("linear", 100, 1e-3, 0.2)
    d = GaussianDiffusion(betas, var_type="fixedsmall")
    rho, s, known_value, n = 0.8, 0.4, 0.5, 4000
    sigma = torch.tensor([[s * s, rho * s * s], [rho * s * s, s * s]])
    x_known = torch.zeros(n, 2, dtype=torch.float64)
    x_known[:, 0] = known_value
    x_known[:, 1] = 7.0  # never read: the unknown coordinate
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # broadcast over the batch
    want_mean, want_sd = rho * known_value, s * math.sqrt(1 - rho**2)  # the Gaussian conditional of x1 | x0
    errors = {}
    for resample in (1, 8):
        model = CorrelatedOracle(betas, sigma)
        x = inpaint(d, model, x_known, mask, generator=torch.Generator().manual_seed(0), resample=resample,
                    clip_denoised=False)
        assert model.calls == 100 * resample - (resample - 1)
        assert torch.equal(x[:, 0], x_known[:, 0])
        _assert_moments(x[:, 1], *repaint_moments(betas, sigma, known_value, resample))
        errors[resample] = abs(x[:, 1].mean().item() - want_mean)
        if resample == 8:  # measured: mean 0.372, std 0.207 (RePaint's harmonisation is approximate)
            assert errors[8] < 0.04 and abs(x[:, 1].std().item() - want_sd) < 0.045
    assert errors[8] < errors[1] / 3  # resampling harmonises: measured 0.028 against 0.150 without


def test_inpainting_shows_the_model_the_known_pixels_at_its_noise_level():
    """Every model call at t < T - 1 sees the known coordinate distributed as q(x_t | x_known), also after a
    jump back (sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z)."""
    betas = torch.linspace(0.05, 0.5, 8, dtype=torch.float64)
    abar = abar_of(betas)
    oracle = GaussianOracle(betas, M, S, "eps")
    seen = []

    def model(x, t):
        seen.append((t[0].item(), x[:, 0].clone()))
        return oracle(x, t)

    n, v = 20000, 0.8
    x_known = torch.full((n, 2), v, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    inpaint(GaussianDiffusion(betas), model, x_known, mask, generator=torch.Generator().manual_seed(0), resample=3,
            clip_denoised=False)
    assert [t for t, _ in seen] == [7, 7, 7, 6, 6, 6, 5, 5, 5, 4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0]
    for t, known in seen[3:]:
        _assert_moments(known, abar[t].sqrt().item() * v, (1 - abar[t]).sqrt().item())


def test_inpainting_validates_its_mask():
    d = GaussianDiffusion(beta_schedule("linear", 10, 1e-3, 0.2))
    with pytest.raises(ValueError, match="mask must hold 0"):
        inpaint(d, GaussianOracle(d.betas, M, S), torch.zeros(2, 2), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="resample must be >= 1"):
        inpaint(d, GaussianOracle(d.betas, M, S), torch.zeros(2, 2), torch.ones(2, 2), resample=0)


# ------------------------------------------------------------------------------------- editing


def test_edit_small_t_keeps_the_image_and_large_t_forgets_it():
    d = GaussianDiffusion(BETAS)
    model = GaussianOracle(BETAS, M, S, "eps")
    image = torch.full((2000, 2), -0.6, dtype=torch.float64)
    near = edit(d, model, image, 5, generator=torch.Generator().manual_seed(0), clip_denoised=False)
    assert (near - image).abs().mean().item() < 0.06  # measured 0.034: the noise of 6 steps
    far = edit(d, model, image, 999, sampler="ddim", steps=50, generator=torch.Generator().manual_seed(0),
               clip_denoised=False)
    _assert_moments(far, *ddim_moments(timestep_subset(1000, 50), 0.0))  # a fresh DDIM-50 sample


# ------------------------------------------------------------------------------------- guidance


def test_guidance_is_the_affine_combination_in_one_call():
    calls = []

    def eps_of(y):
        return 0.37 * y.float() ** 3 + 0.011  # uncond + (cond - uncond) != cond in float32 for these

    def model(x, t, y):  # eps depends on the label only; for 2C outputs the variance channels are -label
        calls.append(x.shape[0])
        eps = eps_of(y).reshape(-1, 1).expand_as(x) + 0 * x
        return torch.cat([eps, -y.float().reshape(-1, 1).expand_as(x)], dim=1) if x.shape[1] == 3 else eps

    null = 10
    y = torch.tensor([3, 7, 1])  # one label more than the batch: the first B are used
    t = torch.tensor([5, 5])
    cond, uncond = eps_of(y[:2])[:, None], eps_of(torch.tensor([null, null]))[:, None]
    for scale, want in ((0.0, uncond), (1.0, cond), (3.0, uncond + 3.0 * (cond - uncond))):
        out = guided_model(model, y, scale, null)(torch.zeros(2, 4), t)
        if scale == 3.0:
            torch.testing.assert_close(out, want.expand(2, 4))
        else:  # exactly the unconditional and the conditional model
            assert torch.equal(out, want.expand(2, 4)), scale
        out = guided_model(model, y, scale, null)(torch.zeros(2, 3), t)  # learned variance: [B, 2C]
        exact = {"rtol": 0.0, "atol": 0.0} if scale != 3.0 else {}
        torch.testing.assert_close(out[:, :3], want.expand(2, 3), **exact)
        assert torch.equal(out[:, 3:], -y[:2].float()[:, None].expand(2, 3))  # the conditional variance
    assert calls == [4] * 6  # one batched call of 2B each time
    with pytest.raises(ValueError, match="y holds 3 labels for a batch of 4"):
        guided_model(model, y, 2.0, null)(torch.zeros(4, 4), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------- v-prediction (Salimans & Ho 2022)


SAMPLER_RUNS = [  # (name, steps, spacing, options): every sampler, the stochastic ones with their noise on
    ("ancestral", None, None, {}), ("respaced", 50, None, {}), ("respaced", 50, "trailing", {}),
    ("ddim", 20, None, {}), ("ddim", 20, "quad", {"eta": 0.5}), ("ddim", 20, "trailing", {"eta": 1.0}),
    ("dpmpp2m", 20, None, {}), ("heun", 12, None, {}), ("heun", 12, "uniform", {"S_churn": 5.0}),
]


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_every_sampler_gives_the_same_samples_from_v_as_from_eps(var_type):
    """The Bayes-optimal v carries what the Bayes-optimal eps does: from the same x_T and noise every sampler's
    output agrees to float64 rounding (so do its moments), deterministic and stochastic alike."""
    x_T = _x_T(2000, seed=11)
    for name, steps, spacing, options in SAMPLER_RUNS:
        outs = [run_sampler(name, GaussianDiffusion(BETAS, mean_type=m, var_type=var_type), GaussianOracle(BETAS, M, S, m),
                            x_T, steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(3),
                            clip_denoised=False, **options) for m in ("eps", "v")]
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        assert outs[0].std().item() > 0.2, name  # a sample, not a collapsed output


def test_v_conversions_invert_each_other():
    """x0 from v, eps from v and v from (x0, eps) are the conversions of Salimans & Ho (sec. 4 / appendix D)."""
    d = GaussianDiffusion(BETAS, mean_type="v")
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = d.q_sample(x0, t, eps)
    v = d.predict_v(x0, t, eps)
    a = ABAR[t][:, None]
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.predict_eps_from_v(x_t, t, v), eps, rtol=0, atol=1e-12)
    p = d.p_mean_variance_from_output(v, x_t, t, clip_denoised=False)
    torch.testing.assert_close(p.pred_x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.mean, d.q_posterior(x0, x_t, t)[0], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- zero terminal SNR (Lin et al.)


ZT_BETAS = rescale_zero_terminal_snr(BETAS)
ZT_ABAR = abar_of(ZT_BETAS)


def test_trailing_grid_contents():
    assert timestep_subset(1000, 4, spacing="trailing") == [249, 499, 749, 999]  # round(1000 - 250 i) - 1
    assert timestep_subset(1000, 10, spacing="trailing") == list(range(99, 1000, 100))
    assert timestep_subset(1000, 3, spacing="trailing") == [332, 666, 999]  # 1000 - 333.3 i: 667, 333 (-1)
    assert timestep_subset(1000, 3, t_start=10, spacing="trailing") == [3, 6, 10]  # n = 11: 11, 7.33, 3.67
    assert timestep_subset(1000, 1000, spacing="trailing") == list(range(1000))
    for T in (2, 7, 1000):
        for steps in range(1, T + 1, max(1, T // 40)):
            kept = timestep_subset(T, steps, spacing="trailing")
            assert len(kept) == steps and kept[-1] == T - 1 and all(a < b for a, b in zip(kept, kept[1:], strict=False))
            assert kept[0] == round(T / steps) - 1  # the lowest: one stride above the clean data
    assert check_sampler("ddim", 10, "trailing") and check_sampler("respaced", 10, "trailing")


def test_zero_terminal_snr_refuses_eps_and_keeps_every_table_it_reads_finite():
    with pytest.raises(ValueError, match="mean_type 'eps' is undefined with zero terminal SNR"):
        GaussianDiffusion(ZT_BETAS)
    with pytest.raises(ValueError, match="mean_type 'eps' is undefined with zero terminal SNR"):
        GaussianDiffusion(beta_schedule("jsd", 10))  # beta_T = 1 too: its eps sampling was NaN at t = T
    d = GaussianDiffusion(ZT_BETAS, mean_type="v", var_type="fixedsmall")
    assert d.zero_terminal_snr and d.alphas_cumprod[-1] == 0 and not GaussianDiffusion(BETAS).zero_terminal_snr
    for name in ("posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "fixedlarge_log_variance", "log_one_minus_alphas_cumprod", "log_betas", "snr", "loss_weights"):
        assert torch.isfinite(getattr(d, name)).all(), name
    x_T = _x_T(8)
    t = torch.full((8,), 999)
    v = GaussianOracle(ZT_BETAS, M, S, "v")(x_T, t)
    torch.testing.assert_close(v, torch.full_like(v, -M))  # E[v | x_T] = -E[x0]: x_T says nothing of x0
    torch.testing.assert_close(d.predict_x0_from_v(x_T, t, v), torch.full_like(v, M))  # x0 = -v at t = T
    assert torch.equal(d.predict_eps_from_x0(x_T, t, torch.zeros_like(x_T)), x_T)  # the limit, not inf / inf
    p = d.p_mean_variance(GaussianOracle(ZT_BETAS, M, S, "v"), x_T, t, clip_denoised=False)
    assert torch.isfinite(p.mean).all() and torch.isfinite(p.log_variance).all()
    assert d.prior_bpd(x_T).abs().max() == 0  # KL(N(0, 1) || N(0, 1))


def test_v_prediction_with_zero_terminal_snr_recovers_the_data():
    """x_T ~ N(0, I) is now exactly q(x_T): the samplers' exact moments (the recursions of the paper's sampler and
    DDIM on the rescaled schedule) hold, and the fast ones land near N(m, s^2)."""
    d = GaussianDiffusion(ZT_BETAS, mean_type="v", var_type="fixedsmall")
    oracle = GaussianOracle(ZT_BETAS, M, S, "v")
    x_T = _x_T()
    grid = timestep_subset(1000, 50, spacing="trailing")
    x = respaced(d, oracle, x_T, steps=50, spacing="trailing", generator=torch.Generator().manual_seed(1),
                 clip_denoised=False)
    _assert_moments(x, *sampler_moments(respace(d, grid).betas, M, S, "fixedsmall"))
    x = ddim(d, oracle, x_T, steps=50, spacing="trailing", clip_denoised=False)
    _assert_moments(x, *ddim_moments(grid, 0.0, ZT_ABAR))
    x = ddim(d, oracle, x_T, steps=50, spacing="trailing", eta=1.0, generator=torch.Generator().manual_seed(2),
             clip_denoised=False)
    _assert_moments(x, *ddim_moments(grid, 1.0, ZT_ABAR))
    # measured std: ddim 1000 trailing steps 0.300, dpmpp2m 20 steps 0.309, heun 25 points 0.310
    for name, steps, tol in (("dpmpp2m", 20, 0.04), ("heun", 25, 0.05)):
        x = run_sampler(name, d, oracle, x_T, steps=steps, clip_denoised=False)
        mu, sd = _moments(x)
        assert abs(mu - M) < 4 * S / math.sqrt(x.numel()) and abs(sd - S) / S < tol, (name, mu, sd)


def test_zero_terminal_snr_grids_stay_finite_and_end_at_T():
    d = GaussianDiffusion(ZT_BETAS, mean_type="v")
    for spacing in ("uniform", "quad", "trailing", "logsnr", "karras"):
        for steps in (3, 10, 50):
            kept = timestep_grid(d, steps, spacing)
            assert len(kept) == steps and kept[-1] == 999 and all(a < b for a, b in zip(kept, kept[1:], strict=False))
    lam = 0.5 * torch.log(ZT_ABAR[:999] / (1 - ZT_ABAR[:999]))  # finite below t = T
    targets = torch.linspace(lam[-1].item(), lam[0].item(), 10, dtype=torch.float64)
    nearest = sorted(int((lam - x).abs().argmin()) for x in targets)
    assert logsnr_subset(d, 10) == nearest[:-1] + [999]  # evenly in log-SNR up to t = T - 1, then t = T itself


# ------------------------------------------------------------------------------------- EDM's Heun sampler


def heun_moments(abar, kept, S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0):
    """EDM's Algorithm 2 with the oracle, written from the paper in its variables: with y = x~ - m, D(x~; sigma) =
    m + y s^2 / (s^2 + sigma^2), so d = y sigma / (s^2 + sigma^2) and every step multiplies y by a factor f (after
    the churn's noise of variance sigma^2 - sigma_i^2, at the timestep nearest to (1 + gamma) sigma_i in log sigma).
    Returns (F, mean, std): F the product of the factors (y_0 F without churn), mean and std of the output."""
    T = len(abar)

    def sig(t):
        return math.sqrt((1 - abar[t].item()) / abar[t].item()) if t >= 0 else 0.0

    K = len(kept)
    F, mean, var = 1.0, -M, 1 / abar[kept[-1]].item()  # y_0 = x_T / sqrt(abar) - m, x_T ~ N(0, 1)
    for j in range(K - 1, -1, -1):
        t, nxt = kept[j], (kept[j - 1] if j > 0 else -1)
        gamma = min(S_churn / K, math.sqrt(2) - 1) if S_tmin <= sig(t) <= S_tmax else 0.0
        t_hat = t
        if gamma > 0:
            t_hat = min(range(t, T), key=lambda u: abs(math.log(sig(u)) - math.log((1 + gamma) * sig(t))))
        s_hat, s_next = sig(t_hat), sig(nxt)
        var += (s_hat**2 - sig(t) ** 2) * S_noise**2
        k_hat = s_hat / (S**2 + s_hat**2)
        h = s_next - s_hat
        if s_next == 0:  # Euler onto the data: x = D
            f = 1 + h * k_hat
        else:
            k_next = s_next / (S**2 + s_next**2)
            f = 1 + h / 2 * (k_hat + k_next * (1 + h * k_hat))
        F, mean, var = F * f, mean * f, var * f * f
    return F, M + mean, math.sqrt(var)


def test_heun_is_edm_algorithm_2_on_the_oracle():
    """Deterministic: the output is m + F (x_T / sqrt(abar_T) - m) to float64 rounding, F from the paper's
    recursion in sigma; with churn, the exact moments. 2K - 1 network evaluations for K grid points."""
    d = GaussianDiffusion(BETAS, mean_type="v", var_type="fixedsmall")
    model = Counting(GaussianOracle(BETAS, M, S, "v"))
    x_T = _x_T()
    for spacing in ("karras", "uniform"):
        grid = timestep_grid(d, 12, spacing)
        model.calls = 0
        x = run_sampler("heun", d, model, x_T, steps=12, spacing=spacing, clip_denoised=False)
        assert model.calls == 2 * 12 - 1
        F, _, _ = heun_moments(ABAR, grid)
        want = M + F * (x_T / ABAR[999].sqrt() - M)
        torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-12)
    grid = timestep_grid(d, 25, "karras")
    for options in ({"S_churn": 5.0}, {"S_churn": 20.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}):
        x = run_sampler("heun", d, model, x_T, steps=25, generator=torch.Generator().manual_seed(4),
                        clip_denoised=False, **options)
        _assert_moments(x, *heun_moments(ABAR, grid, **options)[1:])


# measured std: karras 25 points (49 evaluations) 0.3095, 18 points 0.318; with S_churn 5, 50 points 0.3034
def test_heun_recovers_the_data_distribution():
    d = GaussianDiffusion(BETAS, mean_type="v", var_type="fixedsmall")
    oracle = GaussianOracle(BETAS, M, S, "v")
    for steps, options, tol in ((25, {}, 0.05), (50, {"S_churn": 5.0}, 0.03)):
        x = run_sampler("heun", d, oracle, _x_T(), steps=steps, generator=torch.Generator().manual_seed(5),
                        clip_denoised=False, **options)
        mu, sd = _moments(x)
        assert abs(mu - M) < 4 * S / math.sqrt(x.numel()), (options, mu)
        assert abs(sd - S) / S < tol, (options, sd)
    errs = [abs(run_sampler("heun", d, oracle, _x_T(4000), steps=k, clip_denoised=False).std().item() - S)
            for k in (5, 10, 25)]
    assert errs[0] > errs[1] > errs[2], errs


def test_heun_with_zero_terminal_snr_takes_a_first_order_step_from_infinite_sigma():
    d = GaussianDiffusion(ZT_BETAS, mean_type="v", var_type="fixedsmall")
    model = Counting(GaussianOracle(ZT_BETAS, M, S, "v"))
    x = run_sampler("heun", d, model, _x_T(1000), steps=10, S_churn=10.0, generator=torch.Generator().manual_seed(0),
                    clip_denoised=False)
    assert model.calls == 2 * 10 - 2 and torch.isfinite(x).all()


def test_karras_grid_is_edms_rho_grid_snapped_to_timesteps():
    d = GaussianDiffusion(BETAS)
    kept = karras_subset(d, 10)
    assert len(kept) == 10 and kept[0] == 0 and kept[-1] == 999
    assert all(a < b for a, b in zip(kept, kept[1:], strict=False))
    sigma = ((1 - ABAR) / ABAR).sqrt()
    hi, lo = 80.0 ** (1 / 7), sigma[0].item() ** (1 / 7)
    desc = kept[::-1]
    for i in range(1, 10):  # the top point is t_start itself; the others the nearest in log sigma to EDM's eq. 5
        target = (hi + i / 9 * (lo - hi)) ** 7
        nearest = int((sigma.log() - math.log(target)).abs().argmin())
        assert desc[i] == nearest or desc[i] == desc[i + 1] + 1, (i, desc[i], nearest)  # or pushed apart near 0
    assert karras_subset(d, 4, t_start=100)[-1] == 100
    assert check_sampler("heun").spacings[0] == "karras"


# ------------------------------------------------------------------------------------- DDIM inversion


def test_ddim_inversion_round_trip_recovers_x0():
    d = GaussianDiffusion(BETAS, mean_type="v", var_type="fixedsmall")
    model = Counting(GaussianOracle(BETAS, M, S, "v"))
    x0 = M + S * torch.randn(4000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    errors = []
    for steps in (10, 50, 250):
        grid = timestep_grid(d, steps)
        model.calls = 0
        x_T = ddim_invert(d, model, x0, grid, clip_denoised=False)
        assert model.calls == steps
        back = SAMPLERS["ddim"].fn(d, model, x_T, grid, clip_denoised=False)
        errors.append((back - x0).abs().mean().item())
    # measured mean |error|: 0.152, 0.039, 0.0081: first order in the step
    assert errors[0] > 2 * errors[1] > 4 * errors[2] and errors[2] < 0.02, errors
    _assert_moments(x_T, 0.0, 1.0, k=6)  # the data mapped onto the prior, near N(0, 1)
    seen = []
    ddim_invert(d, GaussianOracle(BETAS, M, S, "v"), x0[:4], [0, 17, 400, 999], callback=lambda t, x, p: seen.append(t))
    assert seen == [0, 0, 17, 400]
