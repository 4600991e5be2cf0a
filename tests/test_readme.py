"""Every command line of the README parses with today's `ddpm` command, and the cheap ones run at tiny sizes on a
tiny run, so the README cannot drift from the CLI again."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import build_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"
FASHION = "/usr/share/datasets/fashion-mnist"
# one level, one block: a sampler's default is all T steps, so a network call must be cheap
TINY_NET = ["--set", "model.ch=32", "--set", "model.ch_mult=1", "--set", "model.num_res_blocks=1",
            "--set", "model.attn_resolutions=8", "--set", "train.sample_every=0", "--set", "train.warmup=2"]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(line, argv after `ddpm`) for every `ddpm ...` or `torchrun ... -m ddpm ...` line in the README's bash
    blocks, continuation lines joined and comments dropped; the usage synopsis (with [options]) is left out."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#") or " [" in line or "|" in line:
                continue
            words = shlex.split(line)
            if words[:1] == ["ddpm"]:
                out.append((line, words[1:]))
            elif words[:1] == ["torchrun"] and "-m" in words:
                i = words.index("-m")
                assert words[i + 1] == "ddpm", line
                out.append((line, words[i + 2:]))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    names = {argv[0] for _, argv in COMMANDS}
    assert {"train", "sample", "eval", "interpolate", "inpaint", "edit", "convert", "export"} <= names
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[c[0][:60] for c in COMMANDS])
def test_every_readme_command_parses(line, argv):
    args = build_parser().parse_args(argv)  # an unknown option or a bad choice exits 2 here
    assert callable(args.func)


def test_the_synopsis_names_only_real_options():
    text = README.read_text()
    synopsis = re.search(r"## The command\n\n```bash\n(.*?)```", text, flags=re.S).group(1)
    parser = build_parser()
    for command in ("train", "sample"):
        sub = parser._subparsers._group_actions[0].choices[command]
        known = {s for a in sub._actions for s in a.option_strings}
        block = synopsis.split(f"ddpm {command}")[1].split("ddpm ")[0]
        for option in re.findall(r"--[a-z][a-z-]*", block):
            assert option in known, (command, option)


# ---------------------------------------------------------------------------------------------- run them


def _scaled_timesteps(argv: list[str], T: int = 100) -> list[str]:
    """The README's timesteps are the paper's (T = 1000): each value of --share-from, --t and --t-start, checked
    to lie in [0, 1000), mapped to the same point of a T-step run (t T / 1000), so that the line runs on the tiny
    run's T."""
    out = list(argv)
    for i, w in enumerate(argv[:-1]):
        if w in ("--share-from", "--t", "--t-start"):
            values = [int(v) for v in argv[i + 1].split(",")]
            assert all(0 <= v < 1000 for v in values), argv  # a timestep of the paper's T = 1000
            out[i + 1] = ",".join(str(v * T // 1000) for v in values)
    return out


def _tiny_argv(argv: list[str], paths: dict[str, str], tmp: Path) -> list[str] | None:
    """The README's argv made tiny: placeholders replaced by real paths, counts capped, the paper's timesteps
    scaled to the tiny run's T = 100; None for a line that needs data or weights that no test has (CIFAR-10, LSUN,
    released checkpoints, the Inception weights)."""
    words = [paths.get(w, w) for w in _scaled_timesteps(argv)]
    joined = " ".join(words)
    if any(k in joined for k in ("cifar", "c10", "church", "lsun", "ddpm-", "ema_diffusion", "--inception-weights",
                                 "--samples")):
        return None
    if "fashion" in joined and not Path(FASHION).is_dir():
        return None  # the Debian package dataset-fashion-mnist is not installed here
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w in ("--n", "--num-samples", "--steps", "--batch-size", "--points", "--resample") and words[0] != "train":
            cap = {"--n": 2, "--num-samples": 2, "--batch-size": 2, "--points": 3, "--resample": 1, "--steps": 4}[w]
            if words[0] == "eval" and words[1] == "fid" and w == "--n":
                cap = 16  # a covariance of the classifier's features needs a few samples
            out += [w, str(min(int(words[i + 1]), cap))]
            i += 2
            continue
        if w in ("--out", "--run-dir", "--run") and i + 1 < len(words) and words[0] in ("train", "convert"):
            out += [w, str(tmp / "runs" / Path(words[i + 1]).name)]
            i += 2
            continue
        if w == "--out" and not words[i + 1].startswith("/"):
            out += [w, str(tmp / "out" / words[i + 1])]
            i += 2
            continue
        out.append(w)
        i += 1
    if out[0] == "train":  # the image presets keep their levels (the README may set them): only narrower
        own_levels = "folder" in out or "fashion" in out
        # T = 100 for every run: their samplers' defaults, all T steps, were most of this test's time (no line
        # names a timestep of these runs; those of the fixture's run are scaled to its T = 100)
        out += ["--steps", "2", "--batch-size", "4", "--quiet", "--set", "diffusion.num_timesteps=100",
                *(["--set", "model.ch=32", "--set", "train.sample_every=0"] if own_levels else TINY_NET)]
    if out[0] == "sample" and "--n" not in out:
        out += ["--n", "2"]
    if out[0] in ("inpaint", "edit"):
        out += ["--n", "1"] + (["--resample", "1"] if out[0] == "inpaint" and "--resample" not in out else [])
    if out[0] == "restore" and "--steps" not in out:  # a conditional run's default: all T = 1000 steps
        out += ["--steps", "4"]
    if out[0] in ("sample", "eval", "restore") and "--quiet" not in out:
        out.append("--quiet")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny digits run with T = 100 (a sampler's default is all T steps, and the bound sums T terms: at the
    paper's T = 1000 the lines took 30 s on an AVX2-only EPYC, and the three that name timesteps, scaled to T = 100
    now, 20 s on the Xeon), and the files the README's commands read."""
    tmp = tmp_path_factory.mktemp("readme")
    run = tmp / "run100"
    assert main(["train", "--run", str(run), "--steps", "2", "--batch-size", "16", *TINY_NET,
                 "--set", "diffusion.num_timesteps=100", "--quiet"]) == 0
    images = tmp / "my_images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{k}.png")
    for name in ("a.png", "b.png", "photo.png", "sketch.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp / name)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    (tmp / "out").mkdir()
    paths = {"RUN": str(run), "runs/demo": str(run), "runs/cond": str(tmp / "runs" / "cond"),
             "runs/fashion": str(tmp / "runs" / "fashion"), "runs/zero-snr": str(tmp / "runs" / "zero-snr"),
             "./my_images": str(images), "runs/mine": str(tmp / "runs" / "mine"), "DIR": str(tmp / "out" / "dir")}
    paths |= {name: str(tmp / name) for name in ("a.png", "b.png", "photo.png", "sketch.png", "mask.png")}
    paths["low.png"] = str(tmp / "out" / "low.png")  # what the README's degrade line writes
    np.savez(tmp / "clean.npz", arr_0=rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8))  # sr4's clean images
    paths |= {"clean.npz": str(tmp / "clean.npz"), "low.npz": str(tmp / "out" / "low.npz"),
              "runs/sr4": str(tmp / "runs" / "sr4")}
    return tmp, paths


RUNNABLE = [(line, argv) for line, argv in COMMANDS if argv[0] in ("train", "sample", "eval", "interpolate",
                                                                    "inpaint", "edit", "export", "degrade",
                                                                    "restore")]


@pytest.mark.slow
def test_the_cheap_readme_commands_run(tiny, capsys):
    tmp, paths = tiny
    ran = []
    # the class-conditional run first: the guided sampling line reads it
    # the runs first, then the degraded images: later lines read them
    ordered = sorted(RUNNABLE, key=lambda c: {"train": 0, "degrade": 1}.get(c[1][0], 2))
    missing = set()  # the runs whose training line was skipped: the lines that read them are skipped too
    for line, argv in ordered:
        tiny_argv = _tiny_argv(argv, paths, tmp)
        run = argv[argv.index("--run") + 1] if "--run" in argv[:-1] else None
        if tiny_argv is None or run in missing:
            if argv[0] == "train" and run is not None:
                missing.add(run)
            continue
        code = main(tiny_argv)
        assert code == 0, (line, tiny_argv, capsys.readouterr().err[-2000:])
        ran.append(argv[0] if argv[0] != "eval" else f"eval {argv[1]}")
    assert {"train", "sample", "eval fid", "eval bpd", "eval rate-distortion", "interpolate", "inpaint", "edit",
            "export", "degrade", "restore"} <= set(ran), ran
    assert len(ran) >= 18, ran
