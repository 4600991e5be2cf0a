"""Degradation operators and the training-free (null-space, DDNM) restorer, on the Gaussian oracle.

For x0 ~ N(m, s^2 I) and noiseless y = A x0 the posterior p(x0 | y) is Gaussian: with P = A+ A the orthogonal
projection onto A's row space, x0 = A+ y + (I - P) x0, and for the isotropic prior the null-space part is
independent of y: mean (I - P) m, covariance s^2 (I - P). With the oracle, DDNM's null-space part follows the
unconditional DDIM chain (eta 1) exactly, a scalar recursion per null direction (`null_moments`), whose limit over
every timestep is that posterior; on a coarse grid it holds less variance, and the recursion says how much.
"""

import math

import numpy as np
import pytest
import torch
from oracle import GaussianOracle, abar_of

from ddpm import GaussianDiffusion, beta_schedule
from ddpm.modes import Task
from ddpm.restoration import Blur, ddnm, ddnm_heun, default_noise, named_mask, operator, step_noise, travel_moves
from ddpm.sampling import heun, timestep_grid

pytestmark = pytest.mark.usefixtures("one_thread")

M, S = 0.1, 0.5
N = 4000
SHAPES = {"sr2": (1, 4, 4), "sr4": (3, 8, 8), "sr8": (1, 8, 8), "colorize": (3, 4, 4), "inpaint": (2, 4, 4),
          "deblur": (2, 8, 8)}


def _op(task: str):
    return operator(task, SHAPES[task], "center" if task == "inpaint" else None)


def _matrix(fn, shape) -> torch.Tensor:
    """The matrix [D_out, D_in] of a linear map on images of `shape`, column j = fn(e_j)."""
    d = math.prod(shape)
    return fn(torch.eye(d, dtype=torch.float64).reshape(d, *shape)).reshape(d, -1).T


# ---------------------------------------------------------------------------------------------- operators


@pytest.mark.parametrize("task", list(SHAPES))
def test_operators_are_pseudo_inverses(task):
    op = _op(task)
    x = torch.randn(6, *op.shape, dtype=torch.float64)
    y = op.A(x)
    assert tuple(y.shape[1:]) == op.degraded_shape(op.shape)
    assert torch.allclose(op.A(op.pinv(y)), y, atol=1e-12)  # A A+ A = A
    p = op.project(x)
    assert torch.allclose(op.project(p), p, atol=1e-12)  # P P = P
    # the four Moore-Penrose conditions, on the matrices themselves: A+ A and A A+ symmetric too
    A, Ap = _matrix(op.A, op.shape), _matrix(op.pinv, op.degraded_shape(op.shape))
    assert torch.allclose(Ap @ A @ Ap, Ap, atol=1e-10)
    assert torch.allclose((Ap @ A).T, Ap @ A, atol=1e-10) and torch.allclose((A @ Ap).T, A @ Ap, atol=1e-10)
    assert torch.allclose(torch.linalg.pinv(A), Ap, atol=1e-8)


def test_degraded_shapes_and_what_they_hold():
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    sr2 = operator("sr2", (1, 4, 4))
    assert sr2.A(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert sr2.pinv(sr2.A(x))[0, 0, 0].tolist() == [2.5, 2.5, 4.5, 4.5]  # nearest upsampling
    assert operator(Task.SR8, (3, 32, 32)).degraded_shape((3, 32, 32)) == (3, 4, 4)
    col = operator("colorize", (3, 2, 2))
    rgb = torch.tensor([0.9, -0.3, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(col.A(rgb), torch.full((1, 1, 2, 2), 0.2)) and col.pinv(col.A(rgb)).shape == (1, 3, 2, 2)
    assert named_mask("center", 4, 4)[0].tolist() == [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    assert named_mask("half", 2, 4)[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_operator_refuses_what_the_images_cannot_take():
    with pytest.raises(ValueError, match="multiple of 4.*6x6"):
        operator("sr4", (1, 6, 6))
    with pytest.raises(ValueError, match="colorize.*1 channel"):
        operator("colorize", (1, 8, 8))
    with pytest.raises(ValueError, match="needs a mask"):
        operator("inpaint", (1, 8, 8))
    with pytest.raises(ValueError, match="8x8"):
        operator("inpaint", (1, 8, 8), torch.ones(4, 4))
    with pytest.raises(ValueError, match="inpaint task only"):
        operator("sr2", (1, 8, 8), "center")
    with pytest.raises(ValueError, match="task must be one of"):
        operator("sr3", (1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 1, 2, 2\]"):
        operator("sr2", (1, 4, 4)).pinv(torch.zeros(1, 1, 4, 4))


def test_blur_inverts_band_limited_images_and_blurs():
    op = Blur((1, 16, 16), sigma=1.5)
    assert op.K.max() == pytest.approx(1.0) and (op.K == 0).any()  # unit DC gain; the lost frequencies are 0
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    band = op.project(x)  # band-limited: only the kept frequencies
    assert torch.allclose(op.pinv(op.A(band)), band, atol=1e-9)
    assert op.A(x).std() < 0.5 * x.std()  # it blurs
    impulse = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    impulse[0, 0, 0, 0] = 1
    psf = op.A(impulse)[0, 0]
    assert psf.sum().item() == pytest.approx(1.0) and psf[0, 1] == pytest.approx(psf[0, 15])  # circular, symmetric
    tikhonov = Blur((1, 16, 16), sigma=1.5, eps=1e-2)
    assert tikhonov.pinv(op.A(band)).std() < band.std()  # the regularised inverse damps the high frequencies


# ---------------------------------------------------------------------------------------------- the restorer


def null_moments(betas: torch.Tensor, grid: list[int], m: float, s: float, eta: float = 1.0,
                 rule: str = "ddim", start: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """Mean and variance, along one null-space direction u of prior mean m (= u . m 1), of DDNM's output with the
    oracle and no clipping: on it the correction does nothing and each step is DDIM's,
    x_s = sqrt(a_s) x0 + k (x_t - sqrt(a_t) x0) / sqrt(1 - a_t) + sigma z with x0 = m + g (x_t - sqrt(a_t) m),
    sigma^2 = eta^2 (1 - a_s) / (1 - a_t) (1 - a_t / a_s) (rule ddim) or eta^2 (1 - a_s) (rule ddnm), from
    x_T's (mean, variance) `start` at the grid's top."""
    abar = abar_of(betas).tolist()
    mu, var = start
    for j in range(len(grid) - 1, -1, -1):
        a_t, a_s = abar[grid[j]], (abar[grid[j - 1]] if j > 0 else 1.0)
        sigma2 = eta**2 * ((1 - a_s) if rule == "ddnm" else (1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        k = math.sqrt(max(1 - a_s - sigma2, 0.0))
        g = math.sqrt(a_t) * s**2 / (a_t * s**2 + 1 - a_t)
        cx = math.sqrt(a_s) - k * math.sqrt(a_t / (1 - a_t))  # x_s's coefficient of x0
        A = cx * g + k / math.sqrt(1 - a_t)
        C = cx * (m - g * math.sqrt(a_t) * m)
        mu, var = A * mu + C, A * A * var + sigma2
    return mu, var


def _restore(task: str, steps: int | None, shape=(1, 4, 4), seed: int = 0, t_start: int | None = None, **kwargs):
    betas = beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas)
    op = operator(task, shape, "center" if task == "inpaint" else None)
    g = torch.Generator().manual_seed(seed)
    x0 = M + S * torch.randn(1, *shape, generator=g, dtype=torch.float64)
    y = op.A(x0).expand(N, *op.degraded_shape(shape))
    grid = timestep_grid(d, steps, t_start=t_start)
    out = ddnm(d, GaussianOracle(betas, M, S), y, op, grid, generator=g, clip_denoised=False, **kwargs)
    return op, y, out, betas, grid


@pytest.mark.parametrize("task, steps, eta", [("sr2", 20, None), ("sr2", None, None), ("inpaint", 50, None),
                                             ("inpaint", 50, ("ddnm", 0.85)), ("sr2", 20, ("ddim", 0.0))])
def test_ddnm_matches_the_gaussian_posterior(task, steps, eta):
    rule, e = eta or ("ddim", 1.0)
    op, y, out, betas, grid = _restore(task, steps, **({} if eta is None else {"eta": e, "eta_rule": rule}))
    D = out[0].numel()
    assert torch.allclose(op.A(out), y, atol=1e-12)  # consistency A x = y, noiseless y
    P = _matrix(op.project, op.shape)
    null = torch.eye(D, dtype=torch.float64) - P
    mean_null = null @ torch.full((D,), M, dtype=torch.float64)  # (I - P) m 1: 0 for sr, m on the hidden pixels
    f = out.reshape(N, D)
    mu_u, var_u = null_moments(betas, grid, M, S, e, rule)
    # the range is A+ y; per null direction mean mu_u, variance var_u: for an m-direction mu_u / M scales (I - P) m
    want_mean = op.pinv(y[:1]).reshape(D) + mean_null * (mu_u / M)
    want_cov = var_u * null
    se = math.sqrt(var_u / N)
    assert (f.mean(0) - want_mean).abs().max() < 4.5 * se
    cov = torch.cov(f.T)
    assert (cov - want_cov).abs().max() < 5 * var_u * math.sqrt(2 / N)
    if steps is None:  # every timestep: the posterior itself, N((I - P) m + A+ y, s^2 (I - P)), to 2%
        # (1.5% short at T = 1000: the posterior-variance steps, as ancestral fixedsmall)
        assert var_u == pytest.approx(S**2, rel=0.02) and mu_u == pytest.approx(M, rel=0.02)
    else:  # the coarse grid holds less variance, as DDIM eta 1 does unconditionally; the more of each step's noise
        # is fresh, the less (50 points: 0.166 with DDNM's rule at 0.85, 0.196 with eta 1; 20 points, eta 0: 0.185
        # against 0.151)
        assert var_u < 0.95 * S**2
        more_fresh = rule == "ddnm" or e > 1
        assert (var_u < null_moments(betas, grid, M, S)[1]) == more_fresh


# the covariance's largest error in units of s^2, measured 0.052 and 0.159: Heun with S_churn 10 on 25 points holds
# 14% more variance than the prior on its own (unconditional std 1.067 s; no churn 1.021 s)
@pytest.mark.parametrize("task, options, tol", [
    ("sr2", {}, 0.1), ("inpaint", {"S_churn": 10.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}, 0.25)])
def test_ddnm_heun_is_the_unconditional_heun_in_the_null_space(task, options, tol):
    """With the isotropic oracle the projection leaves the null space alone: DDNM in Heun's sampler returns A+ y
    plus the null-space part of the unconditional Heun output from the same x_T and churn noise, to float64
    rounding, in 2K - 1 network evaluations; so its moments are the posterior's to Heun's accuracy."""
    betas = beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas)
    shape = (1, 4, 4)
    op = operator(task, shape, "center" if task == "inpaint" else None)
    g = torch.Generator().manual_seed(0)
    x0 = M + S * torch.randn(1, *shape, generator=g, dtype=torch.float64)
    y = op.A(x0).expand(N, *op.degraded_shape(shape))
    x_T = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    grid = timestep_grid(d, 25, "karras")
    oracle, calls = GaussianOracle(betas, M, S), []

    def counting(x, t):
        calls.append(int(t[0]))
        return oracle(x, t)

    out = ddnm_heun(d, counting, y, op, grid, generator=torch.Generator().manual_seed(1), clip_denoised=False,
                    x_T=x_T, **options)
    assert len(calls) == 2 * 25 - 1
    assert torch.allclose(op.A(out), y, atol=1e-12)  # consistency A x = y, noiseless y
    free = heun(d, oracle, x_T, grid, generator=torch.Generator().manual_seed(1), clip_denoised=False, **options)
    torch.testing.assert_close(out, op.pinv(y) + free - op.project(free), rtol=1e-9, atol=1e-10)
    D = out[0].numel()
    null = torch.eye(D, dtype=torch.float64) - _matrix(op.project, op.shape)
    want_mean = op.pinv(y[:1]).reshape(D) + null @ torch.full((D,), M, dtype=torch.float64)
    f = out.reshape(N, D)
    assert (f.mean(0) - want_mean).abs().max() < 4.5 * S / math.sqrt(N)
    assert (torch.cov(f.T) - S**2 * null).abs().max() < tol * S**2
    with pytest.raises(ValueError, match=r"y must be \[2, 1, 2, 2\]"):
        ddnm_heun(d, oracle, torch.zeros(2, 1, 4, 4), operator("sr2", shape), grid)


def test_ddnm_from_a_lower_start_is_noised_pinv_y():
    """A grid whose top t0 lies below T - 1 starts from x_t0 = sqrt(abar_t0) A+ y + sqrt(1 - abar_t0) z: along a
    null direction mean 0 and variance 1 - abar_t0, whence the oracle's recursion gives the output's moments;
    the range is A+ y, and only the grid's points are visited."""
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return oracle(x, t)

    betas = beta_schedule("linear", 1000)
    oracle, t0 = GaussianOracle(betas, M, S), 200
    op, y, out, _, grid = _restore("inpaint", 30, t_start=t0)
    assert grid[-1] == t0 and len(grid) == 30
    assert torch.allclose(op.A(out), y, atol=1e-12)
    D = out[0].numel()
    null = torch.eye(D, dtype=torch.float64) - _matrix(op.project, op.shape)
    a = float(abar_of(betas)[t0])
    mu_u, var_u = null_moments(betas, grid, M, S, start=(0.0, 1 - a))
    # from N(0, I) at t0 the output would hold 0.307 (the prior's 0.25), from this start 0.202: DDIM's eta 1
    # keeps enough of x_t0 to tell the two apart (DDNM's rule at 0.85 forgets it: 0.179 either way)
    assert var_u < 0.7 * null_moments(betas, grid, M, S)[1]
    f = out.reshape(N, D)
    want_mean = op.pinv(y[:1]).reshape(D) + null @ torch.full((D,), M, dtype=torch.float64) * (mu_u / M)
    assert (f.mean(0) - want_mean).abs().max() < 4.5 * math.sqrt(var_u / N)
    assert (torch.cov(f.T) - var_u * null).abs().max() < 5 * var_u * math.sqrt(2 / N)
    ddnm(GaussianDiffusion(betas), counting, y[:2], op, grid, generator=torch.Generator().manual_seed(0))
    assert calls == grid[::-1]


def test_time_travel_moves_and_network_evaluations():
    assert travel_moves(3) == [(2, 1), (1, 0), (0, -1)]
    moves = travel_moves(7, 2, 3)
    downs = [m for m in moves if m[1] < m[0]]
    assert [m for m in moves if m[1] > m[0]] == [(4, 6), (4, 6), (2, 4), (2, 4)]
    assert len(downs) == 7 + 2 * 2 * 2 and moves[-1] == (0, -1)
    with pytest.raises(ValueError):
        travel_moves(5, 0, 1)
    calls = []
    betas = beta_schedule("linear", 100)
    oracle = GaussianOracle(betas, M, S)

    def counting(x, t):
        calls.append(int(t[0]))
        return oracle(x, t)

    op = operator("sr2", (1, 4, 4))
    y = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    out = ddnm(GaussianDiffusion(betas), counting, y, op, timestep_grid(GaussianDiffusion(betas), 7), travel_length=2,
               travel_repeat=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == len(downs) and torch.allclose(op.A(out), y, atol=1e-12)


def test_time_travel_keeps_consistency_and_the_grids_moments():
    op, y, out, betas, grid = _restore("sr2", 20, travel_length=2, travel_repeat=2)
    assert torch.allclose(op.A(out), y, atol=1e-12)
    f = out.reshape(N, -1)
    null_var = torch.diag(torch.cov(f.T)).mean() / (1 - 1 / 4)  # diag of (I - P) is 3/4 for 2 x 2 blocks
    _, var_u = null_moments(betas, grid, M, S)
    # for the isotropic prior the null space needs no harmonising with y: re-walked steps keep about the grid's
    # variance (measured 0.144 against 0.151 without travel; the extra passes lose a little more, as DDIM eta 1 does)
    assert abs(null_var - var_u) < 0.1 * var_u
    assert f.mean(0).sub(op.pinv(y[:1]).reshape(-1)).abs().max() < 4.5 * math.sqrt(var_u / N)


def test_ddnm_plus_splits_the_step_noise():
    for sigma, c, sy in [(0.3, 0.9, 0.1), (0.05, 0.9, 0.2), (0.0, 1.0, 0.1)]:
        sn = step_noise(sigma, c, sy)
        assert 0 <= sn.lam <= 1 and (c * sn.lam * sy) ** 2 + sn.gamma**2 == pytest.approx(sigma**2)
    assert step_noise(0.3, 0.9, 0.0).lam == 1 and step_noise(0.3, 0.9, 0.0).gamma == 0.3
    assert step_noise(0.0, 1.0, 0.1).lam == 0  # the last step: nothing left to absorb noise in y
    # noisy y: the range part is no longer y's exact pre-image, yet close to the clean x0's projection
    betas = beta_schedule("linear", 1000)
    op = operator("sr2", (1, 4, 4))
    g = torch.Generator().manual_seed(3)
    x0 = M + S * torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    sy = 0.2
    y = op.A(x0) + sy * torch.randn(500, 1, 2, 2, generator=g, dtype=torch.float64)
    out = ddnm(GaussianDiffusion(betas), GaussianOracle(betas, M, S), y, op, timestep_grid(GaussianDiffusion(betas), 50),
               generator=g, clip_denoised=False, sigma_y=sy)
    err_plus = (op.A(out) - op.A(x0)).pow(2).mean()
    assert err_plus < sy**2  # it denoises y rather than copying its noise into the result


def test_ddnm_plus_counts_the_blurs_noise_per_frequency():
    op = operator("deblur", (1, 8, 8))
    assert default_noise("deblur") == pytest.approx(2 / 255 / math.sqrt(12)) and default_noise("sr4") == 0
    sigma, c, sy = 0.1, 0.9, 0.01
    split = op.step_noise(sigma, c, sy)
    gain = op.K_pinv.abs()  # A+'s gain per frequency: 1 at f = 0, up to 1 / cutoff
    assert split.lam.shape == (8, 8) and float(split.lam[0, 0]) == 1 and float(split.lam.min()) < 0.05
    # per frequency, the noise the correction brings plus the fresh noise is the step's: sigma^2
    assert torch.allclose((c * split.lam * sy * gain) ** 2 + split.gamma**2, torch.full((8, 8), sigma**2,
                                                                                         dtype=torch.float64))
    assert op.step_noise(sigma, c, 0.0) == step_noise(sigma, c, 0.0)  # noiseless y: the scalar split
    # on the Gaussian oracle with noisy y: counting the noise per pixel (as for sr) copies it, amplified up to
    # 500x here, into the result (measured MSE 35.7 against the prior's variance 0.25); per frequency 1.39
    betas = beta_schedule("linear", 1000)
    d, g = GaussianDiffusion(betas), torch.Generator().manual_seed(3)
    x0 = M + S * torch.randn(500, 1, 8, 8, generator=g, dtype=torch.float64)
    sy = 0.05
    y = op.A(x0) + sy * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = ddnm(d, GaussianOracle(betas, M, S), y, op, timestep_grid(d, 50), generator=g, clip_denoised=False,
               sigma_y=sy)
    assert (out - x0).pow(2).mean() < 3 and (op.A(out) - op.A(x0)).pow(2).mean() < 0.5 * sy**2


# ---------------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tiny import train_tiny

    return train_tiny(tmp_path_factory.mktemp("restore") / "run", 20)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Six test digits as an .npz of uint8 [6, 8, 8, 1]."""
    from ddpm.data import load_digits

    path = tmp_path_factory.mktemp("clean") / "clean.npz"
    np.savez(path, arr_0=load_digits("test")[0][:6].permute(0, 2, 3, 1).numpy())
    return path


def _cli(argv, capsys) -> tuple[int, str]:
    from ddpm.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("task, small", [("sr2", (6, 4, 4, 1)), ("inpaint", (6, 8, 8, 1)), ("deblur", (6, 8, 8, 1))])
def test_degrade_then_restore(tiny_run, clean, tmp_path, capsys, task, small):
    from ddpm.data import to_model_range

    mask = ["--mask", "center"] if task == "inpaint" else []
    noise = ["--noise", "0"] if task == "deblur" else []  # exact consistency (the default assumes 8-bit noise)
    y_path, x_path = tmp_path / "y.npz", tmp_path / "x.npz"
    assert _cli(["degrade", "--task", task, "--input", str(clean), "--out", str(y_path), *mask], capsys)[0] == 0
    y = np.load(y_path)["arr_0"]
    assert y.shape == small and y.dtype == np.uint8
    x8 = torch.from_numpy(np.load(clean)["arr_0"]).permute(0, 3, 1, 2)
    op = operator(task, (1, 8, 8), "center" if task == "inpaint" else None)
    want = op.A(to_model_range(x8).double())
    levels = ((want.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(y - levels).max() <= 0.5 + 1e-4  # rounded to the nearest level (ties in float32 either way)
    code, err = _cli(["restore", "--run", str(tiny_run), "--input", str(y_path), "--out", str(x_path), "--task", task,
                      "--steps", "10", "--batch-size", "4", "--quiet", *mask, *noise], capsys)
    assert code == 0, err
    assert float(err.rsplit("= ", 1)[1].split()[0]) < 1e-5  # A x = y before rounding, in float32
    x = np.load(x_path)["arr_0"]
    assert x.shape == (6, 8, 8, 1) and x.dtype == np.uint8
    got = op.A(to_model_range(torch.from_numpy(x).permute(0, 3, 1, 2)).double())
    y_in = to_model_range(torch.from_numpy(y).permute(0, 3, 1, 2)).double()
    # after the 8-bit rounding (1/255 per pixel) and the clipping of the result to [-1, 1], which the correction
    # crosses on the digits' black background (measured: 0.042 mean for sr2 at 20 training steps)
    assert (got - y_in).abs().mean() < 0.08, (got - y_in).abs().mean()
    again = tmp_path / "again.npz"  # seeded per image: the same result in other batches
    assert _cli(["restore", "--run", str(tiny_run), "--input", str(y_path), "--out", str(again), "--task", task,
                 "--steps", "10", "--batch-size", "6", "--quiet", *mask, *noise], capsys)[0] == 0
    assert np.array_equal(np.load(again)["arr_0"], x)
    if task == "deblur":  # by default DDNM+ for the rounding's noise, which the blur's inverse amplifies
        code, err = _cli(["restore", "--run", str(tiny_run), "--input", str(y_path), "--out", str(again), "--task",
                          task, "--steps", "10", "--quiet"], capsys)
        assert code == 0 and "DDNM+ for input noise of std 0.0023 (8-bit rounding's)" in err, err
        assert not np.array_equal(np.load(again)["arr_0"], x)


def test_restore_with_heuns_sampler(tiny_run, clean, tmp_path, capsys):
    y_path, x_path, again = tmp_path / "y.npz", tmp_path / "x.npz", tmp_path / "again.npz"
    assert _cli(["degrade", "--task", "sr2", "--input", str(clean), "--out", str(y_path)], capsys)[0] == 0
    base = ["restore", "--run", str(tiny_run), "--input", str(y_path), "--task", "sr2", "--quiet", "--sampler", "heun",
            "--steps", "6"]
    heun_churn = ["--sampler-option", "S_churn=10", "--sampler-option", "S_tmax=50"]
    code, err = _cli(base + ["--out", str(x_path), "--batch-size", "4", *heun_churn], capsys)
    assert code == 0 and "DDNM in Heun's sampler, 6 grid points (11 network evaluations, S_churn 10, S_tmax 50)" in err
    assert float(err.rsplit("= ", 1)[1].split()[0]) < 1e-5  # A x = y before rounding, in float32
    assert _cli(base + ["--out", str(again), "--batch-size", "6", *heun_churn], capsys)[0] == 0
    x = np.load(x_path)["arr_0"]
    assert x.shape == (6, 8, 8, 1) and np.array_equal(np.load(again)["arr_0"], x)  # seeded per image
    assert _cli(base + ["--out", str(again)], capsys)[0] == 0  # no churn: another sampler, other images
    assert not np.array_equal(np.load(again)["arr_0"], x)
    out = ["--out", str(tmp_path / "no.npz")]
    for extra, words in ((["--travel-length", "2"], "time travel runs on DDNM's own steps"),
                         (["--sampler-option", "eta=1"], "takes no option 'eta'"),
                         (["--steps", "1"], "needs 2 or more grid points"),
                         (["--noise", "0.01"], "--sampler heun takes noiseless inputs only, and --noise 0.01")):
        code, err = _cli(base + out + extra, capsys)
        assert code == 2 and words in err, err
    code, err = _cli(base[:3] + ["--input", str(clean), "--task", "deblur", "--sampler", "heun"] + out, capsys)
    assert code == 2 and "--task deblur assumes the 8-bit rounding's noise" in err, err
    code, err = _cli(base[:7] + out + ["--sampler-option", "S_churn=10"], capsys)  # --sampler ddim
    assert code == 2 and "options of --sampler heun" in err, err
    assert not (tmp_path / "no.npz").exists()


def test_restore_with_ddnms_eta_rule(tiny_run, clean, tmp_path, capsys):
    y_path, x_path, plain = tmp_path / "y.npz", tmp_path / "x.npz", tmp_path / "plain.npz"
    assert _cli(["degrade", "--task", "sr2", "--input", str(clean), "--out", str(y_path)], capsys)[0] == 0
    base = ["restore", "--run", str(tiny_run), "--input", str(y_path), "--task", "sr2", "--quiet", "--steps", "10"]
    code, err = _cli(base + ["--out", str(x_path), "--eta-rule", "ddnm", "--eta", "0.85"], capsys)
    assert code == 0 and "DDNM, 10 steps, eta 0.85 by DDNM's code's rule" in err, err
    assert float(err.rsplit("= ", 1)[1].split()[0]) < 1e-5  # A x = y before rounding, in float32
    assert _cli(base + ["--out", str(plain)], capsys)[0] == 0
    assert not np.array_equal(np.load(plain)["arr_0"], np.load(x_path)["arr_0"])  # other noise, other images
    out = ["--out", str(tmp_path / "no.npz")]
    for extra, words in ((["--eta-rule", "ddnm", "--eta", "1.5"], "--eta must lie in [0, 1] with --eta-rule ddnm"),
                         (["--eta", "-0.5"], "--eta must be >= 0; got -0.5"),
                         (["--eta-rule", "ddnm", "--sampler", "heun"], "an option of DDNM's own steps")):
        code, err = _cli(base + out + extra, capsys)
        assert code == 2 and words in err, err
    assert not (tmp_path / "no.npz").exists()


def test_restore_from_a_lower_start(tiny_run, clean, tmp_path, capsys):
    y_path, x_path = tmp_path / "y.npz", tmp_path / "x.npz"
    assert _cli(["degrade", "--task", "sr2", "--input", str(clean), "--out", str(y_path)], capsys)[0] == 0
    base = ["restore", "--run", str(tiny_run), "--input", str(y_path), "--task", "sr2", "--quiet"]
    code, err = _cli(base + ["--out", str(x_path), "--t-start", "20"], capsys)  # the default grid: 21 steps
    assert code == 0 and "DDNM, 21 steps, from A+ y noised to t = 20" in err, err
    assert float(err.rsplit("= ", 1)[1].split()[0]) < 1e-5  # A x = y before rounding, in float32
    out = ["--out", str(tmp_path / "no.npz")]
    for extra, words in ((["--t-start", "40"], "--t-start must lie in 1..39"),
                         (["--t-start", "20", "--steps", "30"], "at most 21 steps lie in 0..20"),
                         (["--t-start", "20", "--sampler", "heun"], "--t-start: an option of DDNM's own steps")):
        code, err = _cli(base + out + extra, capsys)
        assert code == 2 and words in err, err
    assert not (tmp_path / "no.npz").exists()


def test_restore_refuses_unfit_inputs_before_any_work(tiny_run, clean, tmp_path, capsys):
    y_path = tmp_path / "y4.npz"
    assert _cli(["degrade", "--task", "sr4", "--input", str(clean), "--out", str(y_path)], capsys)[0] == 0
    out = tmp_path / "x.npz"
    base = ["restore", "--run", str(tiny_run), "--out", str(out), "--quiet"]
    code, err = _cli(base + ["--input", str(y_path), "--task", "sr2"], capsys)  # a 2x2 input for sr2 on 8x8
    assert code == 2 and str(y_path) in err and "[N, 4, 4, 1]" in err and "[6, 2, 2, 1]" in err
    code, err = _cli(base + ["--input", str(clean), "--task", "colorize"], capsys)
    assert code == 2 and "colorize" in err and "1 channel" in err
    mask = tmp_path / "mask.png"
    from PIL import Image

    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(mask)
    code, err = _cli(base + ["--input", str(clean), "--task", "inpaint", "--mask", str(mask)], capsys)
    assert code == 2 and str(mask) in err and "8x8" in err
    code, err = _cli(base + ["--input", str(clean)], capsys)
    assert code == 2 and "--task is required" in err
    code, err = _cli(base + ["--input", str(clean), "--task", "sr2", "--steps", "41"], capsys)
    assert code == 2 and "1..40" in err
    assert not out.exists()


def test_degrade_reads_pngs_and_writes_a_png(clean, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    arr = np.load(clean)["arr_0"]
    for i in range(3):
        Image.fromarray(arr[i, :, :, 0]).save(folder / f"{i}.png")
    out = tmp_path / "y.npz"
    assert _cli(["degrade", "--task", "sr2", "--input", str(folder), "--out", str(out), "--noise", "0.1"], capsys)[0] == 0
    assert np.load(out)["arr_0"].shape == (3, 4, 4, 1)
    one = tmp_path / "one.png"
    assert _cli(["degrade", "--task", "sr2", "--input", str(folder / "0.png"), "--out", str(one)], capsys)[0] == 0
    assert np.asarray(Image.open(one)).shape == (4, 4)  # one image: as it is, at the degraded size
