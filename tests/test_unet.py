"""The paper's U-Net: shapes, exact parameter counts, zero output at initialisation, the time embedding."""

import math

import pytest
import torch

from ddpm.nn import UNet, timestep_embedding


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_cifar10_network():
    net = UNet(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
    assert _count(net) == 35_746_307  # diffusers' google/ddpm-cifar10-32 configuration
    x = torch.randn(2, 3, 32, 32)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    assert [len(level.attn) for level in net.down] == [0, 2, 0, 0]  # attention at 16x16 only (and the middle)


def test_256_network_count_and_shape():
    net = UNet(3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0, 256)
    assert _count(net) == 113_673_219  # diffusers' google/ddpm-ema-church-256 configuration
    assert [len(level.attn) for level in net.down] == [0, 0, 0, 0, 2, 0]
    small = UNet(3, 32, (1, 1, 2, 2, 4, 4), 1, (16,), 0.0, 256)  # same layout, narrower: a fast shape check
    assert small(torch.randn(1, 3, 256, 256), torch.tensor([10])).shape == (1, 3, 256, 256)


def test_output_channels_and_class_embedding():
    net = UNet(1, 32, (1, 2), 1, (4,), 0.0, 8, out_channels=2, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    a = net(x, t, torch.tensor([0, 1, 2]))
    b = net(x, t, torch.tensor([5, 1, 2]))
    assert a.shape == (3, 2, 8, 8)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), 10)))  # no label = the null class
    with pytest.raises(ValueError, match="no class embedding"):
        UNet(1, 32, (1, 2), 1, (), 0.0, 8)(x, t, torch.tensor([0, 1, 2]))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 128)
    half = 64
    i = 5
    f = math.exp(-math.log(10000) * i / (half - 1))
    assert emb[2, i].item() == pytest.approx(math.sin(37 * f), abs=1e-5)
    assert emb[2, half + i].item() == pytest.approx(math.cos(37 * f), abs=1e-5)
    assert emb.shape == (4, 128) and torch.equal(emb[0, :half], torch.zeros(half))


@pytest.mark.parametrize("kwargs,field", [
    (dict(ch=48), "ch"), (dict(resolution=36), "resolution"), (dict(ch_mult=()), "ch_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"), (dict(dropout=1.0), "dropout"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UNet(**kwargs)


def test_eval_mode_is_deterministic_and_dropout_only_in_training():
    net = UNet(1, 32, (1, 2), 1, (4,), 0.5, 8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t), rtol=0, atol=0)
    net.train()
    assert not torch.allclose(net(x, t), net(x, t))
