"""The command as a new user meets it: help for every option, inputs checked before any work, one exit code per
kind of mistake, and no traceback."""

import argparse

import numpy as np
import pytest
import torch
from tiny import train_tiny

from ddpm.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, deeper in _subparsers(sub):
                    yield f"{name} {inner}", deeper


def test_every_option_has_help_and_shows_its_default():
    commands = dict(_subparsers(build_parser()))
    assert {"train", "sample", "eval fid", "eval bpd", "eval rate-distortion", "interpolate", "inpaint", "edit",
            "convert", "export"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
    def text(name):  # the help as one line: argparse wraps it at the terminal's width
        return " ".join(commands[name].format_help().split())

    sample_help = text("sample")
    assert "(default: 64)" in sample_help and "(default: ancestral)" in sample_help
    assert "{ancestral,respaced,ddim,dpmpp2m,heun}" in sample_help
    assert "(default: 500)" in text("edit")
    fid, bpd = text("eval fid"), text("eval bpd")
    assert "--inception-weights" in fid and "--inception-weights" not in bpd  # each metric its own options
    assert "--split" in bpd and "--split" not in fid
    assert "(default: 50000)" in fid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("cli") / "run")


def test_eval_fid_of_samples_made_elsewhere_needs_no_run(run, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))
    assert main(["eval", "fid", "--samples", str(samples), "--features", "digits"]) == 0
    assert (tmp_path / "eval" / "fid_digits.json").is_file()  # beside the samples
    # a missing file is named, with its option, and nothing is created
    capsys.readouterr()
    out = tmp_path / "never"
    assert main(["eval", "fid", "--samples", str(tmp_path / "nope.npz"), "--features", "digits", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "--samples" in err and "nope.npz" in err and "Traceback" not in err and not out.exists()
    assert main(["eval", "fid", "--features", "digits"]) == 2
    assert "exactly one of --run RUN" in capsys.readouterr().err


def test_eval_fid_checks_its_reference_before_sampling(run, tmp_path, capsys, monkeypatch):
    import ddpm.generate

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the inputs were checked")

    monkeypatch.setattr(ddpm.generate, "generate_to_parts", no_sampling)
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    out = tmp_path / "ev"
    for extra, named in ((["--ref", str(tmp_path / "typo")], "--ref"),
                         (["--ref", str(tmp_path), "--inception-weights", str(tmp_path / "typo.pth")],
                          "--inception-weights"),
                         (["--inception-weights", str(weights)], "--ref is required")):
        assert main(["eval", "fid", "--run", str(run), "--n", "4", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["eval", "bpd", "--out", str(out)])
    assert e.value.code == 2 and "--run" in capsys.readouterr().err and not out.exists()


def test_usage_and_input_errors_exit_2_naming_the_option(run, tmp_path, capsys):
    cases = [
        (["train", "--run", str(tmp_path / "d"), "--data", str(tmp_path)], "--data: the digits preset"),
        (["sample", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")],
         "--run " + str(tmp_path / "nowhere") + " is not a run directory"),
        (["sample", "--run", str(run), "--out", str(tmp_path / "x.jpg")], "--out must end in .png or .npz"),
        (["sample", "--run", str(run), "--out", str(tmp_path / "x.png"), "--share-from", "9,x"], "--share-from"),
        (["interpolate", "--run", str(run), "--a", str(tmp_path / "a.png"), "--b", str(tmp_path / "b.png"),
          "--out", str(tmp_path / "i")], "--a"),
        (["convert", "--from", str(tmp_path / "none.ckpt"), "--run", str(tmp_path / "c")], "--from"),
        (["export", "--run", str(run)], "--out is required"),
    ]
    if not torch.cuda.is_available():
        cases.append((["sample", "--run", str(run), "--out", str(tmp_path / "x.png"), "--device", "cuda"],
                      "--device is 'cuda' but no CUDA device is available"))
    for argv, message in cases:
        assert main([*argv, "--quiet"] if argv[0] in ("train", "sample") else argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists() and not (tmp_path / "x.png.parts").exists()


def test_old_spellings_still_work(run, tmp_path):
    args = build_parser().parse_args(["train", "--out", "r"])
    assert args.run == "r"
    assert build_parser().parse_args(["convert", "--from", "f", "--out", "r"]).run == "r"
    assert build_parser().parse_args(["interpolate", "--run", "r", "--a", "a", "--b", "b", "--steps", "5",
                                      "--out", "o"]).points == 5
    out = tmp_path / "pipe"
    assert main(["export", "--run", str(run), str(out)]) == 0 and (out / "model_index.json").is_file()
