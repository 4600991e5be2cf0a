"""Real images on a laptop: the IDX reader (files written here, well-formed and malformed), the `idx` dataset
kind and the fashion / mnist presets, the upscaled grids, and the Fashion-MNIST evaluation on the real data when
Debian's dataset-fashion-mnist is installed (skipped otherwise)."""

import dataclasses
import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.config import ConfigError, apply_overrides, preset
from ddpm.data import build_dataset, idx_files, load_idx, read_idx
from ddpm.images import MIN_GAP, grid_image, grid_scale, save_grid
from ddpm.modes import DatasetKind, LossType, MeanType, VarType

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason=f"no {FASHION}: install Debian's package dataset-fashion-mnist "
                                 "(apt-get install dataset-fashion-mnist) to run the real-data tests")
SRC = Path(__file__).resolve().parent.parent / "src"
CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, gz: bool = False, code: int | None = None, magic: bytes = b"\0\0",
              cut: int = 0) -> Path:
    """`array` as an IDX file (big-endian, as LeCun's files are), optionally gzipped, with a chosen type code or
    magic, or `cut` bytes short."""
    be = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    head = magic + bytes([CODES[be.dtype] if code is None else code, array.ndim])
    raw = head + struct.pack(f">{array.ndim}I", *array.shape) + be.tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def fake_idx_folder(root: Path, n_train: int = 6, n_test: int = 4, gz_train: bool = True, gz_test: bool = False,
                    size: int = 28) -> Path:
    """The four files of an MNIST-like data set with random images and labels (train gzipped, test plain)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", n_train, gz_train), ("t10k", n_test, gz_test)):
        suffix = ".gz" if gz else ""
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n, dtype=np.uint8), gz)
    return root


# ---------------------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip_every_type(tmp_path, gz):
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"):
        a = (rng.normal(size=(3, 5, 2)) * 100).astype(dtype)
        got = read_idx(write_idx(tmp_path / f"a{np.dtype(dtype).str[1:]}", a, gz))
        assert got.dtype.isnative and got.shape == (3, 5, 2)
        np.testing.assert_array_equal(got, a.astype(np.dtype(dtype).newbyteorder("=")))
        got[0, 0, 0] = 1  # a writable copy, not a view of the file's bytes
    assert read_idx(write_idx(tmp_path / "big", np.array([1, 256, 65536], dtype=">i4"), gz)).tolist() == [1, 256, 65536]


def test_malformed_idx_files_are_errors_naming_the_file(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    cases = [
        (write_idx(tmp_path / "magic", images, magic=b"\x01\x00"), "is not an IDX file"),
        (write_idx(tmp_path / "magic.gz", images, gz=True, magic=b"PK"), "is not an IDX file"),
        (write_idx(tmp_path / "code", images, code=0x07), "unknown IDX type code 0x07"),
        (write_idx(tmp_path / "data_cut", images, cut=10),
         "is truncated: shape (4, 28, 28) needs 3136 bytes of data, the file has 3126"),
        (write_idx(tmp_path / "data_cut.gz", images, gz=True, cut=1), "is truncated"),
        (write_idx(tmp_path / "header_cut", images, cut=3136 + 5), "is truncated: its header needs 16 bytes"),
        (write_idx(tmp_path / "long", np.zeros((2, 3), np.uint8)), None),  # fine; made longer below
    ]
    long_path = cases.pop()[0]
    long_path.write_bytes(long_path.read_bytes() + b"\0\0")
    cases.append((long_path, "2 bytes after the data of shape (2, 3)"))
    zero = tmp_path / "zero_dims"
    zero.write_bytes(b"\0\0\x08\0")
    cases.append((zero, "declares 0 dimensions"))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    cases.append((empty, "an empty file"))
    gz_cut = tmp_path / "stream_cut.gz"  # the gzip stream itself cut short
    gz_cut.write_bytes(gzip.compress(b"\0\0\x08\x01" + struct.pack(">I", 1000) + bytes(1000))[:-12])
    cases.append((gz_cut, "damaged gzip stream"))
    for path, message in cases:
        with pytest.raises(ValueError) as e:
            read_idx(path)
        assert str(path) in str(e.value) and message in str(e.value), (path.name, str(e.value))


def test_load_idx_checks_images_labels_and_counts(tmp_path):
    root = fake_idx_folder(tmp_path / "d", n_train=6, n_test=4)
    x, y = load_idx(root, "train")
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64 and y.shape == (6,)
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    np.testing.assert_array_equal(x[:, 0].numpy(), np.frombuffer(raw[16:], np.uint8).reshape(6, 28, 28))
    xt, _ = load_idx(root, "test")  # the plain files
    assert xt.shape == (4, 1, 28, 28)
    # a plain file beside its .gz: the plain one is read
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), gz=True)
    assert idx_files(root, "test")[1].name == "t10k-labels-idx1-ubyte"

    labels = root / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="holds 5 labels but .*t10k-images-idx3-ubyte holds 4 images") as e:
        load_idx(root, "test")
    assert str(labels) in str(e.value)
    write_idx(labels, np.zeros(4, ">i4"))
    with pytest.raises(ValueError, match="labels must be unsigned bytes"):
        load_idx(root, "test")
    write_idx(labels, np.zeros(4, np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((4, 784), np.uint8))
    with pytest.raises(ValueError, match=r"images must be unsigned bytes \[N, H, W\]"):
        load_idx(root, "test")

    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_idx(root, "train")
    msg = str(e.value)
    assert str(root) in msg and "no train-labels-idx1-ubyte or train-labels-idx1-ubyte.gz" in msg
    assert "t10k-images-idx3-ubyte[.gz]" in msg and "dataset-fashion-mnist" in msg
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_idx(root, "val")


def test_the_idx_kind_through_build_dataset(tmp_path):
    root = fake_idx_folder(tmp_path / "d")
    ds = build_dataset("idx", str(root), 28, "train", 1)
    x, label = ds[2]
    assert len(ds) == 6 and x.shape == (1, 28, 28) and x.dtype == torch.uint8 and 0 <= label < 10
    assert torch.equal(x, load_idx(root, "train")[0][2])
    assert len(build_dataset(DatasetKind.IDX, str(root), 28, "test", 1)) == 4
    with pytest.raises(ValueError, match="model.in_channels=1 and model.resolution=28"):
        build_dataset("idx", str(root), 32, "train", 1)
    with pytest.raises(ValueError, match="model.in_channels=1"):
        build_dataset("idx", str(root), 28, "train", 3)
    with pytest.raises(FileNotFoundError, match="needs --data PATH: a folder holding train-images-idx3-ubyte.gz"):
        build_dataset("idx", None, 28)


# ---------------------------------------------------------------------------------------------- presets


def test_the_fashion_and_mnist_presets(tmp_path, capsys):
    for name in ("fashion", "mnist"):
        cfg = preset(name)
        m, d = cfg.model, cfg.diffusion
        assert (m.in_channels, m.resolution, cfg.data.dataset, cfg.data.hflip) == (1, 28, DatasetKind.IDX, False)
        assert m.attn_resolutions == (7,) and m.ch_mult == (1, 2, 2)  # 28 -> 14 -> 7
        # the paper's diffusion, unchanged
        assert (d.num_timesteps, d.schedule, d.mean_type, d.var_type, d.loss_type) == (
            1000, "linear", MeanType.EPS, VarType.FIXED_LARGE, LossType.SIMPLE)
        assert apply_overrides(preset(name), ["model.num_classes=10"]).model.num_classes == 10
        assert cfg.train.sample_every == cfg.train.steps  # one grid, after the last step
        # 30 minutes on any CPU: stopped by the clock, with an EMA that is good wherever it stops
        assert (cfg.train.minutes, cfg.train.ema_warmup) == (29.0, True)
    assert preset("fashion").data.path == str(FASHION) and preset("mnist").data.path is None
    with pytest.raises(ConfigError, match="attn_resolutions"):
        apply_overrides(preset("fashion"), ["model.attn_resolutions=8"])

    # two steps of `ddpm train --preset fashion` on a folder written here, narrowed for the test
    root = fake_idx_folder(tmp_path / "d", n_train=8)
    run = tmp_path / "run"
    assert main(["train", "--preset", "fashion", "--data", str(root), "--run", str(run), "--steps", "2",
                 "--batch-size", "4", "--set", "train.sample_every=0", "--quiet"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == {"dataset": "idx", "path": str(root), "hflip": False, "num_workers": 0, "task": None,
                             "mask": None}
    # mnist has no default folder: the error says what to pass
    capsys.readouterr()
    assert main(["train", "--preset", "mnist", "--run", str(tmp_path / "m"), "--steps", "1", "--quiet"]) == 2
    assert "data.dataset 'idx' needs --data PATH" in capsys.readouterr().err

    # eval fid --features fashion checks its data folder before a sample is drawn
    assert main(["eval", "fid", "--run", str(run), "--features", "fashion", "--n", "4", "--data",
                 str(tmp_path / "nowhere"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "train-images-idx3-ubyte" in err and not (run / "eval").exists()
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((4, 28, 28, 1), np.uint8))
    assert main(["eval", "fid", "--samples", str(samples), "--features", "fashion"]) == 2
    assert "--features fashion needs the Fashion-MNIST IDX folder: pass --data DIR" in capsys.readouterr().err
    digits_run = tmp_path / "digits"
    assert main(["train", "--run", str(digits_run), "--steps", "1", "--batch-size", "4", "--set",
                 "train.sample_every=0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "fid", "--run", str(digits_run), "--features", "fashion", "--n", "4"]) == 2
    assert "scores 1-channel 28x28 images" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- grids


def test_grids_are_upscaled_with_gaps(tmp_path):
    # (n, nrow, h, w) -> (side, factor, gap): at least 256 pixels a side, integer factors, 2-pixel gaps at least
    cases = {(64, 8, 8, 8): (274, 4, 2), (64, 8, 28, 28): (466, 2, 2), (64, 8, 32, 32): (274, 1, 2),
             (1, 1, 8, 8): (262, 31, 7), (16, 4, 64, 64): (266, 1, 2)}
    for (n, nrow, h, w), (side, factor, gap) in cases.items():
        assert grid_scale(n, nrow, h, w) == (factor, gap)
        x = torch.rand(n, 1, h, w) * 2 - 1
        path = save_grid(x, tmp_path / f"{n}_{h}.png", nrow=nrow)
        img = np.asarray(Image.open(path))
        assert img.shape == (side, side), (n, h, img.shape)
    # nearest neighbour: every source pixel is a factor x factor block; the gaps are white
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    f, gap = grid_scale(4, 2, 8, 8)
    img = grid_image(x, nrow=2)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    cell = img[gap : gap + 8 * f, 2 * gap + 8 * f : 2 * gap + 16 * f]  # row 0, column 1: image 1
    np.testing.assert_array_equal(cell, np.kron(u8[1, 0], np.ones((f, f), np.uint8)))
    assert (img[:gap] == 255).all() and (img[:, gap + 8 * f : 2 * gap + 8 * f] == 255).all() and gap >= MIN_GAP
    # RGB stays RGB; a long strip is capped on its long side
    assert grid_image(torch.zeros(2, 3, 8, 8)).shape[2] == 3
    strip = grid_image(torch.zeros(100, 1, 8, 8), nrow=100)
    assert strip.shape[1] <= 4096 and strip.shape[0] >= 8 * 4


# ---------------------------------------------------------------------------------------------- real data


@needs_fashion
def test_the_reader_on_the_real_fashion_mnist():
    x, y = load_idx(FASHION, "train")
    xt, yt = load_idx(FASHION, "test")
    assert x.shape == (60_000, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert len(build_dataset("idx", str(FASHION), 28, "test", 1)) == 10_000


@needs_fashion
def test_the_evaluation_scores_real_images_near_the_floor_and_noise_far_from_it(tmp_path, capsys):
    from ddpm.metrics.fashion import evaluate_fashion

    test, _ = load_idx(FASHION, "test")
    n = 300
    real = evaluate_fashion(test[-n:], FASHION)  # the classifier from the user's cache (built once, ~30 s)
    rng = np.random.default_rng(0)
    noise = evaluate_fashion(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), FASHION)
    with capsys.disabled():
        print(f"\nfashion, n={n}: real test images {real}\nuniform noise {noise}")
    assert 0.85 <= real.test_accuracy <= 0.9 and real.floor == noise.floor
    assert 0.5 < real.ratio < 1.5 and noise.ratio > 50
    assert abs(real.precision - real.floor_precision) < 0.06 and abs(real.recall - real.floor_recall) < 0.06
    assert min(real.precision, real.recall, real.floor_precision, real.floor_recall) > 0.85
    # the noise's features are one tight cluster: no real image lies in its balls; its precision is not
    # asserted (the whole cluster falls in or out of one outlying real image's ball, 0.04 to 0.99 with n)
    assert noise.recall < 0.02 and noise.confident_fraction < 0.02
    assert sum(real.class_histogram) == n and max(real.class_histogram) < 0.2 * n  # test images: balanced classes
    assert max(noise.class_histogram) > 0.4 * n

    # the command: JSON and a grid of the first 64 samples beside it
    samples = tmp_path / "s.npz"
    np.savez(samples, test[-100:].permute(0, 2, 3, 1).numpy())
    assert main(["eval", "fid", "--samples", str(samples), "--features", "fashion", "--data", str(FASHION)]) == 0
    report = json.loads((tmp_path / "eval" / "fid_fashion.json").read_text())
    assert report["n"] == 100 and report["ratio"] < 1.5 and len(report["class_histogram"]) == 10
    assert Image.open(tmp_path / "eval" / "fid_fashion.png").size == (8 * 56 + 9 * 2,) * 2


_RACE = """
import sys, time, dataclasses
from ddpm.metrics import fashion
fit = fashion._fit
def counted(*a):
    print("trained", flush=True)
    return fit(*a)
fashion._fit = counted
print("ready", flush=True)
while time.time() < float(sys.argv[3]):  # both processes start building at the same moment
    time.sleep(0.01)
fashion.build_classifier(sys.argv[1], dataclasses.replace(fashion.SETTINGS, n_train=500, epochs=1), sys.argv[2])
"""


@needs_fashion
def test_two_processes_that_need_the_classifier_at_once_train_it_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    start = time.time() + 5  # after both have imported torch (about 2 s each)
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(FASHION), str(tmp_path / "c"), str(start)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert all("ready" in o for o, _ in outs)
    assert sum(o.split().count("trained") for o, _ in outs) == 1  # the second waited on the lock, then read
    assert len(list((tmp_path / "c").iterdir())) == 1


_BUILD = """
import sys, numpy as np, torch
from ddpm.data import load_idx
from ddpm.metrics.fashion import SETTINGS, build_classifier, fashion_outputs
import dataclasses
s = dataclasses.replace(SETTINGS, n_train=2000, epochs=1)
net = build_classifier(sys.argv[1], s, sys.argv[2])
np.save(sys.argv[3], fashion_outputs(load_idx(sys.argv[1], "test")[0][:500], net)[0])
print(torch.backends.cpu.get_cpu_capability())
"""


@needs_fashion
def test_the_classifier_is_the_same_from_scratch_on_other_kernels_and_from_its_cache(tmp_path, monkeypatch):
    from ddpm.metrics import fashion

    small = dataclasses.replace(fashion.SETTINGS, n_train=2000, epochs=1)  # the procedure, at a tenth of the cost
    test, _ = load_idx(FASHION, "test")
    net = fashion.build_classifier(FASHION, small, tmp_path / "a")
    feats = fashion.fashion_outputs(test[:500], net)[0]
    # another build from scratch in a process on torch's scalar kernels and MKL's SSE4.2 code path: what a
    # machine without AVX-512 computes. Summation orders differ; float64 keeps the drift far below 1e-10.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _BUILD, str(FASHION), str(tmp_path / "b"), str(tmp_path / "f.npy")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "DEFAULT"
    other = np.load(tmp_path / "f.npy")
    np.testing.assert_allclose(other, feats, rtol=0, atol=1e-10)
    assert np.abs(feats).max() > 1 and (feats > 0).mean() > 0.2  # real features, not a dead network
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert a.name == b.name  # the same key: the settings and the data, not the machine

    # the cache: read back without training, the same bits; deleted, rebuilt to the same bytes
    monkeypatch.setattr(fashion, "_fit", lambda *args: pytest.fail("trained although the cache holds the weights"))
    cached = fashion.build_classifier(FASHION, small, tmp_path / "a")
    np.testing.assert_array_equal(fashion.fashion_outputs(test[:500], cached)[0], feats)
    monkeypatch.undo()
    saved = a.read_bytes()
    a.unlink()
    fashion.build_classifier(FASHION, small, tmp_path / "a")
    assert a.read_bytes() == saved
    a.write_bytes(saved[:100])  # a damaged cache file is rebuilt, with a warning
    with pytest.warns(UserWarning, match="unreadable cached classifier"):
        fashion.build_classifier(FASHION, small, tmp_path / "a")
    assert a.read_bytes() == saved
