"""FID, Inception Score and KID through torch-fidelity, with the FID Inception weights read from a local file.

The FID is computed here from cached statistics with `frechet_distance` (the same 2048-d pool features that
torch-fidelity's FID uses); torch-fidelity supplies the feature network (always in eval mode), the Inception
Score and KID. Reference statistics are computed once over ALL reference images, whatever the batch size,
and cached in an npz keyed by the reference's path, size and modification time.

The weights file: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (its v0.2.0 release asset, the
TensorFlow FID Inception converted to PyTorch). Fetch it once on a machine with internet access and pass
`--inception-weights PATH`; nothing is downloaded here.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.metrics.frechet import feature_stats, frechet_distance

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FID_MIN_SAMPLES = 2048  # fewer samples than feature dimensions: the covariance is rank-deficient, FID biased


@dataclass
class FidelityReport:
    fid: float
    isc_mean: float | None
    isc_std: float | None
    kid_mean: float | None
    kid_std: float | None
    n_samples: int
    n_ref: int


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 [N, H, W, C] (or [N, C, H, W]) -> items uint8 [3, H, W], grayscale repeated to RGB."""

    def __init__(self, images):
        x = torch.as_tensor(np.asarray(images))
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C]; got {x.dtype} {tuple(x.shape)}")
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].contiguous()


def feature_extractor(weights: str | Path, device: str = "cpu"):
    """torch-fidelity's FID Inception from a local weights file (checked to hold tensors only first)."""
    from torch_fidelity.utils import create_feature_extractor

    from ddpm.checkpoint import safe_torch_load

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"Inception weights {weights} not found. Download {WEIGHTS_NAME} (torch-fidelity's v0.2.0 release asset) "
            "once on a machine with internet access and pass --inception-weights PATH; nothing is downloaded here")
    safe_torch_load(weights)  # refuses a file that would run code; torch-fidelity then loads the vetted file
    fe = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=str(device).startswith("cuda"),
                                  feature_extractor_weights_path=str(weights), verbose=False)
    fe.eval()
    assert not fe.training
    return fe


def inception_features(images, fe, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{'2048': [N, 2048], 'logits_unbiased': [N, 1008]} for uint8 images, batched, in eval mode."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    fe.eval()
    cuda = next(fe.parameters()).is_cuda
    return get_featuresdict_from_dataset(_Uint8Images(images), fe, batch_size, cuda, save_cpu_ram=True, verbose=False)


def _load_reference(ref: str | Path, resolution: int) -> np.ndarray:
    """Reference images uint8 [N, H, W, C]: an .npz (arr_0), a CIFAR-10 archive/folder (train split), or a
    folder of images (centre-cropped and resized to the samples' resolution)."""
    from ddpm.data import ImageFolderDataset, load_cifar10

    p = Path(ref)
    if p.suffix == ".npz":
        return np.load(p)["arr_0"]
    try:
        x, _ = load_cifar10(p, "train")
        return x.permute(0, 2, 3, 1).numpy()
    except (FileNotFoundError, ValueError):
        pass
    ds = ImageFolderDataset(p, resolution)
    return torch.stack([ds[i][0] for i in range(len(ds))]).permute(0, 2, 3, 1).numpy()


def reference_stats(ref: str | Path, fe, cache_dir: str | Path, resolution: int, batch_size: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, sigma, pool features) of every reference image, from the cache when it is there."""
    p = Path(ref)
    if not p.exists():
        raise FileNotFoundError(f"reference {p} not found: pass an .npz, a CIFAR-10 archive or folder, or a folder of images")
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{resolution}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"ref_{key}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["mu"], z["sigma"], z["features"]
    images = _load_reference(p, resolution)
    feats = inception_features(images, fe, batch_size)["2048"].double().numpy()
    mu, sigma = feature_stats(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=feats.astype(np.float32), n=len(feats))
    tmp.replace(cache)
    return mu, sigma, feats.astype(np.float32)


def fidelity_metrics(samples_u8, ref: str | Path, inception_weights: str | Path, cache_dir: str | Path,
                     kid: bool = True, isc: bool = True, batch_size: int = 64, device: str = "cpu") -> FidelityReport:
    """FID (and IS, KID) of uint8 samples [N, H, W, C] against a reference set."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    samples = np.asarray(samples_u8)
    n = samples.shape[0]
    if n < FID_MIN_SAMPLES:
        warnings.warn(f"FID from {n} samples (< {FID_MIN_SAMPLES}) is biased upwards; the paper uses 50,000", stacklevel=2)
    fe = feature_extractor(inception_weights, device)
    resolution = samples.shape[1] if samples.shape[-1] in (1, 3) else samples.shape[2]
    mu_r, sigma_r, feats_r = reference_stats(ref, fe, cache_dir, resolution, batch_size)
    fd = inception_features(samples, fe, batch_size)
    feats = fd["2048"].double().numpy()
    mu, sigma = feature_stats(feats)
    report = FidelityReport(fid=frechet_distance(mu, sigma, mu_r, sigma_r), isc_mean=None, isc_std=None,
                            kid_mean=None, kid_std=None, n_samples=n, n_ref=int(feats_r.shape[0]))
    if isc:
        m = isc_featuresdict_to_metric(fd, "logits_unbiased", isc_splits=min(10, n), samples_shuffle=True, rng_seed=2020,
                                       verbose=False)
        report.isc_mean, report.isc_std = float(m["inception_score_mean"]), float(m["inception_score_std"])
    if kid:
        size = min(1000, n, feats_r.shape[0])
        m = kid_features_to_metric(torch.from_numpy(feats).float(), torch.from_numpy(feats_r), kid_subsets=100,
                                   kid_subset_size=size, kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020,
                                   verbose=False)
        report.kid_mean, report.kid_std = float(m["kernel_inception_distance_mean"]), float(m["kernel_inception_distance_std"])
    return report
