"""Frechet distance against closed forms; the digits feature network; its guard rails."""

import numpy as np
import pytest
import torch

from ddpm.data import load_digits
from ddpm.metrics.frechet import feature_stats, frechet_distance


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_closed_form_full_covariance():
    """S2 = a^2 S1 commutes with S1: tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 - a)^2 tr(S1)."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 4))
    s1 = A @ A.T + 0.1 * np.eye(4)
    a = 1.7
    mu = rng.normal(size=4)
    assert frechet_distance(mu, s1, mu + 1.0, a * a * s1) == pytest.approx(4.0 + (1 - a) ** 2 * np.trace(s1), rel=1e-8)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(4, 4))
    s2 = b @ b.T + 0.2 * np.eye(4)
    assert frechet_distance(mu, s1, 0 * mu, s2) == pytest.approx(frechet_distance(0 * mu, s2, mu, s1), rel=1e-8)


def test_feature_stats_recover_a_known_gaussian():
    rng = np.random.default_rng(2)
    cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    x = rng.multivariate_normal([1.0, -2.0], cov, size=200_000)
    mu, s = feature_stats(x)
    np.testing.assert_allclose(mu, [1.0, -2.0], atol=0.01)
    np.testing.assert_allclose(s, cov, atol=0.02)
    # the FID of a large sample against its own Gaussian is ~0, not a batch-size artefact
    assert frechet_distance(mu, s, np.array([1.0, -2.0]), cov) < 1e-3


def test_digits_classifier_and_report():
    from ddpm.metrics.digits import digits_features, evaluate_digits

    test_images, _ = load_digits("test")
    rep = evaluate_digits(test_images)
    assert rep.test_accuracy >= 0.95
    assert 0 < rep.floor < 50 and rep.ratio == pytest.approx(1.0, abs=1e-6)  # the test half IS the floor
    assert sum(rep.class_histogram) == len(test_images)
    assert rep.confident_fraction > 0.8
    np.testing.assert_array_equal(digits_features(test_images[:50]), digits_features(test_images[:50]))
    # NHWC input (the .npz layout) gives the same answer
    nhwc = test_images.permute(0, 2, 3, 1).numpy()
    assert evaluate_digits(nhwc).frechet == pytest.approx(rep.frechet, rel=1e-9)
    noise = torch.randint(0, 256, (400, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = evaluate_digits(noise)
    assert bad.ratio > 10 and bad.confident_fraction < rep.confident_fraction


def test_digits_input_is_checked():
    from ddpm.metrics.digits import evaluate_digits

    with pytest.raises(ValueError, match="uint8"):
        evaluate_digits(np.zeros((10, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        evaluate_digits(np.zeros((10, 3, 8, 8), dtype=np.uint8))


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory):
    """A random-weight FID Inception saved as a local file: the whole torch-fidelity path runs, no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe_mod

    path = tmp_path_factory.mktemp("w") / "inception-standin.pth"
    orig_url, orig_load = fe_mod.load_state_dict_from_url, fe_mod.FeatureExtractorInceptionV3.load_state_dict
    fe_mod.load_state_dict_from_url = lambda *a, **k: {}
    fe_mod.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        torch.manual_seed(0)
        net = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe_mod.load_state_dict_from_url = orig_url
        fe_mod.FeatureExtractorInceptionV3.load_state_dict = orig_load
    torch.save(net.state_dict(), path)
    return path


def _images(seed, n=24, res=32):
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (1, res, res, 3))
    return np.clip(base + g.integers(-40, 40, (n, res, res, 3)), 0, 255).astype(np.uint8)


def test_fid_plumbing_through_torch_fidelity(standin_weights, tmp_path, monkeypatch):
    import ddpm.metrics.inception as inc

    ref = tmp_path / "ref.npz"
    real = _images(0)
    np.savez(ref, arr_0=real)
    with pytest.warns(UserWarning, match="biased"):
        same = inc.fidelity_metrics(real, ref, standin_weights, tmp_path / "cache", batch_size=5)
    other = inc.fidelity_metrics(_images(1), ref, standin_weights, tmp_path / "cache", batch_size=5, kid=False, isc=False)
    assert same.n_ref == 24 and same.n_samples == 24  # all reference images, batch size 5
    assert abs(same.fid) < 1e-3 * other.fid and other.fid > 0
    assert same.isc_mean is not None and same.kid_mean is not None
    # the reference statistics are cached: a second run does not touch the reference images
    assert len(list((tmp_path / "cache").glob("ref_*.npz"))) == 1
    monkeypatch.setattr(inc, "_load_reference", lambda *a: pytest.fail("reference recomputed"))
    again = inc.fidelity_metrics(_images(1), ref, standin_weights, tmp_path / "cache", batch_size=7, kid=False, isc=False)
    assert again.fid == pytest.approx(other.fid, rel=1e-6)
    fe = inc.feature_extractor(standin_weights)
    assert not fe.training


def test_fid_weights_missing_or_unsafe(tmp_path):
    from ddpm.checkpoint import CheckpointError
    from ddpm.metrics.inception import feature_extractor

    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        feature_extractor(tmp_path / "nope.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        feature_extractor(tmp_path / "evil.pth")
