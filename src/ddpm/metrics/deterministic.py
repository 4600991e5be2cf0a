"""Pieces shared by the project's own feature classifiers (`ddpm.metrics.digits`, `ddpm.metrics.fashion`), which
must come out the same on every machine: SGD on a network is chaotic in float32, so they train in float64 from
initial weights that are exact functions of integers drawn from numpy's `RandomState` (whose streams numpy keeps
stable)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def uniform(rs: np.random.RandomState, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """U(-bound, bound) in float64 from 24-bit integers: every step but the final product is exact, so every
    machine gets the same bits (torch's own uniform_ differs by an ulp between vectorised kernels)."""
    k = rs.randint(0, 2**24, size=shape).astype(np.float64)
    return torch.from_numpy(((k + 0.5) / 2**23 - 1.0) * bound)


def init_default_scale(net: nn.Module, rs: np.random.RandomState) -> None:
    """PyTorch's default scale for Conv2d/Linear, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases,
    drawn by `uniform`."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / float(np.sqrt(m.weight[0].numel()))
                m.weight.copy_(uniform(rs, tuple(m.weight.shape), bound))
                m.bias.copy_(uniform(rs, tuple(m.bias.shape), bound))


def as_nchw_float(images, side: int, what: str) -> torch.Tensor:
    """uint8 [N, 1, side, side] or [N, side, side, 1] (tensor or array) -> float64 [N, 1, side, side] in [0, 1];
    `what` names the images in the errors."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"{what} images must be uint8; got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, side, side):
        raise ValueError(f"{what} images must be [N, 1, {side}, {side}] or [N, {side}, {side}, 1]; got {tuple(x.shape)}")
    return x.to(torch.float64) / 255.0


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside: one summation order for every reduction whatever the core count, and on a
    busy machine no second thread left waiting for a core (it measured 2-5x slower on the shared 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def weights_key(settings: dict, *tensors: torch.Tensor) -> str:
    """A hash of a classifier's settings and of the training data it is built from (the decoded bytes)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _exclusive(folder: Path):
    """An exclusive lock on the folder (flock on its descriptor, as `ddpm.lock` takes its locks; no file is
    added): two processes that need a classifier at once (two test workers, two evaluations) train it once, and
    the second reads the first's file."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_or_fit(path: Path, net: nn.Module, fit: Callable[[], nn.Module]) -> nn.Module:
    """`net` with the weights of the file `path` when it is readable, else `fit()`'s network, written to `path`
    (atomically, under a lock that a concurrent build waits on); frozen in eval mode either way. A damaged file
    is rebuilt with a warning, never trusted."""
    with _exclusive(path.parent):
        if path.is_file():
            try:
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return net.eval().requires_grad_(False)
            except Exception as e:
                warnings.warn(f"{path}: unreadable cached classifier ({e}); rebuilding it", stacklevel=3)  # the caller of build_classifier
        with one_thread(), torch.enable_grad():
            net = fit()
        buf = io.BytesIO()  # through a buffer, the archive names no temporary file: equal weights give equal bytes
        torch.save(net.state_dict(), buf)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    return net.eval().requires_grad_(False)
