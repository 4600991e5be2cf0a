"""The Frechet distance between Gaussians fitted to features, split into statistics and formula so that the
formula can be tested on Gaussians with a known answer."""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (divided by N - 1) of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D]; got shape {f.shape}")
    mu = f.mean(0)  # [D]
    d = f - mu  # [N, D]
    sigma = d.T @ d / (f.shape[0] - 1)  # [D, D]; np.cov would return a scalar for D = 1
    return mu, sigma


def _check_psd(w: np.ndarray, name: str) -> None:
    """w: a symmetric matrix's eigenvalues, ascending. Below zero by rounding only is allowed."""
    if w[0] < -1e-6 * max(abs(w[-1]), abs(w[0])):
        raise ValueError(f"{name} is not positive semi-definite (an eigenvalue of {w[0]:.3g}): not a covariance")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The trace of the square root is the sum of the square roots of the eigenvalues of S1 S2, which are those of
    the symmetric S1^(1/2) S2 S1^(1/2): two symmetric eigendecompositions, 5-6x faster at 2048 features than
    scipy's sqrtm of the product (1.7 s against 9.9 s on a 2-core AMD EPYC with AVX-512, 2026-12-01: RESULTS,
    "The test suite, the Frechet distance..."), the same to 1e-15 at full rank, and exact
    where the product is singular (fewer samples than features), where sqrtm needs an offset. Eigenvalues below
    D * machine epsilon of the largest are rounding and count as zero.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has values that are not finite")
    w, u = np.linalg.eigh((s1 + s1.T) / 2)
    _check_psd(w, "sigma1")
    _check_psd(np.linalg.eigvalsh((s2 + s2.T) / 2), "sigma2")
    r1 = (u * np.sqrt(np.clip(w, 0.0, None))) @ u.T  # S1^(1/2)
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    lam[lam < max(lam[-1], 0.0) * len(lam) * np.finfo(np.float64).eps] = 0.0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())
