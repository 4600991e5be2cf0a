"""Runs that survive: signals, non-finite steps, interrupted sampling, refusals that keep saved work."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny import dies_after

from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.cli import main
from ddpm.config import ConfigError, apply_overrides, preset
from ddpm.run import load_run
from ddpm.train import Trainer, TrainingError, trim_log

TINY_SETS = ["model.ch=32", "model.ch_mult=1,2", "model.attn_resolutions=4", "diffusion.num_timesteps=40",
             "train.sample_every=0", "train.warmup=2", "train.batch_size=16", "train.log_every=1"]
TINY = [x for s in TINY_SETS for x in ("--set", s)] + ["--quiet"]


def _cfg(**train):
    cfg = apply_overrides(preset("digits"), TINY_SETS)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits(tmp_path, sig, code):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddpm", "train", "--out", str(run), "--steps", "100000", "--ckpt-every", "100000", *TINY]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "--resume" in err
    steps_logged = len(log.read_text().splitlines())
    c = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert c.step == steps_logged >= 3  # the step in flight finished and was saved
    assert main(["train", "--out", str(run), "--steps", str(c.step + 2), "--resume", *TINY]) == 0
    assert load_run(run).step == c.step + 2


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    tr = Trainer(_cfg(steps=50, max_bad_steps=3, ckpt_every=2), tmp_path / "run")
    for _ in range(2):
        tr.train_step()
    tr.save()
    before = {k: v.clone() for k, v in tr.state_tensors()[0].items()}
    good = tr._micro_batch

    def poisoned(k):
        x0, *rest = good(k)
        x0 = x0.clone()
        x0[0, 0, 0, 0] = float("nan")
        return x0, *rest

    monkeypatch.setattr(tr, "_micro_batch", poisoned)
    info = tr.train_step()
    assert not info["finite"] and tr.bad_in_a_row == 1 and tr.bad_total == 1
    after = tr.state_tensors()[0]
    for k, v in before.items():  # weights, EMA and optimizer moments untouched
        assert torch.equal(after[k], v), k
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        tr.train(progress=False)
    assert "non-finite" in capsys.readouterr().err
    c = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    # skipped steps still advance past their batch; what was saved holds the last good weights
    assert c.step >= 2 and all(torch.equal(c.tensors[k], before[k]) for k in before if k.startswith(("model/", "ema/")))
    # a good batch resets the count
    monkeypatch.setattr(tr, "_micro_batch", good)
    assert tr.train_step()["finite"] and tr.bad_in_a_row == 0


def test_cli_stops_with_non_zero_exit_on_nan(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--steps", "10", "--set", "train.lr=1e30",
                 "--set", "train.max_bad_steps=2", "--set", "train.grad_clip=0", *TINY])
    assert code == 1
    assert "non-finite steps in a row" in capsys.readouterr().err


def test_interrupted_sampling_continues_where_it_stopped(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "2", *TINY]) == 0
    full = tmp_path / "full.npz"
    assert main(["sample", "--run", str(run), "--n", "7", "--batch-size", "2", "--out", str(full), "--quiet"]) == 0

    import ddpm.generate as gen

    real, calls = gen.sample_batch, []
    part = tmp_path / "part.npz"
    monkeypatch.setattr(gen, "sample_batch", dies_after(2, real, calls))
    with pytest.raises(KeyboardInterrupt):
        main(["sample", "--run", str(run), "--n", "7", "--batch-size", "2", "--out", str(part), "--quiet"])
    assert len(list((tmp_path / "part.npz.parts").glob("part_*.npy"))) == 2 and not part.exists()
    calls.clear()
    # the parts of another job (here another --seed, or another sampler) are refused, not mixed in, and kept
    for other in (["--seed", "1"], ["--sampler", "ddim", "--steps", "4"]):
        assert main(["sample", "--run", str(run), "--n", "7", "--batch-size", "2", "--out", str(part), "--quiet",
                     *other]) == 2
    assert not calls and len(list((tmp_path / "part.npz.parts").glob("part_*.npy"))) == 2
    monkeypatch.setattr(gen, "sample_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    # resumed at another batch size (the default is the machine's): the parts made count, only 4..6 is drawn
    assert main(["sample", "--run", str(run), "--n", "7", "--batch-size", "3", "--out", str(part), "--quiet"]) == 0
    assert len(calls) == 2  # [4, 6) (the rest of batch [3, 6)) and [6, 7)
    np.testing.assert_array_equal(np.load(part)["arr_0"], np.load(full)["arr_0"])


def test_sampling_during_training_leaves_weights_alone(tmp_path):
    tr = Trainer(_cfg(steps=3), tmp_path / "run")
    tr.train_step()
    before = {k: v.clone() for k, v in tr.state_tensors()[0].items()}
    rng = torch.get_rng_state()
    tr.sample_grid(n=4)
    assert torch.equal(torch.get_rng_state(), rng)
    after = tr.state_tensors()[0]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert tr.model.training and not tr.ema.training


def test_weights_only_resume_is_explicit(tmp_path, capsys):
    src = tmp_path / "port.pt"
    from ddpm.nn import UNet

    torch.save(UNet(1, 32, (1, 2), 2, (4,), 0.0, 8).state_dict(), src)
    run = tmp_path / "conv"
    assert main(["convert", "--from", str(src), "--out", str(run), "--preset", "digits", "--resolution", "8"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    args = ["train", "--out", str(run), "--steps", "2", "--quiet"] + [
        x for k, v in (("model.ch", 32), ("model.ch_mult", "1,2"), ("model.attn_resolutions", 4)) for x in ("--set", f"{k}={v}")]
    assert cfg["model"]["ch"] == 32
    assert main([*args, "--resume"]) == 2
    assert "--weights-only" in capsys.readouterr().err
    assert main([*args, "--resume", "--weights-only"]) == 0
    assert load_run(run).step == 2


def test_preview_grids_are_fast_unless_asked(tmp_path, monkeypatch):
    """The preview grid is DDIM with eta 1 on train.preview_steps steps (one network call each), the paper's
    ancestral sampler over all T only when train.preview asks for it."""
    for preview, steps, want in (("ddim", 5, 5), ("ddim", 500, 40), ("ancestral", 5, 40)):  # T = 40
        tr = Trainer(_cfg(steps=1, preview=preview, preview_steps=steps), tmp_path / f"{preview}{steps}")
        calls, forward = [], tr.ema.forward
        monkeypatch.setattr(tr.ema, "forward", lambda *a, c=calls, f=forward, **k: (c.append(1), f(*a, **k))[1])
        path = tr.sample_grid(n=4)
        assert len(calls) == want and path.is_file(), (preview, steps, len(calls))
    with pytest.raises(ConfigError, match="train.preview must be one of 'ddim', 'ancestral'"):
        apply_overrides(preset("digits"), ["train.preview=heun"])


def test_minutes_stop_training_on_time_and_resume_goes_on(tmp_path):
    """`--minutes`: the run stops when the time is spent, well before its steps, saves and draws its final grid as
    at the last step, and exits 0; --resume with another budget continues from that step."""
    run = tmp_path / "run"
    args = ["train", "--run", str(run), "--steps", "100000", "--ckpt-every", "100000", *TINY,
            "--set", "train.sample_every=100000"]
    assert main([*args, "--minutes", "0.02"]) == 0  # 1.2 s
    first = load_run(run).step
    assert 1 <= first < 100000
    assert len(list((run / "grids").glob("*.png"))) == 1  # the final grid, drawn once
    assert first == len((run / "log.jsonl").read_text().splitlines())
    assert main([*args, "--minutes", "0.02", "--resume"]) == 0
    assert load_run(run).step > first
    with pytest.raises(ConfigError, match="train.minutes"):
        apply_overrides(preset("digits"), ["train.minutes=-1"])


def test_ema_warmup_forgets_the_start(tmp_path):
    """train.ema_warmup: update n uses min(ema_decay, (1 + n) / (10 + n)); after one step the EMA is 0.1 of the
    initial weights and 0.9 of the new ones (without it, ema_decay of the initial ones)."""
    from ddpm.train import ema_decay

    assert [ema_decay(0.999, True, n) for n in (0, 90, 10**6)] == [0.1, 0.91, 0.999]
    assert ema_decay(0.999, False, 0) == 0.999
    for warm, decay in ((True, 0.1), (False, 0.999)):
        trainer = Trainer(_cfg(steps=1, ema_warmup=warm, ema_decay=0.999), tmp_path / f"run{warm}")
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train(progress=False)
        now = trainer.model.state_dict()
        for k, v in trainer.ema.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, decay * start[k] + (1 - decay) * now[k], rtol=1e-5, atol=1e-6)
        assert any((now[k] - start[k]).abs().max() > 1e-4 for k in now)  # the step moved the weights


def test_the_log_is_cut_back_to_the_step_training_resumes_from(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(1, 6)) + '{"step": 6, "lo')  # cut by kill
    trim_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert not (tmp_path / "log.jsonl.tmp").exists()
    trim_log(log, 3)  # nothing past the step: left as it is
    assert log.read_text().count("\n") == 3
    trim_log(tmp_path / "none.jsonl", 3)  # a run without a log yet
    assert not (tmp_path / "none.jsonl").exists()
