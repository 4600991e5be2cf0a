"""The fused group norm -> swish -> dropout kernel (ddpm.nn.fused) against torch's operators in float64."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.nn import UNet, fused

pytestmark = pytest.mark.skipif(not fused.status()[0], reason=f"fused kernel unavailable: {fused.status()[1]}")


def _norm(C, groups=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(groups, C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(C, generator=g) * 0.5 + 1)
        norm.bias.copy_(torch.randn(C, generator=g) * 0.5)
    return norm


def _x(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 2  # an offset mean: the variance must not come from E[x^2] - E[x]^2
    return x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()


def _reference(x, norm, silu=True, keep=None, p=0.0):
    """float64 autograd of torch's own operators; keep: the dropout mask to apply (scaled by 1 / (1 - p))."""
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    b64 = norm.bias.detach().double().requires_grad_()
    y = F.group_norm(x64, norm.num_groups, w64, b64, norm.eps)
    if silu:
        y = F.silu(y)
    if keep is not None:
        y = y * keep.double() / (1 - p)
    return y, (x64, w64, b64)


@pytest.mark.parametrize("shape", [(2, 64, 5, 7), (16, 128, 8, 8), (1, 256, 4, 4), (3, 96, 16, 16)])
@pytest.mark.parametrize("silu", [True, False])
def test_float32_output_and_gradients_equal_float64_reference(shape, silu):
    norm = _norm(shape[1])
    x = _x(shape)
    y = fused.group_norm_act(x, norm, silu=silu)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    ref, inputs = _reference(x, norm, silu)
    dy = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, norm.weight, norm.bias], dy.float())
    want = torch.autograd.grad(ref, inputs, dy)
    assert (y.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want, strict=True):
        err = ((g.double() - w).abs().max() / w.abs().max()).item()
        assert err < 1e-5, (name, err)


def test_bfloat16_error_is_no_larger_than_torchs_own_bfloat16():
    shape = (8, 128, 16, 16)
    norm = _norm(128)
    x = _x(shape, torch.bfloat16)
    dy = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref, inputs = _reference(x, norm)
    want = torch.autograd.grad(ref, inputs, dy.double())

    def errors(y, grads):
        out = [((y.double() - ref).abs().max() / ref.abs().max()).item()]
        return out + [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, want, strict=True)]

    y = fused.group_norm_act(x, norm)
    ours = errors(y, torch.autograd.grad(y, [x, norm.weight, norm.bias], dy))
    y = F.silu(norm(x))  # torch's channels-last bf16 kernels
    theirs = errors(y, torch.autograd.grad(y, [x, norm.weight, norm.bias], dy))
    assert y.dtype == torch.bfloat16
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), ours, theirs, strict=True):
        assert a <= 1.5 * b + 1e-3, (name, a, b)
    assert max(ours) < 2e-2  # bf16 keeps 8 bits: a relative rounding of 2^-9 per element


@pytest.mark.parametrize("shape", [(3, 96, 16, 16), (4, 32, 28, 28)])  # 3 channels a group; 1 (the shift cancels)
def test_a_shift_is_added_before_the_norm_and_gets_its_gradient(shape):
    N, C = shape[:2]
    norm = _norm(C)
    x = _x(shape)
    shift = (torch.randn(N, C, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    y = fused.group_norm_act(x, norm, shift=shift, dropout=0.2)
    # against float64 on x + shift with the kernel's own dropout mask
    keep = y.detach() != 0
    x64 = x.detach().double().requires_grad_()
    s64 = shift.detach().double().requires_grad_()
    ref = F.silu(F.group_norm(x64 + s64[:, :, None, None], 32, norm.weight.double(), norm.bias.double(), norm.eps))
    ref = ref * keep.double() / 0.8
    assert (y.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    dy = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, shift], dy.float())
    want = torch.autograd.grad(ref, [x64, s64], dy)
    assert ((got[0].double() - want[0]).abs().max() / want[0].abs().max()).item() < 1e-5
    # the shift's gradient is the sum of dx over the positions; with one channel a group it is 0 (a group's
    # constant cancels in its norm), so its error is measured against that sum's scale
    scale = got[0].double().abs().sum(dim=(2, 3)).max()
    assert ((got[1].double() - want[1]).abs().max() / scale).item() < 1e-6
    if C == 32:
        assert want[1].abs().max() < 1e-10 * scale
    with pytest.raises(ValueError, match=r"shift must be \[N, C\]"):
        fused.group_norm_act(x, norm, shift=shift[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shift_is_the_sum_torchs_add_would_store(dtype):
    """The kernel adds the shift as it reads x, rounded to x's dtype as torch's add of two such tensors rounds:
    the output and dx are bit for bit those of the kernel on torch's own sum; so is torch's operators' path."""
    norm = _norm(64)
    x = _x((2, 64, 8, 8), dtype)
    shift = torch.randn(2, 64).to(dtype).requires_grad_()
    dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    y = fused.group_norm_act(x, norm, shift=shift)
    dx, dshift = torch.autograd.grad(y, [x, shift], dy)
    summed = (x + shift[:, :, None, None]).contiguous(memory_format=torch.channels_last)
    y2 = fused.group_norm_act(summed, norm)
    assert torch.equal(y, y2)
    assert torch.equal(dx, torch.autograd.grad(y2, [x], dy)[0])
    assert dshift.dtype == dtype
    assert torch.allclose(dshift.float(), dx.float().sum(dim=(2, 3)), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                          atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    fallback = fused.group_norm_act(x, norm, shift=shift, fused=False)
    assert fallback.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (fallback.float() - y.float()).abs().max() <= tol * y.float().abs().max()


def test_dropout_drops_a_fraction_p_and_the_gradient_follows_the_same_mask():
    p, shape = 0.3, (4, 64, 16, 16)
    norm = _norm(64)
    x = _x(shape)
    y = fused.group_norm_act(x, norm, dropout=p)
    keep = y.detach() != 0
    n = keep.numel()
    dropped = 1 - keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma, (dropped, p)
    ref, inputs = _reference(x, norm, keep=keep, p=p)
    assert (y.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    dy = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, norm.weight, norm.bias], dy.float())
    for g, w in zip(got, torch.autograd.grad(ref, inputs, dy), strict=True):
        assert ((g.double() - w).abs().max() / w.abs().max()).item() < 1e-5
    # every channel and position drops at the same rate (no structure in the hash): per-channel counts
    per_channel = 1 - keep.double().mean(dim=(0, 2, 3))
    assert per_channel.std().item() < 3 * (p * (1 - p) / (n / 64)) ** 0.5


def test_dropout_masks_follow_torchs_seed():
    norm = _norm(64)
    x = _x((2, 64, 8, 8))
    torch.manual_seed(5)
    a = fused.group_norm_act(x, norm, dropout=0.5)
    b = fused.group_norm_act(x, norm, dropout=0.5)
    torch.manual_seed(5)
    c = fused.group_norm_act(x, norm, dropout=0.5)
    assert torch.equal(a, c)
    agree = ((a == 0) == (b == 0)).double().mean().item()
    assert 0.4 < agree < 0.6  # two independent masks at p = 0.5 agree on about half the elements


@pytest.mark.parametrize("N", [1, 16])
def test_results_do_not_depend_on_the_thread_count(N):
    """One sample runs the rows path (here two blocks of rows, the second partial), 16 the items path."""
    norm = _norm(128)
    x = _x((N, 128, 12, 13))
    dy = torch.randn(x.shape)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            y = fused.group_norm_act(x, norm, dropout=0.1)
            out.append([y, *torch.autograd.grad(y, [x, norm.weight, norm.bias], dy)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("C", [32, 64, 96, 128, 160])
def test_a_batch_and_its_samples_alone_give_the_same_bits(C):
    """A batch of 16 runs the items path, one work item per sample over all C channels (the kernel has copies for
    32 to 128 channels with the width a constant, and the general loops for 160); one sample alone runs the rows
    path: the two must agree bit for bit."""
    norm = _norm(C)
    x = _x((16, C, 6, 5))
    shift = torch.randn(16, C)
    dy = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    y = fused.group_norm_act(x, norm, shift=shift)
    dx = torch.autograd.grad(y, x, dy)[0]
    for i in (0, 7, 15):
        xi = x[i:i + 1].detach().clone().requires_grad_()
        yi = fused.group_norm_act(xi, norm, shift=shift[i:i + 1])
        assert torch.equal(yi, y[i:i + 1])
        assert torch.equal(torch.autograd.grad(yi, xi, dy[i:i + 1])[0], dx[i:i + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32, 17, 19), (3, 64, 9, 30), (2, 160, 11, 13), (5, 256, 4, 4)])
def test_the_rows_and_the_items_paths_give_the_same_bits(monkeypatch, shape, dtype):
    """The kernel's two ways of cutting the work (`_path` 1: items of whole samples or blocks of their groups;
    2: blocks of 128 rows, several of them here, the last partial) with a shift, dropout and swish, forward and
    backward: bit for bit, so that its own choice between them changes the speed only."""
    norm = _norm(shape[1])
    x = _x(shape, dtype)
    shift = torch.randn(shape[:2], requires_grad=True)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    out = []
    for path in (1, 2):
        monkeypatch.setattr(fused, "_path", path)
        torch.manual_seed(0)
        y = fused.group_norm_act(x, norm, dropout=0.2, shift=shift)
        out.append([y, *torch.autograd.grad(y, [x, norm.weight, norm.bias, shift], dy)])
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)
    assert (out[0][0] == 0).float().mean().item() == pytest.approx(0.2, abs=0.05)  # dropout ran


def test_without_autograd_the_kernel_is_called_directly_with_the_same_bits(monkeypatch):
    """No graph to record (inference mode, no_grad, or no input requiring grad): the kernel runs without the autograd
    Function, drawing the same dropout seed, and gives the same bits as the recorded call."""
    norm = _norm(64)
    x = _x((3, 64, 5, 6))
    shift = torch.randn(3, 64)
    applied = []
    apply = fused._GroupNormAct.apply
    monkeypatch.setattr(fused._GroupNormAct, "apply", lambda *a: applied.append(1) or apply(*a))
    torch.manual_seed(0)
    want = fused.group_norm_act(x, norm, dropout=0.3, shift=shift)
    assert want.grad_fn is not None and applied == [1]
    for context in (torch.inference_mode, torch.no_grad):
        torch.manual_seed(0)
        with context():
            got = fused.group_norm_act(x, norm, dropout=0.3, shift=shift)
        assert torch.equal(got, want.detach()) and applied == [1]
    torch.manual_seed(0)
    frozen = _norm(64).requires_grad_(False)
    got = fused.group_norm_act(x.detach(), frozen, dropout=0.3, shift=shift)
    assert got.grad_fn is None and torch.equal(got, want.detach()) and applied == [1]


@pytest.mark.parametrize("path", [1, 2])
def test_an_empty_batch_gives_empty_results_and_zero_parameter_gradients(monkeypatch, path):
    monkeypatch.setattr(fused, "_path", path)
    norm = _norm(64)
    x = _x((0, 64, 8, 8))
    y = fused.group_norm_act(x, norm, dropout=0.1, shift=torch.zeros(0, 64))
    assert y.shape == (0, 64, 8, 8)
    dx, dw, db = torch.autograd.grad(y, [x, norm.weight, norm.bias], torch.ones_like(y))
    assert dx.shape == x.shape and not dw.any() and not db.any()


def test_nan_stays_in_its_group():
    norm = _norm(64)
    x = _x((2, 64, 4, 4)).detach().clone()
    x[1, 5, 2, 3] = float("nan")  # sample 1, group 2 (channels 4-5)
    y = fused.group_norm_act(x, norm)
    nan = torch.isnan(y)
    assert nan[1, 4:6].all() and nan.sum() == 2 * 16
    assert torch.isnan(F.silu(norm(x))).sum() == nan.sum()


def test_other_inputs_take_torchs_operators():
    norm = _norm(64)
    x = _x((2, 64, 8, 8)).detach()
    norm64 = _norm(64).double()
    for other, n in ((x.contiguous(), norm), (x.double().contiguous(memory_format=torch.channels_last), norm64)):
        assert not fused.fused_applies(other, n)
        assert torch.equal(fused.group_norm_act(other, n), F.silu(n(other)))
    assert fused.fused_applies(x, norm)
    assert torch.equal(fused.group_norm_act(x, norm, fused=False), F.silu(norm(x)))
    with pytest.raises(ValueError, match="dropout must be in"):
        fused.group_norm_act(x, norm, dropout=1.0)


def test_unet_is_the_same_network_with_the_kernel(one_thread):
    torch.manual_seed(0)
    net = UNet(3, 32, (1, 2), 1, (8,), 0.1, 16)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 100, 999])
    outs = []
    for enabled in (True, False):
        net.set_fused_norm(enabled)
        net.eval()  # no dropout: the two paths compute the same function
        with torch.no_grad():
            y_eval = net(x, t)
        net.train()
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        net.zero_grad()
        y = net(x, t)
        y.square().mean().backward()
        outs.append([y_eval, y.detach()] + [p.grad.clone() for p in net.parameters()])
    scale = max(b.abs().max().item() for b in outs[1][2:])  # some gradients are zero up to rounding
    for i, (a, b) in enumerate(zip(*outs, strict=True)):
        assert (a - b).abs().max().item() < 1e-4 * (b.abs().max().item() if i < 2 else scale), i


def _subprocess(code, env_extra, tmp_path):
    """code run by a fresh Python with the environment plus env_extra (a None value removes that variable)."""
    env = {**os.environ, "DDPM_CACHE_DIR": str(tmp_path), "PYTHONWARNINGS": "default", **env_extra}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


_PROBE = """
import torch, torch.nn.functional as F
from ddpm.nn import fused
norm = torch.nn.GroupNorm(32, 64)
x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
assert torch.allclose(fused.group_norm_act(x, norm), F.silu(norm(x)), atol=1e-5)
print(fused.status())
"""


def test_without_a_compiler_it_warns_once_and_runs_torchs_operators(tmp_path):
    done = _subprocess(_PROBE, {"CC": "/nonexistent/cc"}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(False, \"could not build the kernel" in done.stdout and "/nonexistent/cc" in done.stdout
    assert done.stderr.count("fused CPU group-norm kernel is off") == 1
    done = _subprocess(_PROBE, {"DDPM_FUSED_CPU": "0"}, tmp_path)
    assert done.returncode == 0 and "(False, 'turned off by DDPM_FUSED_CPU=0')" in done.stdout
    assert "kernel is off" not in done.stderr  # asked for: no warning


def test_the_kernel_is_compiled_once_into_the_cache_and_again_for_torchs_avx2_switch(tmp_path):
    """Built on first use into the cache folder, then read back; ATEN_CPU_CAPABILITY=avx2 (an AVX-512 machine
    standing in for an AVX2 one) builds a second library, for Haswell's instruction set, which computes the same
    function (the probe's allclose). One test: each probe is a process importing torch and a compiler run. The
    native probes run without the switch even where the suite itself runs held to AVX2."""
    native = {"ATEN_CPU_CAPABILITY": None}
    first = _subprocess(_PROBE, native, tmp_path)
    assert first.returncode == 0 and "(True, 'compiled kernel loaded (-march=native" in first.stdout, first.stderr
    built = sorted((tmp_path / "kernels").glob("fused_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _subprocess(_PROBE, native, tmp_path)
    assert second.returncode == 0 and "(True," in second.stdout
    assert sorted((tmp_path / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    if not fused._X86:  # the instruction sets named are x86-64's
        return
    held = _subprocess(_PROBE, {"ATEN_CPU_CAPABILITY": "avx2"}, tmp_path)
    assert held.returncode == 0, held.stderr
    assert "-march=haswell" in held.stdout
    assert len(list((tmp_path / "kernels").glob("fused_cpu-*.so"))) == 2


@pytest.mark.parametrize("channels", [3, 1])  # one channel: conv_in's output would come back contiguous
def test_unet_takes_the_kernel_by_default_for_every_group_norm(monkeypatch, channels):
    calls = []
    apply = fused._GroupNormAct.apply
    # (whether a shift was given, silu, p) of each call
    monkeypatch.setattr(fused._GroupNormAct, "apply", lambda *a: calls.append((a[3] is not None, *a[6:])) or apply(*a))
    net = UNet(channels, 32, (1, 2), 1, (8,), 0.1, 16)  # defaults: channels-last, fused_norm=True
    net(torch.randn(2, channels, 16, 16), torch.tensor([3, 400])).sum().backward()
    blocks = sum(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert len(calls) == blocks  # every group norm of the network
    # attention; norm1 and norm_out; norm2, which adds the time embedding as its shift
    assert sorted(set(calls)) == [(False, False, 0.0), (False, True, 0.0), (True, True, 0.1)]
    calls.clear()
    net.set_fused_norm(False)
    net(torch.randn(2, channels, 16, 16), torch.tensor([3, 400]))
    assert not calls


# ---------------------------------------------------------------- torch's operators draw the kernel's masks


def _both_ways(x, norm, p, seed, silu=True):
    """(kernel's output, fallback's output, fallback's on an NCHW-contiguous copy of x), each from
    torch.manual_seed(seed), and the generator's next draw after each: the generator must advance alike."""
    out, after = [], []
    for inp, fuse in ((x, True), (x, False), (x.detach().contiguous().requires_grad_(), False)):
        torch.manual_seed(seed)
        out.append(fused.group_norm_act(inp, norm, silu=silu, dropout=p, fused=fuse))
        after.append(torch.randint(0, 2**62, ()))
    assert fused.fused_applies(x, norm) and not fused.fused_applies(out[2], norm)
    assert after[0] == after[1] == after[2]
    return out


@pytest.mark.parametrize("shape, groups", [((2, 9, 5, 7), 3), ((3, 15, 4, 6), 5), ((4, 64, 8, 8), 32),
                                           ((3, 96, 24, 24), 32)])  # the last: 165,888 elements, two chunks
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchs_operators_draw_the_kernels_masks_forward_and_backward(shape, groups, p, dtype):
    norm = _norm(shape[1], groups)
    x = _x(shape, dtype)
    y_kernel, y_torch, y_nchw = _both_ways(x, norm, p, seed=7)
    drop = y_kernel == 0
    assert abs(drop.double().mean().item() - p) < 5 * (p * (1 - p) / drop.numel()) ** 0.5
    assert torch.equal(y_torch == 0, drop) and torch.equal(y_nchw == 0, drop)  # bitwise the same mask
    torch.manual_seed(7)
    assert torch.equal(fused.dropout_mask(shape, p, fused._dropout_seed()), drop)
    assert y_torch.is_contiguous(memory_format=torch.channels_last) and y_nchw.is_contiguous()
    # the values to rounding (the kernel's and torch's group norm and swish round differently), and the
    # gradients through the same mask: both equal the float64 reference that applies the kernel's mask (measured
    # at most 3e-7 and 1.1e-6 in float32, 4.6e-3 and 8.4e-3 in bf16); with another mask they miss it by 0.66 or more
    tol_y, tol_g = (2e-6, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    ref, inputs = _reference(x, norm, keep=~drop, p=p)
    other, other_inputs = _reference(x, norm, keep=~drop.roll(1, dims=1), p=p)
    for y in (y_torch, y_nchw):
        assert (y.double() - ref).abs().max() <= tol_y * ref.abs().max()
    assert (other - ref).abs().max() > 0.3 * ref.abs().max()
    dy = torch.randn(shape, dtype=torch.float64)
    want = torch.autograd.grad(ref, inputs, dy)
    for y in (y_kernel, y_torch):
        got = torch.autograd.grad(y, [x, norm.weight, norm.bias], dy.to(dtype))
        for name, g, w in zip(("dx", "dweight", "dbias"), got, want, strict=True):
            err = ((g.double() - w).abs().max() / w.abs().max()).item()
            assert err < tol_g, (name, err)
    wrong = torch.autograd.grad(other, other_inputs, dy)
    assert max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(wrong, want, strict=True)) > 0.3


def test_the_mask_does_not_depend_on_the_chunks_it_is_hashed_in(monkeypatch):
    shape = (2, 24, 7, 9)  # 3,024 elements: chunks of 1,000 end off the channel rows and leave a short one
    whole = fused.dropout_mask(shape, 0.4, 2**64 - 5)
    monkeypatch.setattr(fused, "_CHUNK_CPU", 1000)
    assert torch.equal(fused.dropout_mask(shape, 0.4, 2**64 - 5), whole)
    assert 0.3 < whole.double().mean().item() < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_torchs_operators_scale_the_survivors_as_the_kernel_does_bit_for_bit(dtype, p):
    """Group norm made exact (eps 0, x = +-1 in a checkerboard: every group has mean 0 and variance 1; weights
    that bf16 holds exactly, bias 0; no swish), so that both paths feed dropout the same values +-weight; then the
    kernel's float32 multiplication by its float32 scale and torch's must agree bitwise."""
    N, C, H, W = 3, 12, 4, 6
    norm = nn.GroupNorm(4, C, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_((torch.randn(C) + 1.5).bfloat16().float())
        norm.bias.zero_()
    n, c, h, w = torch.meshgrid(*(torch.arange(k) for k in (N, C, H, W)), indexing="ij")
    x = (1.0 - 2.0 * ((n + c + h + w) % 2)).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y_kernel, y_torch, y_nchw = _both_ways(x, norm, p, seed=11, silu=False)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    want = torch.where(y_kernel == 0, 0.0, x.detach().float() * norm.weight.detach()[:, None, None] * scale)
    assert torch.equal(y_kernel, want.to(dtype)) and torch.equal(y_torch, y_kernel) and torch.equal(y_nchw, y_kernel)
    # the backward pass: the gradient into dropout is the incoming one, scaled where kept and zero where dropped,
    # bit for bit as the kernel's dropout_row computes it
    h = torch.randn(N, C, H, W).to(dtype).requires_grad_()
    dy = torch.randn(N, C, H, W).to(dtype)
    torch.manual_seed(11)  # the kernel's seed again
    (g,) = torch.autograd.grad(fused._hashed_dropout(h, p, inplace=False), h, dy)
    assert torch.equal(g, torch.where(y_kernel == 0, 0.0, dy.float() * scale).to(dtype))


def _train_three_steps(fused_norm, torch_masks=False, monkeypatch=None):
    """Three Adam steps of a small UNet with dropout 0.3 on fixed random data, from fixed seeds; returns the
    parameters before and after, flat."""
    if torch_masks:
        monkeypatch.setattr(fused, "_hashed_dropout", lambda h, p, inplace: F.dropout(h, p, True, inplace))
    torch.manual_seed(0)
    net = UNet(3, 32, (1, 2), 1, (8,), 0.3, 16)
    net.set_fused_norm(fused_norm)
    start = torch.cat([p.detach().flatten() for p in net.parameters()])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, t = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 1000, (4,), generator=g)
        loss = (net(x, t) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if torch_masks:
        monkeypatch.undo()
    return start, torch.cat([p.detach().flatten() for p in net.parameters()])


def test_a_seeded_run_trains_the_same_weights_with_or_without_the_kernel(one_thread, monkeypatch):
    start, kernel = _train_three_steps(True)
    _, torchs = _train_three_steps(False)
    _, torch_masks = _train_three_steps(False, torch_masks=True, monkeypatch=monkeypatch)
    step = (kernel - start).norm()
    assert step > 0.1  # the three steps moved the weights
    # measured 2.7e-4: Adam turns a near-zero gradient's rounding into a full step (the kernel's group norm and
    # torch's differ in the last bits), so the whole is compared. torch's own dropout masks: 0.76
    assert (torchs - kernel).norm() < 3e-3 * step
    assert (torch_masks - kernel).norm() > 0.3 * step


def test_inside_a_compiled_graph_torchs_dropout_runs_without_a_graph_break():
    norm = _norm(64)
    x = _x((2, 64, 8, 8)).detach()
    explained = torch._dynamo.explain(lambda x: fused.group_norm_act(x, norm, dropout=0.5))(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_torchs_operators_draw_the_kernels_masks():
    norm = _norm(96)
    x = _x((3, 96, 24, 24))
    y_kernel, _, _ = _both_ways(x, norm, 0.3, seed=3)
    x_gpu = x.detach().cuda().requires_grad_()
    norm_gpu = _norm(96).cuda()
    torch.manual_seed(3)
    y_gpu = fused.group_norm_act(x_gpu, norm_gpu, dropout=0.3)
    after = torch.randint(0, 2**62, ())
    torch.manual_seed(3)
    fused.group_norm_act(x, norm, dropout=0.3)
    assert after == torch.randint(0, 2**62, ())
    assert torch.equal(y_gpu.cpu() == 0, y_kernel == 0)
    (g,) = torch.autograd.grad(y_gpu, x_gpu, torch.ones_like(y_gpu))
    assert torch.isfinite(g).all()
