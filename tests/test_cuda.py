"""The CUDA paths, where a GPU is present (skipped elsewhere; benchmarks/gpu_check.sh runs them on a lent GPU):
the network and a training step on the GPU compute what they compute on the CPU; sampling through
torch.compile with CUDA graphs draws the images eager sampling draws; bf16 and fp16 training stay finite and
near float32."""

import numpy as np
import pytest
import torch
from tiny import losses, perturbed, train_log, train_tiny

from ddpm import UNet, load_run
from ddpm.generate import SampleOptions, sample_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 on the GPU, so that it can be held to the CPU's results."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_network_on_the_gpu_computes_what_it_computes_on_the_cpu():
    torch.manual_seed(0)
    net = perturbed(UNet(3, 128, (1, 2), 1, (8,), 0.0, 16))
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999])
    ref = net(x, t)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), list(net.parameters()))
    net.cuda()
    out = net(x.cuda(), t.cuda())
    g_out = torch.autograd.grad(out.pow(2).sum(), list(net.parameters()))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_training_on_the_gpu_follows_the_cpu_and_low_precision_stays_finite(tmp_path):
    runs = {}
    for name, extra in (("cpu", ["--set", "train.device=cpu"]), ("fp32", ["--set", "train.device=cuda"]),
                        ("bf16", ["--set", "train.device=cuda", "--set", "train.precision=bf16"]),
                        ("fp16", ["--set", "train.device=cuda", "--set", "train.precision=fp16"])):
        runs[name] = tmp_path / name
        train_tiny(runs[name], 6, *extra)
    cpu = losses(runs["cpu"])
    np.testing.assert_allclose(losses(runs["fp32"]), cpu, rtol=1e-3)
    for name in ("bf16", "fp16"):
        log = train_log(runs[name])
        assert all(np.isfinite(e["loss"]) for e in log), (name, log)
        # the first loss is the same network on the same batch: only the forward's precision differs
        assert abs(log[0]["loss"] - cpu[0]) < 2e-2 * cpu[0], (name, log[0]["loss"], cpu[0])
        # bf16 keeps float32's range: every step applies; fp16's gradient scaler may skip the first steps
        # (gradients overflowing at its initial scale) and must then lower the scale until steps apply
        applied = sum(e["finite"] for e in log)
        assert applied == len(log) if name == "bf16" else applied >= 1, (name, log)
        run = load_run(runs[name], ema=False)
        assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_compiled_sampling_with_cuda_graphs_draws_the_same_images(tmp_path):
    dev = torch.device("cuda")
    run = load_run(train_tiny(tmp_path / "run"), device=dev)
    perturbed(run.model)
    plain = sample_batch(run, range(8), 3, SampleOptions(), dev)
    graphed = sample_batch(run, range(8), 3, SampleOptions(compile=True), dev)
    assert plain.abs().mean() > 0.1
    torch.testing.assert_close(graphed, plain, rtol=0, atol=1e-3)
    # per-sample seeds: the same images whatever the batch, the graphs recorded for the first batch size included
    again = sample_batch(run, range(4, 8), 3, SampleOptions(compile=True), dev)
    torch.testing.assert_close(again, plain[4:], rtol=0, atol=1e-3)


def test_low_precision_sampling_on_the_gpu_stays_near_float32(tmp_path):
    dev = torch.device("cuda")
    run = load_run(train_tiny(tmp_path / "run"), device=dev)
    perturbed(run.model)
    plain = sample_batch(run, range(8), 3, SampleOptions(), dev)
    for precision in ("bf16", "fp16"):
        low = sample_batch(run, range(8), 3, SampleOptions(precision=precision), dev)
        assert low.dtype == torch.float32
        assert 0 < (low - plain).abs().mean() < 0.02, precision  # the CPU's bf16: 1.6e-3
