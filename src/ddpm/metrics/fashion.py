"""The evaluation of Fashion-MNIST samples: a small classifier trained in the project on part of the training
set, whose hidden features give a Frechet distance to the test set and precision/recall manifolds, and whose
probabilities give the confident fraction and the class histogram.

The floor is the same distance for N real training images the classifier never saw, at the samples' N (the
Frechet distance of N points is biased upwards, more so at small N). The reference for precision and recall
is N test images, so that both sets hold N points as the metric's paper takes them.

Determinism across machines, as in `ddpm.metrics.digits`: the classifier trains in float64 on one thread, its
initial weights are exact functions of integers drawn from numpy's `RandomState`, and so are its data subset,
its data order and its shifts; different CPU kernels (AVX-512 against scalar) then agree on the features to
about 1e-14 (benchmarks/RESULTS.md; tests/test_fashion.py holds them to 1e-10). Training takes half a minute
of one core, so the weights are cached on disk (`cache_dir()`), keyed by a hash of the settings and of the
training images and labels (the decoded bytes: a gzipped and a plain copy of the same data share the file), and
rebuilt identically when the file is missing.

Precision and recall: the samples' precision does not tell noise from data (uniform noise has features in one
tight cluster, which an outlying real image's ball may hold whole: 0.25 at N = 300, 0.99 at N = 1000); its
recall and Frechet distance do (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.data import load_idx
from ddpm.metrics.deterministic import as_nchw_float, init_default_scale, load_or_fit, one_thread, weights_key
from ddpm.metrics.frechet import feature_stats, frechet_distance
from ddpm.metrics.manifold import K, precision_recall
from ddpm.runtime import cache_dir as _cache_dir

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CONFIDENT = 0.9  # a sample counts as confidently classified when its top class probability is at least this
BATCH_EVAL = 1000  # images per forward call when computing features
FORMAT = 1  # bump when the network or the training procedure changes: old cache files are then not read


@dataclass(frozen=True)
class ClassifierSettings:
    n_train: int = 20_000  # training images: the first of a seeded permutation of the 60,000; the rest are the floor's
    epochs: int = 3  # passes over them
    batch: int = 64  # minibatch size
    lr: float = 1e-3  # Adam
    seed: int = 1234  # numpy RandomState seed for the subset, the initial weights, the data order and the shifts
    widths: tuple[int, int] = (16, 32)  # channels of the two 3x3 conv layers (each followed by a 2x2 max-pool)
    feature_dim: int = 128  # width of the hidden layer whose activations are the features


SETTINGS = ClassifierSettings()


class _FashionNet(nn.Module):
    """[N, 1, 28, 28] float64 in [0, 1] -> features [N, feature_dim] (after a ReLU) -> logits [N, 10]."""

    def __init__(self, s: ClassifierSettings):
        super().__init__()
        a, b = s.widths
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(), nn.Linear(b * 7 * 7, s.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(s.feature_dim, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 1, 28, 28] in [0, 1] -> features [N, feature_dim]; the input standardised by the training
        set's mean and deviation (0.286, 0.353), which speeds up the first epochs."""
        return self.features((x - 0.286) / 0.353)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 1, 28, 28] in [0, 1] -> logits [N, 10]."""
        return self.head(self.embed(x))


def _split(n: int, s: ClassifierSettings) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the training set: (the classifier's n_train images, the held-out rest), both sorted."""
    order = np.random.RandomState(s.seed).permutation(n)
    return np.sort(order[: s.n_train]), np.sort(order[s.n_train :])


def _fit(x: torch.Tensor, y: torch.Tensor, s: ClassifierSettings) -> _FashionNet:
    """Adam on cross-entropy over x [n, 1, 28, 28] float64, y [n], minibatches in a seeded order, each batch
    rolled by -1..1 pixels."""
    rs = np.random.RandomState(s.seed + 1)  # another stream than the subset's permutation
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global generator: leave it alone
        net = _FashionNet(s).double()
    init_default_scale(net, rs)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    for _ in range(s.epochs):
        perm = torch.from_numpy(rs.permutation(len(x)))
        for start in range(0, len(x), s.batch):
            idx = perm[start : start + s.batch]
            # small random shifts make the features robust to slightly misplaced garments
            shift = [int(v) for v in rs.randint(-1, 2, size=2)]
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def cache_dir() -> Path:
    """Where the trained classifiers are kept: $DDPM_CACHE_DIR/fashion, else $XDG_CACHE_HOME/ddpm/fashion, else
    ~/.cache/ddpm/fashion (the kernels of ddpm.nn.fused live beside it)."""
    return _cache_dir("fashion")


def build_classifier(data_dir: str | Path, settings: ClassifierSettings = SETTINGS,
                     cache: str | Path | None = None) -> _FashionNet:
    """The classifier for the Fashion-MNIST folder `data_dir`, frozen in eval mode: loaded from the cache
    folder (default `cache_dir()`) when it holds this key's file, else trained (float64, fixed seeds, one thread)
    and written there (`ddpm.metrics.deterministic.load_or_fit`)."""
    images, labels = load_idx(data_dir, "train")
    key = weights_key({"format": FORMAT, **dataclasses.asdict(settings)}, images, labels)
    mine, _ = _split(len(images), settings)
    return load_or_fit(Path(cache or cache_dir()) / f"classifier-{key}.pt", _FashionNet(settings).double(),
                       lambda: _fit(as_nchw_float(images[mine], 28, "Fashion-MNIST"), labels[mine], settings))


@functools.lru_cache(maxsize=2)
def classifier(data_dir: str, settings: ClassifierSettings = SETTINGS, cache: str | None = None) -> _FashionNet:
    """`build_classifier`, once per process for each (folder, settings, cache)."""
    return build_classifier(data_dir, settings, cache)


@torch.no_grad()
def fashion_outputs(images, net: _FashionNet) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 1, 28, 28] or [N, 28, 28, 1] -> (features [N, feature_dim], class probabilities [N, 10]),
    float64, in eval mode, BATCH_EVAL images a call."""
    assert not net.training
    x = as_nchw_float(images, 28, "Fashion-MNIST")
    feats, probs = [], []
    with one_thread():
        for s in range(0, len(x), BATCH_EVAL):
            f = net.embed(x[s : s + BATCH_EVAL])
            feats.append(f)
            probs.append(torch.softmax(net.head(f), 1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


@dataclass
class FashionReport:
    n: int  # samples scored
    frechet: float  # Frechet distance of the samples' features to the real test set's (10,000 images)
    floor: float  # the same for n real training images the classifier never saw: what a perfect model scores at n
    ratio: float  # frechet / floor
    precision: float  # fraction of samples inside the manifold of n test images (k-NN balls, k = 3)
    recall: float  # fraction of those n test images inside the samples' manifold
    floor_precision: float  # precision of the n real training images: a perfect model's
    floor_recall: float  # recall of the n real training images
    confident_fraction: float  # fraction of samples with top class probability >= CONFIDENT (0.9)
    floor_confident_fraction: float  # the same for the n real training images
    class_histogram: list[int]  # samples per predicted class, in the order of CLASSES
    test_accuracy: float  # the classifier's accuracy on the 10,000 test images


@functools.lru_cache(maxsize=2)
def _reference(data_dir: str, settings: ClassifierSettings, cache: str | None):
    """(test features [10000, D], their mean and covariance, test accuracy, held-out training images), once per
    process."""
    net = classifier(data_dir, settings, cache)
    test, test_y = load_idx(data_dir, "test")
    feats, probs = fashion_outputs(test, net)
    mu, sigma = feature_stats(feats)
    acc = float((probs.argmax(1) == test_y.numpy()).mean())
    train, _ = load_idx(data_dir, "train")
    _, held_out = _split(len(train), settings)
    return feats, mu, sigma, acc, train[held_out]


def _order(n: int, m: int, seed: int) -> np.ndarray:
    """The first m of a seeded permutation of range(n): which real images stand beside m samples."""
    return np.random.RandomState(seed).permutation(n)[:m]


def evaluate_fashion(images, data_dir: str | Path, settings: ClassifierSettings = SETTINGS,
                     cache: str | Path | None = None) -> FashionReport:
    """Quality of generated Fashion-MNIST images, uint8 [N, 1, 28, 28] or [N, 28, 28, 1] with K < N <= 10,000,
    against the real data in the IDX folder `data_dir` (the four files of `ddpm.data.load_idx`)."""
    x = as_nchw_float(images, 28, "Fashion-MNIST")  # checks the shape before any classifier is built
    n = x.shape[0]
    test_feats, mu_te, s_te, acc, held_out = _reference(str(data_dir), settings, None if cache is None else str(cache))
    if not K < n <= len(test_feats):
        raise ValueError(f"the Fashion-MNIST evaluation takes {K + 1} to {len(test_feats)} samples; got {n}")
    net = classifier(str(data_dir), settings, None if cache is None else str(cache))
    feats, probs = fashion_outputs(images, net)
    real_feats, real_probs = fashion_outputs(held_out[_order(len(held_out), n, settings.seed + 2)], net)
    test_n = test_feats[_order(len(test_feats), n, settings.seed + 3)]
    mu, s = feature_stats(feats)
    fd = frechet_distance(mu, s, mu_te, s_te)
    floor = frechet_distance(*feature_stats(real_feats), mu_te, s_te)
    pr, pr_floor = precision_recall(test_n, feats), precision_recall(test_n, real_feats)
    return FashionReport(
        n=n, frechet=fd, floor=floor, ratio=fd / floor, precision=pr.precision, recall=pr.recall,
        floor_precision=pr_floor.precision, floor_recall=pr_floor.recall,
        confident_fraction=float((probs.max(1) >= CONFIDENT).mean()),
        floor_confident_fraction=float((real_probs.max(1) >= CONFIDENT).mean()),
        class_histogram=[int(v) for v in np.bincount(probs.argmax(1), minlength=10)], test_accuracy=acc,
    )
