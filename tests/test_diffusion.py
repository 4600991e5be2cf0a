"""The diffusion math against closed forms, the Gaussian oracle and diffusers' DDPMScheduler."""

import dataclasses
import math

import pytest
import torch
from oracle import GaussianOracle, abar_of, sampler_moments

from ddpm import GaussianDiffusion, beta_schedule
from ddpm.likelihood import discretized_gaussian_log_likelihood, normal_kl
from ddpm.sampling import run_sampler
from ddpm.schedule import rescale_zero_terminal_snr

BETAS = beta_schedule("linear", 1000)
PARAMS = ["eps", "x0", "xprev", "v"]
VARS = ["fixedlarge", "fixedsmall"]


# ------------------------------------------------------------------ schedules and tables


def test_linear_schedule_golden_values():
    assert BETAS.dtype == torch.float64 and BETAS.shape == (1000,)
    assert BETAS[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert BETAS[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert BETAS[1].item() == pytest.approx(1e-4 + 0.0199 / 999, rel=1e-12)
    abar = abar_of(BETAS)
    # alphas_cumprod at T: a value widely quoted for the paper's schedule
    assert abar[-1].item() == pytest.approx(4.035829e-05, rel=1e-4)
    d = GaussianDiffusion(BETAS)
    torch.testing.assert_close(d.alphas_cumprod, abar, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["linear", "quad", "const", "jsd", "cosine"])
def test_schedules_are_valid(name):
    b = beta_schedule(name, 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert (b > 0).all() and (b <= 1.0).all()
    if name != "jsd":  # jsd ends at beta_T = 1 by design
        assert (b < 0.999 + 1e-12).all()


def test_schedule_specific_values():
    assert torch.allclose(beta_schedule("jsd", 4), torch.tensor([1 / 4, 1 / 3, 1 / 2, 1.0], dtype=torch.float64))
    assert torch.allclose(beta_schedule("const", 3), torch.full((3,), 0.02, dtype=torch.float64))
    q = beta_schedule("quad", 10)
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    c = beta_schedule("cosine", 1000)
    abar = abar_of(c)
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert abar[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert c[-1].item() == pytest.approx(0.999)


def test_enum_strings_and_bad_values():
    d = GaussianDiffusion(BETAS, mean_type="x0", var_type="fixedsmall", loss_type="kl")
    assert d.mean_type.value == "x0" and d.var_type.value == "fixedsmall" and d.loss_type.value == "kl"
    with pytest.raises(ValueError, match="mean_type must be one of 'eps', 'x0', 'xprev'"):
        GaussianDiffusion(BETAS, mean_type="epsilon")
    with pytest.raises(ValueError, match="var_type must be one of .*'fixedlarge'"):
        GaussianDiffusion(BETAS, var_type="fixed_large")
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(BETAS, loss_type="mse")
    with pytest.raises(ValueError, match="beta schedule must be one of"):
        beta_schedule("sigmoid", 10)


# ------------------------------------------------------------------ forward process and posterior


def test_q_sample_is_eq4_on_any_rank():
    d = GaussianDiffusion(BETAS)
    abar = abar_of(BETAS)
    for shape in [(5, 3), (5, 2, 4, 4), (5, 7)]:
        x0, noise = torch.randn(shape), torch.randn(shape)
        t = torch.tensor([0, 1, 250, 998, 999])
        x_t = d.q_sample(x0, t, noise)
        a = abar[t].float().reshape(-1, *[1] * (len(shape) - 1))
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_q_posterior_against_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0), independently."""
    d = GaussianDiffusion(BETAS)
    x0 = torch.randn(6, 3, dtype=torch.float64)
    x_t = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 500, 900, 999])
    beta = BETAS[t][:, None]
    abar_prev = abar_of(BETAS)[t - 1][:, None]
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    want_mean = ((1 - beta).sqrt() * x_t / beta + abar_prev.sqrt() * x0 / (1 - abar_prev)) / precision
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, 1 / precision, rtol=1e-10, atol=0)
    torch.testing.assert_close(log_var, torch.log(1 / precision), rtol=1e-10, atol=1e-12)
    assert var.shape == (6, 1)


def test_posterior_variances_closed_form():
    d = GaussianDiffusion(BETAS)
    abar = abar_of(BETAS)
    pv = BETAS * (1 - torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])) / (1 - abar)
    torch.testing.assert_close(d.posterior_variance, pv)
    assert d.posterior_variance[0] == 0
    # clipped log-variance: log of the t = 1 value at t = 0
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(pv[1].item()))
    # fixedlarge: beta_t for t >= 1, posterior variance of t = 1 at t = 0
    x = torch.zeros(3, 2, dtype=torch.float64)
    var, log_var = GaussianDiffusion(BETAS, var_type="fixedlarge").p_variance(x, torch.tensor([0, 1, 999]))
    torch.testing.assert_close(var[:, 0], torch.stack([pv[1], BETAS[1], BETAS[999]]))
    torch.testing.assert_close(log_var, var.log())


# ------------------------------------------------------------------ the Gaussian oracle


M, S = 0.1, 0.3


@pytest.mark.parametrize("var_type", VARS)
@pytest.mark.parametrize("mean_type", PARAMS)
def test_sampler_matches_scalar_recursion(mean_type, var_type):
    """With the Bayes-optimal model and no clipping, the sampler's output is Gaussian with moments given
    by a scalar recursion; 40,000 draws pin the mean and spread to a few 1e-3 (a batch of 1000 draws of 40
    dimensions: the per-row tables of a batch of 20000 took 5x longer)."""
    d = GaussianDiffusion(BETAS, mean_type=mean_type, var_type=var_type)
    oracle = GaussianOracle(BETAS, M, S, mean_type)
    x = d.sample(oracle, (1000, 40), generator=torch.Generator().manual_seed(1), clip_denoised=False).flatten()
    want_mu, want_sd = sampler_moments(BETAS, M, S, var_type)
    n = x.numel()
    assert abs(x.mean().item() - want_mu) < 4 * want_sd / n**0.5
    assert abs(x.std().item() - want_sd) < 4 * want_sd / (2 * n) ** 0.5
    # fixedlarge ends slightly above s, fixedsmall slightly below (the recursion, not the data)
    assert (want_sd > S) if var_type == "fixedlarge" else (want_sd < S)


@pytest.mark.parametrize("mean_type", PARAMS)
def test_training_loss_matches_closed_form(mean_type):
    """E[L_simple] with the oracle = the posterior variance of the target, averaged over t."""
    d = GaussianDiffusion(BETAS, mean_type=mean_type)
    oracle = GaussianOracle(BETAS, M, S, mean_type)
    reps = 64
    t = torch.arange(1000).repeat(reps)
    x0 = (M + S * torch.randn(t.shape[0], 4, dtype=torch.float64))
    loss = d.training_losses(oracle, x0, t=t)
    abar = abar_of(BETAS)
    var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)  # Var(x0 | x_t)
    if mean_type == "eps":
        want = abar * S**2 / (abar * S**2 + 1 - abar)  # Var(eps | x_t)
    elif mean_type == "x0":
        want = var_x0
    elif mean_type == "v":  # given x_t, eps = (x_t - sqrt(a) x0) / sqrt(1 - a), so v = -x0 / sqrt(1 - a) + const
        want = var_x0 / (1 - abar)
    else:
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        want = (BETAS * abar_prev.sqrt() / (1 - abar)) ** 2 * var_x0
    got = loss.reshape(reps, 1000).mean(0)
    # per t, the loss of one example is want * chi^2_4 / 4: relative sd 1/sqrt(2 * reps)
    assert abs(got.mean().item() - want.mean().item()) < 4 * want.mean().item() / (2 * reps * 1000) ** 0.5 * 3
    assert loss.shape == (64000,)
    rel = ((got - want) / want).abs()
    assert rel.median().item() < 0.15


def _quantised_gaussian(m, s, n, d, seed=0):
    """8-bit data in [-1, 1] drawn from N(m, s^2) quantised to the 256 levels, and its entropy in bits."""
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    edges = torch.cat([torch.tensor([-math.inf]), (levels[:-1] + levels[1:]) / 2, torch.tensor([math.inf])])
    p = torch.special.ndtr((edges[1:] - m) / s) - torch.special.ndtr((edges[:-1] - m) / s)
    entropy = float(-(p[p > 0] * torch.log2(p[p > 0])).sum())
    idx = torch.multinomial(p, n * d, replacement=True, generator=torch.Generator().manual_seed(seed))
    return levels[idx].reshape(n, d).float(), entropy


def _expected_kl_bits(var_type, s):
    """E over x0, x_t of the KL terms L_1..L_{T-1} with the oracle, in closed form (bits/dim)."""
    abar = abar_of(BETAS)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post = BETAS * (1 - abar_prev) / (1 - abar)
    sigma2 = BETAS if var_type == "fixedlarge" else post
    c1 = BETAS * abar_prev.sqrt() / (1 - abar)
    var_x0 = s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
    kl = 0.5 * (torch.log(sigma2 / post) + post / sigma2 - 1 + c1**2 * var_x0 / sigma2)
    return float(kl[1:].sum() / math.log(2))


@pytest.mark.parametrize("var_type,gap_range", [("fixedlarge", (0.0, 0.3)), ("fixedsmall", (0.45, 0.9))])
@pytest.mark.parametrize("mean_type", PARAMS)
def test_bpd_of_oracle_is_above_entropy(mean_type, var_type, gap_range):
    """The bound of quantised Gaussian data sits above its entropy: by about 0.1 bit/dim for fixedlarge
    and about 0.6 for fixedsmall (measured: 0.14 and 0.67 at s = 0.1); its KL part has a closed form."""
    s = 0.1
    x0, entropy = _quantised_gaussian(0.0, s, 600, 4)
    d = GaussianDiffusion(BETAS, mean_type=mean_type, var_type=var_type)
    res = d.bpd(GaussianOracle(BETAS, 0.0, s, mean_type), x0, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    assert res.terms.shape == (600, 1000) and res.total.shape == (600,) and res.prior.shape == (600,)
    torch.testing.assert_close(res.total, res.prior + res.terms.sum(1))
    gap = res.total.mean().item() - entropy
    assert gap_range[0] < gap < gap_range[1], gap
    kl_sum = res.terms[:, 1:].sum(1)
    se = kl_sum.std().item() / 600**0.5
    assert abs(kl_sum.mean().item() - _expected_kl_bits(var_type, s)) < 4 * se + 0.02
    # the prior term: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) is tiny for this schedule
    assert 0 < res.prior.mean().item() < 1e-4


def test_loss_types_run_and_kl_is_the_bound_term():
    x0, _ = _quantised_gaussian(0.0, 0.3, 8, 4)
    oracle = GaussianOracle(BETAS, 0.0, 0.3, "eps")
    d = GaussianDiffusion(BETAS, loss_type="kl")
    t = torch.tensor([0, 0, 1, 5, 100, 500, 900, 999])
    noise = torch.randn_like(x0)
    loss = d.training_losses(oracle, x0, t=t, noise=noise)
    x_t = d.q_sample(x0, t, noise)
    p = d.p_mean_variance(oracle, x_t, t, clip_denoised=False)
    mean, _, log_var = d.q_posterior(x0, x_t, t)
    kl = normal_kl(mean, log_var, p.mean, p.log_variance).mean(1) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance).mean(1) / math.log(2)
    want = torch.where(t == 0, nll, kl).float()
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("mean_type,var_type,loss_type", [("eps", "fixedlarge", "simple"), ("x0", "fixedsmall", "kl"),
                                                            ("xprev", "fixedlarge", "simple"), ("eps", "learned_range", "hybrid")])
def test_the_math_stays_float32_when_the_network_runs_in_bf16(mean_type, var_type, loss_type):
    """bf16 training and sampling (autocast around the whole step) round the network's output only: loss, bound
    and sampler computed inside autocast from a bf16 output equal float32 arithmetic on that same output. On
    100 steps: the bound and the sampler visit every step, twice (3-4 s a case at 1000 on an AVX2-only EPYC)."""
    betas = beta_schedule("linear", 100)
    x0, _ = _quantised_gaussian(0.0, 0.3, 16, 4)
    oracle = GaussianOracle(betas, 0.0, 0.3, mean_type)
    learned = var_type == "learned_range"

    def net(x, t):  # what a network under bf16 autocast returns: a bf16 tensor
        out = oracle(x, t)
        return (torch.cat([out, torch.zeros_like(out)], 1) if learned else out).bfloat16()

    def rounded(x, t):  # the same numbers, handed over in float32
        return net(x, t).float()

    d = GaussianDiffusion(betas, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    t = torch.tensor([0, 1, 2, 5, 10, 40, 70, 99]).repeat(2)
    noise = torch.randn_like(x0)

    def everything(model):
        loss = d.training_losses(model, x0, t=t, noise=noise)
        bound = d.bpd(model, x0, generator=torch.Generator().manual_seed(3), clip_denoised=False)
        samples = d.sample(model, (16, 4), generator=torch.Generator().manual_seed(4))
        fast = run_sampler("ddim", d, model, torch.randn(16, 4, generator=torch.Generator().manual_seed(5)), steps=20)
        return loss, bound.total, samples, fast

    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = everything(net)
    outside = everything(rounded)
    for a, b in zip(inside, outside, strict=True):
        assert a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if not learned:  # the rounding is there to see: the float32 oracle's loss differs
        assert (d.training_losses(oracle, x0, t=t, noise=noise) != outside[0]).any()


# ------------------------------------------------------------------ likelihood pieces


def test_normal_kl_closed_form():
    assert normal_kl(0.0, 0.0, 0.0, 0.0).item() == 0.0
    # KL(N(1, 1) || N(0, 4)) = log 2 + (1 + 1) / 8 - 1/2
    assert normal_kl(1.0, 0.0, 0.0, math.log(4.0)).item() == pytest.approx(math.log(2) + 2 / 8 - 0.5)


def test_discretized_gaussian_sums_to_one():
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.5)), (-0.3, math.log(0.004))]:
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # a narrow decoder centred on a level puts almost all mass there (no cancellation at the tails)
    lp = discretized_gaussian_log_likelihood(torch.tensor([0.6]), torch.tensor([0.6]), torch.tensor([math.log(1e-4)]))
    assert lp.item() == pytest.approx(0.0, abs=1e-9)
    far = discretized_gaussian_log_likelihood(torch.tensor([0.6]), torch.tensor([-0.9]), torch.tensor([math.log(0.05)]))
    assert torch.isfinite(far) and far.item() < -20


# ------------------------------------------------------------------ diffusers' scheduler as a reference


def _diffusers_in_float64(sched):
    """diffusers keeps its tables in float32, where 1 - abar_t loses ~3e-4 relative accuracy at t = 2 (our
    float64 tables do not); compare the formulas, so give its scheduler float64 tables of the same betas."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("var_type,diffusers_var", [("fixedlarge", "fixed_large"), ("fixedsmall", "fixed_small")])
@pytest.mark.parametrize("mean_type,prediction_type", [("eps", "epsilon"), ("x0", "sample")])
def test_p_mean_variance_matches_diffusers(var_type, diffusers_var, mean_type, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    sched = _diffusers_in_float64(diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        variance_type=diffusers_var, clip_sample=True, prediction_type=prediction_type,
    ))
    ours = GaussianDiffusion(BETAS, mean_type=mean_type, var_type=var_type)
    torch.testing.assert_close(sched.betas, BETAS, rtol=1e-6, atol=0)  # float32 linspace vs float64
    ours = GaussianDiffusion(sched.betas, mean_type=mean_type, var_type=var_type)
    g = torch.Generator().manual_seed(3)
    for t in [1, 2, 50, 400, 999]:
        x_t = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        output = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * (0.5 if mean_type == "x0" else 1.0)
        step = sched.step(output, t, x_t, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        p = ours.p_mean_variance_from_output(output, x_t, torch.full((4,), t), clip_denoised=True)
        torch.testing.assert_close(p.pred_x0, step.pred_original_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.mean + p.variance.sqrt() * noise, step.prev_sample, rtol=1e-6, atol=1e-6)
        assert p.variance.shape == (4, 1, 1, 1)


def test_model_output_shape_is_checked():
    d = GaussianDiffusion(BETAS)
    with pytest.raises(ValueError, match="model output shape"):
        d.p_mean_variance(lambda x, t: x[:, :1], torch.randn(2, 3), torch.tensor([1, 2]))


# ------------------------------------------------------------------ learned variances (improved DDPM)


def _learned(oracle: GaussianOracle, v_of_t):
    """A learned-variance model [B, 2D]: the oracle's eps and the variance channels v_of_t(t) [B]."""

    def model(x_t, t):
        v = v_of_t(t).to(x_t.dtype)[:, None].expand_as(x_t)
        return torch.cat([oracle(x_t, t), v], dim=1)

    return model


def _optimal_v(s: float) -> torch.Tensor:
    """v [T] putting sigma_t^2 at the true reverse variance Var[x_{t-1} | x_t] = beta~_t + c1_t^2 Var[x_0 | x_t]
    of N(0, s^2) data, clamped to the learnable range [beta~_t, beta_t] (improved DDPM eq. 15)."""
    abar = abar_of(BETAS)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post = BETAS * (1 - abar_prev) / (1 - abar)
    lo = torch.log(torch.cat([post[1:2], post[1:]]))
    hi = torch.log(BETAS)
    c1 = BETAS * abar_prev.sqrt() / (1 - abar)
    true_var = post + c1**2 * s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
    frac = ((torch.log(true_var) - lo) / (hi - lo)).clamp(0, 1)
    return 2 * frac - 1


def test_learned_range_interpolates_the_fixed_log_variances():
    d = GaussianDiffusion(BETAS, var_type="learned_range")
    small = GaussianDiffusion(BETAS, var_type="fixedsmall")
    x = torch.zeros(4, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    _, lo = small.p_variance(x, t)
    hi = torch.log(BETAS[t])[:, None]
    for v, want in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2), (0.5, 0.75 * hi + 0.25 * lo)):
        var, log_var = d.p_variance(x, t, torch.full_like(x, v))
        torch.testing.assert_close(log_var, want.expand_as(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(var, torch.exp(log_var))
    # at t >= 1, v = 1 is fixedlarge's sigma^2 = beta_t and v = -1 fixedsmall's
    large = GaussianDiffusion(BETAS, var_type="fixedlarge")
    for v, ref in ((1.0, large), (-1.0, small)):
        m = _learned(GaussianOracle(BETAS, 0.0, 0.3), lambda t, v=v: torch.full(t.shape, v, dtype=torch.float64))
        x_t = torch.randn(4, 3, dtype=torch.float64)
        got = d.p_mean_variance(m, x_t, t, clip_denoised=False)
        want = ref.p_mean_variance(GaussianOracle(BETAS, 0.0, 0.3), x_t, t, clip_denoised=False)
        torch.testing.assert_close(got.mean, want.mean)
        torch.testing.assert_close(got.log_variance, want.log_variance.expand_as(x_t))
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        d.p_mean_variance(GaussianOracle(BETAS, 0.0, 0.3), x_t, t)


def test_learned_variances_lower_the_bound_on_the_oracle():
    """With the oracle's mean and the true reverse variances, every KL term drops to 0.5 log(1 + c1^2 Var[x0|x_t]
    / beta~): the bound of the same quantised data, with the same noise, falls below both fixed choices."""
    s = 0.3
    x0, entropy = _quantised_gaussian(0.0, s, 400, 4)
    oracle = GaussianOracle(BETAS, 0.0, s)
    v_opt = _optimal_v(s)
    totals = {}
    for name, d, model in (
        ("fixedlarge", GaussianDiffusion(BETAS, var_type="fixedlarge"), oracle),
        ("fixedsmall", GaussianDiffusion(BETAS, var_type="fixedsmall"), oracle),
        ("learned", GaussianDiffusion(BETAS, var_type="learned_range"), _learned(oracle, lambda t: v_opt[t])),
    ):
        res = d.bpd(model, x0, generator=torch.Generator().manual_seed(3), clip_denoised=False)
        totals[name] = res.total
    gaps = {k: v.mean().item() - entropy for k, v in totals.items()}
    print("bits/dim above the entropy:", gaps)
    # paired over the same examples and noise: learned below both, by more than the paired noise
    for ref in ("fixedlarge", "fixedsmall"):
        diff = totals[ref] - totals["learned"]
        assert diff.mean().item() > 4 * diff.std().item() / 400**0.5, (ref, gaps)
    assert 0.0 < gaps["learned"] < gaps["fixedlarge"] < gaps["fixedsmall"], gaps


def test_hybrid_loss_is_simple_plus_the_bound_and_trains_only_the_variance():
    s = 0.3
    x0, _ = _quantised_gaussian(0.0, s, 16, 4)
    t = torch.tensor([0, 1, 2, 5, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    d = GaussianDiffusion(BETAS, var_type="learned_range", loss_type="hybrid")
    x_t = d.q_sample(x0, t, noise)
    eps = (GaussianOracle(BETAS, 0.0, s)(x_t, t) + 0.05).requires_grad_()
    v = torch.full_like(x0, 0.3, requires_grad=True)
    loss = d.training_losses(lambda x, tt: torch.cat([eps, v], 1), x0, t=t, noise=noise)
    simple = ((noise - eps) ** 2).mean(1)
    vb = d._vb_terms_bpd(torch.cat([eps, v], 1).detach(), x0, x_t, t, clip_denoised=False)[0]
    torch.testing.assert_close(loss, simple + 0.001 * 1000 * vb)
    loss.sum().backward()
    # the mean channels get exactly L_simple's gradient (the bound's path to them is cut) ...
    torch.testing.assert_close(eps.grad, -2 * (noise - eps.detach()) / 4)
    # ... and the variance channels a non-zero one
    assert v.grad.abs().min() > 0
    with pytest.raises(ValueError, match="learned_range"):
        GaussianDiffusion(BETAS, var_type="fixedlarge", loss_type="hybrid")


# ------------------------------------------------------------------ the tables on a device

SMALL_T = 3  # bpd runs all T steps: a short schedule keeps a hundred calls of every method cheap
TABLE_CONFIGS = [(m, v, loss) for v in ("fixedlarge", "fixedsmall", "learned_range") for loss in ("simple", "kl", "hybrid")
                 for m in PARAMS if loss != "hybrid" or v == "learned_range"]


def _toy_model(learned: bool):
    """Any function of x_t serves here ([B, C, ...] -> [B, C or 2C, ...]): these tests are about the tables."""

    def model(x_t, t):
        out = 0.3 * x_t
        return torch.cat([out, torch.tanh(x_t)], 1) if learned else out

    return model


def _toy_inputs(device, dtype=torch.float32):
    """x0 (8-bit levels in [-1, 1]), x_t, noise [4, 3, 2, 2] and t [4] (both ends included), made on the CPU."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 256, (4, 3, 2, 2), generator=g).to(dtype) * 2 / 255 - 1
    x_t, noise = (torch.randn(4, 3, 2, 2, generator=g, dtype=dtype) for _ in range(2))
    t = torch.tensor([0, 1, SMALL_T // 2, SMALL_T - 1])
    return tuple(v.to(device) for v in (x0, x_t, noise, t))


def _every_method(d: GaussianDiffusion, x0, x_t, noise, t) -> dict[str, torch.Tensor]:
    """One call of every method that reads the tables, their outputs by name."""
    model = _toy_model(d.var_type.value == "learned_range")
    out = dict(zip(("qmv_mean", "qmv_var", "qmv_log_var"), d.q_mean_variance(x0, t), strict=True))
    out["q_sample"] = d.q_sample(x0, t, noise)
    out.update(zip(("post_mean", "post_var", "post_log_var"), d.q_posterior(x0, x_t, t), strict=True))
    out["x0_from_eps"] = d.predict_x0_from_eps(x_t, t, noise)
    out["eps_from_x0"] = d.predict_eps_from_x0(x_t, t, x0)
    p = d.p_mean_variance(model, x_t, t)
    out.update(p_mean=p.mean, p_var=p.variance, p_log_var=p.log_variance, p_x0=p.pred_x0)
    out["loss"] = d.training_losses(model, x0, t=t, noise=noise)
    out["prior_bpd"] = d.prior_bpd(x0)
    res = d.bpd(model, x0, generator=torch.Generator().manual_seed(1))  # a CPU generator: the same noise anywhere
    out.update(bpd_total=res.total, bpd_terms=res.terms, bpd_x0_mse=res.x0_mse)
    return out


def test_the_named_tables_are_the_public_float64_attributes():
    d = GaussianDiffusion(BETAS)
    abar = abar_of(BETAS)
    cpu = d._tables(torch.device("cpu"))
    for f in dataclasses.fields(cpu):
        table = getattr(cpu, f.name)
        assert table is getattr(d, f.name), f.name
        assert table.dtype == torch.float64 and table.shape == (1000,) and table.device.type == "cpu", f.name
    torch.testing.assert_close(d.one_minus_alphas_cumprod, 1 - abar, rtol=1e-14, atol=0)
    torch.testing.assert_close(d.log_one_minus_alphas_cumprod, torch.log(1 - abar), rtol=1e-14, atol=0)
    torch.testing.assert_close(d.fixedlarge_variance, torch.cat([d.posterior_variance[1:2], BETAS[1:]]), rtol=0, atol=0)
    torch.testing.assert_close(d.fixedlarge_log_variance, torch.log(d.fixedlarge_variance), rtol=0, atol=0)


@pytest.mark.parametrize("mean_type,var_type,loss_type", TABLE_CONFIGS)
def test_every_method_runs_on_the_meta_device(mean_type, var_type, loss_type):
    """A second device without values: every output has its shape, the inputs' dtype (bits/dim in float64) and
    lies on that device, on the device's first use and after."""
    d = GaussianDiffusion(beta_schedule("linear", SMALL_T), mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    x0, x_t, noise, t = _toy_inputs("meta")
    per_example, per_pixel = (4, 1, 1, 1), (4, 3, 2, 2)
    want = dict(qmv_mean=per_pixel, qmv_var=per_example, qmv_log_var=per_example, q_sample=per_pixel,
                post_mean=per_pixel, post_var=per_example, post_log_var=per_example, x0_from_eps=per_pixel,
                eps_from_x0=per_pixel, p_mean=per_pixel, p_x0=per_pixel, loss=(4,), prior_bpd=(4,), bpd_total=(4,),
                bpd_terms=(4, SMALL_T), bpd_x0_mse=(4, SMALL_T))
    want["p_var"] = want["p_log_var"] = per_pixel if var_type == "learned_range" else per_example
    for _ in range(2):
        out = _every_method(d, x0, x_t, noise, t)
        assert {k: tuple(v.shape) for k, v in out.items()} == want
        for k, v in out.items():
            assert v.device.type == "meta", k
            assert v.dtype == (torch.float64 if k.startswith("bpd") else torch.float32), k


@pytest.mark.parametrize("mean_type,var_type,loss_type,devices", [
    ("x0", "fixedlarge", "kl", ("cpu",)),
    ("eps", "fixedsmall", "simple", ("cpu",)),
    # meta's kernels are slow (170 ms a round on the Xeon, 15 s for 100): one config, 10 rounds
    ("xprev", "learned_range", "hybrid", ("cpu", "meta")),
])
def test_the_tables_are_moved_once_per_device_not_once_per_call(mean_type, var_type, loss_type, devices):
    """After 100 calls of every method (10 with the meta device), interleaved over the devices, the same one copy
    of the tables per device as after the first call (a cache keyed by id(table) gained two CPU entries per
    q_mean_variance call)."""
    d = GaussianDiffusion(beta_schedule("linear", SMALL_T), mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    inputs = [_toy_inputs(device) for device in devices]
    for x in inputs:
        _every_method(d, *x)
    after_one = dict(d._device_tables)
    for _ in range(99 if "meta" not in devices else 9):
        for x in inputs:
            _every_method(d, *x)
    assert len(d._device_tables) == len(after_one)
    assert set(d._device_tables) == {torch.device(device) for device in ("cpu", *devices)}  # one entry each
    assert all(d._device_tables[k] is v for k, v in after_one.items())  # and not remade either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_tables_on_cuda_give_the_cpu_values_over_many_interleaved_calls():
    """Every method on the GPU, 20 rounds interleaved over the configurations (freed temporaries and their ids
    come and go between calls), equals the CPU in float64; q_mean_variance also equals its closed form."""
    from ddpm.sampling import inpaint

    betas = beta_schedule("linear", SMALL_T)
    ds = [GaussianDiffusion(betas, mean_type=m, var_type=v, loss_type=loss) for m, v, loss in TABLE_CONFIGS]
    cpu_inputs = _toy_inputs("cpu", torch.float64)
    gpu_inputs = tuple(v.cuda() for v in cpu_inputs)
    mask = (torch.arange(48).reshape(4, 3, 2, 2) % 2).double()

    def painted(d, x0):
        model = _toy_model(d.var_type.value == "learned_range")
        return inpaint(d, model, x0, mask.to(x0.device), resample=2, generator=torch.Generator().manual_seed(2))

    want = [_every_method(d, *cpu_inputs) | {"inpaint": painted(d, cpu_inputs[0])} for d in ds]
    abar_t = abar_of(betas)[cpu_inputs[3]].reshape(4, 1, 1, 1)
    for _ in range(20):
        for d, ref in zip(ds, want, strict=True):
            got = _every_method(d, *gpu_inputs) | {"inpaint": painted(d, gpu_inputs[0])}
            for k, v in got.items():
                assert v.device.type == "cuda", k
                torch.testing.assert_close(v.cpu(), ref[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
            torch.testing.assert_close(got["qmv_var"].cpu(), 1 - abar_t, rtol=1e-15, atol=0)
            torch.testing.assert_close(got["qmv_log_var"].cpu(), torch.log(1 - abar_t), rtol=1e-15, atol=0)
    assert all(len(d._device_tables) == 2 for d in ds)


# ------------------------------------------------------------------ past the paper: v, Min-SNR, zero terminal SNR


def test_zero_terminal_snr_rescaling_is_lin_et_al_algorithm_1():
    zt = rescale_zero_terminal_snr(BETAS)
    abar, old = abar_of(zt), abar_of(BETAS)
    assert zt.dtype == torch.float64 and zt.shape == (1000,)
    assert abar[-1] == 0 and zt[-1] == 1.0 and ((zt > 0) & (zt <= 1)).all()  # abar_T = 0 exactly, beta_T = 1
    assert zt[0] == BETAS[0] and abar[0].sqrt() == old[0].sqrt()  # sqrt(abar_1) unchanged, bit for bit
    # sqrt(abar_t) shifted by sqrt(abar_T) and scaled to keep sqrt(abar_1) (Algorithm 1), to float64 rounding
    first, last = old[0].sqrt(), old[-1].sqrt()
    torch.testing.assert_close(abar.sqrt(), (old.sqrt() - last) * first / (first - last), rtol=1e-12, atol=1e-15)
    assert (zt[1:] > BETAS[1:]).all()  # every later step noisier: the schedule moves the whole curve down
    d = GaussianDiffusion(zt, mean_type="v")
    assert d.snr[-1] == 0 and d.sqrt_alphas_cumprod[0] == GaussianDiffusion(BETAS).sqrt_alphas_cumprod[0]
    with pytest.raises(ValueError, match="T >= 2"):
        rescale_zero_terminal_snr(torch.tensor([0.5]))


def test_min_snr_weights_by_hand():
    """Hang et al. 2023 with gamma = 5: the x0 error weighted min(SNR, 5); for eps and v the same weight on
    the x0 error, divided by what the target's MSE multiplies it by (SNR, SNR + 1)."""
    abar = abar_of(BETAS)
    for t in (0, 100, 200, 500, 999):
        snr = (abar[t] / (1 - abar[t])).item()
        want = {"eps": min(snr, 5.0) / snr, "v": min(snr, 5.0) / (snr + 1), "x0": min(snr, 5.0)}
        for mean_type, w in want.items():
            d = GaussianDiffusion(BETAS, mean_type=mean_type, loss_weight="min_snr")
            assert d.snr[t].item() == pytest.approx(snr, rel=1e-14)
            assert d.loss_weights[t].item() == pytest.approx(w, rel=1e-14), (mean_type, t)
    d = GaussianDiffusion(BETAS, mean_type="eps", loss_weight="min_snr", min_snr_gamma=1.0)
    assert d.loss_weights[0].item() == pytest.approx(1 / (abar[0] / (1 - abar[0])).item(), rel=1e-14)
    assert d.loss_weights[-1] == 1.0  # SNR 4e-5 < gamma: eps keeps its full weight at high noise
    assert torch.equal(GaussianDiffusion(BETAS, mean_type="v").loss_weights, torch.ones(1000, dtype=torch.float64))


@pytest.mark.parametrize("mean_type", ["eps", "v", "x0"])
def test_min_snr_weights_the_simple_loss_and_leaves_the_bound_alone(mean_type):
    x0, _ = _quantised_gaussian(0.0, 0.3, 16, 4)
    t = torch.tensor([0, 1, 2, 5, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    oracle = GaussianOracle(BETAS, 0.0, 0.3, mean_type)
    plain = GaussianDiffusion(BETAS, mean_type=mean_type).training_losses(oracle, x0, t=t, noise=noise)
    d = GaussianDiffusion(BETAS, mean_type=mean_type, loss_weight="min_snr")
    weighted = d.training_losses(oracle, x0, t=t, noise=noise)
    torch.testing.assert_close(weighted, plain * d.loss_weights[t].float(), rtol=1e-6, atol=0)
    # hybrid: the simple part weighted, the bound term (variance only) as it was
    def learned(x, tt):
        return torch.cat([oracle(x, tt), torch.full_like(x, 0.3)], 1)

    hybrid = {w: GaussianDiffusion(BETAS, mean_type=mean_type, var_type="learned_range", loss_type="hybrid",
                                   loss_weight=w).training_losses(learned, x0, t=t, noise=noise) for w in ("none", "min_snr")}
    vb = hybrid["none"] - plain
    torch.testing.assert_close(hybrid["min_snr"], weighted + vb, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_type 'kl' is the variational bound and is not reweighted"):
        GaussianDiffusion(BETAS, mean_type=mean_type, loss_type="kl", loss_weight="min_snr")
    with pytest.raises(ValueError, match="min_snr' is defined for mean_type 'eps', 'v' and 'x0'; got 'xprev'"):
        GaussianDiffusion(BETAS, mean_type="xprev", loss_weight="min_snr")


def test_the_bound_and_the_kl_loss_read_v_as_eps():
    """The bound goes through the predicted x0: the oracle's v gives the bits/dim and the kl losses of its eps."""
    x0, _ = _quantised_gaussian(0.0, 0.1, 64, 4)
    t = torch.tensor([0, 1, 5, 100, 500, 999]).repeat(4)[:24]
    noise = torch.randn(24, 4, generator=torch.Generator().manual_seed(2))
    out = {}
    for m in ("eps", "v"):
        d = GaussianDiffusion(BETAS, mean_type=m, var_type="fixedsmall", loss_type="kl")
        oracle = GaussianOracle(BETAS, 0.0, 0.1, m)
        out[m] = (d.bpd(oracle, x0.double(), generator=torch.Generator().manual_seed(1), clip_denoised=False).total,
                  d.training_losses(oracle, x0[:24].double(), t=t, noise=noise.double()))
    for a, b in zip(out["eps"], out["v"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_the_bound_with_zero_terminal_snr_has_no_prior_term():
    zt = rescale_zero_terminal_snr(beta_schedule("linear", 100, 1e-3, 0.2))
    x0, _ = _quantised_gaussian(0.0, 0.3, 32, 4)
    for var_type in VARS:
        d = GaussianDiffusion(zt, mean_type="v", var_type=var_type)
        res = d.bpd(GaussianOracle(zt, 0.0, 0.3, "v"), x0, generator=torch.Generator().manual_seed(0), clip_denoised=False)
        assert torch.equal(res.prior, torch.zeros(32, dtype=torch.float64))  # KL(N(0, 1) || N(0, 1)) = 0
        assert torch.isfinite(res.terms).all() and 0 < res.total.mean().item() < 10
