"""torch.compile as an option (ddpm.nn.compiled): training and sampling through it are the same function, the
checkpoints keep the plain module's keys, and a compiled run resumes an eager one. The tests trace with the
"aot_eager" backend (Dynamo and AOTAutograd, as with Inductor, without its code generation: seconds, not a
minute); a counter of compiled graphs proves the compiled path ran."""

import json

import numpy as np
import pytest
import torch
from tiny import losses, perturbed, train_tiny
from torch._dynamo.utils import counters

from ddpm import UNet, generate, load_run
from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.cli import main
from ddpm.generate import SampleOptions, sample_batch
from ddpm.nn import compiled


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_training_is_the_same_function_and_keeps_the_keys(tmp_path):
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    train_tiny(eager, 4)
    assert _graphs() == 0
    train_tiny(comp, 2, "--compile")
    assert _graphs() >= 1
    assert json.loads((comp / "config.json").read_text())["train"]["compile"] is True
    # the compiled run resumes its own checkpoint; an eager run resumes it too (compile changes no state)
    train_tiny(comp, 3, "--resume", "--compile")
    train_tiny(comp, 4, "--resume")
    a, b = (load_checkpoint(latest_checkpoint(r / "checkpoints")) for r in (eager, comp))
    assert a.tensors.keys() == b.tensors.keys() and not any("_orig_mod" in k for k in b.tensors)
    # the same steps: the losses and weights agree to float32 rounding (the compiled graph decomposes group norm
    # and runs torch's operators where the eager network runs the fused C kernel)
    np.testing.assert_allclose(losses(comp), losses(eager), rtol=1e-5)
    keys = [k for k in a.tensors if k.startswith("model/")]
    wa, wb = (torch.cat([c.tensors[k].flatten() for k in keys]) for c in (a, b))
    assert (wa - wb).norm() < 1e-4 * wa.norm()  # measured 1e-6 (Adam turns a near-zero gradient's rounding into
    # a full step, so a single bias may differ by more: the whole is compared)


def test_compiled_sampling_draws_the_same_images(tmp_path, monkeypatch):
    run = train_tiny(tmp_path / "run")
    r = load_run(run)
    perturbed(r.model)
    dev = torch.device("cpu")
    plain = sample_batch(r, range(3, 6), 7, SampleOptions(), dev)
    assert _graphs() == 0
    comp = sample_batch(r, range(3, 6), 7, SampleOptions(compile=True), dev)
    assert _graphs() >= 1
    assert plain.abs().mean() > 0.1
    torch.testing.assert_close(comp, plain, rtol=0, atol=1e-4)
    # through the command, two batches of the shape above (another shape costs a second trace, 17 s on the Xeon):
    # the same images, byte for byte or one level apart where a value sits on a boundary
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    made = []  # the networks the command compiles: one for all its batches (Dynamo's cache serves the graph)
    monkeypatch.setattr(generate, "compile_network", lambda net, **kw: made.append(net) or compiled.compile_network(
        net, **kw))
    assert main(["sample", "--run", str(run), "--n", "6", "--out", str(a), "--batch-size", "3", "--quiet"]) == 0
    assert made == []
    assert main(["sample", "--run", str(run), "--n", "6", "--out", str(b), "--batch-size", "3", "--compile",
                 "--quiet"]) == 0
    assert len(made) == 1
    diff = np.abs(np.load(a)["arr_0"].astype(int) - np.load(b)["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_our_cpu_kernels_step_aside_inside_a_compiled_graph(monkeypatch):
    """Winograd and the fused group norm are opaque to the compiler: inside a graph torch's operators run, with
    no graph break (one graph for the whole network)."""
    torch.manual_seed(0)
    net = perturbed(UNet(3, 128, (1, 2), 1, (8,), 0.0, 16).eval(), 0.02)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = net(x, t)
    net.set_winograd(False)
    net.set_fused_norm(False)
    plain = net(x, t)
    net.set_winograd(True)
    net.set_fused_norm(True)
    assert (ref - plain).abs().max() > 1e-6  # eager: our kernels ran (another rounding)
    explained = torch._dynamo.explain(net)(x, t)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    out = compiled.compile_network(net)(x, t)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
