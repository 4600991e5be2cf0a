"""Presets hold the paper's recipes; overrides are typed; bad values name their field and exit with code 2."""

import json

import pytest

from ddpm.cli import main
from ddpm.config import CHOICES, Config, ConfigError, apply_overrides, preset, validate
from ddpm.modes import (
    BetaSchedule,
    DatasetKind,
    LossType,
    LossWeight,
    MeanType,
    Precision,
    Preview,
    Spacing,
    TimestepSampler,
    VarType,
    values,
)


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


# ---------------------------------------------------------------------------------------------- modes

MODE_ENUMS = {BetaSchedule, MeanType, VarType, LossType, DatasetKind, Precision, LossWeight, TimestepSampler,
              Preview}
# a value some modes need beside them to pass validation: learned variances are trained by the hybrid loss; jsd's
# beta_T = 1 is a zero terminal SNR, where eps is undefined
COMPANIONS = {("diffusion.var_type", "learned_range"): ["diffusion.loss_type=hybrid"],
              ("diffusion.loss_type", "hybrid"): ["diffusion.var_type=learned_range"],
              ("diffusion.schedule", "jsd"): ["diffusion.mean_type=v"],
              ("data.dataset", "pairs"): ["data.task=sr2"]}  # the degradation of its input/ images


def test_mode_fields_are_typed_by_their_enums_and_stay_strings_in_json(tmp_path):
    assert set(CHOICES.values()) == MODE_ENUMS and len(CHOICES) == len(MODE_ENUMS)
    c = preset("lsun-church")
    assert c.diffusion.var_type is VarType.FIXED_SMALL and c.data.dataset is DatasetKind.LMDB
    assert c.train.precision is Precision.FP32 and c.diffusion.schedule is BetaSchedule.LINEAR
    c.save(tmp_path / "config.json")
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["diffusion"]["var_type"] == "fixedsmall" and on_disk["data"]["dataset"] == "lmdb"
    for name in CHOICES:
        section, key = name.split(".")
        assert type(on_disk[section][key]) is str and type(c.to_dict()[section][key]) is str, name
    assert Config.load(tmp_path / "config.json") == c
    c.diffusion.var_type = "learned_range"  # a string set directly becomes the member when validated
    c.diffusion.loss_type = "hybrid"
    validate(c)
    assert c.diffusion.var_type is VarType.LEARNED_RANGE and c.diffusion.loss_type is LossType.HYBRID


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_every_mode_field_accepts_exactly_its_enums_values(name):
    enum_cls = CHOICES[name]
    others = {v for e in MODE_ENUMS for v in values(e)}
    candidates = others | {m.name for m in enum_cls} | {v.upper() for v in values(enum_cls)} | {"", "none"}
    accepted = set()
    for value in sorted(candidates):
        c = preset("digits")
        try:
            apply_overrides(c, [f"{name}={value}", *COMPANIONS.get((name, value), [])])
        except ConfigError as e:
            listed = ", ".join(repr(v) for v in values(enum_cls))
            assert str(e) == f"{name} must be one of {listed}; got {value!r}"  # the field named, the choices listed
            continue
        accepted.add(value)
        section, key = name.split(".")
        assert getattr(getattr(c, section), key) is enum_cls(value)
    assert accepted == set(values(enum_cls))


def test_the_other_lists_of_modes_are_the_enums():
    from ddpm import cli, run, sampling

    assert cli.PRECISIONS == values(Precision) == ("fp32", "bf16", "fp16")
    assert cli.SPACINGS == sampling.SPACINGS == values(Spacing) == ("uniform", "quad", "logsnr", "trailing", "karras")
    assert list(run.AMP_DTYPES) == list(Precision)
    assert cli.SAMPLER_NAMES == tuple(sampling.SAMPLERS)  # the parser's copy of the sampler names


def test_a_bad_mode_is_refused_with_its_field_named_everywhere(tmp_path):
    import torch

    from ddpm.data import build_dataset
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.run import amp_dtype
    from ddpm.sampling import timestep_subset
    from ddpm.schedule import beta_schedule

    betas = beta_schedule("linear", 10)
    d = preset("digits").to_dict()
    d["diffusion"]["schedule"] = "sigmoid"
    with pytest.raises(ConfigError, match=r"^diffusion\.schedule must be one of 'linear', 'quad', 'const', 'jsd', 'cosine'; got 'sigmoid'$"):
        Config.from_dict(d)  # a config.json
    c = preset("digits")
    c.train.precision = "fp64"
    with pytest.raises(ConfigError, match=r"^train\.precision must be one of 'fp32', 'bf16', 'fp16'; got 'fp64'$"):
        validate(c)  # set directly
    with pytest.raises(ValueError, match="^mean_type must be one of 'eps', 'x0', 'xprev', 'v'; got 'epsilon'$"):
        GaussianDiffusion(betas, mean_type="epsilon")
    with pytest.raises(ValueError, match="^loss_type must be one of 'simple', 'kl', 'hybrid'; got 'l1'$"):
        GaussianDiffusion(betas, loss_type="l1")
    with pytest.raises(ValueError, match="^beta schedule must be one of"):
        beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="^data.dataset must be one of 'digits', 'cifar10', 'folder', 'lmdb', 'idx', 'pairs'; got 'imagenet'$"):
        build_dataset("imagenet", None, 32)
    with pytest.raises(ConfigError, match="^precision must be one of 'fp32', 'bf16', 'fp16'; got 'bf61'$"):
        amp_dtype("bf61", torch.device("cpu"), "precision")
    with pytest.raises(ValueError, match="^unknown spacing 'cubic'"):
        timestep_subset(100, 10, spacing="cubic")
    assert amp_dtype(Precision.BF16, torch.device("cpu"), "precision") is amp_dtype("bf16", torch.device("cpu"), "p")


def test_the_diffusion_and_the_configuration_refuse_hybrid_by_the_same_rule():
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.schedule import beta_schedule

    betas = beta_schedule("linear", 10)
    c = preset("digits")
    c.diffusion.loss_type = "hybrid"  # with fixedlarge
    with pytest.raises(ConfigError) as by_config:
        validate(c)
    with pytest.raises(ValueError) as by_diffusion:
        GaussianDiffusion(betas, var_type="fixedlarge", loss_type="hybrid")
    assert str(by_config.value).startswith("diffusion.loss_type 'hybrid' trains learned variances")
    assert str(by_config.value) == str(by_diffusion.value).replace("loss_type", "diffusion.loss_type").replace(
        "var_type", "diffusion.var_type")  # one rule (ddpm.modes.check_diffusion_modes), two names
    # a training recipe asks more than the diffusion computes: learned variances trained by hybrid, with eps
    GaussianDiffusion(betas, var_type="learned_range")  # evaluating or sampling them under another loss is fine
    for sets, field in ((["diffusion.var_type=learned_range"], "diffusion.loss_type"),
                        (["diffusion.var_type=learned_range", "diffusion.loss_type=hybrid", "diffusion.mean_type=x0"],
                         "diffusion.mean_type")):
        with pytest.raises(ConfigError, match="^" + field.replace(".", r"\.") + " must be"):
            apply_overrides(preset("digits"), sets)


def test_the_settings_past_the_paper_are_fields_validated_like_the_others():
    """v-prediction, Min-SNR weighting, loss-aware t and zero terminal SNR (issue 21): the paper's defaults, each
    value reaching the diffusion, and the refusals named by field, the same rules as GaussianDiffusion's."""
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.run import build_diffusion
    from ddpm.schedule import beta_schedule

    d = preset("cifar10").diffusion
    assert (d.loss_weight, d.min_snr_gamma, d.timestep_sampler, d.zero_terminal_snr) == ("none", 5.0, "uniform", False)
    c = apply_overrides(preset("digits"), ["diffusion.mean_type=v", "diffusion.loss_weight=min_snr",
                                           "diffusion.min_snr_gamma=2", "diffusion.zero_terminal_snr=true",
                                           "diffusion.timestep_sampler=importance"])
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    built = build_diffusion(c)
    assert built.mean_type is MeanType.V and built.loss_weight is LossWeight.MIN_SNR and built.min_snr_gamma == 2.0
    assert built.alphas_cumprod[-1] == 0 and built.betas[-1] == 1.0
    assert build_diffusion(preset("digits")).alphas_cumprod[-1] > 0
    for sets, message in (
        (["diffusion.zero_terminal_snr=true"], "diffusion.mean_type 'eps' is undefined with zero terminal SNR"),
        (["diffusion.schedule=jsd"], "diffusion.mean_type 'eps' is undefined with zero terminal SNR"),
        (["diffusion.loss_weight=min_snr", "diffusion.loss_type=kl"], "diffusion.loss_weight 'min_snr' weights L_simple"),
        (["diffusion.loss_weight=min_snr", "diffusion.mean_type=xprev"], "diffusion.loss_weight 'min_snr' is defined"),
        (["diffusion.min_snr_gamma=0"], "diffusion.min_snr_gamma must be positive"),
        (["diffusion.timestep_sampler=lossaware"], "diffusion.timestep_sampler must be one of 'uniform', 'importance'"),
    ):
        with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
            apply_overrides(preset("digits"), sets)
    c = preset("digits")
    c.diffusion.zero_terminal_snr = True
    with pytest.raises(ConfigError) as by_config:
        validate(c)
    with pytest.raises(ValueError) as by_diffusion:
        GaussianDiffusion(beta_schedule("jsd", 10))
    assert str(by_config.value) == str(by_diffusion.value).replace("mean_type", "diffusion.mean_type").replace(
        "as zero_terminal_snr", "as diffusion.zero_terminal_snr")
