"""The U-Net's last 3x3 convolution, the one onto the image's few channels, as a matrix product and a fold.

`conv_out` maps the network's width back to the image's C channels (1 for Fashion-MNIST, 3 for RGB). oneDNN's
direct kernel blocks output channels in 16s, so with 1 to 8 it runs at a few GFLOP/s where the network's other
3x3 convolutions run near the machine's peak: 3.0 ms for the fashion network's 32 -> 1 (batch 64, 28x28), 0.3% of
its work in 1% of its forward, on the Intel Xeon of benchmarks/RESULTS.md. Here one product of the
channels-last input with the weight as a [C_in, 9 C_out] matrix gives every pixel's 9 taps per output channel,
and `F.fold` (unfold's adjoint) adds each tap into the pixel it belongs to, with the kernel flipped so that the
taps land where a convolution puts them: 2.0 ms there, and 6.4 against 7.9 ms forward and backward.

The same function as nn.Conv2d's (stride 1, padding 1), other rounding (a sum in another order); autograd
differentiates it through torch's own operators. Used on the CPU in float32 and bfloat16 (autocast included)
when the output has at most `MAX_CHANNELS` channels and the input more; everywhere else nn.Conv2d's kernel runs.
(The first convolution, from the image's channels, is oneDNN's: it runs fast once its input is unambiguously
channels-last, `ddpm.nn.unet._channels_last`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# outputs up to this many take the product (9 taps each per pixel); oneDNN's blocks of 16 outputs run wider ones
MAX_CHANNELS = 8


class ImageConv3x3(nn.Conv2d):
    """nn.Conv2d(in_ch, out_ch, 3, padding=1) (the same parameters and state-dict names) whose forward on the CPU
    takes one matrix product and `fold` when it has at most MAX_CHANNELS outputs and more inputs."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)
        self.matmul = True  # off: nn.Conv2d's kernel always (for measuring)

    def _applies(self, x: torch.Tensor) -> bool:
        return (self.matmul and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in (torch.float32, torch.bfloat16)
                and self.out_channels <= MAX_CHANNELS < self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._applies(x):
            return super().forward(x)
        N, C, H, W = x.shape
        K = self.out_channels
        # few outputs: each pixel's taps, weight [K, C, 3, 3] flipped so that tap (2 - kh, 2 - kw) of pixel p is
        # weight (kh, kw) applied at p; fold adds tap (a, b) of pixel p into the output at p + (a - 1, b - 1)
        w = self.weight.flip(2, 3).permute(0, 2, 3, 1).reshape(K * 9, C)
        taps = torch.mm(x.permute(0, 2, 3, 1).reshape(N * H * W, C), w.t())  # [N H W, 9 K]
        # fold runs 4x faster on a contiguous [N, 9 K, H W] than on the transposed view
        y = F.fold(taps.view(N, H * W, K * 9).transpose(1, 2).contiguous(), (H, W), 3, padding=1)
        return y + self.bias.to(y.dtype)[:, None, None]
