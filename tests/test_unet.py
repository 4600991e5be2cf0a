"""The paper's U-Net: shapes, exact parameter counts, zero output at initialisation, the initialisation's
statistics, the time embedding and the attention against their formulas, argument checks."""

import math

import pytest
import torch

from ddpm.config import ConfigError, ModelConfig, preset, validate
from ddpm.nn import UNet, timestep_embedding
from ddpm.nn.imageconv import ImageConv3x3
from ddpm.nn.unet import AttnBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _randomise(net, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def _tiny(**kw):
    args = dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, resolution=8)
    return UNet(**(args | kw))


def test_cifar10_network_count_shape_and_zero_output():
    net = UNet(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
    assert _count(net) == 35_746_307  # diffusers' google/ddpm-cifar10-32 configuration
    assert [len(level.attn) for level in net.down] == [0, 2, 0, 0]  # attention at 16x16 only (and the middle)
    assert [len(level.attn) for level in net.up] == [0, 3, 0, 0]
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.tensor([999]))
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # conv_out starts at zero


def test_256_network_count_and_shape():
    with torch.device("meta"):  # counting needs no memory or initialisation
        net = UNet(3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0, 256)
    assert _count(net) == 113_673_219  # diffusers' google/ddpm-ema-church-256 configuration
    assert [len(level.attn) for level in net.down] == [0, 0, 0, 0, 2, 0]
    # The full network's forward at batch 1 took 10 to 19 s on the shared 2-core CPU, so the shape is checked on the
    # same layout at a quarter of the width and one block per level.
    small = UNet(3, 32, (1, 1, 2, 2, 4, 4), 1, (16,), 0.0, 256)
    with torch.no_grad():
        assert small(torch.randn(1, 3, 256, 256), torch.tensor([10])).shape == (1, 3, 256, 256)


def test_initialisation_is_variance_scaling_with_zeroed_output_layers():
    net = UNet(3, 64, (1, 2), 1, (16,), 0.0, 32)
    for name, p in net.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
    zeroed = {n for n, _ in net.named_parameters() if n.endswith(("conv2.weight", "proj_out.weight")) or n == "conv_out.weight"}
    assert len(zeroed) == (2 + 4 + 2) + (1 + 2 + 1) + 1  # conv2 of 8 blocks, 4 attention outputs, conv_out
    for name, p in net.named_parameters():
        if name in zeroed:
            assert torch.count_nonzero(p) == 0, name
    # TF's variance_scaling(1.0, "fan_avg", "uniform"): U(-l, l), l = sqrt(3 / ((fan_in + fan_out) / 2))
    for name in ("up.0.block.0.conv1.weight", "temb.dense.1.weight", "down.1.attn.0.q.weight"):
        w = net.get_parameter(name)
        receptive = w[0, 0].numel() if w.ndim == 4 else 1
        limit = math.sqrt(3.0 / ((w.shape[0] + w.shape[1]) * receptive / 2))
        assert w.abs().max() <= limit, name
        assert w.var().item() == pytest.approx(limit**2 / 3, rel=0.05), name


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 128)
    half = 64
    want = torch.tensor([[math.sin(s * math.exp(-math.log(10000) * i / (half - 1))) for i in range(half)]
                         + [math.cos(s * math.exp(-math.log(10000) * i / (half - 1))) for i in range(half)]
                         for s in (0, 1, 37, 999)], dtype=torch.float64)
    assert emb.shape == (4, 128) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), want, rtol=0, atol=2e-4)  # float32 arguments up to 999
    torch.testing.assert_close(emb[:2].double(), want[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(timestep_embedding(t.float(), 128), emb)  # float timesteps give the same
    odd = timestep_embedding(t, 7)  # an odd width is padded with a zero column
    assert odd.shape == (4, 7) and torch.equal(odd[:, 6], torch.zeros(4))


def test_attention_is_the_single_head_formula():
    attn = _randomise(AttnBlock(32), std=0.2, seed=1).double()
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64)
    h = attn.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (attn.q, attn.k, attn.v))  # [B, C, HW]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)  # [B, HW_q, HW_k]
    a = torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 4, 5)
    torch.testing.assert_close(attn(x), x + attn.proj_out(a), rtol=1e-12, atol=1e-12)
    # a channels-last input takes the matrix products on its [B, HW, C] memory: the same formula, that layout out
    out = attn(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, x + attn.proj_out(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_ch, out_ch", [(32, 1), (64, 3), (16, 8), (3, 32)])
def test_image_convolution_is_conv2d_forward_and_backward(in_ch, out_ch):
    conv = ImageConv3x3(in_ch, out_ch).double()
    ref = torch.nn.Conv2d(in_ch, out_ch, 3, padding=1).double()
    ref.load_state_dict(conv.state_dict())
    assert conv._applies(torch.zeros(1, in_ch, 4, 4)) == (out_ch <= 8 < in_ch)  # float32: few outputs only
    conv._applies = lambda x: out_ch <= 8 < in_ch  # float64 too, for the comparison at 1e-12
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, in_ch, 5, 7, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        g = torch.randn(2, out_ch, 5, 7, dtype=torch.float64)
        outs = []
        for m in (conv, ref):
            m.zero_grad()
            x.grad = None
            y = m(x)
            y.backward(g)
            outs.append((y, x.grad, m.weight.grad, m.bias.grad))
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    x = torch.randn(3, in_ch, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 as nn.Conv2d answers it, to bf16's rounding
        y, y_ref = conv.float()(x), ref.float()(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.05)


def test_a_one_channel_image_enters_the_network_channels_last():
    torch.manual_seed(2)
    net = _randomise(_tiny(), std=0.1)
    plain = _tiny(channels_last=False)
    plain.load_state_dict(net.state_dict())
    layouts = []
    net.conv_in.register_forward_hook(lambda m, args, out: layouts.append(
        (args[0].stride(1), out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        torch.testing.assert_close(net(x, t), plain(x, t), rtol=1e-5, atol=1e-5)
    # channel stride 1: oneDNN reads it as NHWC and answers channels-last (with the contiguous strides: NCHW)
    assert layouts == [(1, True)]


def test_output_channels_and_class_embedding():
    net = _randomise(_tiny(out_channels=2, num_classes=10))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    a = net(x, t, torch.tensor([0, 1, 2]))
    b = net(x, t, torch.tensor([5, 1, 2]))
    assert a.shape == (3, 2, 8, 8)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])  # labels act per sample
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), 10)))  # no label = the null class
    with pytest.raises(ValueError, match="no class embedding"):
        _tiny()(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="y must be"):
        net(x, t, torch.tensor([0, 1]))


def test_timesteps_act_per_sample_and_may_be_float_or_scalar():
    net = _randomise(_tiny()).eval()
    x = torch.randn(2, 1, 8, 8)
    out = net(x, torch.tensor([3, 500]))
    torch.testing.assert_close(net(x, torch.tensor([3.0, 500.0])), out)
    torch.testing.assert_close(net(x[1:], torch.tensor([500])), out[1:])  # no mixing across the batch
    torch.testing.assert_close(net(x, 3), net(x, torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="t must be"):
        net(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 1, 9, 8), torch.tensor([1]))


@pytest.mark.parametrize("kwargs,field", [
    (dict(ch=48), "ch"), (dict(ch=0), "ch"), (dict(resolution=36), "resolution"), (dict(ch_mult=()), "ch_mult"),
    (dict(ch_mult=(1, 0)), "ch_mult"), (dict(num_res_blocks=0), "num_res_blocks"), (dict(dropout=1.0), "dropout"),
    (dict(attn_resolutions=(12,)), "attn_resolutions"), (dict(in_channels=0), "in_channels"),
    (dict(out_channels=0), "out_channels"), (dict(num_classes=0), "num_classes"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UNet(**kwargs)  # refused before any layer is built


def test_eval_mode_is_deterministic_and_dropout_only_in_training():
    net = _randomise(_tiny(dropout=0.5))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t), rtol=0, atol=0)
    net.train()
    assert not torch.allclose(net(x, t), net(x, t))


def test_channels_last_changes_the_layout_not_the_function():
    torch.manual_seed(0)
    fast = UNet(3, 32, (1, 2), 1, (8,), 0.0, 16)
    with torch.no_grad():  # non-zero output layers, so the whole network contributes
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = UNet(3, 32, (1, 2), 1, (8,), 0.0, 16, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    assert fast.channels_last and not plain.channels_last and not hasattr(fast.config, "channels_last")
    seen = []
    for net in (fast, plain):
        net.conv_in.register_forward_pre_hook(lambda m, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    with torch.inference_mode():
        out_fast, out_plain = fast(x, t), plain(x, t)
    assert seen == [True, False]  # inference in float32 on the CPU: only `fast` took the channels-last path
    assert out_fast.is_contiguous() and out_fast.abs().mean() > 0.1
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    fast(x, t).pow(2).mean().backward()  # training too: the same gradients from either layout
    plain(x, t).pow(2).mean().backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x, t)  # bf16 inference
    fast(x, t)  # float32 training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x, t)  # bf16-autocast training
    with torch.no_grad():
        fast.double()(x.double(), t)  # no oneDNN path for float64
    assert seen == [True, True, True, False]


def test_inference_updates_its_own_intermediates_in_place_with_the_same_result():
    torch.manual_seed(1)
    net = UNet(3, 32, (1, 2), 1, (8,), 0.1, 16, channels_last=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    x_before = x.clone()
    with_grad = net(x, t)  # autograd on: out-of-place operations
    with torch.inference_mode():
        without = net(x, t)  # in-place SiLU and additions on the network's own tensors
    assert with_grad.abs().mean() > 0.1
    # the same arithmetic up to rounding (kernels may differ with autograd on: 2e-6 here); a tensor written
    # in place while still needed (a skip connection) would differ at the scale of the output
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-4, atol=1e-5)
    assert torch.equal(x, x_before)  # the caller's input is never written


def test_from_config_is_the_keyword_network_and_keeps_its_config_typed():
    m = ModelConfig(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1,
                    resolution=8, num_classes=10)
    torch.manual_seed(3)
    a = UNet.from_config(m, out_channels=2)
    torch.manual_seed(3)
    b = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1,
             resolution=8, out_channels=2, num_classes=10)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and len(sa) > 50
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    assert any(torch.count_nonzero(v) for v in sa.values())  # the same random values, not only the zeros
    assert type(a.config) is ModelConfig and a.config == b.config == m and a.out_channels == b.out_channels == 2
    assert a.config is not m  # its own copy: the caller's later edits do not rewrite the network's description
    m.ch = 64
    assert a.config.ch == 32
    assert UNet.from_config(preset("digits").model).out_channels == 1  # defaults to in_channels


@pytest.mark.parametrize("field,value", [
    ("ch", 48), ("ch", 0), ("resolution", 9), ("ch_mult", ()), ("ch_mult", (1, 0)), ("num_res_blocks", 0),
    ("dropout", 1.0), ("attn_resolutions", (12,)), ("in_channels", 0), ("num_classes", 0),
])
def test_the_network_and_the_configuration_refuse_by_the_same_rule(field, value):
    cfg = preset("digits")
    setattr(cfg.model, field, value)
    with pytest.raises(ConfigError) as by_config:
        validate(cfg)
    with pytest.raises(ConfigError) as by_network:
        UNet.from_config(cfg.model)
    assert str(by_config.value).startswith(f"model.{field} ")
    assert str(by_config.value) == "model." + str(by_network.value)  # one rule (ddpm.config.check_model), two names
