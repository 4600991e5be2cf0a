"""The "Inception" of the 8x8 digits: a small deterministic classifier trained on the real train split, whose
hidden features give a Frechet distance, and whose probabilities give the confident fraction and the class
histogram. The floor is the distance between the real train and real test halves.

Determinism across machines: SGD on a network is chaotic in float32, so a one-ulp difference (a CPU with
other vector units rounds a kernel differently) grows into a different network; the floor then moved by 5%
between an AVX-512 and a scalar build of the same torch. So the classifier is trained in float64, its initial
weights are exact functions of integers drawn from numpy's `RandomState` (whose streams numpy keeps stable),
and so are the data order and the augmentation. Different CPUs then agree on the features to about 1e-13.
The trained weights are kept on disk (`cache_dir()`), as the Fashion-MNIST classifier's are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.data import load_digits
from ddpm.metrics.deterministic import as_nchw_float, init_default_scale, load_or_fit, weights_key
from ddpm.metrics.frechet import feature_stats, frechet_distance
from ddpm.runtime import cache_dir as _cache_dir

CONFIDENT = 0.9  # a sample counts as confidently classified when its top class probability is at least this
FEATURE_DIM = 128  # width of the hidden layer whose activations are the Frechet features

SEED = 1234  # numpy RandomState seed for the initial weights, the data order and the shifts
EPOCHS = 40  # passes over the 899 training images
BATCH = 64
LR = 2e-3  # Adam
FORMAT = 1  # bump when the network or the training procedure changes: old cache files are then not read


class _DigitNet(nn.Module):
    """[N, 1, 8, 8] float64 in [0, 1] -> features [N, 128] (after a ReLU) -> logits [N, 10]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)


def _fit(x: torch.Tensor, y: torch.Tensor) -> _DigitNet:
    """Adam on cross-entropy, minibatches of 64 in a seeded order, each batch rolled by -1..1 pixels."""
    rs = np.random.RandomState(SEED)
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global generator: leave it alone
        net = _DigitNet().double()
    init_default_scale(net, rs)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    for _ in range(EPOCHS):
        perm = torch.from_numpy(rs.permutation(len(x)))
        for s in range(0, len(x), BATCH):
            idx = perm[s : s + BATCH]
            # small random shifts make the features robust to slightly misplaced strokes
            shift = [int(v) for v in rs.randint(-1, 2, size=2)]
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(net.head(net.features(xb)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def cache_dir() -> Path:
    """Where the trained classifier is kept: $DDPM_CACHE_DIR/digits, else $XDG_CACHE_HOME/ddpm/digits, else
    ~/.cache/ddpm/digits (beside the Fashion-MNIST classifiers)."""
    return _cache_dir("digits")


def build_classifier(cache: str | Path | None = None) -> _DigitNet:
    """The classifier, frozen in eval mode: loaded from the cache folder (default `cache_dir()`) when it holds
    this key's file (a hash of the training settings and the train split), else trained on the real train split
    (float64, fixed seeds, one thread: 11-21 s on the machines measured) and written there."""
    images, labels = load_digits("train")
    key = weights_key({"format": FORMAT, "seed": SEED, "epochs": EPOCHS, "batch": BATCH, "lr": LR}, images, labels)
    return load_or_fit(Path(cache or cache_dir()) / f"classifier-{key}.pt", _DigitNet().double(),
                       lambda: _fit(as_nchw_float(images, 8, "digit"), labels))


@functools.lru_cache(maxsize=1)
def classifier() -> _DigitNet:
    """`build_classifier()`, once per process."""
    return build_classifier()


@torch.no_grad()
def digits_features(images) -> np.ndarray:
    """uint8 [N, 1, 8, 8] or [N, 8, 8, 1] -> hidden features [N, 128] float64, always in eval mode."""
    net = classifier()
    assert not net.training
    return net.features(as_nchw_float(images, 8, "digit")).numpy()


@torch.no_grad()
def digits_probs(images) -> np.ndarray:
    """uint8 [N, 1, 8, 8] or [N, 8, 8, 1] -> class probabilities [N, 10] float64."""
    net = classifier()
    return torch.softmax(net.head(net.features(as_nchw_float(images, 8, "digit"))), 1).numpy()


@dataclass
class DigitsReport:
    frechet: float  # Frechet distance of the samples' features to the real train split's
    floor: float  # the same between the real train and real test halves: the best a model can expect
    ratio: float  # frechet / floor
    confident_fraction: float  # fraction of samples with top class probability >= CONFIDENT (0.9)
    class_histogram: list[int]  # samples per predicted class 0..9
    test_accuracy: float  # the classifier's accuracy on the real test split


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray, float, float]:
    """(mu_train [128], sigma_train [128, 128], floor, test accuracy), computed once per process."""
    tr, _ = load_digits("train")
    te, te_y = load_digits("test")
    mu_tr, s_tr = feature_stats(digits_features(tr))
    mu_te, s_te = feature_stats(digits_features(te))
    acc = float((digits_probs(te).argmax(1) == te_y.numpy()).mean())
    return mu_tr, s_tr, frechet_distance(mu_tr, s_tr, mu_te, s_te), acc


def evaluate_digits(images) -> DigitsReport:
    """Quality of generated digits (uint8 [N, 1, 8, 8] or [N, 8, 8, 1], N >= 2) against the real train split."""
    mu_tr, s_tr, floor, acc = _reference()
    mu, s = feature_stats(digits_features(images))
    fd = frechet_distance(mu, s, mu_tr, s_tr)
    probs = digits_probs(images)
    hist = np.bincount(probs.argmax(1), minlength=10)
    return DigitsReport(frechet=fd, floor=floor, ratio=fd / floor, confident_fraction=float((probs.max(1) >= CONFIDENT).mean()),
                        class_histogram=[int(v) for v in hist], test_accuracy=acc)
