"""The "Inception" of the 8x8 digits: a small deterministic classifier trained on the real train split, whose
hidden features give a Frechet distance, and whose probabilities give the confident fraction and the class
histogram. The floor is the distance between the real train and real test halves."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ddpm.data import load_digits
from ddpm.metrics.frechet import feature_stats, frechet_distance

CONFIDENT = 0.9  # a sample counts as confidently classified when its top class probability is at least this
FEATURE_DIM = 128


class _DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)


def _as_nchw_float(images) -> torch.Tensor:
    """uint8 [N, 1, 8, 8] or [N, 8, 8, 1] (tensor or array) -> float [N, 1, 8, 8] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"digit images must be uint8; got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digit images must be [N, 1, 8, 8] or [N, 8, 8, 1]; got {tuple(x.shape)}")
    return x.float() / 255.0


def _fit(x: torch.Tensor, y: torch.Tensor) -> _DigitNet:
    g = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        net = _DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(40):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 64):
            idx = perm[s : s + 64]
            # small random shifts make the features robust to slightly misplaced strokes
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(net.head(net.features(xb)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


@functools.lru_cache(maxsize=1)
def classifier() -> _DigitNet:
    """Trained once per process on the real train split, deterministically (fixed seeds, one thread)."""
    images, labels = load_digits("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums whatever the machine's core count
    try:
        with torch.enable_grad():
            net = _fit(_as_nchw_float(images), labels)
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def digits_features(images) -> np.ndarray:
    """Hidden features [N, 128] (float64) of the classifier, always in eval mode."""
    net = classifier()
    assert not net.training
    return net.features(_as_nchw_float(images)).double().numpy()


@torch.no_grad()
def digits_probs(images) -> np.ndarray:
    """Class probabilities [N, 10]."""
    net = classifier()
    return torch.softmax(net.head(net.features(_as_nchw_float(images))), 1).double().numpy()


@dataclass
class DigitsReport:
    frechet: float  # Frechet distance of the samples' features to the real train split's
    floor: float  # the same between the real train and real test halves: the best a model can expect
    ratio: float  # frechet / floor
    confident_fraction: float  # fraction of samples with top class probability >= CONFIDENT
    class_histogram: list[int]  # samples per predicted class 0..9
    test_accuracy: float  # the classifier's accuracy on the real test split


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray, float, float]:
    tr, _ = load_digits("train")
    te, te_y = load_digits("test")
    mu_tr, s_tr = feature_stats(digits_features(tr))
    mu_te, s_te = feature_stats(digits_features(te))
    acc = float((digits_probs(te).argmax(1) == te_y.numpy()).mean())
    return mu_tr, s_tr, frechet_distance(mu_tr, s_tr, mu_te, s_te), acc


def evaluate_digits(images) -> DigitsReport:
    """Quality of generated digits (uint8 [N, 1, 8, 8] or [N, 8, 8, 1]) against the real train split."""
    mu_tr, s_tr, floor, acc = _reference()
    mu, s = feature_stats(digits_features(images))
    fd = frechet_distance(mu, s, mu_tr, s_tr)
    probs = digits_probs(images)
    hist = np.bincount(probs.argmax(1), minlength=10)
    return DigitsReport(frechet=fd, floor=floor, ratio=fd / floor, confident_fraction=float((probs.max(1) >= CONFIDENT).mean()),
                        class_histogram=[int(v) for v in hist], test_accuracy=acc)
