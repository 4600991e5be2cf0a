"""Datasets: digits, CIFAR-10 archives, image folders full of bad files, LMDB; every error names its file."""

import io
import os
import pickle
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import (
    ImageFolderDataset,
    LmdbImageDataset,
    build_dataset,
    check_enough,
    load_cifar10,
    load_digits,
    read_image,
    to_model_range,
    to_uint8,
)


def test_digits_split_and_levels():
    tr, ytr = load_digits("train")
    te, yte = load_digits("test")
    assert tr.shape == (899, 1, 8, 8) and te.shape == (898, 1, 8, 8) and tr.dtype == torch.uint8
    levels = set(torch.unique(torch.cat([tr, te])).tolist())
    assert levels <= {round(v * 255 / 16) for v in range(17)} and 255 in levels and 0 in levels
    all_images, _ = load_digits("all")
    assert all_images.shape[0] == 1797
    flat = {tuple(x.flatten().tolist()) for x in tr}
    assert not any(tuple(x.flatten().tolist()) in flat for x in te[:200])  # disjoint halves (digits has few duplicates)
    assert torch.equal(load_digits("train")[0], tr)
    assert torch.equal(to_uint8(to_model_range(tr)), tr)


def _fake_cifar(root, malicious=None):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        obj = {b"data": data, b"labels": list(rng.integers(0, 10, 4))}
        if malicious and name == "data_batch_3":
            obj = malicious
        (folder / name).write_bytes(pickle.dumps(obj))
        batches[name] = obj
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return folder, archive, batches


def test_cifar10_archive_and_folder(tmp_path):
    folder, archive, batches = _fake_cifar(tmp_path)
    for source in (archive, folder, tmp_path):
        x, y = load_cifar10(source, "train")
        assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (20,)
        row = batches["data_batch_1"][b"data"][1]
        # official layout: 1024 red, then green, then blue values, row-major
        assert x[1, 0, 0, 5].item() == row[5] and x[1, 1, 2, 0].item() == row[1024 + 64] and x[1, 2, 31, 31].item() == row[3071]
    xt, _ = load_cifar10(archive, "test")
    assert xt.shape == (4, 3, 32, 32)


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_cifar10_malicious_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    _, archive, _ = _fake_cifar(tmp_path / "d", malicious={b"data": _Evil(sentinel)})
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(archive, "train")
    assert not sentinel.exists()


def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset("folder", str(tmp_path / "nope"), 32)
    with pytest.raises(FileNotFoundError, match="_train_lmdb"):
        LmdbImageDataset(tmp_path, 32)
    with pytest.raises(ValueError, match="data.dataset must be one of"):
        build_dataset("imagenet", None, 32)


def _save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_image_folder_with_bad_files(tmp_path):
    root = tmp_path / "imgs"
    _save(Image.new("RGB", (40, 30), (200, 10, 10)), root / "a.PNG")
    _save(Image.new("RGB", (32, 32), (10, 200, 10)), root / "nested" / "deeper" / "b.webp")
    _save(Image.new("RGB", (32, 32), (10, 10, 200)), root / "c.jpg")
    _save(Image.new("RGB", (32, 32)), root / ".hidden.png")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    _save(Image.new("RGB", (8, 8)), root / ".cache" / "x.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (root / "broken.jpg").write_bytes(buf.getvalue()[:200])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="broken.jpg"):
            ImageFolderDataset(root, 16)
    (root / "broken.jpg").unlink()
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(root, 16)
    assert len(record) == 1 and "skipped 4" in str(record[0].message)  # .hidden.png, .cache/, empty.png, notes.txt
    assert len(ds) == 3
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == -1


def test_modes_become_rgb8_with_their_levels(tmp_path):
    ramp16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (256, 1))
    p16 = _save(Image.fromarray(ramp16), tmp_path / "ramp16.png")
    assert Image.open(p16).mode.startswith("I")
    x = read_image(p16, 256)
    assert x.shape == (3, 256, 256)
    assert len(torch.unique(x[0, 0])) >= 200  # a plain convert("RGB") leaves two levels
    np.testing.assert_array_equal(x[0, 0].numpy(), np.round(ramp16[0] / 257).astype(np.uint8))

    gray = _save(Image.new("L", (8, 8), 77), tmp_path / "g.png")
    assert read_image(gray, 8)[:, 0, 0].tolist() == [77, 77, 77]
    pal = Image.new("P", (8, 8))
    pal.putpalette([10, 20, 30] * 256)
    assert read_image(_save(pal, tmp_path / "p.png"), 8)[:, 0, 0].tolist() == [10, 20, 30]
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert read_image(_save(rgba, tmp_path / "t.png"), 8)[:, 0, 0].tolist() == [255, 255, 255]  # onto white
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    assert read_image(_save(cmyk, tmp_path / "c.jpg", quality=100), 8)[:, 0, 0].tolist() == [255, 255, 255]
    assert read_image(gray, 8, channels=1).shape == (1, 8, 8)


def test_center_crop_and_resize(tmp_path):
    arr = np.zeros((32, 48, 3), dtype=np.uint8)
    arr[:, :8] = (255, 0, 0)  # a red band at the left edge, outside the centre square
    x = read_image(_save(Image.fromarray(arr), tmp_path / "wide.png"), 16)
    assert x.shape == (3, 16, 16) and x[0].max() == 0
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(_save(Image.fromarray(same), tmp_path / "s.png"), 16).permute(1, 2, 0).numpy(), same)


def test_empty_folder_and_too_few_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="holds 899 images, fewer than one batch of 1000"):
        check_enough(build_dataset("digits", None, 8), 1000, "digits")


def test_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(tmp_path / "church_train_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, fmt in enumerate(["WEBP", "PNG", "JPEG"]):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            txn.put(f"key{i}".encode(), buf.getvalue())
    env.close()
    ds = build_dataset("lmdb", str(tmp_path / "church_train_lmdb"), 16)
    assert isinstance(ds, LmdbImageDataset) and ds.keys == [b"key0", b"key1", b"key2"] and len(ds) == 3
    img, label = ds[1]
    assert img.shape == (3, 16, 16) and img[0, 8, 8].item() == 80 and label == -1
    assert ds[0][0][0, 8, 8].item() == 0  # lossless webp

    # a second dataset on the same files in this process (LMDB refuses a second open of them)
    again = pickle.loads(pickle.dumps(LmdbImageDataset(tmp_path / "church_train_lmdb", 8, channels=1)))
    assert again[1][0].shape == (1, 8, 8)
    with ThreadPoolExecutor(3) as pool:
        assert [x[0][0, 4, 4].item() for x in pool.map(again.__getitem__, [2, 1, 0])] == [48, 24, 0]  # luma of red
    # a forked DataLoader worker after the parent has read: it opens its own environment
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, multiprocessing_context="fork")
    (batch, labels), = list(loader)
    assert batch[:, 0, 8, 8].tolist() == [0, 80, 160] and labels.tolist() == [-1, -1, -1]


def test_lmdb_name_accepts_a_folder_of_images(tmp_path):
    _save(Image.new("RGB", (12, 12), (9, 9, 9)), tmp_path / "x.png")
    ds = build_dataset("lmdb", str(tmp_path), 12)
    assert isinstance(ds, ImageFolderDataset) and ds[0][0][:, 0, 0].tolist() == [9, 9, 9]
