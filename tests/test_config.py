"""Presets hold the paper's recipes; overrides are typed; bad values name their field and exit with code 2."""

import json

import pytest

from ddpm.cli import main
from ddpm.config import Config, ConfigError, apply_overrides, preset


def test_cifar10_preset_is_the_papers_recipe():
    c = preset("cifar10")
    assert (c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions) == (128, (1, 2, 2, 2), 2, (16,))
    assert c.model.dropout == 0.1 and c.model.resolution == 32 and c.model.in_channels == 3
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert (c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type) == ("eps", "fixedlarge", "simple")
    t = c.train
    assert (t.lr, t.warmup, t.batch_size, t.grad_clip, t.ema_decay, t.steps, t.adam_eps) == (2e-4, 5000, 128, 1.0, 0.9999, 800_000, 1e-8)
    assert c.data.hflip and c.data.dataset == "cifar10"


@pytest.mark.parametrize("name,flip", [("celebahq256", True), ("lsun-church", True), ("lsun-bedroom", False), ("lsun-cat", False)])
def test_256_presets(name, flip):
    c = preset(name)
    assert c.model.ch_mult == (1, 1, 2, 2, 4, 4) and c.model.resolution == 256 and c.model.dropout == 0.0
    assert c.diffusion.var_type == "fixedsmall"
    assert (c.train.lr, c.train.batch_size, c.train.warmup) == (2e-5, 64, 5000)
    assert c.data.hflip is flip


def test_overrides_are_typed_and_round_trip():
    c = apply_overrides(preset("digits"), ["train.lr=3e-4", "model.ch_mult=1,2,2", "model.num_classes=10",
                                            "data.hflip=true", "diffusion.var_type=fixedsmall"])
    assert c.train.lr == 3e-4 and c.model.ch_mult == (1, 2, 2) and c.model.num_classes == 10 and c.data.hflip is True
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("item,field", [
    ("train.lr=-1", "train.lr"), ("train.lr=0", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.steps=-5", "train.steps"), ("train.batch_size=abc", "train.batch_size"), ("train.steps=1.5", "train.steps"),
    ("model.resolution=12", "model.resolution"), ("model.ch=48", "model.ch"), ("train.bogus=1", "train.bogus"),
    ("nosection.x=1", "nosection"), ("diffusion.var_type=fixed_large", "diffusion.var_type"),
    ("data.hflip=maybe", "data.hflip"), ("train.ema_decay=1.5", "train.ema_decay"),
])
def test_bad_values_name_the_field(item, field):
    c = preset("digits")
    if item.startswith("model.resolution"):
        c.model.ch_mult = (1, 2, 2, 2)  # 12 cannot be halved three times
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(c, [item])


def test_cli_bad_config_exits_2_before_building_anything(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--set", "train.lr=-1"])
    assert code == 2
    assert "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "0"]) == 2
