"""Datasets: digits, CIFAR-10 archives, image folders full of bad files, LMDB; every error names its file."""

import io
import os
import pickle
import struct
import tarfile
import time
import warnings
import zlib
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
    to_rgb8,
    to_uint8,
)
from ddpm.images import ImageMismatchError, read_input_image


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sk_load_digits

    import ddpm.data as data

    bunch = sk_load_digits()
    levels, labels = data._digits_levels()
    np.testing.assert_array_equal(levels, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    # a `ddpm` process that loads the digits never imports scikit-learn (1.6-1.8 s of every start)
    probe = "import sys; from ddpm.data import load_digits; load_digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
    # without the file in that layout: scikit-learn's loader, the same arrays
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    fallback = data._digits_levels()
    np.testing.assert_array_equal(fallback[0], levels)
    np.testing.assert_array_equal(fallback[1], labels)


def test_digits_split_and_levels():
    tr, ytr = load_digits("train")
    te, yte = load_digits("test")
    assert tr.shape == (899, 1, 8, 8) and te.shape == (898, 1, 8, 8) and tr.dtype == torch.uint8
    levels = set(torch.unique(torch.cat([tr, te])).tolist())
    assert levels <= {round(v * 255 / 16) for v in range(17)} and 255 in levels and 0 in levels
    all_images, all_labels = load_digits("all")
    assert all_images.shape[0] == 1797 == tr.shape[0] + te.shape[0]

    def rows(x, y):  # each image with its label as one sortable tuple
        return sorted(tuple(r) for r in torch.cat([x.flatten(1).long(), y[:, None]], 1).tolist())

    # the halves partition the whole: together they are exactly the 1,797 (image, label) pairs, so no index
    # is in both (digits holds a few duplicate images, which is why this compares multisets, not sets)
    assert rows(torch.cat([tr, te]), torch.cat([ytr, yte])) == rows(all_images, all_labels)
    assert set(ytr.tolist()) == set(yte.tolist()) == set(range(10))
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
    xt, yt = load_cifar10(archive, "test")
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [int(v) for v in batches["test_batch"][b"labels"]]
    only_archive = tmp_path / "only"
    only_archive.mkdir()
    archive.rename(only_archive / archive.name)  # a folder holding just the archive
    assert torch.equal(load_cifar10(only_archive, "train")[0], x)


def test_cifar10_batch_of_the_wrong_shape_names_the_file(tmp_path):
    folder, _, _ = _fake_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(ValueError, match=r"test_batch: data must be uint8 \[n, 3072\]"):
        load_cifar10(folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}))
    with pytest.raises(ValueError, match="test_batch: 4 images but labels"):
        load_cifar10(folder, "test")


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_cifar10_malicious_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    _, archive, _ = _fake_cifar(tmp_path / "d", malicious={b"data": _Evil(sentinel)})
    with pytest.raises(ValueError, match=r"data_batch_3: refusing to load posix\.system"):
        load_cifar10(archive, "train")
    with pytest.raises(ValueError, match=r"data_batch_3: refusing to load posix\.system"):
        load_cifar10(tmp_path / "d" / "cifar-10-batches-py", "train")
    assert not sentinel.exists()
    load_cifar10(archive, "test")  # the clean test batch of the same archive still loads


def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset("folder", str(tmp_path / "nope"), 32)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        build_dataset("cifar10", None, 32)
    with pytest.raises(FileNotFoundError, match="_train_lmdb"):
        LmdbImageDataset(tmp_path, 32)
    with pytest.raises(FileNotFoundError, match="nope.*_train_lmdb"):
        build_dataset("lmdb", str(tmp_path / "nope"), 32)
    with pytest.raises(ValueError, match="neither an LMDB"):
        build_dataset("lmdb", str(tmp_path), 32)  # an existing folder with neither data.mdb nor images
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
    message = str(record[0].message)
    assert len(record) == 1 and "skipped 4 file(s): 2 hidden, 1 not an image, 1 empty" in message  # .hidden.png and
    # .cache/ are hidden, notes.txt is not an image, empty.png is empty
    assert [p.relative_to(root).as_posix() for p in ds.files] == ["a.PNG", "c.jpg", "nested/deeper/b.webp"]
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == -1
    assert img[:, 8, 8].tolist() == [200, 10, 10]
    for i, colour in [(1, (10, 10, 200)), (2, (10, 200, 10))]:  # lossy JPEG and WebP: within a few levels
        assert (ds[i][0][:, 8, 8].long() - torch.tensor(colour)).abs().max() <= 3
    with ThreadPoolExecutor(2) as pool:  # the trainer reads items from a thread pool
        assert [x[0].shape for x in pool.map(ds.__getitem__, range(3))] == [(3, 16, 16)] * 3


def test_dangling_link_is_skipped_and_counted(tmp_path):
    _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "real.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.warns(UserWarning, match="skipped 1 file\\(s\\): 1 unreadable"):
        ds = ImageFolderDataset(tmp_path, 8)
    assert [p.name for p in ds.files] == ["real.png"]


def test_many_damaged_files_are_listed_up_to_ten(tmp_path):
    for i in range(12):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(tmp_path, 8)
    message = str(info.value)
    assert message.startswith(f"12 damaged image(s) in {tmp_path}") and message.endswith(" and 2 more")
    assert "bad09.png" in message and "bad10.png" not in message


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
    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert read_image(_save(red, tmp_path / "red.tif"), 8)[:, 0, 0].tolist() == [255, 0, 0]
    assert read_image(gray, 8, channels=1)[:, 0, 0].tolist() == [77]
    assert read_image(_save(red, tmp_path / "red.tif"), 8, channels=1)[:, 0, 0].tolist() == [76]  # 0.299 * 255

    # a palette with a transparent index and a half-transparent grey: composited onto white
    pt = Image.new("P", (8, 8), 0)
    pt.putpalette([10, 20, 30] * 256)
    assert read_image(_save(pt, tmp_path / "pt.png", transparency=0), 8)[:, 0, 0].tolist() == [255, 255, 255]
    la = Image.new("LA", (8, 8), (0, 128))
    assert read_image(_save(la, tmp_path / "la.png"), 8)[:, 0, 0].tolist() == [127, 127, 127]  # 255 * (1 - 128 / 255)


def test_16_bit_images_keep_their_gradations(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)  # [256]
    expected = np.round(ramp / 257).astype(np.uint8)
    for mode in ("I;16", "I;16B"):
        img = Image.frombytes(mode, (256, 1), ramp.astype("<u2" if mode == "I;16" else ">u2").tobytes())
        assert img.mode == mode
        np.testing.assert_array_equal(to_rgb8(img)[0, :, 1], expected)
        np.testing.assert_array_equal(to_rgb8(img)[0, :, 0], to_rgb8(img)[0, :, 2])
    np.testing.assert_array_equal(to_rgb8(Image.fromarray(ramp[None].astype(np.int32)))[0, :, 0], expected)  # "I"
    assert len(np.unique(np.asarray(Image.frombytes("I;16", (256, 1), ramp.tobytes()).convert("RGB")))) <= 2

    def png_rgb16(arr):  # a 48-bit RGB PNG, chunk by chunk ([H, W, 3] uint16)
        h, w, _ = arr.shape
        raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

    (tmp_path / "rgb16.png").write_bytes(png_rgb16(np.stack([np.tile(ramp, (256, 1))] * 3, -1)))
    x = read_image(tmp_path / "rgb16.png", 256)
    assert len(torch.unique(x[2, 0])) >= 200
    assert np.abs(x[2, 0].numpy().astype(int) - expected).max() <= 1


def test_center_crop_and_resize(tmp_path):
    arr = np.zeros((32, 48, 3), dtype=np.uint8)
    arr[:, :8] = (255, 0, 0)  # a red band at the left edge, outside the centre square
    x = read_image(_save(Image.fromarray(arr), tmp_path / "wide.png"), 16)
    assert x.shape == (3, 16, 16) and x[0].max() == 0
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(_save(Image.fromarray(same), tmp_path / "s.png"), 16).permute(1, 2, 0).numpy(), same)


def test_input_images_are_checked_not_resized(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    path = _save(Image.fromarray(rgb), tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_input_image(path, 6, 3).permute(1, 2, 0).numpy(), rgb)
    with pytest.raises(ImageMismatchError, match=r"--a .*rgb.png is 6x6 \(H x W, 3 channels RGB\), but the run takes "
                                                 r"8x8 images: resize or crop it to 8x8 first"):
        read_input_image(path, 8, 3, "--a")
    with pytest.raises(ImageMismatchError, match="in colour, but a 1-channel"):  # no silent luma
        read_input_image(path, 6, 1)
    gray = np.repeat(rgb[..., :1], 3, axis=2)  # an RGB file with R = G = B is a gray image
    assert read_input_image(_save(Image.fromarray(gray), tmp_path / "g.png"), 6, 1).tolist() == [gray[..., 0].tolist()]
    assert read_input_image(_save(Image.new("L", (6, 6), 9), tmp_path / "l.png"), 6, 3).unique().tolist() == [9]
    with pytest.raises(FileNotFoundError, match="--mask .*nope.png"):
        read_input_image(tmp_path / "nope.png", 6, 1, "--mask")


def test_empty_folder_and_too_few_images(tmp_path):
    (tmp_path / "empty").mkdir()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"no images found in {tmp_path / 'empty'}"):
        ImageFolderDataset(tmp_path / "empty", 8)
    assert time.perf_counter() - start < 2.0
    (tmp_path / "junk" / ".git").mkdir(parents=True)
    (tmp_path / "junk" / "readme.md").write_text("no pictures")
    (tmp_path / "junk" / "zero.png").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no images found in .*junk \(skipped 1 hidden"):
        build_dataset("folder", str(tmp_path / "junk"), 8)
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
