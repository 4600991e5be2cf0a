"""Datasets and the [0, 255] <-> [-1, 1] mapping.

Every dataset yields uint8 images [C, H, W] and an int64 label (-1 when the data has none); the trainer maps
them to [-1, 1] with `to_model_range`. Nothing here downloads: a missing file is an error that says what to
put where.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ddpm.modes import DatasetKind, parse_enum

DIGITS_TEST_FRACTION = 0.5  # the digits split: two halves, so "real train vs real test" is the quality floor
DIGITS_SPLIT_SEED = 0


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..] in 0..255 -> float32 in [-1, 1] (the paper's data scaling)."""
    return images_u8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 0..255, rounding to the nearest level (inverse of `to_model_range`)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _digits_levels() -> tuple[np.ndarray, np.ndarray]:
    """The digits' levels [1797, 8, 8] (float64, 0..16) and labels [1797]: the file scikit-learn ships
    (datasets/data/digits.csv.gz: one row per image, 64 pixel levels then the label), read without importing
    scikit-learn, whose import costs every `ddpm` process 1.6-1.8 s (Xeon family 6 model 167); through
    `sklearn.datasets.load_digits` where the file is not found in that layout."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders
                 if (Path(f) / "datasets" / "data" / "digits.csv.gz").is_file()), None)
    if path is None:
        from sklearn.datasets import load_digits as _sk_load_digits

        bunch = _sk_load_digits()
        return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # [1797, 65]
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as uint8 images [N, 1, 8, 8] and int64 labels [N].

    The 17 levels 0..16 become round(v * 255 / 16). The split is a fixed permutation (seed 0) cut in two
    halves: "train" (899 images) and "test" (898 images); "all" returns all 1,797.
    """
    levels, target = _digits_levels()
    images = np.round(levels * 255.0 / 16.0).astype(np.uint8)[:, None]
    labels = np.asarray(target, dtype=np.int64)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    n_test = int(round(len(images) * DIGITS_TEST_FRACTION))
    if split == "all":
        idx = np.arange(len(images))
    elif split == "train":
        idx = np.sort(order[n_test:])
    elif split == "test":
        idx = np.sort(order[:n_test])
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])


# ---------------------------------------------------------------------------------------------- in memory


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images [N, C, H, W] with int64 labels [N] (or none: label -1)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        if labels is not None and tuple(labels.shape) != (images.shape[0],):
            raise ValueError(f"labels must be [N] = [{images.shape[0]}]; got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels if labels is not None else torch.full((images.shape[0],), -1, dtype=torch.long)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_HELP = ("put the official python-format archive cifar-10-python.tar.gz (or its extracted folder "
               "cifar-10-batches-py) there and pass --data PATH")


class _ArrayUnpickler:
    """Unpickles the CIFAR-10 batches while refusing every global but numpy's array reconstruction, so a
    doctored archive cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    @classmethod
    def load(cls, f, name: str):
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module, qualname):
                if (module, qualname) in cls.ALLOWED:
                    return super().find_class(module, qualname)
                raise pickle.UnpicklingError(f"{name}: refusing to load {module}.{qualname} (not a CIFAR-10 batch)")

        return Restricted(f, encoding="bytes").load()


def _cifar_batch(batch, where: str) -> tuple[np.ndarray, np.ndarray]:
    """An unpickled batch -> (uint8 data [n, 3072], int64 labels [n]), checked against the official layout."""
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{where} is not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: data must be uint8 [n, 3072]; got {data.dtype} {data.shape}")
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if labels.shape != (len(data),):
        raise ValueError(f"{where}: {len(data)} images but labels of shape {labels.shape}")
    return data, labels


def load_cifar10(path: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as uint8 [N, 3, 32, 32] and int64 labels [N] from cifar-10-python.tar.gz, its extracted
    folder cifar-10-batches-py, or a folder containing either."""
    import pickle
    import tarfile

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    p = Path(path)
    if p.is_dir():
        for cand in (p / "cifar-10-batches-py", p):
            if all((cand / n).is_file() for n in names):
                p = cand
                break
        else:
            if (p / "cifar-10-python.tar.gz").is_file():
                p = p / "cifar-10-python.tar.gz"
            else:
                raise FileNotFoundError(f"CIFAR-10 not found at {path}: {_CIFAR_HELP}")
    elif not p.is_file():
        raise FileNotFoundError(f"CIFAR-10 not found at {path}: {_CIFAR_HELP}")

    batches = []  # (where, unpickled dict)
    try:
        if p.is_dir():
            for n in names:
                with open(p / n, "rb") as f:
                    batches.append((str(p / n), _ArrayUnpickler.load(f, str(p / n))))
        else:
            with tarfile.open(p, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for n in names:
                    if n not in members:
                        raise ValueError(f"{p} has no member {n}: {_CIFAR_HELP}")
                    batches.append((f"{p}:{n}", _ArrayUnpickler.load(tar.extractfile(members[n]), f"{p}:{n}")))
    except (pickle.UnpicklingError, tarfile.TarError, EOFError, OSError, TypeError, LookupError) as e:
        raise ValueError(f"cannot read CIFAR-10 from {p}: {e}") from None
    checked = [_cifar_batch(b, where) for where, b in batches]
    data = np.concatenate([d for d, _ in checked])
    labels = np.concatenate([y for _, y in checked])
    # each row: 1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------- IDX (MNIST)

# The IDX header: two zero bytes, a type code, the number of dimensions, then each dimension as a big-endian
# uint32; the data follows in C order, big-endian (LeCun's MNIST page, which Fashion-MNIST and KMNIST reuse).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {  # split -> (images, labels) as the original distributions name them, each also read gzipped
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs them


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not, told by its first bytes) -> its array, in native byte order.

    Checked: the magic number (two zero bytes), a known type code, at least one dimension, and a data size that
    is exactly the product of the dimensions; every error names the file.
    """
    import gzip
    import zlib

    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut or damaged .gz
        raise ValueError(f"{path}: damaged gzip stream ({e}); the file is probably truncated") from None
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise ValueError(f"{path} is not an IDX file (its magic number must start with two zero bytes; "
                         f"got {raw[:4].hex() or 'an empty file'})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x} (known: "
                         + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES) + ")")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < want:
        raise ValueError(f"{path} is truncated: shape {shape} needs {want} bytes of data, the file has {have}")
    if have > want:
        raise ValueError(f"{path}: {have - want} bytes after the data of shape {shape} (not an IDX file of that shape)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def idx_files(folder: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of `split` ("train" or "test": the train- and t10k- files) in `folder`, each
    the plain file or its .gz (the plain one when both are there); a missing one is an error naming the folder
    and the expected names."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)
    found = []
    for stem in IDX_FILES[split]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            expected = ", ".join(f"{s}[.gz]" for pair in IDX_FILES.values() for s in pair)
            raise FileNotFoundError(f"{folder}: no {stem} or {stem}.gz; an IDX data folder (MNIST, Fashion-MNIST, "
                                    f"KMNIST) holds {expected} (on Debian, `apt-get install dataset-fashion-mnist` "
                                    f"puts Fashion-MNIST in {IDX_DEBIAN_FASHION})")
    return found[0], found[1]


def load_idx(folder: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """An IDX data folder's `split` as uint8 images [N, 1, H, W] (28 x 28 for the MNIST family) and int64
    labels [N]: images are 3-dimensional unsigned bytes, labels 1-dimensional unsigned bytes, one per image."""
    images_path, labels_path = idx_files(folder, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{images_path}: images must be unsigned bytes [N, H, W]; got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: labels must be unsigned bytes [N]; got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images")
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))  # read_idx made the copy


# ---------------------------------------------------------------------------------------------- image files

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


def to_rgb8(img) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, 3] with its levels kept.

    16-bit grayscale (I;16, I;16B, I up to 65535) becomes round(v / 257): a plain convert("RGB") clips it to
    two grey levels. 16-bit RGB PNGs Pillow already opens as 8-bit "RGB" (keeping the high byte), so they
    keep their gradations too. Transparency (RGBA, LA, palette with a transparent index) is composited onto
    a white background; CMYK, palette, bilevel and grayscale images are converted to RGB.
    """
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.round(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) > 1.0 else 255.0 * 255.0
        arr = np.round(np.clip(arr * (scale / 255.0), 0, 255)).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def center_crop_resize(arr: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [H, W, C] -> centre square crop -> [resolution, resolution, C]; equal sizes pass unchanged.
    Downscaling uses Pillow's BICUBIC with its antialiasing (reducing in steps for large factors)."""
    from PIL import Image

    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    arr = arr[top : top + s, left : left + s]
    if s == resolution:
        return np.ascontiguousarray(arr)
    img = Image.fromarray(arr)
    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0 if s > 2 * resolution else None)
    return np.asarray(img, dtype=np.uint8)


def decode_image(data_or_path, resolution: int, channels: int = 3) -> torch.Tensor:
    """An image file (path or bytes) -> uint8 [channels, resolution, resolution]."""
    import io

    from PIL import Image

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    with Image.open(src) as img:
        img.load()
        arr = center_crop_resize(to_rgb8(img), resolution)
    return to_channels(arr, channels)


def to_channels(rgb: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [channels, H, W]: the image itself (3) or its ITU-R 601 luma, as Pillow's "L" (1)."""
    t = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    if channels == 1:
        t = (t.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)[:, None, None]).sum(0, keepdim=True)
        t = t.round().clamp(0, 255).to(torch.uint8)
    return t


def read_image(path: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """A user's image file -> uint8 [channels, resolution, resolution], centre-cropped and resized as training
    data are; errors name the file. The commands take `ddpm.images.read_input_image`, which refuses instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        return decode_image(path, resolution, channels)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _check_file(path: Path) -> str | None:
    """None if `path` decodes fully (pixels and colour conversion), else a line naming it and the error."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            to_rgb8(img)
    except Exception as e:  # Pillow raises many types for damaged files
        return f"{path} ({type(e).__name__}: {e})"
    return None


def _raise(error: OSError) -> None:
    raise error


class NoImagesError(ValueError):
    """A folder holds no images (after skipping hidden, non-image and empty files)."""


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image below `root` (nested folders, any case of extension) as uint8 [channels, R, R], label -1.

    Files are in sorted path order. Hidden files and folders (leading "."), non-image files, empty files and
    unreadable entries (a dangling link) are skipped and counted in one warning. With `check`, every
    candidate is decoded once at scan time and damaged images are reported by path (a ValueError) before
    training starts. Colours go through `to_rgb8` (transparency onto a white background, 16-bit levels
    kept); `channels=1` then takes the ITU-R 601 luma. Each image is centre-cropped to a square and resized
    to R = `resolution` by `center_crop_resize`.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3, check: bool = True):
        import warnings
        from concurrent.futures import ThreadPoolExecutor

        self.root, self.resolution, self.channels = Path(root), resolution, channels
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} not found: pass --data with a folder of images")
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder of images")
        skipped = {"hidden": 0, "not an image": 0, "empty": 0, "unreadable": 0}
        files = []
        # onerror: a folder we may not list is an error, not a silently smaller data set
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=_raise):
            skipped["hidden"] += sum(1 for d in dirnames if d.startswith("."))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if name.startswith("."):
                    skipped["hidden"] += 1
                    continue
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped["not an image"] += 1
                    continue
                try:
                    size = p.stat().st_size
                except OSError:
                    skipped["unreadable"] += 1
                    continue
                if size == 0:
                    skipped["empty"] += 1
                else:
                    files.append(p)
        self.files = sorted(files)
        what = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        if what:
            warnings.warn(f"{self.root}: skipped {sum(skipped.values())} file(s): {what}", stacklevel=2)
        if not self.files:
            raise NoImagesError(f"no images found in {self.root}" + (f" (skipped {what})" if what else ""))
        if check:
            with ThreadPoolExecutor(max_workers=4) as pool:
                bad = [b for b in pool.map(_check_file, self.files) if b]
            if bad:
                more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
                raise ValueError(f"{len(bad)} damaged image(s) in {self.root}: " + "; ".join(bad[:10]) + more)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return decode_image(self.files[i], self.resolution, self.channels), -1
        except Exception as e:
            raise ValueError(f"cannot read image {self.files[i]}: {e}") from None


class PairedFolderDataset(TensorImageDataset):
    """Training pairs for a conditional run (SR3): `root`/input/ holds the degraded images y, at the task's
    degraded size (`input_shape` (c, h, w), e.g. 7x7 for sr4 on 28x28, as `ddpm degrade` writes them), and
    `root`/target/ the clean ones at [channels, resolution, resolution], under the same file names. Nothing is
    resized or cropped: a name on one side only, or an image of another size, is a ValueError naming the file.
    Both are read into memory: `images` uint8 [N, C, R, R] (the targets), `inputs` uint8 [N, c, h, w], labels -1;
    files in sorted name order. Colours as `ImageFolderDataset` (one channel: the ITU-R 601 luma)."""

    def __init__(self, root: str | Path, resolution: int, channels: int, input_shape: tuple[int, int, int]):
        from PIL import Image

        root = Path(root)
        sides = {}
        for side in ("input", "target"):
            folder = root / side
            if not folder.is_dir():
                raise FileNotFoundError(f"paired data {root}: no folder {folder} (pairs are input/ and target/ "
                                        "images under the same file names)")
            sides[side] = {p.name: p for p in folder.iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}
        for side, other in (("input", "target"), ("target", "input")):
            lone = sorted(set(sides[side]) - set(sides[other]))
            if lone:
                more = f" (and {len(lone) - 1} more)" if len(lone) > 1 else ""
                raise ValueError(f"paired data: {sides[side][lone[0]]} has no {other} of the same name in "
                                 f"{root / other}{more}")
        names = sorted(sides["target"])
        if not names:
            raise NoImagesError(f"paired data {root}: no images in {root / 'target'}")

        def read(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
            try:
                with Image.open(path) as img:
                    img.load()
                    rgb = to_rgb8(img)
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
            c, h, w = shape
            if rgb.shape[:2] != (h, w):
                raise ValueError(f"paired data: {path} is {rgb.shape[0]}x{rgb.shape[1]}, but {path.parent.name}/ "
                                 f"images must be {h}x{w} (H x W; nothing is resized)")
            return to_channels(rgb, c)

        targets = [read(sides["target"][n], (channels, resolution, resolution)) for n in names]
        inputs = [read(sides["input"][n], tuple(input_shape)) for n in names]
        super().__init__(torch.stack(targets))
        self.inputs = torch.stack(inputs)
        self.names = names


# LMDB refuses a second open of the same files in one process, and an environment must not be used across
# a fork; so each process keeps one read-only environment per LMDB, shared by all datasets and threads.
_LMDB_ENVS: dict[str, tuple[int, object]] = {}  # real path -> (pid that opened it, lmdb.Environment)
_LMDB_LOCK = threading.Lock()


def _reset_lmdb_lock() -> None:
    global _LMDB_LOCK
    _LMDB_LOCK = threading.Lock()  # a fork while another thread held the lock must not deadlock the child


os.register_at_fork(after_in_child=_reset_lmdb_lock)


def _lmdb_env(path: Path):
    """This process's read-only environment for the LMDB folder `path` (opened on first use)."""
    import lmdb

    key = os.path.realpath(path)
    with _LMDB_LOCK:
        pid, env = _LMDB_ENVS.get(key, (None, None))
        if pid != os.getpid():
            if env is not None:
                env.close()  # inherited through a fork: the child's copy is closed, the parent's stays open
            # lock=False: LSUN is read-only; readahead=False: random access over a file larger than memory
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False)
            _LMDB_ENVS[key] = (os.getpid(), env)
        return env


class LmdbImageDataset(torch.utils.data.Dataset):
    """LSUN's LMDB export (keys -> encoded WebP/JPEG/PNG bytes) as uint8 [channels, R, R], label -1.

    Keys are listed once at init (in LMDB's sorted order); entries are decoded, centre-cropped and resized
    like `ImageFolderDataset` when read, so a damaged entry is an error naming its key. The environment is
    opened read-only, without locking or readahead, lazily and once per process (`_lmdb_env`); the dataset
    holds only the path and keys, so DataLoader workers started by fork, spawn or forkserver each open
    their own.
    """

    def __init__(self, path: str | Path, resolution: int, channels: int = 3):
        self.path, self.resolution, self.channels = Path(path), resolution, channels
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"LSUN LMDB not found at {self.path}: pass --data with the <category>_train_lmdb "
                                    "folder (holding data.mdb) of the LSUN export, or a folder of images")
        with _lmdb_env(self.path).begin(write=False) as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))  # keys only: no image reads
        if not self.keys:
            raise ValueError(f"LMDB {self.path} holds no images")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with _lmdb_env(self.path).begin(write=False) as txn:
            data = txn.get(self.keys[i])
        if data is None:
            raise ValueError(f"LMDB {self.path} has no entry {self.keys[i]!r} any more (changed since it was listed)")
        try:
            return decode_image(bytes(data), self.resolution, self.channels), -1
        except Exception as e:
            raise ValueError(f"cannot decode LMDB entry {self.keys[i]!r} of {self.path}: {e}") from None


# ---------------------------------------------------------------------------------------------- choosing one

def build_dataset(
    name: DatasetKind | str, path: str | None, resolution: int, split: str = "train", channels: int = 3,
    input_shape: tuple[int, int, int] | None = None,
) -> torch.utils.data.Dataset:
    """The dataset a run trains on; each item is (uint8 image [C, H, W], int label, -1 when none).

    "digits": the bundled 8x8 digits (`path` and `resolution` ignored, [1, 8, 8]); "cifar10": `load_cifar10`
    ([3, 32, 32], `split` "train" or "test"); "idx": `load_idx` (MNIST-like [1, 28, 28] with labels, `split`
    "train" or "test"); "folder": `ImageFolderDataset`; "lmdb": `LmdbImageDataset`, or `ImageFolderDataset`
    when `path` is a folder of images rather than an LMDB; "pairs": `PairedFolderDataset` (its input/ images
    [input_shape], the training split only).
    """
    kind = parse_enum(DatasetKind, name, "data.dataset")
    if kind is DatasetKind.DIGITS:
        images, labels = load_digits(split)
        return TensorImageDataset(images, labels)
    if not path:
        help_ = {DatasetKind.CIFAR10: f": {_CIFAR_HELP}",
                 DatasetKind.IDX: ": a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                                  "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not)"}
        raise FileNotFoundError(f"data.dataset {kind.value!r} needs --data PATH" + help_.get(kind, ""))
    if kind is DatasetKind.CIFAR10:
        images, labels = load_cifar10(path, split)
        return TensorImageDataset(images, labels)
    if kind is DatasetKind.IDX:
        images, labels = load_idx(path, split)
        # the images are used as they are (no resizing): a network of another size is a configuration error
        if (channels, resolution) != (1, images.shape[-1]) or images.shape[-2] != images.shape[-1]:
            raise ValueError(f"the IDX images in {path} are 1 x {images.shape[-2]} x {images.shape[-1]}: set "
                             f"model.in_channels=1 and model.resolution={images.shape[-1]} (got {channels} and "
                             f"{resolution})")
        return TensorImageDataset(images, labels)
    p = Path(path)
    if kind is DatasetKind.PAIRS:
        if split != "train":
            raise ValueError(f"paired data {p} (input/ and target/) is a training set: it has no {split} split")
        if input_shape is None:
            raise ValueError("paired data needs the input/ images' shape: data.task's degraded size")
        return PairedFolderDataset(p, resolution, channels, input_shape)
    if kind is DatasetKind.LMDB and not (p / "data.mdb").is_file() and p.is_dir():
        try:
            return ImageFolderDataset(p, resolution, channels)
        except NoImagesError:
            raise NoImagesError(f"{p} is neither an LMDB (no data.mdb) nor a folder of images: pass --data with the "
                             "LSUN <category>_train_lmdb folder or a folder of images") from None
    if kind is DatasetKind.LMDB:
        return LmdbImageDataset(p, resolution, channels)
    return ImageFolderDataset(p, resolution, channels)


def check_enough(dataset, batch_size: int, source: str) -> None:
    """Fewer images than one batch is an error (raised at once, never a hang)."""
    if len(dataset) < batch_size:
        raise ValueError(f"{source} holds {len(dataset)} images, fewer than one batch of {batch_size}")
