"""Conditional models trained on pairs (SR3, Palette): the condition and its concatenation, the configuration's
task, training on pairs made on the fly and read from folders, resume, `ddpm restore` with such a run (resumable),
and the refusals between conditional runs and the unconditional commands."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_fashion import FASHION, fake_idx_folder, needs_fashion
from tiny import dies_after

from ddpm.cli import main
from ddpm.conditional import concatenated, condition, condition_from_clean
from ddpm.config import TASK_MASKS, ConfigError, apply_overrides, preset
from ddpm.data import to_model_range
from ddpm.nn import UNet
from ddpm.restoration import MASKS, operator
from ddpm.run import NeedsCondition, load_run

# 28 x 28, two levels, one block: a step takes a fraction of a second on one core
TINY28 = ["--set", "model.ch=32", "--set", "model.ch_mult=1,2", "--set", "model.num_res_blocks=1",
          "--set", "model.attn_resolutions=14", "--set", "diffusion.num_timesteps=40", "--set", "train.sample_every=0",
          "--set", "train.warmup=2", "--set", "train.log_every=1", "--batch-size", "8", "--quiet"]


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


# ---------------------------------------------------------------------------------------------- the condition


@pytest.mark.parametrize("task", ["sr4", "colorize", "inpaint", "deblur"])
def test_the_condition_is_the_pseudo_inverse_of_the_degraded_batch(task):
    shape = (3, 8, 8)
    op = operator(task, shape, "center" if task == "inpaint" else None)
    x0 = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = condition_from_clean(op, x0)
    assert c.shape == x0.shape
    # the blur's y is full size already: fed as it is (A+ would amplify its 8-bit rounding up to 1000 times)
    want = op.A(x0) if task == "deblur" else op.pinv(op.A(x0))
    assert torch.equal(c, want)
    if task == "sr4":  # nearest upsampling of the block means
        assert c[0, 1, 3, 2].item() == pytest.approx(x0[0, 1, :4, :4].mean().item(), abs=1e-6)
    if task == "colorize":  # the gray in every channel
        assert torch.allclose(c[:, 2], x0.mean(1), atol=1e-6) and torch.equal(c[:, 0], c[:, 2])
    if task == "inpaint":  # the hidden centre is 0, the rest the image itself
        assert c[0, :, 4, 4].abs().max() == 0 and torch.equal(c[0, :, 0, 0], x0[0, :, 0, 0])
    assert torch.equal(condition(op, op.A(x0)), c)
    assert TASK_MASKS == MASKS


def test_the_concatenation_feeds_exactly_the_condition():
    seen = []

    def stub(x, t):
        seen.append((x.clone(), t))
        return x[:, :1] * 2

    cond = torch.arange(3 * 1 * 2 * 2, dtype=torch.float32).reshape(3, 1, 2, 2)
    x = torch.full((2, 1, 2, 2), -1.0)
    out = concatenated(stub, cond)(x, torch.tensor([5, 7]))
    got, t = seen[0]
    assert got.shape == (2, 2, 2, 2) and torch.equal(got[:, 0], x[:, 0]) and torch.equal(got[:, 1], cond[:2, 0])
    assert t.tolist() == [5, 7] and torch.equal(out, x * 2)
    with pytest.raises(ValueError, match="the condition is"):
        concatenated(stub, cond)(torch.zeros(4, 1, 2, 2), torch.zeros(4))


def test_the_network_takes_the_condition_channels_and_outputs_the_image():
    net = UNet(in_channels=1, cond_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               resolution=8, dropout=0.0)
    assert tuple(net.conv_in.weight.shape) == (32, 2, 3, 3) and net.out_channels == 1
    assert net(torch.zeros(3, 2, 8, 8), torch.zeros(3)).shape == (3, 1, 8, 8)


def test_the_task_sets_the_condition_channels_and_refuses_contradictions():
    cfg = apply_overrides(preset("fashion"), ["data.task=sr4"])
    assert cfg.model.cond_channels == 1 and cfg.data.task == "sr4"
    cfg = apply_overrides(preset("cifar10"), ["data.task=colorize"])
    assert cfg.model.cond_channels == 3
    for sets, named in ((["data.task=sr4", "model.cond_channels=3"], "model.cond_channels must be model.in_channels (1)"),
                        (["model.cond_channels=1"], "model.cond_channels is set by data.task"),
                        (["data.task=inpaint"], "data.mask must be one of center, half"),
                        (["data.mask=center"], "data.mask applies to data.task 'inpaint' only"),
                        (["data.dataset=pairs"], "data.task is needed by data.dataset 'pairs'"),
                        (["data.task=sr3"], "data.task must be one of")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            apply_overrides(preset("fashion"), sets)


# ---------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    return fake_idx_folder(tmp_path_factory.mktemp("idx") / "idx", n_train=24, n_test=8)


@pytest.fixture(scope="module")
def sr4_run(idx, tmp_path_factory):
    run = tmp_path_factory.mktemp("sr4") / "run"
    assert main(["train", "--preset", "fashion", "--data", str(idx), "--task", "sr4", "--run", str(run),
                 "--steps", "4", "--ckpt-every", "2", *TINY28]) == 0
    return run


@pytest.fixture(scope="module")
def low(idx, tmp_path_factory):
    """Five test images of the IDX folder degraded by sr4: uint8 [5, 7, 7, 1], and the clean ones."""
    from ddpm.data import load_idx

    tmp = tmp_path_factory.mktemp("low")
    clean = tmp / "clean.npz"
    np.savez(clean, arr_0=load_idx(idx, "test")[0][:5].permute(0, 2, 3, 1).numpy())
    assert main(["degrade", "--task", "sr4", "--input", str(clean), "--out", str(tmp / "low.npz")]) == 0
    return tmp / "low.npz", clean


def test_a_conditional_run_trains_records_its_task_and_resumes(sr4_run, idx, capsys):
    log = [json.loads(line) for line in (sr4_run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(e["finite"] and 0 < e["loss"] < 3 for e in log)
    cfg = json.loads((sr4_run / "config.json").read_text())
    assert cfg["data"]["task"] == "sr4" and cfg["model"]["cond_channels"] == 1
    run = load_run(sr4_run, conditional=True)
    assert run.task == "sr4" and run.step == 4 and tuple(run.model.conv_in.weight.shape[:2]) == (32, 2)
    with pytest.raises(NeedsCondition, match="ddpm restore"):
        run.conditioned()
    # another task cannot resume it; the same one continues the step count
    code, err = _cli(["train", "--preset", "fashion", "--data", str(idx), "--task", "sr2", "--run", str(sr4_run),
                      "--steps", "6", "--resume", *TINY28], capsys)
    assert code == 2 and "data.task: 'sr4' -> 'sr2'" in err and "model.cond_channels" not in err
    code, err = _cli(["train", "--preset", "fashion", "--data", str(idx), "--task", "sr4", "--run", str(sr4_run),
                      "--steps", "6", "--resume", *TINY28], capsys)
    assert code == 0, err
    assert load_run(sr4_run, conditional=True).step == 6 and len((sr4_run / "log.jsonl").read_text().splitlines()) == 6


def test_the_trainer_conditions_on_the_degraded_batch(idx, tmp_path):
    from ddpm.train import Trainer

    cfg = apply_overrides(preset("fashion"), ["data.task=sr4", f"data.path={idx}", "model.ch=32", "model.ch_mult=1,2",
                                              "model.num_res_blocks=1", "model.attn_resolutions=14",
                                              "diffusion.num_timesteps=40", "train.batch_size=8"])
    tr = Trainer(cfg, tmp_path / "run")
    try:
        x0, t, noise, y, cond = tr._micro_batch(0)
        assert y is None and torch.equal(cond, tr.op.pinv(torch.nn.functional.avg_pool2d(x0, 4)))
        info = tr.train_step()
        assert info["finite"] and info["loss"] == pytest.approx(1.0, abs=0.25)  # eps MSE of a zero-output network
    finally:
        tr.close()


def test_restore_with_a_conditional_run(sr4_run, low, tmp_path, capsys):
    y_path, _ = low
    out = tmp_path / "high.npz"
    code, err = _cli(["restore", "--run", str(sr4_run), "--input", str(y_path), "--out", str(out), "--batch-size", "2",
                      "--quiet"], capsys)
    assert code == 0, err
    assert "conditional, ancestral, 40 steps" in err
    x = np.load(out)["arr_0"]
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8 and x.std() > 1
    again = tmp_path / "again.npz"  # --task naming its own task is accepted; seeded per image: other batches agree
    assert _cli(["restore", "--run", str(sr4_run), "--input", str(y_path), "--out", str(again), "--task", "sr4",
                 "--quiet"], capsys)[0] == 0
    assert np.array_equal(np.load(again)["arr_0"], x)
    ddim = tmp_path / "ddim.npz"
    code, err = _cli(["restore", "--run", str(sr4_run), "--input", str(y_path), "--out", str(ddim), "--steps", "5",
                      "--quiet"], capsys)
    assert code == 0 and "DDIM, 5 steps" in err and np.load(ddim)["arr_0"].shape == (5, 28, 28, 1)
    worst, said = {}, {}
    for name, extra in (("ddim", []), ("consistent", ["--consistent"]),
                        ("travel", ["--consistent", "--travel-length", "2", "--travel-repeat", "2"]),
                        ("heun", ["--sampler", "heun"]), ("heun-consistent", ["--sampler", "heun", "--consistent"])):
        code, err = _cli(["restore", "--run", str(sr4_run), "--input", str(y_path), "--out", str(tmp_path / f"{name}.npz"),
                          "--steps", "5", "--quiet", *extra], capsys)
        assert code == 0, err
        worst[name], said[name] = float(re.search(r"max \|A x - y\| = (\S+) before", err).group(1)), err
    # DDNM's steps with the pairs-trained network: its output agrees with y (A x = y) to float precision; its
    # plain DDIM samples do not (after 4 steps of training they hardly look at the condition)
    assert "conditional with DDNM's steps, 5 steps, time travel: 7 network evaluations" in said["travel"]
    assert "conditional in Heun's sampler, 5 grid points (9 network evaluations)" in said["heun"]
    assert "conditional with DDNM's projection in Heun's sampler, 5 grid points" in said["heun-consistent"]
    assert worst["consistent"] < 1e-5 and worst["travel"] < 1e-5 and worst["heun-consistent"] < 1e-5, worst
    assert worst["ddim"] > 1e-2 and worst["heun"] > 1e-2, worst


def test_conditional_and_unconditional_commands_refuse_each_other(sr4_run, low, tmp_path, capsys):
    y_path, clean = low
    for argv in (["sample", "--run", str(sr4_run), "--out", str(tmp_path / "s.png"), "--quiet"],
                 ["eval", "bpd", "--run", str(sr4_run), "--n", "2", "--quiet"],
                 ["export", "--run", str(sr4_run), "--out", str(tmp_path / "pipe")],
                 ["interpolate", "--run", str(sr4_run), "--a", str(tmp_path / "a.png"), "--b", str(tmp_path / "a.png"),
                  "--out", str(tmp_path / "i")]):
        if argv[0] == "interpolate":
            Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
        code, err = _cli(argv, capsys)
        assert code == 2 and "needs a condition image" in err and "ddpm restore --run" in err, (argv, err)
        assert "Traceback" not in err
    base = ["restore", "--run", str(sr4_run), "--out", str(tmp_path / "x.npz"), "--quiet"]
    code, err = _cli(base + ["--input", str(y_path), "--task", "sr2"], capsys)
    assert code == 2 and "--task sr2" in err and "trained on sr4 pairs" in err
    code, err = _cli(base + ["--input", str(clean)], capsys)  # the clean 28x28 images, not the 7x7 inputs
    assert code == 2 and str(clean) in err and "[5, 28, 28, 1]" in err and "[N, 7, 7, 1]" in err
    code, err = _cli(base + ["--input", str(y_path), "--travel-repeat", "2"], capsys)
    assert code == 2 and "--travel-repeat" in err and "DDNM" in err and "--consistent" in err
    code, err = _cli(base + ["--input", str(y_path), "--noise", "0.01"], capsys)
    assert code == 2 and "--noise: DDNM's options" in err
    code, err = _cli(base + ["--input", str(y_path), "--eta-rule", "ddnm", "--eta", "0.85"], capsys)
    assert code == 2 and "--eta-rule: DDNM's options" in err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.npz.parts").exists()


@pytest.mark.parametrize("conditional", [True, False])
def test_an_interrupted_restore_continues_with_the_same_images(conditional, sr4_run, low, tmp_path, capsys,
                                                               monkeypatch):
    import ddpm.generate as gen

    y_path, _ = low
    if conditional:
        run, extra = sr4_run, ["--steps", "4"]
    else:  # DDNM with an unconditional run of the same images
        from tiny import train_tiny

        run = train_tiny(tmp_path / "digits", 1)
        y_path = tmp_path / "low8.npz"
        from ddpm.data import load_digits

        np.savez(tmp_path / "clean8.npz", arr_0=load_digits("test")[0][:5].permute(0, 2, 3, 1).numpy())
        assert main(["degrade", "--task", "sr2", "--input", str(tmp_path / "clean8.npz"), "--out", str(y_path)]) == 0
        extra = ["--task", "sr2", "--steps", "4"]
    argv = ["restore", "--run", str(run), "--input", str(y_path), "--batch-size", "2", "--quiet", *extra]
    full = tmp_path / "full.npz"
    assert _cli(argv + ["--out", str(full)], capsys)[0] == 0
    real, calls = gen.restore_batch, []
    part = tmp_path / "part.npz"
    monkeypatch.setattr(gen, "restore_batch", dies_after(2, real, calls))
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--out", str(part)])
    parts = tmp_path / "part.npz.parts"
    assert len(list(parts.glob("part_*.npy"))) == 2 and (parts / "job.json").exists() and not part.exists()
    # the parts belong to this job: another seed does not mix into them
    code, err = _cli(argv + ["--out", str(part), "--seed", "1"], capsys)
    assert code == 2 and "another job" in err and "seed differ" in err
    calls.clear()
    monkeypatch.setattr(gen, "restore_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    code, err = _cli(argv + ["--out", str(part)], capsys)
    assert code == 0 and len(calls) == 1 and "over the 1 made now" in err  # only the missing batch of 1 image
    np.testing.assert_array_equal(np.load(part)["arr_0"], np.load(full)["arr_0"])
    assert not parts.exists()


# ---------------------------------------------------------------------------------------------- paired folders


def _pairs(root: Path, n: int = 8, low: int = 7, high: int = 28) -> Path:
    rng = np.random.default_rng(1)
    for side, size in (("input", low), ("target", high)):
        (root / side).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / side / f"{i:02d}.png")
    return root


def test_training_on_paired_folders(tmp_path, capsys):
    from ddpm.data import PairedFolderDataset
    from ddpm.train import Trainer

    root = _pairs(tmp_path / "pairs")
    ds = PairedFolderDataset(root, 28, 1, (1, 7, 7))
    assert ds.images.shape == (8, 1, 28, 28) and ds.inputs.shape == (8, 1, 7, 7) and ds.names[0] == "00.png"
    assert np.array_equal(ds.inputs[3, 0].numpy(), np.asarray(Image.open(root / "input" / "03.png")))
    sets = ["data.dataset=pairs", f"data.path={root}", "data.task=sr4", "model.ch=32", "model.ch_mult=1,2",
            "model.num_res_blocks=1", "model.attn_resolutions=14", "diffusion.num_timesteps=40", "train.batch_size=4"]
    tr = Trainer(apply_overrides(preset("fashion"), sets), tmp_path / "run")
    try:  # the condition is the paired input's, nearest-upsampled, not one made from the target
        x0, _, _, _, cond = tr._micro_batch(0)
        idx = tr.order.indices(0)
        assert torch.equal(cond, to_model_range(ds.inputs[idx]).repeat_interleave(4, -2).repeat_interleave(4, -1))
        assert torch.equal(x0, to_model_range(ds.images[idx]))
    finally:
        tr.close()
    run = tmp_path / "cli"
    code, err = _cli(["train", "--preset", "fashion", "--data", str(root), "--task", "sr4", "--run", str(run),
                      "--set", "data.dataset=pairs", "--steps", "2", *TINY28[:-3], "--batch-size", "4", "--quiet"],
                     capsys)
    assert code == 0, err
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "target" / "lonely.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "input" / "00.png")
    argv = ["train", "--preset", "fashion", "--data", str(root), "--task", "sr4", "--set", "data.dataset=pairs",
            "--steps", "1", "--batch-size", "4", "--quiet", "--run"]
    code, err = _cli(argv + [str(tmp_path / "bad1")], capsys)
    assert code == 2 and str(root / "target" / "lonely.png") in err and "no input of the same name" in err
    (root / "target" / "lonely.png").unlink()
    code, err = _cli(argv + [str(tmp_path / "bad2")], capsys)
    assert code == 2 and str(root / "input" / "00.png") in err and "is 8x8" in err and "7x7" in err
    assert "Traceback" not in err


@needs_fashion
def test_the_fashion_preset_trains_sr4_on_the_real_data(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "fashion", "--task", "sr4", "--run", str(run), "--steps", "2", *TINY28]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["path"] == str(FASHION) and cfg["data"]["task"] == "sr4"
