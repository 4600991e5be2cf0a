"""FID, Inception Score and KID through torch-fidelity, with the FID Inception weights read from a local file.

torch-fidelity supplies the feature network ("inception-v3-compat", always in eval mode), the Inception Score
and KID. The FID is computed here, with `frechet_distance`, from the same 2048-d pool features that
torch-fidelity's own FID uses (`FID_LAYER`), so that the reference statistics can be cached: they are computed
once over ALL reference images (whatever the batch size) and stored in an npz keyed by the reference (path,
size and modification time of every file, or the bytes of an array), the weights' sha256 and the resolution.

The weights file: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (its v0.2.0 release asset, the
TensorFlow FID Inception converted to PyTorch). Fetch it once on a machine with internet access and pass
`--inception-weights PATH`; nothing is downloaded here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.metrics.frechet import feature_stats, frechet_distance

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's port of the TF FID Inception (bilinear resize to 299)
FID_LAYER = "2048"  # the pool features torch-fidelity uses for FID and KID with this extractor
ISC_LAYER = "logits_unbiased"  # the logits (without the fc bias) it uses for the Inception Score
FID_MIN_SAMPLES = 2048  # fewer samples than feature dimensions: the covariance is rank-deficient, FID biased
ISC_SPLITS = 10  # torch-fidelity's defaults, so that IS and KID are comparable with its command line
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
RNG_SEED = 2020  # torch-fidelity's seed for the IS shuffle and the KID subsets
CACHE_VERSION = 1  # bump when the cached statistics change meaning


@dataclass
class FidelityReport:
    fid: float  # Frechet distance of the 2048-d pool features, samples vs reference
    isc_mean: float | None  # Inception Score over ISC_SPLITS splits (None when not asked for)
    isc_std: float | None
    kid_mean: float | None  # KID, polynomial kernel of degree 3, KID_SUBSETS subsets (None when not asked for)
    kid_std: float | None
    n_samples: int
    n_ref: int  # reference images behind the statistics (all of them)
    weights_sha256: str  # of the Inception weights file: tells the real weights from a stand-in


# ---------------------------------------------------------------------------------------------- inputs


def _as_nchw_uint8(images) -> torch.Tensor:
    """uint8 [N, H, W, C] (the .npz layout) or [N, C, H, W], array or tensor, C in {1, 3} -> uint8 [N, C, H, W]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C] or [N, C, H, W]; got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels; got shape {tuple(x.shape)}")
    return x


class _Uint8Images(torch.utils.data.Dataset):
    """torch-fidelity's input contract: items uint8 [3, H, W]; grayscale is repeated to RGB."""

    def __init__(self, images):
        self.x = _as_nchw_uint8(images)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].expand(3, -1, -1).contiguous()


class _FolderImages(torch.utils.data.Dataset):
    """A folder of images, decoded lazily (never all in memory): items uint8 [3, R, R]."""

    def __init__(self, root: Path, resolution: int):
        from ddpm.data import ImageFolderDataset

        self.ds = ImageFolderDataset(root, resolution, channels=3)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds[i][0]


def _reference_dataset(ref, resolution: int) -> torch.utils.data.Dataset:
    """The reference images as a torch-fidelity dataset: an array, an .npz (arr_0), a CIFAR-10 archive or folder
    (its training set, the paper's protocol), or a folder of images (centre-cropped and resized to the samples'
    resolution)."""
    from ddpm.data import load_cifar10

    if not isinstance(ref, (str, os.PathLike)):
        return _Uint8Images(ref)
    p = Path(ref)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            return _Uint8Images(z["arr_0"])
    if p.is_file():  # any other file must be the CIFAR-10 archive: its errors say what is wrong
        return _Uint8Images(load_cifar10(p, "train")[0])
    try:
        return _Uint8Images(load_cifar10(p, "train")[0])
    except FileNotFoundError:
        return _FolderImages(p, resolution)  # no CIFAR-10 batches here: a folder of images


def _reference_identity(ref) -> str:
    """What the cached statistics depend on, cheaply: an array's bytes; a file's path, size and mtime; for a
    folder the same for every file below it (an added, removed or rewritten file changes the key)."""
    if not isinstance(ref, (str, os.PathLike)):
        x = _as_nchw_uint8(ref)
        return f"array {tuple(x.shape)} sha256 {hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()}"
    p = Path(ref).resolve()
    if not p.exists():
        raise FileNotFoundError(f"reference {ref} not found: pass an .npz, a CIFAR-10 archive or folder, or a folder of images")
    if p.is_file():
        st = p.stat()
        return f"file {p} {st.st_size} {st.st_mtime_ns}"
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            with contextlib.suppress(OSError):  # a dangling link: the dataset skips it too
                st = f.stat()
                h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"folder {p} {h.hexdigest()}"


# ---------------------------------------------------------------------------------------------- the network


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def feature_extractor(weights: str | Path, device: str | torch.device = "cpu"):
    """torch-fidelity's FID Inception from a local weights file (checked to hold tensors only), in eval mode.

    It yields (FID_LAYER [N, 2048], ISC_LAYER [N, 1008]) float32 for uint8 [N, 3, H, W]. A CUDA device puts it
    on that device.
    """
    from torch_fidelity.utils import create_feature_extractor

    from ddpm.checkpoint import safe_torch_load

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"Inception weights {weights} not found. Download {WEIGHTS_NAME} (torch-fidelity's v0.2.0 release asset, "
            "the TensorFlow FID Inception ported to PyTorch) once on a machine with internet access and pass "
            "--inception-weights PATH; nothing is downloaded here")
    safe_torch_load(weights)  # refuses a file that would run code; torch-fidelity then loads the vetted file
    device = torch.device(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        fe = create_feature_extractor(FEATURE_EXTRACTOR, [FID_LAYER, ISC_LAYER], cuda=device.type == "cuda",
                                      feature_extractor_weights_path=str(weights), verbose=False)
    fe.eval()
    assert not fe.training
    return fe


def inception_features(images, fe, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{FID_LAYER: [N, 2048], ISC_LAYER: [N, 1008]} float32 for uint8 images (an array/tensor [N, H, W, C] or
    [N, C, H, W], or a dataset of uint8 [3, H, W]), in batches of `batch_size`, in eval mode."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    ds = images if isinstance(images, torch.utils.data.Dataset) else _Uint8Images(images)
    fe.eval()
    p = next(fe.parameters())
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
        return get_featuresdict_from_dataset(ds, fe, batch_size, p.is_cuda, save_cpu_ram=True, verbose=False)


# ---------------------------------------------------------------------------------------------- statistics


def reference_stats(ref, fe, weights_sha256: str, cache_dir: str | Path, resolution: int, batch_size: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048], pool features [N_ref, 2048] float32) of every reference image, from
    `cache_dir` when the same reference, weights and resolution were seen before."""
    identity = f"v{CACHE_VERSION}|{FEATURE_EXTRACTOR}/{FID_LAYER}|{_reference_identity(ref)}|weights {weights_sha256}|res {resolution}"
    cache = Path(cache_dir) / f"ref_{hashlib.sha256(identity.encode()).hexdigest()[:20]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["identity"]) == identity:
                return z["mu"], z["sigma"], z["features"]
    feats = inception_features(_reference_dataset(ref, resolution), fe, batch_size)[FID_LAYER].numpy()
    mu, sigma = feature_stats(feats.astype(np.float64))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")  # per process: ranks may race; the rename is atomic
    np.savez(tmp, mu=mu, sigma=sigma, features=feats, identity=np.array(identity))
    tmp.replace(cache)
    return mu, sigma, feats


def fidelity_metrics(samples_u8, ref, inception_weights: str | Path, cache_dir: str | Path, kid: bool = True,
                     isc: bool = True, batch_size: int = 64, device: str | torch.device = "cpu") -> FidelityReport:
    """FID (and IS, KID) of uint8 samples [N, H, W, C] or [N, C, H, W] against a reference set.

    `ref`: a uint8 array of images, an .npz (arr_0), a CIFAR-10 archive or folder (its training set), or a folder
    of images. Say which reference in every report: the paper's CIFAR-10 FID 3.17 is against the training set.
    """
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    samples = _as_nchw_uint8(samples_u8)
    n = samples.shape[0]
    if n < FID_MIN_SAMPLES:
        warnings.warn(f"FID from {n} samples (< {FID_MIN_SAMPLES}) is biased upwards; the paper uses 50,000", stacklevel=2)
    fe = feature_extractor(inception_weights, device)
    weights_sha256 = _sha256_file(Path(inception_weights))
    mu_r, sigma_r, feats_r = reference_stats(ref, fe, weights_sha256, cache_dir, samples.shape[2], batch_size)
    n_ref = feats_r.shape[0]
    if n_ref < FID_MIN_SAMPLES:
        warnings.warn(f"FID against {n_ref} reference images (< {FID_MIN_SAMPLES}) is biased upwards", stacklevel=2)
    fd = inception_features(samples, fe, batch_size)
    feats = fd[FID_LAYER]
    mu, sigma = feature_stats(feats.double().numpy())
    report = FidelityReport(fid=frechet_distance(mu, sigma, mu_r, sigma_r), isc_mean=None, isc_std=None,
                            kid_mean=None, kid_std=None, n_samples=n, n_ref=n_ref, weights_sha256=weights_sha256)
    if isc:
        m = isc_featuresdict_to_metric(fd, ISC_LAYER, isc_splits=min(ISC_SPLITS, n), samples_shuffle=True,
                                       rng_seed=RNG_SEED, verbose=False)
        report.isc_mean, report.isc_std = float(m["inception_score_mean"]), float(m["inception_score_std"])
    if kid:
        m = kid_features_to_metric(feats, torch.from_numpy(feats_r), kid_subsets=KID_SUBSETS,
                                   kid_subset_size=min(KID_SUBSET_SIZE, n, n_ref), kid_kernel="poly",
                                   kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                   rng_seed=RNG_SEED, verbose=False)
        report.kid_mean, report.kid_std = float(m["kernel_inception_distance_mean"]), float(m["kernel_inception_distance_std"])
    return report
