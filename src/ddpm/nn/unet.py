"""The paper's U-Net (Ho et al. 2020, appendix B; PixelCNN++ backbone): Wide-ResNet blocks with group norm and
swish, a sinusoidal timestep embedding added in every block, single-head self-attention at the listed
resolutions and in the middle.

Module names follow the original code's variables (`temb.dense.0`, `down.0.block.1`, `mid.attn_1`,
`up.3.upsample.conv`, `norm_out`, ...), so the released checkpoints map one to one. The network knows
nothing of noise schedules: it maps (x_t [B, C, H, W], t [B]) to a tensor of x's spatial shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import ModelConfig, check_model

from .fused import group_norm_act
from .imageconv import ImageConv3x3
from .winograd import Conv3x3


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] of timesteps t [B]: sin then cos, frequencies exp(-log(10000) i / (half - 1)),
    as in the paper's code (diffusers: flip_sin_to_cos=False, freq_shift=1)."""
    if dim < 4:
        raise ValueError(f"dim must be >= 4 (two frequencies at least); got {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in the channels-last layout, which every later layer keeps. A one-channel tensor's strides fit both
    layouts, and torch keeps the contiguous ones: oneDNN then reads it as NCHW, answers with a contiguous output
    and runs conv_in slower (1.4 against 0.93 ms for the fashion network's at batch 64 in a warm process, 5.7
    against 0.94 in a fresh one; benchmarks/RESULTS.md). Its channel stride set to 1 makes it channels-last
    unambiguously: the same memory, the same values."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> + dense(swish(temb)) -> GN -> swish -> dropout -> conv3x3 (zero init),
    plus a 1x1 "nin" shortcut when the channel count changes. x [B, C_in, H, W] -> [B, C_out, H, W]."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3x3(out_ch, out_ch)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.fused_norm = True  # UNet.set_fused_norm

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act = swish(temb) [B, temb_ch], computed once per forward for all blocks. h + temb is the second
        # group norm's shift: the fused kernel adds it as it reads h, with no pass over memory of its own. Without
        # autograd the residual sum is taken in place (one pass fewer); never in x itself.
        h = self.conv1(group_norm_act(x, self.norm1, fused=self.fused_norm))
        p = self.dropout.p if self.training else 0.0
        h = self.conv2(group_norm_act(h, self.norm2, dropout=p, fused=self.fused_norm,
                                      shift=self.temb_proj(temb_act)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip) if not torch.is_grad_enabled() else skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: GN -> 1x1 q, k, v -> softmax(q k^T / sqrt(C)) v
    -> 1x1 proj_out (zero init) -> residual. x [B, C, H, W] -> same."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.fused_norm = True  # UNet.set_fused_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = group_norm_act(x, self.norm, silu=False, fused=self.fused_norm)
        if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
            # channels-last h is [B, HW, C] in memory: q, k and v as one matrix product on it, and proj_out on
            # the attention's [B, HW, C] output, with no layout copies (1.15x this block's forward on the
            # fashion network, benchmarks/RESULTS.md). The same products as the 1x1 convolutions below.
            hf = h.permute(0, 2, 3, 1).reshape(B, 1, H * W, C)
            w = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * C, C)
            q, k, v = F.linear(hf, w, torch.cat([self.q.bias, self.k.bias, self.v.bias])).chunk(3, dim=-1)
            a = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
            out = F.linear(a, self.proj_out.weight.view(C, C), self.proj_out.bias)
            out = out.view(B, H, W, C).permute(0, 3, 1, 2)  # channels-last [B, C, H, W]
            return out.add_(x) if not torch.is_grad_enabled() else x + out
        q = self.q(h).reshape(B, 1, C, H * W).transpose(-1, -2)  # (B, 1 head, HW, C)
        k = self.k(h).reshape(B, 1, C, H * W).transpose(-1, -2)
        v = self.v(h).reshape(B, 1, C, H * W).transpose(-1, -2)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, fused
        a = a.transpose(-1, -2).reshape(B, C, H, W)
        out = self.proj_out(a)
        return out.add_(x) if not torch.is_grad_enabled() else x + out  # in place without autograd


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TensorFlow "SAME" padding: pad right and bottom by one, then no padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv3x3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (residual blocks), `attn` (attention after each block, if any), and
    `downsample` or `upsample`."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """The lowest resolution: block_1 -> attn_1 -> block_2, at constant width."""

    def __init__(self, ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, temb_ch, dropout)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch, temb_ch, dropout)


class _Temb(nn.Module):
    """The timestep MLP: `dense.0` (ch -> 4 ch) -> swish -> `dense.1` (4 ch -> 4 ch); applied in UNet.forward."""

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])


class UNet(nn.Module):
    """The paper's noise-prediction network. `net(x [B, C, H, W], t [B]) -> [B, out_channels, H, W]`.

    Built from a run's configuration with `UNet.from_config(cfg.model, out_channels)`, or from the same fields
    as keywords. `net.config` is the network's ModelConfig (its own copy, checked by `ddpm.config.check_model`)
    and `net.out_channels` the one setting outside it: the caller derives it from the diffusion (2 x
    in_channels for learned variances), so the network stays ignorant of it.

    Args:
        in_channels: image channels.
        ch: base width (a multiple of 32: group norm uses 32 groups).
        ch_mult: width multiplier per level; each level but the last halves the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes that get self-attention after each residual block.
        dropout: dropout in the residual blocks.
        resolution: input height = width.
        out_channels: defaults to in_channels (2 x in_channels for learned variances).
        cond_channels: extra input channels (SR3's conditioning by concatenation): forward takes x [B, in_channels +
            cond_channels, H, W], the noisy image and the condition stacked; the output keeps out_channels.
        num_classes: when set, a class embedding (num_classes + 1 rows; the last is "no class", for
            classifier-free guidance) is added to the time embedding; forward takes y [B] (None -> no class).
        channels_last: on the CPU in float32 or bfloat16 (autocast included), run the network on a
            channels-last copy of x (the output is returned contiguous). Only the memory layout changes, not
            the arithmetic, for speed on the CPU (its measurements per machine: benchmarks/RESULTS.md).
            Not part of `config`.
        winograd: the residual blocks' and upsamplers' 3x3 convolutions run Winograd's F(4x4, 3x3) on the CPU
            in float32 where it measured faster (`ddpm.nn.winograd.Conv3x3`): the same function with a
            rounding error about 1e-5 relative instead of 1e-6. Not part of `config`; `set_winograd` changes it.
        fused_norm: the residual blocks' group norm -> swish (-> dropout), the second one with the time
            embedding added to its input as it reads it, the output's group norm -> swish and the attention
            blocks' group norm run as one compiled kernel on channels-last CPU tensors (`ddpm.nn.fused`; torch's
            operators where it does not apply or cannot be built). The same function, dropout's masks included:
            both paths draw them from one hash of a seed drawn from torch's generator, so a seeded run trains the
            same weights either way. Not part of `config`; `set_fused_norm` changes it.
    """

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 resolution: int = 32, out_channels: int | None = None, num_classes: int | None = None,
                 channels_last: bool = True, winograd: bool = True, fused_norm: bool = True, cond_channels: int = 0):
        super().__init__()
        ch_mult = tuple(int(c) for c in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.config = ModelConfig(in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                                  attn_resolutions=attn_resolutions, dropout=dropout, resolution=resolution,
                                  num_classes=num_classes, cond_channels=cond_channels)
        check_model(self.config, prefix="")  # the rules a run's configuration is validated by
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer or None; got {out_channels}")
        self.out_channels = out_channels
        self.ch, self.num_classes = ch, num_classes
        self.channels_last = bool(channels_last)
        self.num_res_blocks = num_res_blocks
        self.num_levels = len(ch_mult)
        temb_ch = 4 * ch

        self.temb = _Temb(ch, temb_ch)
        self.label_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels + cond_channels, ch, 3, padding=1)

        in_mult = (1,) + ch_mult
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, temb_ch, dropout)

        ups = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            block_out = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                skip = ch * (ch_mult[i] if j < num_res_blocks else in_mult[i])
                level.block.append(ResnetBlock(block_in + skip, block_out, temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)  # up[i] works at the resolution of down[i]

        self.norm_out = _norm(block_in)
        self.conv_out = ImageConv3x3(block_in, out_channels)
        self.reset_parameters()
        self.set_winograd(winograd)
        self.set_fused_norm(fused_norm)

    @classmethod
    def from_config(cls, cfg: ModelConfig, out_channels: int | None = None) -> UNet:
        """The network a ModelConfig describes, with `out_channels` (default: cfg.in_channels) set by the caller.
        `net.config` is a copy: changing `cfg` afterwards does not change it."""
        return cls(in_channels=cfg.in_channels, ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                   attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout, resolution=cfg.resolution,
                   out_channels=out_channels, num_classes=cfg.num_classes, cond_channels=cfg.cond_channels)

    def _takes_channels_last(self, x: torch.Tensor) -> bool:
        """Channels-last on the CPU in float32 and bf16 (autocast included), training and inference: it
        measured faster on this project's machines (benchmarks/RESULTS.md), and the Winograd tiles gather
        contiguous channels."""
        return self.channels_last and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)

    def set_winograd(self, enabled: bool) -> None:
        """Turns the Winograd path of every Conv3x3 (the residual blocks' and upsamplers' 3x3 convolutions)
        on or off; off runs nn.Conv2d's direct kernel in them (the same function, other rounding)."""
        for m in self.modules():
            if isinstance(m, Conv3x3):
                m.winograd = bool(enabled)

    def set_fused_norm(self, enabled: bool) -> None:
        """Turns the fused group norm -> swish (-> dropout) kernel on or off (off: torch's operators)."""
        self.fused_norm = bool(enabled)
        for m in self.modules():
            if isinstance(m, (ResnetBlock, AttnBlock)):
                m.fused_norm = bool(enabled)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation: variance scaling (fan_avg, uniform, scale 1) for dense and conv
        weights, zero biases; the last conv of every residual block, the attention output projection and
        conv_out start at zero, so the network outputs exactly 0 at initialisation."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C (+ cond_channels), H, W], t [B] (int or float timesteps; a scalar applies to the whole batch), y [B] int64
        class labels or None (the null class) -> [B, out_channels, H, W]."""
        B, _, H, W = x.shape
        f = 2 ** (self.num_levels - 1)
        if H % f or W % f:
            raise ValueError(f"x's height and width must be divisible by {f} (one halving per level); got {H}x{W}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be [B] with B = {B}; got shape {tuple(t.shape)}")
        temb = timestep_embedding(t, self.ch).to(x.dtype)  # [B, ch]
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # [B, 4 ch]
        if self.label_emb is not None:
            if y is None:
                y = torch.full((B,), self.num_classes, device=x.device, dtype=torch.long)
            if y.shape != (B,):
                raise ValueError(f"y must be [B] with B = {B}; got shape {tuple(y.shape)}")
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this UNet has no class embedding (num_classes=None) but labels were given")
        temb_act = F.silu(temb)  # every block's temb_proj takes swish(temb): computed once here
        cl = self._takes_channels_last(x)

        hs = [self.conv_in(_channels_last(x) if cl else x)]
        if cl:  # every later layer keeps the layout (a no-op where conv_in answered channels-last)
            hs[0] = hs[0].contiguous(memory_format=torch.channels_last)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb_act)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_levels - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_1(hs[-1], temb_act)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb_act)

        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(group_norm_act(h, self.norm_out, fused=self.fused_norm)).contiguous()
