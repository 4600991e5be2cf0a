"""The released models' layouts: diffusers folders and the PyTorch port load into our network with the same
outputs; export goes back to diffusers; damaged files and networks of another design are refused by name."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ddpm import load_run
from ddpm.config import ModelConfig, apply_overrides, preset
from ddpm.convert import (
    ConversionError,
    diffusers_unet_config,
    export_diffusers,
    load_diffusers_unet,
    load_port_state_dict,
    scheduler_config_for,
    unet_kwargs_from_diffusers,
    write_run,
)
from ddpm.modes import Mode, VarType
from ddpm.nn import UNet

diffusers = pytest.importorskip("diffusers")

CIFAR10_CONFIG = dict(  # google/ddpm-cifar10-32
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu", norm_num_groups=32,
    center_input_sample=False, time_embedding_type="positional", resnet_time_scale_shift="default",
    mid_block_scale_factor=1, dropout=0.1,
)
CHURCH_CONFIG = dict(  # google/ddpm-ema-church-256: attention at 16x16, the fifth of six levels
    CIFAR10_CONFIG, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), dropout=0.0,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "variance_type": "fixed_large", "clip_sample": True, "prediction_type": "epsilon"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _randomise(model, seed=0):
    """Every tensor random and non-zero (the zero-initialised layers would hide mapping errors); norm scales
    near 1 so that the signal keeps its size through the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    return model


def _random_diffusers(config, seed=0):
    """A diffusers UNet2DModel with random weights; built on the meta device, as its own initialisation would
    be overwritten anyway (2 s for the CIFAR-10 network)."""
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**config)
    return _randomise(model.to_empty(device="cpu"), seed).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(res, b=2, c=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, c, res, res, generator=g, dtype=torch.float64), torch.tensor([3, 871])[:b]


def _small_church(**kw):
    """The church layout (6 levels, attention at one level) at a quarter of the width and 64x64 pixels:
    attention sits at 4x4, the fifth level, as 16x16 does at 256x256."""
    return dict(CHURCH_CONFIG, sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128), **kw)


def test_cifar10_diffusers_folder_gives_the_same_outputs(tmp_path):
    ref = _random_diffusers(CIFAR10_CONFIG)
    assert sum(p.numel() for p in ref.parameters()) == 35_746_307
    ref.save_pretrained(tmp_path / "cifar")
    ours, cfg = load_diffusers_unet(tmp_path / "cifar")
    assert cfg["block_out_channels"] == [128, 256, 256, 256]
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resolution")
    assert {k: getattr(ours.config, k) for k in keys} \
        == dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
    assert not ours.training
    x, t = _inputs(32, b=1)
    with torch.no_grad():
        want = ref.double()(x, t).sample
        got = ours.double()(x, t)
    assert _rel(got, want) < 1e-5


def test_church_layout_old_names_and_bin_file_give_the_same_outputs(tmp_path):
    with torch.device("meta"):  # the full-size configuration, counted without memory or initialisation
        assert sum(p.numel() for p in diffusers.UNet2DModel(**CHURCH_CONFIG).parameters()) == 113_673_219
        kwargs = unet_kwargs_from_diffusers(dict(CHURCH_CONFIG))
        assert sum(p.numel() for p in UNet(**kwargs).parameters()) == 113_673_219
    assert kwargs["ch_mult"] == (1, 1, 2, 2, 4, 4) and kwargs["attn_resolutions"] == (16,)

    ref = _random_diffusers(_small_church(), seed=2)
    folder = tmp_path / "church"
    ref.save_pretrained(folder)
    # the 2022 google/ddpm-* folders: a .bin with the old attention names, a config without attention_head_dim
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in ref.state_dict().items():
        for new, was in old.items():
            name = name.replace(f".{new}.", f".{was}.")
        state[name] = tensor
    assert "mid_block.attentions.0.query.weight" in state
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["attention_head_dim"]
    (folder / "config.json").write_text(json.dumps(cfg))

    ours, _ = load_diffusers_unet(folder)
    assert ours.config.attn_resolutions == (4,) and ours.config.resolution == 64
    x, t = _inputs(64, b=2)
    with torch.no_grad():
        want = ref.double()(x, t).sample
        assert _rel(ours.double()(x, t), want) < 1e-5
        # the comparison can fail: swapping the middle attention's q and k changes the output
        q, k = ours.mid.attn_1.q.weight, ours.mid.attn_1.k.weight
        q_was = q.clone()
        q.copy_(k)
        k.copy_(q_was)
        assert _rel(ours(x, t), want) > 1e-4  # 6e-4: sixty times the tolerance


def test_port_state_dict_infers_the_network_and_loads_exactly(tmp_path):
    ours = _randomise(UNet(3, 32, (1, 2, 2, 2), 2, (16,), 0.0, 32, out_channels=6), seed=3).eval()
    torch.save(ours.state_dict(), tmp_path / "ema_diffusion_cifar10_model.ckpt")  # the port's names are ours
    port = load_port_state_dict(tmp_path / "ema_diffusion_cifar10_model.ckpt")
    # all inferred; the image size from attention at 16x16
    assert port.config == dataclasses.replace(ours.config, dropout=0.0)
    assert port.out_channels == ours.out_channels == 6
    assert not port.training
    x, t = _inputs(32)
    with torch.no_grad():
        assert torch.equal(port(x.float(), t), ours(x.float(), t))
    again = load_port_state_dict(tmp_path / "ema_diffusion_cifar10_model.ckpt", resolution=64, dropout=0.1)
    assert again.config.resolution == 64 and again.config.attn_resolutions == (32,) and again.config.dropout == 0.1


def test_export_loads_in_diffusers_with_the_same_outputs(tmp_path):
    ours = _randomise(UNet(3, 32, (1, 2, 2, 2), 2, (16,), 0.1, 32), seed=4).eval()
    out = export_diffusers(ours, tmp_path / "export", SCHEDULER)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    x, t = _inputs(32)
    with torch.no_grad():
        want = ours.double()(x, t)
        back = diffusers.UNet2DModel.from_pretrained(out / "unet").double().eval()
        assert _rel(back(x, t).sample, want) < 1e-5
        assert diffusers_unet_config(ours)["dropout"] == back.config.dropout == 0.1
        again, _ = load_diffusers_unet(out)  # the pipeline folder reads back into our network exactly
        assert torch.equal(again.double()(x, t), want)
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, diffusers.UNet2DModel) and isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    assert pipe.scheduler.config.variance_type == "fixed_large" and pipe.scheduler.config.num_train_timesteps == 1000
    with pytest.raises(ConversionError, match="no setting variance"):
        export_diffusers(ours, tmp_path / "bad", dict(SCHEDULER, variance="fixed_large"))
    with pytest.raises(ConversionError, match="variance_type 'fixedlarge'"):
        export_diffusers(ours, tmp_path / "bad", dict(SCHEDULER, variance_type="fixedlarge"))
    with pytest.raises(ConversionError, match="class-conditional"):
        export_diffusers(UNet(1, 32, (1, 2), 1, (4,), 0.0, 8, num_classes=10), tmp_path / "bad", SCHEDULER)
    assert not (tmp_path / "bad").exists()


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):  # unpickling would create the sentinel file
        return (Path.touch, (self.sentinel,))


def test_damaged_port_files_are_refused_by_name(tmp_path):
    sd = UNet(3, 32, (1, 2), 1, (16,), 0.0, 32).state_dict()
    missing = dict(sd)
    del missing["mid.attn_1.q.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match=r"missing: mid\.attn_1\.q\.weight"):
        load_port_state_dict(tmp_path / "missing.pt")
    torch.save(dict(sd, **{"bogus.weight": torch.zeros(1)}), tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match=r"unexpected: bogus\.weight"):
        load_port_state_dict(tmp_path / "extra.pt")
    torch.save(dict(sd, **{"conv_out.bias": torch.zeros(5)}), tmp_path / "shape.pt")
    with pytest.raises(ConversionError, match=r"mis-shaped: conv_out\.bias \(5,\) \(expected \(3,\)\)"):
        load_port_state_dict(tmp_path / "shape.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("up.")}, tmp_path / "many.pt")
    with pytest.raises(ConversionError, match=r"missing: up\.0\.[^;]* and \d+ more"):  # ten named, then a count
        load_port_state_dict(tmp_path / "many.pt")
    sentinel = tmp_path / "ran"
    torch.save(dict(sd, evil=_RunsCode(sentinel)), tmp_path / "evil.ckpt")
    with pytest.raises(ConversionError, match="evil.ckpt"):
        load_port_state_dict(tmp_path / "evil.ckpt")
    assert not sentinel.exists()  # refused without running it
    torch.save({"conv_in.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="port's naming"):
        load_port_state_dict(tmp_path / "other.pt")


def test_damaged_diffusers_files_are_refused_by_diffusers_names(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = diffusers.UNet2DModel(**_small_church())
    ref.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["up_blocks.1.attentions.2.to_v.bias"]
    state["mid_block.attentions.0.to_q.weight"] = torch.zeros(128, 128, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ConversionError) as e:
        load_diffusers_unet(tmp_path / "m")
    msg = str(e.value)
    assert "missing: up_blocks.1.attentions.2.to_v.bias" in msg and "unexpected: extra.weight" in msg
    assert "mis-shaped: mid_block.attentions.0.to_q.weight (128, 128, 1, 1) (expected (128, 128))" in msg


@pytest.mark.parametrize("change,field", [
    (dict(attention_head_dim=8), "several heads"), (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(mid_block_scale_factor=2**-0.5), "mid_block_scale_factor"), (dict(add_attention=False), "add_attention"),
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"), (dict(freq_shift=0), "freq_shift"), (dict(norm_eps=1e-5), "norm_eps"),
    (dict(downsample_padding=1), "downsample_padding"), (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(up_block_types=("UpBlock2D",) * 4), "mirror"), (dict(down_block_types=("ResnetDownsampleBlock2D",) * 4), "down_block_types"),
    (dict(block_out_channels=(48, 96, 96, 96)), "block_out_channels"), (dict(time_embedding_dim=256), "time_embedding_dim"),
    (dict(sample_size=(32, 64)), "not square"), (dict(_class_name="UNet2DConditionModel"), "not a UNet2DModel"),
])
def test_networks_of_another_design_are_refused(change, field):
    with pytest.raises(ConversionError, match=field):
        unet_kwargs_from_diffusers(dict(CIFAR10_CONFIG, **change))


def test_missing_config_keys_take_diffusers_defaults():
    paper = dict(CIFAR10_CONFIG)
    del paper["freq_shift"]  # diffusers' default 0 is not the paper's 1
    with pytest.raises(ConversionError, match="freq_shift = 0"):
        unet_kwargs_from_diffusers(paper)
    assert unet_kwargs_from_diffusers({k: v for k, v in CIFAR10_CONFIG.items() if k != "dropout"})["dropout"] == 0.0


@pytest.mark.parametrize("preset_name,out_channels", [("cifar10", None), ("cifar10", 6), ("lsun-church", None)])
def test_the_network_config_round_trips_through_diffusers_config(preset_name, out_channels):
    m = preset(preset_name).model
    with torch.device("meta"):  # the full-size networks, without memory or initialisation
        net = UNet.from_config(m, out_channels=out_channels)
        back = UNet(**unet_kwargs_from_diffusers(diffusers_unet_config(net)))
    assert type(back.config) is ModelConfig and back.config == net.config == m
    assert back.out_channels == net.out_channels == (out_channels or m.in_channels)


def test_a_converted_port_file_is_a_run_of_the_same_network(tmp_path):
    ours = _randomise(UNet(1, 32, (1, 2), 2, (4,), 0.0, 8, out_channels=2), seed=5).eval()
    torch.save(ours.state_dict(), tmp_path / "model.ckpt")
    write_run(tmp_path / "model.ckpt", tmp_path / "run", preset_name="digits", resolution=8)
    on_disk = json.loads((tmp_path / "run" / "config.json").read_text())
    assert on_disk["diffusion"]["var_type"] == "learned_range" and on_disk["diffusion"]["loss_type"] == "hybrid"
    assert on_disk["model"] == dict(in_channels=1, ch=32, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[4],
                                    dropout=0.0, resolution=8, num_classes=None, cond_channels=0)
    run = load_run(tmp_path / "run")
    assert run.config.model == ours.config and run.model.out_channels == 2
    assert run.diffusion.var_type is VarType.LEARNED_RANGE
    for k, v in ours.state_dict().items():
        assert torch.equal(run.model.state_dict()[k], v), k


def test_scheduler_config_reads_the_typed_modes():
    d = preset("lsun-church").diffusion  # enum members, as a validated configuration holds them
    want = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon",
            "trained_betas": None}
    assert scheduler_config_for(d) == want
    assert scheduler_config_for(dataclasses.replace(d, var_type="fixedsmall", schedule="linear")) == want  # or strings
    assert not any(isinstance(v, Mode) for v in scheduler_config_for(d).values())  # plain values for the JSON
    with pytest.raises(ConversionError, match="^diffusers' DDPMScheduler has no 'jsd' beta schedule$"):
        scheduler_config_for(dataclasses.replace(d, schedule="jsd"))
    with pytest.raises(ConversionError, match="^diffusers' DDPMScheduler cannot use mean_type 'xprev'$"):
        scheduler_config_for(apply_overrides(preset("digits"), ["diffusion.mean_type=xprev"]).diffusion)


def test_scheduler_config_of_v_prediction_with_zero_terminal_snr():
    """diffusers names v "v_prediction" and rescales its betas by the same Algorithm 1 (Lin et al. 2024)."""
    d = apply_overrides(preset("digits"), ["diffusion.mean_type=v", "diffusion.zero_terminal_snr=true"]).diffusion
    got = scheduler_config_for(d)
    assert got["prediction_type"] == "v_prediction" and got["rescale_betas_zero_snr"] is True
    diffusers = pytest.importorskip("diffusers")
    from ddpm.run import build_diffusion

    sched = diffusers.DDPMScheduler(**got)
    ours = build_diffusion(apply_overrides(preset("digits"), ["diffusion.mean_type=v", "diffusion.zero_terminal_snr=true"]))
    torch.testing.assert_close(sched.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)  # theirs: float32
    assert sched.alphas_cumprod[-1] == 0 == ours.alphas_cumprod[-1]
