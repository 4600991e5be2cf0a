"""The released models' layouts: diffusers folders and the PyTorch port load into our network with the same
outputs; export goes back to diffusers; damaged files are refused by name."""

import json

import pytest
import torch

from ddpm.convert import (
    ConversionError,
    diffusers_unet_config,
    export_diffusers,
    load_diffusers_unet,
    load_port_state_dict,
)
from ddpm.nn import UNet

diffusers = pytest.importorskip("diffusers")

CIFAR10_CONFIG = dict(  # google/ddpm-cifar10-32
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu", norm_num_groups=32,
)
CHURCH_DOWN = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
CHURCH_UP = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(res, b=2, c=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, c, res, res, generator=g, dtype=torch.float64), torch.tensor([3, 871])[:b]


def test_cifar10_diffusers_folder_gives_the_same_outputs(tmp_path):
    ref = _randomise(diffusers.UNet2DModel(**CIFAR10_CONFIG))
    assert sum(p.numel() for p in ref.parameters()) == 35_746_307
    ref.save_pretrained(tmp_path / "cifar")
    ours, cfg = load_diffusers_unet(tmp_path / "cifar")
    assert ours.config["ch_mult"] == (1, 2, 2, 2) and ours.config["attn_resolutions"] == (16,)
    x, t = _inputs(32)
    with torch.no_grad():
        want = ref.double().eval()(x, t).sample
        got = ours.double().eval()(x, t)
    assert _rel(got, want) < 1e-5


def test_church_layout_gives_the_same_outputs(tmp_path):
    full = dict(CIFAR10_CONFIG, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                down_block_types=CHURCH_DOWN, up_block_types=CHURCH_UP)
    with torch.device("meta"):
        assert sum(p.numel() for p in diffusers.UNet2DModel(**full).parameters()) == 113_673_219
    small = dict(full, sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128),
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    ref = _randomise(diffusers.UNet2DModel(**small), seed=2)
    ref.save_pretrained(tmp_path / "church", safe_serialization=False)  # the older .bin layout
    ours, _ = load_diffusers_unet(tmp_path / "church")
    assert ours.config["attn_resolutions"] == (16,) and ours.config["resolution"] == 64
    x, t = _inputs(64, b=1)
    with torch.no_grad():
        assert _rel(ours.double()(x, t), ref.double()(x, t).sample) < 1e-5


def test_port_state_dict_loads_and_export_round_trips(tmp_path):
    ours = _randomise(UNet(3, 128, (1, 2, 2, 2), 2, (16,), 0.0, 32), seed=3).eval()
    torch.save(ours.state_dict(), tmp_path / "ema_diffusion_cifar10_model.ckpt")  # the port's names are ours
    port = load_port_state_dict(tmp_path / "ema_diffusion_cifar10_model.ckpt")
    assert port.config["attn_resolutions"] == (16,) and port.config["ch_mult"] == (1, 2, 2, 2)
    x, t = _inputs(32)
    with torch.no_grad():
        want = ours.double()(x, t)
        assert _rel(port.double().eval()(x, t), want) < 1e-12
    sched = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "variance_type": "fixed_large", "clip_sample": True, "prediction_type": "epsilon"}
    export_diffusers(ours.float(), tmp_path / "export", sched)
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "export" / "unet").double().eval()
    with torch.no_grad():
        assert _rel(back(x, t).sample, want) < 1e-5
    s = diffusers.DDPMScheduler.from_pretrained(tmp_path / "export" / "scheduler")
    assert s.config.variance_type == "fixed_large" and s.config.num_train_timesteps == 1000
    assert json.loads((tmp_path / "export" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]


def test_damaged_files_are_refused_by_name(tmp_path):
    sd = UNet(3, 32, (1, 2), 1, (16,), 0.0, 32).state_dict()
    missing = dict(sd)
    del missing["mid.attn_1.q.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match=r"missing: mid\.attn_1\.q\.weight"):
        load_port_state_dict(tmp_path / "missing.pt")
    extra = dict(sd, **{"bogus.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match=r"unexpected: bogus\.weight"):
        load_port_state_dict(tmp_path / "extra.pt")
    shaped = dict(sd, **{"conv_out.bias": torch.zeros(5)})
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(ConversionError, match=r"mis-shaped: conv_out\.bias \(5,\)"):
        load_port_state_dict(tmp_path / "shape.pt")


def test_multi_head_diffusers_models_are_refused(tmp_path):
    ref = diffusers.UNet2DModel(**dict(CIFAR10_CONFIG, block_out_channels=(32, 64, 64, 64), attention_head_dim=8))
    ref.save_pretrained(tmp_path / "m")
    with pytest.raises(ConversionError, match="several heads"):
        load_diffusers_unet(tmp_path / "m")
    assert diffusers_unet_config(UNet())["attention_head_dim"] is None
