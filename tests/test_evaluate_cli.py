"""The paper's evaluations and figures through the command, on a tiny run; bound pieces against closed forms."""

import json
import math

import numpy as np
import pytest
import torch
from oracle import GaussianOracle
from PIL import Image

from ddpm import GaussianDiffusion, beta_schedule
from ddpm.cli import main
from ddpm.images import grid_scale
from ddpm.likelihood import rate_distortion

TINY = ["--set", "model.ch=32", "--set", "model.ch_mult=1,2", "--set", "model.attn_resolutions=4",
        "--set", "diffusion.num_timesteps=30", "--set", "train.sample_every=0", "--set", "train.warmup=2",
        "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--out", str(path), "--steps", "3", *TINY]) == 0
    return path


def test_eval_bpd_and_rate_distortion(run, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "bpd", "--run", str(run), "--n", "6", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "bpd" / "bpd.json").read_text())
    assert report["n"] == 6 and report["split"] == "test" and report["var_type"] == "fixedlarge"
    assert report["bpd"] == pytest.approx(report["prior_bpd"] + report["decoder_bpd"] + report["kl_bpd"], rel=1e-9)
    assert 0 < report["bpd"] < 100
    lines = (out / "bpd" / "terms.csv").read_text().splitlines()
    assert lines[0] == "t,L_t_bits_per_dim" and len(lines) == 31
    assert (out / "bpd" / "terms.png").stat().st_size > 0
    assert main(["eval", "rate-distortion", "--run", str(run), "--n", "4", "--out", str(out), "--quiet"]) == 0
    rd = json.loads((out / "rate-distortion" / "rate_distortion.json").read_text())
    assert rd["final_rate_bpd"] >= rd["rate_at_T"]
    for name in ("rate_vs_t.png", "distortion_vs_t.png", "distortion_vs_rate.png", "rate_distortion.csv"):
        assert (out / "rate-distortion" / name).stat().st_size > 0


def test_figures(run, tmp_path):
    assert main(["sample", "--run", str(run), "--progressive", "--n", "3", "--frames", "4", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    info = json.loads((tmp_path / "p" / "progressive.json").read_text())
    assert info["timesteps"] == [29, 19, 10, 0]
    assert Image.open(tmp_path / "p" / "progressive.gif").n_frames == 4
    assert main(["sample", "--run", str(run), "--share-from", "25,10", "--n", "3", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert json.loads((tmp_path / "s" / "share_from.json").read_text())["timesteps"] == [25, 10]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("L", (8, 8), 0).save(a)
    Image.new("L", (8, 8), 255).save(b)
    assert main(["interpolate", "--run", str(run), "--a", str(a), "--b", str(b), "--t", "10", "--steps", "5",
                 "--out", str(tmp_path / "i")]) == 0
    info = json.loads((tmp_path / "i" / "interpolation.json").read_text())
    assert info["lambdas"][0] == 0 and info["lambdas"][-1] == 1 and len(info["reconstruction_rmse_0_255"]) == 2
    assert Image.open(tmp_path / "i" / "interpolation.png").size[0] > 7 * 8


def test_inpaint_and_edit_commands(run, tmp_path):
    img, mask = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))).save(img)
    m = np.zeros((8, 8), dtype=np.uint8)
    m[:, :4] = 255
    Image.fromarray(m).save(mask)
    assert main(["inpaint", "--run", str(run), "--image", str(img), "--mask", str(mask), "--n", "2", "--resample", "2",
                 "--out", str(tmp_path / "inp.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "inp.png").convert("L"))
    f, gap = grid_scale(3, 3, 8, 8)  # the input and 2 results, each pixel an f x f block, gap pixels between cells
    first = grid[gap : gap + 8 * f, 2 * gap + 8 * f : 2 * gap + 16 * f][::f, ::f]  # the first result, 8 x 8
    left = np.tile(np.arange(0, 128, 32, dtype=np.uint8), (8, 1))
    np.testing.assert_array_equal(first[:, :4], left)  # the first result keeps the known half exactly
    assert main(["edit", "--run", str(run), "--image", str(img), "--t", "5", "--n", "2", "--sampler", "ddim",
                 "--steps", "3", "--out", str(tmp_path / "ed.png")]) == 0


def test_images_that_do_not_fit_the_run_are_refused_before_any_work(run, tmp_path, capsys):
    def png(name, size, mode="L", color=0):
        Image.new(mode, size, color).save(tmp_path / name)  # size is (W, H), Pillow's order
        return str(tmp_path / name)

    img, out = png("img.png", (8, 8)), tmp_path / "out.png"
    cases = [  # (command, file named in the error, what the error says)
        (["inpaint", "--image", img, "--mask", png("mask.png", (7, 5))], "--mask", "is 5x7 (H x W, 1 channel L), but "
         f"it must be 8x8 like --image {img}: resize or crop it to 8x8 first"),
        (["edit", "--image", png("big.png", (16, 16), "RGB")], "--image", "is 16x16 (H x W, 3 channels RGB), but the "
         "run takes 8x8 images"),
        (["edit", "--image", png("red.png", (8, 8), "RGB", (255, 0, 0))], "--image", "is 8x8 (H x W, 3 channels RGB) "
         "in colour, but a 1-channel (grayscale) 8x8 image is needed"),
        (["inpaint", "--image", img, "--mask", png("cmask.png", (8, 8), "RGB", (0, 255, 0))], "--mask", "in colour"),
    ]
    for args, option, says in cases:
        capsys.readouterr()
        assert main([args[0], "--run", str(run), *args[1:], "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        named = args[args.index(option) + 1]
        assert err.startswith(f"ddpm {args[0]}: error: {option} {named} ") and says in err and err.count("\n") == 1
        assert not out.exists()
    capsys.readouterr()
    assert main(["interpolate", "--run", str(run), "--a", img, "--b", png("b.png", (8, 9)), "--out", str(tmp_path / "i")]) == 2
    assert f"--b {tmp_path / 'b.png'} is 9x8 (H x W" in capsys.readouterr().err and not (tmp_path / "i").exists()


def test_fast_sampler_spacing_on_the_command_line(run, tmp_path, capsys):
    arrays = {}
    for spacing in ("uniform", "quad"):  # eta 1: with a barely trained net (eps ~ 0) eta 0 only rescales x_T
        out = tmp_path / f"{spacing}.npz"
        assert main(["sample", "--run", str(run), "--n", "3", "--out", str(out), "--sampler", "ddim", "--steps", "4",
                     "--eta", "1", "--spacing", spacing, "--quiet"]) == 0
        arrays[spacing] = np.load(out)["arr_0"]
    assert arrays["quad"].shape == (3, 8, 8, 1) and not np.array_equal(arrays["quad"], arrays["uniform"])
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(tmp_path / "a.npz"), "--spacing", "quad",
                 "--quiet"]) == 2
    assert "spacing 'quad' applies to the ddim and respaced samplers, not 'ancestral'" in capsys.readouterr().err
    # an option the sampler does not take is an error naming both, before any sample is drawn
    for sampler, extra in (("ancestral", []), ("dpmpp2m", ["--steps", "4"])):
        assert main(["sample", "--run", str(run), "--n", "3", "--out", str(tmp_path / "e.npz"), "--sampler", sampler,
                     *extra, "--eta", "1", "--quiet"]) == 2
        assert f"sampler '{sampler}' takes no option 'eta' (only ddim takes it)" in capsys.readouterr().err
    assert not (tmp_path / "e.npz.parts").exists()
    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(tmp_path / "g.npz"), "--guidance", "2.0",
                 "--quiet"]) == 2
    assert "--guidance needs a class-conditional run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sample", "--run", str(run), "--out", str(tmp_path / "b.npz"), "--spacing", "cubic"])
    assert e.value.code == 2
    from ddpm import cli, sampling

    assert cli.SPACINGS == sampling.SPACINGS  # the parser's copy of the choices


def test_class_conditional_training_and_guided_sampling(tmp_path, capsys):
    run = tmp_path / "cond"
    assert main(["train", "--out", str(run), "--steps", "2", *TINY, "--set", "model.num_classes=10"]) == 0
    out = tmp_path / "g.npz"
    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(out), "--class", "3", "--guidance", "2.0", "--quiet"]) == 0
    assert np.load(out)["arr_0"].shape == (3, 8, 8, 1)
    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(out), "--class", "12", "--quiet"]) == 2
    capsys.readouterr()
    # guidance steers towards a class: without --class it is refused, not silently dropped
    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(tmp_path / "u.npz"), "--guidance", "2.0",
                 "--quiet"]) == 2
    assert "--guidance needs --class" in capsys.readouterr().err and not (tmp_path / "u.npz.parts").exists()


def test_oracle_prior_term_and_rate_distortion_directions():
    betas = beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas)
    x0 = (torch.rand(64, 4) * 2 - 1).mul(127.5).round().div(127.5)
    res = d.bpd(GaussianOracle(betas, 0.0, 0.5), x0, generator=torch.Generator().manual_seed(0), clip_denoised=False)
    abar = torch.cumprod(1 - betas, 0)[-1]
    # KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)) per dimension, in bits
    kl = 0.5 * (-torch.log(1 - abar) + (1 - abar) + abar * x0.double() ** 2 - 1) / math.log(2)
    torch.testing.assert_close(res.prior, kl.mean(1).to(res.prior.dtype), rtol=1e-4, atol=1e-10)
    rd = rate_distortion(res)
    assert (rd.rate[:-1] >= rd.rate[1:]).all()  # more bits have been received once t is smaller
    assert rd.distortion[0] < rd.distortion[500] < rd.distortion[-1]  # and the reconstruction gets better
    assert rd.distortion[0] < 5 and rd.rate[-1] == pytest.approx(res.prior.mean().item())
