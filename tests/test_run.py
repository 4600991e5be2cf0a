"""The run layer: its format written and read in one place, builders, seeds, per-sample generators, devices and
the binding of class labels and guidance; and the direction of the imports around it."""

import subprocess
import sys

import pytest
import torch

from ddpm import checkpoint as ckpt
from ddpm.config import ConfigError, apply_overrides, preset
from ddpm.diffusion import StackedGenerator, randn
from ddpm.guidance import guided_model
from ddpm.run import (
    RUN_FORMAT_VERSION,
    build_diffusion,
    build_model,
    conditioned,
    derived_seed,
    load_run,
    resolve_device,
    sample_generator,
    save_run,
)

SMALL = ["model.ch=32", "model.ch_mult=1,2", "model.attn_resolutions=4", "diffusion.num_timesteps=20"]


def test_sampling_and_evaluation_never_import_the_training_loop():
    code = ("import sys, ddpm.generate, ddpm.evaluate, ddpm.convert, ddpm.sampling, ddpm.run, ddpm\n"
            "ddpm.load_run\n"
            "print(sorted(m for m in sys.modules if m in ('ddpm.train', 'ddpm.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_sample_generator_rows_depend_on_their_index_alone():
    g = sample_generator(7, "sample", range(3, 8))
    assert isinstance(g, StackedGenerator) and len(g) == 5
    x = g.randn((5, 2, 3))
    for row, i in enumerate(range(3, 8)):  # each row is its own (seed, purpose, index) stream
        seed = derived_seed(7, "sample", i)
        want = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(x[row], want)
    x64 = sample_generator(7, "sample", range(3, 8)).randn((5, 2, 3), dtype=torch.float64)  # filled in place
    assert torch.equal(x64[4], torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(
        derived_seed(7, "sample", 7))))
    # the same index in another batch draws the same noise; randn_like and ddpm.diffusion.randn agree
    assert torch.equal(sample_generator(7, "sample", [5]).randn((1, 2, 3))[0], x[2])
    assert torch.equal(sample_generator(7, "sample", range(3, 8)).randn_like(x), x)
    assert torch.equal(randn((5, 2, 3), sample_generator(7, "sample", range(3, 8)), "cpu"), x)
    assert not torch.equal(sample_generator(7, "other", range(3, 8)).randn((5, 2, 3)), x)
    with pytest.raises(ValueError, match="got 5 generators for a batch of 4"):
        g.randn((4, 2, 3))


def test_conditioned_binds_labels_and_guidance_in_one_place():
    calls = []

    def net(x, t, y=None):
        calls.append(y)
        return x * (1.0 if y is None else (1.0 + y[:, None].float()))

    x, t = torch.ones(3, 2), torch.zeros(3, dtype=torch.long)
    assert conditioned(net, None) is net
    null = conditioned(net, 10, batch=4)
    assert torch.equal(null(x, t), x * 11.0) and calls[-1].tolist() == [10, 10, 10]  # the null label, B of 4
    assert torch.equal(conditioned(net, 10, label=3, batch=3)(x, t), x * 4.0)
    guided = conditioned(net, 10, label=3, guidance=2.5, batch=3)
    want = guided_model(net, torch.full((3,), 3), 2.5, null_label=10)(x, t)
    assert torch.equal(guided(x, t), want)
    for kwargs, message in (({"label": 3}, "--class needs a class-conditional run"),
                            ({"guidance": 2.0}, "--guidance needs a class-conditional run")):
        with pytest.raises(ValueError, match=message):
            conditioned(net, None, **kwargs)
    with pytest.raises(ValueError, match="--guidance needs --class"):
        conditioned(net, 10, guidance=2.0)
    with pytest.raises(ValueError, match=r"--class must lie in 0\.\.9; got 10"):
        conditioned(net, 10, label=10)


def test_save_run_and_load_run_round_trip(tmp_path):
    cfg = apply_overrides(preset("digits"), SMALL)
    torch.manual_seed(3)
    model, ema = build_model(cfg), build_model(cfg)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    path = save_run(tmp_path / "r", cfg, 12, model.state_dict(), ema.state_dict(), extra={"note": "x"},
                    write_config=True)
    state = ckpt.load_checkpoint(path).state
    assert state["format"] == RUN_FORMAT_VERSION and state["step"] == 12 and state["note"] == "x"
    for use_ema, want in ((True, ema), (False, model)):
        run = load_run(tmp_path / "r", ema=use_ema)
        assert run.step == 12 and run.config.to_dict() == cfg.to_dict() and not run.model.training
        for (k, v), (k2, w) in zip(run.model.state_dict().items(), want.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, w)
    d = build_diffusion(cfg)
    assert d.num_timesteps == 20 and d.var_type.value == "fixedlarge"


def test_a_missing_device_names_the_option():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device is 'cuda' but no CUDA device is available"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="train.device is 'cuda:1'"):
            resolve_device("cuda:1", "train.device")
    with pytest.raises(ConfigError, match="--device 'gpu0' is not a device name"):
        resolve_device("gpu0")


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    import warnings

    from ddpm import run, runtime

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the flags decide (the suite may run held to AVX2)
    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
    assert not runtime.cpu_has_native_bf16(avx2)
    assert runtime.cpu_has_native_bf16(avx2.replace("avx2", "avx2 avx512f avx512_bf16"))
    assert runtime.cpu_has_native_bf16(avx2.replace("avx2", "avx2 amx_bf16 amx_tile"))
    assert runtime.cpu_has_native_bf16("no flags line here")  # nothing claimed about a CPU it cannot read
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN held to AVX2 has no bf16 either
    assert not runtime.cpu_has_native_bf16(avx2.replace("avx2", "avx2 avx512_bf16"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(run.SlowPrecisionWarning, match="train.precision bf16: this CPU has no native bf16"):
        assert run.amp_dtype("bf16", torch.device("cpu"), "train.precision") is torch.bfloat16
    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.amp_dtype("bf16", torch.device("cpu"), "precision") is torch.bfloat16
        assert run.amp_dtype("fp32", torch.device("cpu"), "precision") is None
