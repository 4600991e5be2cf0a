"""Frechet distance against closed forms; the digits feature network; FID/IS/KID plumbing through torch-fidelity
with a stand-in weights file (nothing is downloaded)."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm.data import load_digits
from ddpm.metrics.frechet import feature_stats, frechet_distance

# ---------------------------------------------------------------------------------------------- the formula


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_two_by_two_by_hand():
    """S1 = [[2, 1], [1, 2]] and S2 = [[2, -1], [-1, 2]] commute with S1 S2 = 3 I, so the trace term is
    2 + 2 + 2 + 2 - 2 * 2 sqrt(3); the means differ by (3, 4): 25 more."""
    s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    s2 = np.array([[2.0, -1.0], [-1.0, 2.0]])
    assert frechet_distance([0.0, 0.0], s1, [3.0, 4.0], s2) == pytest.approx(25 + 8 - 4 * np.sqrt(3), rel=1e-12)


def test_frechet_distance_full_covariances():
    """Commuting case S2 = a^2 S1: tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 - a)^2 tr(S1). General case against the
    symmetric form tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed by eigendecompositions."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 4))
    s1 = A @ A.T + 0.1 * np.eye(4)
    a = 1.7
    mu = rng.normal(size=4)
    assert frechet_distance(mu, s1, mu + 1.0, a * a * s1) == pytest.approx(4.0 + (1 - a) ** 2 * np.trace(s1), rel=1e-8)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    B = rng.normal(size=(4, 4))
    s2 = B @ B.T + 0.2 * np.eye(4)
    r1 = psd_sqrt(s1)
    want = np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)) + ((mu - 1) ** 2).sum()
    assert frechet_distance(mu, s1, np.ones(4), s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu, s1, np.ones(4), s2) == pytest.approx(frechet_distance(np.ones(4), s2, mu, s1), rel=1e-9)
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-6


def test_frechet_distance_singular_and_invalid():
    # rank-deficient covariances (fewer samples than features, as in small FID runs): still ~0 against itself
    A = np.random.default_rng(3).normal(size=(6, 2))
    s = A @ A.T
    assert abs(frechet_distance(np.zeros(6), s, np.zeros(6), s)) < 1e-6 * np.trace(s)
    # diag(0, 1) diag(1, 0) = 0: a singular product's root is 0, exactly, with no offset (sqrtm needed one)
    assert frechet_distance(np.zeros(2), np.diag([0.0, 1.0]), np.zeros(2), np.diag([1.0, 0.0])) == 2.0
    # a covariance that is not PSD is an error naming it, never clipped into an answer
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(ValueError, match="sigma1 has values that are not finite"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("n", [2000, 40])  # full rank; rank 39 of 256
def test_frechet_distance_is_scipys_sqrtm_formula(n):
    """The eigenvalue route gives the trace of scipy's sqrtm(S1 S2) (pytorch-fid's formula), to rounding."""
    rng = np.random.default_rng(n)
    mix = rng.normal(size=(256, 256)) / 16
    a, b = rng.normal(size=(n, 256)) @ mix, rng.normal(size=(n, 256)) @ mix * 1.5 + 0.2
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(s1 @ s2)
    want = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-12 if n > 256 else 1e-6)


def test_feature_stats_recover_a_known_gaussian():
    rng = np.random.default_rng(2)
    cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    x = rng.multivariate_normal([1.0, -2.0], cov, size=200_000)
    mu, s = feature_stats(x)
    np.testing.assert_allclose(mu, [1.0, -2.0], atol=0.01)
    np.testing.assert_allclose(s, cov, atol=0.02)
    # the distance of a large sample to its own Gaussian is ~0
    assert frechet_distance(mu, s, np.array([1.0, -2.0]), cov) < 1e-3
    # unbiased: two points 0 and 2 have variance 2 (N - 1), not 1
    mu2, s2 = feature_stats(np.array([[0.0], [2.0]]))
    assert mu2.tolist() == [1.0] and s2.tolist() == [[2.0]]
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------- digits

DIGITS_FLOOR = 6.0968184119851685  # measured on an AVX-512 CPU; forced to scalar kernels it was 6.096818412003
DIGITS_TEST_ACCURACY = 874 / 898


def test_digits_classifier_and_report():
    from ddpm.metrics.digits import CONFIDENT, digits_features, digits_probs, evaluate_digits

    test_images, _ = load_digits("test")
    rep = evaluate_digits(test_images)
    assert rep.test_accuracy >= 0.95
    # golden values: the classifier is the same on every machine (float64, integer-seeded), not just in this process
    assert rep.test_accuracy == pytest.approx(DIGITS_TEST_ACCURACY, abs=1e-12)
    assert rep.floor == pytest.approx(DIGITS_FLOOR, rel=1e-6)
    assert 0 < rep.floor < np.inf and rep.ratio == pytest.approx(1.0, abs=1e-6)  # the test half IS the floor
    assert sum(rep.class_histogram) == len(test_images) and len(rep.class_histogram) == 10
    assert rep.confident_fraction > 0.85 and CONFIDENT == 0.9
    f = digits_features(test_images[:50])
    assert f.shape == (50, 128) and f.dtype == np.float64
    np.testing.assert_array_equal(f, digits_features(test_images[:50]))
    np.testing.assert_allclose(digits_probs(test_images[:50]).sum(1), 1.0, rtol=1e-12)
    # NHWC input (the .npz layout) gives the same answer
    nhwc = test_images.permute(0, 2, 3, 1).numpy()
    assert evaluate_digits(nhwc).frechet == pytest.approx(rep.frechet, rel=1e-9)
    noise = torch.randint(0, 256, (400, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = evaluate_digits(noise)
    assert bad.ratio > 10 and bad.confident_fraction < 0.6 and sum(bad.class_histogram) == 400


def test_the_digits_classifier_is_kept_on_disk_and_read_back_without_training(tmp_path, monkeypatch):
    from ddpm.metrics import digits

    test_images, _ = load_digits("test")
    trained = digits.classifier()  # this process's (trained or read from the user's cache, held to golden values above)
    monkeypatch.setattr(digits, "_fit", lambda *args: trained)
    first = digits.build_classifier(tmp_path)
    (saved,) = tmp_path.iterdir()
    assert saved.name.startswith("classifier-") and saved.suffix == ".pt"
    monkeypatch.setattr(digits, "_fit", lambda *args: pytest.fail("trained although the cache holds the weights"))
    read = digits.build_classifier(tmp_path)
    assert read is not trained and not read.training
    x = test_images[:64].double() / 255
    assert torch.equal(read.features(x), trained.features(x)) and torch.equal(read.head(read.features(x)),
                                                                              first.head(first.features(x)))
    saved.write_bytes(saved.read_bytes()[:100])  # damaged: rebuilt (by the stand-in) with a warning
    monkeypatch.setattr(digits, "_fit", lambda *args: trained)
    with pytest.warns(UserWarning, match="unreadable cached classifier"):
        digits.build_classifier(tmp_path)
    assert torch.equal(digits.build_classifier(tmp_path).features(x), trained.features(x))


def test_digits_input_is_checked():
    from ddpm.metrics.digits import evaluate_digits

    with pytest.raises(ValueError, match="uint8"):
        evaluate_digits(np.zeros((10, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        evaluate_digits(np.zeros((10, 3, 8, 8), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- FID / IS / KID


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory):
    """A random FID Inception saved as a local weights file, so the whole torch-fidelity path runs offline.

    torch-fidelity's constructor always loads a state dict (from a path, else from its release URL), so the
    architecture is built once with the loader and `load_state_dict` stubbed out; its state dict (the same keys
    and shapes as the real file) is then saved. Kaiming-normal convolutions keep the activations O(1): the
    default init shrinks them to ~1e-8 (denormal-slow and numerically meaningless)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe_mod

    def no_download(*args, **kwargs):
        return {}

    with mock.patch.object(fe_mod, "load_state_dict_from_url", no_download), \
            mock.patch.object(fe_mod.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
    path = tmp_path_factory.mktemp("w") / "inception-standin.pth"
    torch.save(net.state_dict(), path)
    return path


def _images(seed, n, res=32):
    """uint8 [n, res, res, 3]: one random picture with per-image noise (a small, coherent 'data set')."""
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (1, res, res, 3))
    return np.clip(base + g.integers(-40, 40, (n, res, res, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def forward_spy(monkeypatch):
    """Records (training flag, batch size) of every Inception forward."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe_mod

    seen, forward = [], fe_mod.FeatureExtractorInceptionV3.forward

    def spy(self, x):
        seen.append((self.training, x.shape[0]))
        return forward(self, x)

    monkeypatch.setattr(fe_mod.FeatureExtractorInceptionV3, "forward", spy)
    return seen


def test_fid_plumbing_through_torch_fidelity(standin_weights, tmp_path, monkeypatch, forward_spy):
    import torch_fidelity

    import ddpm.metrics.inception as inc

    n = 6  # Inception at 299 x 299 costs ~0.2 s an image on one core; the three Frechet distances at 2048 features
    # (~5 s each) stay whatever n
    real = _images(0, n)
    noise = np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=real)
    cache = tmp_path / "cache"

    # samples in the other layout ([N, C, H, W] tensor) against the .npz of the same images: FID ~ 0
    with pytest.warns(UserWarning, match="biased"):
        same = inc.fidelity_metrics(torch.from_numpy(real).permute(0, 3, 1, 2), ref, standin_weights, cache, batch_size=4)
    assert forward_spy == [(False, 4), (False, 2)] * 2  # reference (ALL of it, batch 4), then samples
    assert same.n_ref == n and same.n_samples == n
    assert same.isc_mean is not None and np.isfinite(same.isc_mean) and same.kid_mean is not None
    assert same.weights_sha256 == inc._sha256_file(standin_weights)
    assert len(list(cache.glob("ref_*.npz"))) == 1

    # a second run reads the cached statistics: only the samples go through the network
    forward_spy.clear()
    monkeypatch.setattr(inc, "_reference_dataset", lambda *a: pytest.fail("reference statistics recomputed"))
    with pytest.warns(UserWarning, match="biased"):
        other = inc.fidelity_metrics(noise, ref, standin_weights, cache, batch_size=4, isc=False)
    assert [b for _, b in forward_spy] == [4, 2] and not any(t for t, _ in forward_spy)
    assert other.fid > 0 and other.isc_mean is None
    assert abs(same.fid) < 1e-3 * other.fid
    assert other.kid_mean > 0
    # KID of a set against itself, by hand from the cached reference features: every subset of n is the whole
    # set, and the unbiased MMD^2 with k(x, y) = (x.y / 2048 + 1)^3 is 2 (sum K - tr K) / (m (m - 1)) - 2 sum K / m^2
    (cached,) = cache.glob("ref_*.npz")
    with np.load(cached) as z:
        f = z["features"].astype(np.float64)
    K = (f @ f.T / 2048 + 1) ** 3
    want = 2 * (K.sum() - np.trace(K)) / (n * (n - 1)) - 2 * K.sum() / n**2
    # (torch-fidelity sums kernels near 1 in float32: its answer carries ~1% rounding at this size)
    assert want < 0 and same.kid_mean == pytest.approx(want, rel=3e-2) and same.kid_std < 0.1 * abs(want)

    # cross-check: torch-fidelity's own FID (its features, its statistics, its formula) on the same files
    tf = torch_fidelity.calculate_metrics(input1=inc._Uint8Images(noise), input2=inc._Uint8Images(real), fid=True,
                                          cuda=False, batch_size=n, feature_extractor_weights_path=str(standin_weights),
                                          cache=False, save_cpu_ram=True, verbose=False)
    assert other.fid == pytest.approx(tf["frechet_inception_distance"], rel=1e-3)
    assert inc.FID_LAYER == torch_fidelity.FeatureExtractorInceptionV3.get_default_feature_layer_for_metric("fid")
    assert inc.ISC_LAYER == torch_fidelity.FeatureExtractorInceptionV3.get_default_feature_layer_for_metric("isc")


def test_reference_cache_key(standin_weights, tmp_path, monkeypatch):
    """Other weights or a changed reference never reuse cached statistics; the same ones always do."""
    import ddpm.metrics.inception as inc

    made = []

    def tiny_reference(ref, resolution):
        made.append(ref)
        return inc._Uint8Images(_images(2, 3))

    monkeypatch.setattr(inc, "_reference_dataset", tiny_reference)
    fe = inc.feature_extractor(standin_weights)
    assert not fe.training
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=_images(0, 3))
    mu, sigma, feats = inc.reference_stats(ref, fe, "weights-a", tmp_path, 32)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and feats.shape == (3, 2048)
    np.testing.assert_array_equal(inc.reference_stats(ref, fe, "weights-a", tmp_path, 32)[0], mu)
    assert len(made) == 1
    inc.reference_stats(ref, fe, "weights-b", tmp_path, 32)
    assert len(made) == 2
    np.savez(ref, arr_0=_images(1, 4))  # rewritten: another size
    inc.reference_stats(ref, fe, "weights-a", tmp_path, 32)
    assert len(made) == 3

    # identities: an array by content, a folder by every file in it
    a = _images(0, 3)
    assert inc._reference_identity(a) == inc._reference_identity(a.copy())
    assert inc._reference_identity(a) != inc._reference_identity(_images(1, 3))
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    before = inc._reference_identity(folder)
    (folder / "b.png").write_bytes(b"y")
    assert inc._reference_identity(folder) != before


def test_fid_inputs(tmp_path):
    """Grayscale becomes three equal channels; a folder of images is read at the samples' resolution."""
    from PIL import Image

    import ddpm.metrics.inception as inc

    gray = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1)).astype(np.uint8)
    item = inc._Uint8Images(gray)[1]
    assert item.dtype == torch.uint8 and item.shape == (3, 16, 16)
    assert (item == torch.from_numpy(gray[1, :, :, 0])).all()
    rgb = _images(0, 2, res=16)
    for i, im in enumerate(rgb):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    ds = inc._reference_dataset(tmp_path, 16)
    assert len(ds) == 2 and torch.equal(ds[1], torch.from_numpy(rgb[1]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="uint8"):
        inc._Uint8Images(gray.astype(np.float32))
    (tmp_path / "ref.bin").write_bytes(b"not an archive")  # a file that is not an .npz must be CIFAR-10
    with pytest.raises(ValueError, match="ref.bin"):
        inc._reference_dataset(tmp_path / "ref.bin", 16)


def test_fid_weights_missing_or_unsafe(tmp_path):
    from ddpm.checkpoint import CheckpointError
    from ddpm.metrics.inception import WEIGHTS_NAME, feature_extractor, fidelity_metrics

    with pytest.raises(FileNotFoundError, match="--inception-weights") as e, pytest.warns(UserWarning, match="biased"):
        fidelity_metrics(_images(0, 2), _images(1, 2), tmp_path / "nope.pth", tmp_path / "cache")
    assert WEIGHTS_NAME in str(e.value)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        feature_extractor(tmp_path / "evil.pth")
