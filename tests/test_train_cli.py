"""End to end through the command: train, checkpoint, resume, sample; exact resume; the errors users meet."""

import json

import numpy as np
import pytest
import torch
from tiny import TINY, losses, perturbed, train_log, train_tiny

from ddpm import load_run
from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.cli import main


def test_train_resume_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--batch-size", "16", "--ckpt-every", "2", *TINY]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["ch"] == 32 and cfg["diffusion"]["num_timesteps"] == 40 and cfg["train"]["batch_size"] == 16
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 4
    # a second train into the same directory without --resume/--force is refused
    assert main(["train", "--out", str(run), "--steps", "6", "--batch-size", "16", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--steps", "6", "--batch-size", "16", "--resume", *TINY]) == 0
    assert load_run(run).step == 6
    assert len(losses(run)) == 6
    assert list((run / "tb").glob("events.out.tfevents*"))

    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", "--run", str(run), "--n", "6", "--out", str(png), "--batch-size", "4", "--quiet"]) == 0
    assert png.stat().st_size > 0
    assert main(["sample", "--run", str(run), "--n", "6", "--out", str(npz), "--batch-size", "4", "--seed", "1", "--quiet"]) == 0
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
    # same seed, another batch size: the same images
    npz2 = tmp_path / "s2.npz"
    assert main(["sample", "--run", str(run), "--n", "6", "--out", str(npz2), "--batch-size", "5", "--seed", "1", "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(npz2)["arr_0"], arr)
    assert not (tmp_path / "s.npz.parts").exists()


def test_resume_is_bitwise_exact_mid_epoch(tmp_path):
    """4 steps + a resume for 3 more == 7 steps at once: weights, EMA, optimizer and per-step losses.
    The digits train split (899) at batch 16 has 56 batches an epoch, so this is mid-epoch; with
    grad_accum 2 and flips on every random stream is exercised."""
    extra = ["--set", "train.grad_accum=2", "--set", "data.hflip=true", "--set", "model.dropout=0.1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), "--steps", "7", "--batch-size", "16", *TINY, *extra]) == 0
    assert main(["train", "--out", str(b), "--steps", "4", "--batch-size", "16", *TINY, *extra]) == 0
    assert main(["train", "--out", str(b), "--steps", "7", "--batch-size", "16", "--resume", *TINY, *extra]) == 0
    ca = load_checkpoint(latest_checkpoint(a / "checkpoints"))
    cb = load_checkpoint(latest_checkpoint(b / "checkpoints"))
    assert ca.step == cb.step == 7
    assert ca.tensors.keys() == cb.tensors.keys()
    assert any(k.startswith("optim/") for k in ca.tensors) and any(k.startswith("ema/") for k in ca.tensors)
    for k in ca.tensors:
        assert torch.equal(ca.tensors[k], cb.tensors[k]), k
    assert losses(a) == losses(b)


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    code = main(["train", "--preset", "cifar10", "--out", str(tmp_path / "r"), "--data", str(missing),
                 "--set", "model.ch=32", "--steps", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "cifar-10-python.tar.gz" in err
    assert not (tmp_path / "r" / "config.json").exists()  # the failed start left no run to refuse the next try


def test_a_data_set_that_fails_to_load_changes_no_run(tmp_path, capsys):
    """--force with a data set that cannot load leaves the run it would replace as it was; the fixed command
    then replaces it."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "2", "--batch-size", "16", *TINY]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*") if p.name != ".lock")
    missing = tmp_path / "nowhere"
    code = main(["train", "--preset", "folder", "--out", str(run), "--data", str(missing), "--steps", "1",
                 "--force", "--quiet"])
    assert code == 2 and str(missing) in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.name != ".lock") == before
    assert not (run / "replaced").exists() and load_run(run).step == 2
    assert main(["train", "--out", str(run), "--steps", "1", "--batch-size", "16", "--force", *TINY]) == 0
    assert load_run(run).step == 1 and (run / "replaced" / "checkpoints").is_dir()


def test_resume_with_a_different_setup_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "2", "--batch-size", "16", *TINY]) == 0
    code = main(["train", "--out", str(run), "--steps", "4", "--batch-size", "32", "--resume", *TINY,
                 "--set", "diffusion.schedule=cosine"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 16 -> 32" in err and "diffusion.schedule: 'linear' -> 'cosine'" in err


def test_resume_without_checkpoint_never_starts_fresh(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "empty"), "--steps", "2", "--resume", *TINY]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_sampling_with_the_network_in_bf16(tmp_path, capsys):
    """--precision bf16: the network under autocast, the sampler's arithmetic in float32: images near the
    float32 ones, not the same (the network did run in bf16); fp16 needs a GPU; a typo is refused."""
    from ddpm.generate import SampleOptions, sample_batch

    run = train_tiny(tmp_path / "run")
    r = load_run(run)
    perturbed(r.model)
    dev = torch.device("cpu")
    plain = sample_batch(r, range(8), 3, SampleOptions(), dev)
    low = sample_batch(r, range(8), 3, SampleOptions(precision="bf16"), dev)
    assert low.dtype == torch.float32 and plain.abs().mean() > 0.1
    assert 0 < (low - plain).abs().mean() < 0.02  # measured 1.6e-3 (max 1.2e-2) over 40 steps
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        sample_batch(r, range(2), 3, SampleOptions(precision="fp16"), dev)
    npz = tmp_path / "s.npz"
    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(npz), "--precision", "bf16", "--quiet"]) == 0
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 1)
    with pytest.raises(SystemExit):
        main(["sample", "--run", str(run), "--n", "3", "--out", str(npz), "--precision", "bf61"])
    assert "--precision" in capsys.readouterr().err


def test_bf16_training_on_the_cpu_follows_float32(tmp_path, capsys):
    """train.precision=bf16: the forward and backward under autocast over float32 master weights and optimizer
    state; every step applies, the losses stay near float32's on the same batches and the weights move as
    float32's do, not equal to them (the network did run in bf16); fp16 on the CPU is refused by name."""
    runs = {"fp32": train_tiny(tmp_path / "fp32", 8, "--ckpt-every", "4"),
            "bf16": train_tiny(tmp_path / "bf16", 8, "--ckpt-every", "4", "--set", "train.precision=bf16")}
    logs = {k: train_log(run) for k, run in runs.items()}
    assert all(e["finite"] for log in logs.values() for e in log) and len(logs["bf16"]) == 8
    a, b = (np.array([e["loss"] for e in logs[k]]) for k in ("fp32", "bf16"))
    assert (np.abs(b - a) / a).max() < 0.01  # measured 1.4e-4 (the fresh network's zeroed output layer)

    def weights(name, step):
        ck = load_checkpoint(runs[name] / "checkpoints" / f"step_{step:09d}")
        kept = {k: v for k, v in ck.tensors.items() if k.startswith(("model/", "ema/", "optim/state/"))}
        assert len(kept) > 300 and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in kept.values())
        return torch.cat([v.flatten() for k, v in sorted(kept.items()) if k.startswith("model/")])

    moved = (weights("fp32", 8) - weights("fp32", 4)).norm()  # float32's last four updates
    apart = (weights("bf16", 8) - weights("fp32", 8)).norm()  # bf16's rounding, accumulated over eight
    assert 0 < apart < 0.3 * moved, (apart, moved)  # measured 0.11x
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "fp16"), "--steps", "2", "--batch-size", "16", *TINY,
                 "--set", "train.precision=fp16"]) == 2
    assert "train.precision" in capsys.readouterr().err
