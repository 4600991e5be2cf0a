"""Precision and recall of generated samples against real ones (Kynkaanniemi et al. 2019, "Improved Precision
and Recall Metric for Assessing Generative Models", arXiv 1904.06991): each set's manifold in feature space is
the union of balls around its points, each ball's radius the distance to that point's k-th nearest neighbour
in its own set. Precision: the fraction of samples inside the real manifold; recall: the fraction of real
points inside the samples' manifold.

Distances are torch.cdist's direct differences (not the |a|^2 + |b|^2 - 2ab matrix product, which loses digits
for near points), in row blocks so that 10,000 x 10,000 pairs never sit in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

K = 3  # the paper's choice of neighbour for the radii
BLOCK = 1024  # rows per block of the distance matrix


def _blocks(a: torch.Tensor, b: torch.Tensor):
    """Yields (row slice, distances [rows, M]) between blocks of a [N, D] and all of b [M, D]."""
    for s in range(0, a.shape[0], BLOCK):
        yield slice(s, s + BLOCK), torch.cdist(a[s : s + BLOCK], b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats: np.ndarray, k: int = K) -> np.ndarray:
    """feats [N, D] -> [N] the distance from each point to its k-th nearest other point (N > k)."""
    x = torch.as_tensor(np.asarray(feats, dtype=np.float64))
    if x.ndim != 2 or x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k = {k} need features [N, D] with N > {k}; got {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=x.dtype)
    for rows, d in _blocks(x, x):
        # the point itself is at distance 0, the smallest: the (k+1)-th smallest is the k-th neighbour
        out[rows] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out.numpy()


def inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """points [N, D], balls centres [M, D] with radii [M] -> bool [N]: inside at least one ball (boundary in)."""
    p = torch.as_tensor(np.asarray(points, dtype=np.float64))
    c = torch.as_tensor(np.asarray(centres, dtype=np.float64))
    r = torch.as_tensor(np.asarray(radii, dtype=np.float64))
    assert r.shape == (c.shape[0],) and p.shape[1] == c.shape[1], (p.shape, c.shape, r.shape)
    out = torch.empty(p.shape[0], dtype=torch.bool)
    for rows, d in _blocks(p, c):
        out[rows] = (d <= r[None, :]).any(dim=1)
    return out.numpy()


@dataclass
class PrecisionRecall:
    precision: float  # fraction of the samples inside the real points' manifold
    recall: float  # fraction of the real points inside the samples' manifold


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K) -> PrecisionRecall:
    """Improved precision and recall of features fake [N, D] against real [M, D] (the paper takes N = M)."""
    precision = inside(fake, real, knn_radii(real, k)).mean()
    recall = inside(real, fake, knn_radii(fake, k)).mean()
    return PrecisionRecall(precision=float(precision), recall=float(recall))
