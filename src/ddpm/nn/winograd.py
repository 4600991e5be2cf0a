"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016).

Each 6x6 input tile d gives a 4x4 output tile Y = A^T [(G g G^T) * (B^T d B)] A: the 3x3 convolution becomes
36 independent matrix products (tiles x C_in) @ (C_in x C_out) with 4x fewer multiplications than the direct
method, at the price of transforms that read and write the tiles a few times. The result is the same function
of x and the weights; only the rounding differs (a relative error about 1e-5 in float32 against 1e-6 for the
direct kernels). The backward pass works in the same transformed domain. `conv3x3_winograd` is used by the
U-Net's wide 3x3 convolutions on the CPU in float32 (see `Conv3x3`) where it measures faster than oneDNN's
direct convolution on the machine at hand; everywhere else nn.Conv2d's own kernel runs.

Whether it pays is a property of the machine, not of the method: its products run on torch's BLAS (MKL), the
direct kernel on oneDNN, and their ratio moved from 1.2-1.7x per layer on an Intel Xeon with AMX to 0.6-0.9x on
an AMD EPYC with AVX-512 (MKL's AMD path reached 190 GFLOP/s there, oneDNN's convolution 540) and back to
1.3-1.8x with oneDNN held to AVX2 on that EPYC (benchmarks/RESULTS.md). So `pays` times both kernels once per
machine on the paper's network's widest layers, one per resolution, for training and for inference, and keeps
the answer on disk (`ddpm.runtime.cache_dir("winograd")`, keyed by the CPU's flags, torch's version, the
thread count and the instruction-set switches), so that every process on the machine runs the same kernels.
`DDPM_WINOGRAD=1` or `0` decides without measuring.

Without autograd (sampling, evaluation) `conv3x3_fused` runs the same method as one compiled kernel
(`_winograd_cpu.c`, built with the fused group norm's, `ddpm.nn.fused`): per block of tiles the input transform,
the 36 products and the output transform run one after the other on one thread, so the transformed tiles are
read back from the core's caches rather than from memory (the block's size: `tiles_per_block`). It takes any
width (K a multiple of the vector width) and any height and width, and ran 1.6-2.9x oneDNN's direct kernel per
layer on the small presets' 32-128 channels, natively and held to AVX2, where the path above lost (RESULTS.md).
In training it computes the forward and, by two more kernels, the input and weight gradients (`_FusedForward`).
Where it pays is measured per machine the same way (`fused_pays`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.runtime import cache_dir

from .fused import cpu_key
from .fused import library as fused_library

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

_MATS: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _mats(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kron(B^T, B^T) [36, 36], kron(G, G) [36, 9], kron(A^T, A^T) [16, 36]) in `dtype`, built in float64."""
    if dtype not in _MATS:
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
        _MATS[dtype] = tuple(torch.kron(m, m).to(dtype) for m in (bt, g, at))
    return _MATS[dtype]


_SCRATCH = threading.local()


def _scratch(tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer of `shape` for a transient of the tile pipeline, reused call after call (one per tag,
    dtype, device and inference mode, per thread; it grows to the largest request). The chunks' temporaries
    come in a few sizes that repeat every step, and freshly allocated ones arrive from the system as zeroed
    pages: reusing them measured 1.07x in training and sampling the CIFAR-10 network (benchmarks/RESULTS.md).
    `release_scratch` frees them."""
    numel = math.prod(shape)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (tag, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Frees this thread's scratch buffers (at most a few tens of MB: the tiles of one batch chunk per tag)."""
    _SCRATCH.bufs = {}


def _input_tiles(x: torch.Tensor) -> torch.Tensor:
    """x [n, C, H, W] -> its 6x6 tiles at stride 4 of the zero-padded input, laid out [36, n*th*tw*C] (a
    scratch buffer: valid until the next call)."""
    n, C, H, W = x.shape
    if _is_channels_last(x):
        xp = _scratch("pad", (n, H + 2, W + 2, C), x).permute(0, 3, 1, 2)
    else:
        xp = _scratch("pad", (n, C, H + 2, W + 2), x)
    for border in (xp[:, :, 0], xp[:, :, -1], xp[:, :, :, 0], xp[:, :, :, -1]):
        border.zero_()
    xp[:, :, 1:-1, 1:-1].copy_(x)
    d = _scratch("tiles", (6, 6, n, H // 4, W // 4, C), x)
    d.copy_(xp.unfold(2, 6, 4).unfold(3, 6, 4).permute(4, 5, 0, 2, 3, 1))
    return d.view(36, -1)


def _fold_axis(t: torch.Tensor, tile_dim: int, tag: str) -> torch.Tensor:
    """Sums the overlapping 6-wide tiles along one axis back onto the unpadded 4-wide output positions.
    `t` has the tile index at `tile_dim` and the 6 positions within a tile at `tile_dim + 1`: tile a covers
    padded rows 4a..4a+5 (unpadded 4a-1..4a+4), so row 4a+k takes tile a's row k+1, and rows 4a and 4a+3 also
    take tile a-1's row 5 and tile a+1's row 0. The result lies in the scratch buffer `tag`."""
    inner = t.narrow(tile_dim + 1, 1, 4)
    out = _scratch(tag, tuple(inner.shape), t)
    out.copy_(inner)
    th = t.shape[tile_dim]
    if th > 1:
        out.narrow(tile_dim, 0, th - 1).select(tile_dim + 1, 3).add_(
            t.narrow(tile_dim, 1, th - 1).select(tile_dim + 1, 0))
        out.narrow(tile_dim, 1, th - 1).select(tile_dim + 1, 0).add_(
            t.narrow(tile_dim, 0, th - 1).select(tile_dim + 1, 5))
    return out


def filter_transform(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """w [K, C, 3, 3] -> G w G^T per (k, c), laid out [36, K, C] (w read in place: no copy of the weights)."""
    K, C = w.shape[:2]
    kg = _mats(w.dtype)[1]
    return torch.mm(kg, w.reshape(K * C, 9).t(), out=out).view(36, K, C)


def _filter_tiles(w: torch.Tensor) -> torch.Tensor:
    """filter_transform(w) in a scratch buffer (valid until the next call). The tiles of a wide layer take 9-19
    MB, above the sizes glibc's allocator keeps for reuse: a fresh tensor per call came back from the system as
    new pages every time (page faults); computing them again in backward costs less (training 1.08x)."""
    K, C = w.shape[:2]
    return filter_transform(w, out=_scratch("u", (36, K * C), w))


# A^T's column 1 is all ones, so kron(A^T, A^T)'s column 7 (tile position (1, 1)) is all ones too: a bias added
# to the products at that position reaches every output once (a pass over 1/36 of the products, not the output)
_BIAS_POS = 7


CHUNK_BYTES = 8 << 20


def _chunks(x: torch.Tensor, K: int) -> list[tuple[int, int]]:
    """Batch slices whose tiles ([36, n*th*tw, max(C, K)]) take at most CHUNK_BYTES each: they stay in cache
    and below the allocator's reuse threshold (larger ones came back from the system zeroed on every call and
    ran 2-3x slower)."""
    N, C, H, W = x.shape
    per_image = 36 * (H // 4) * (W // 4) * max(C, K) * x.element_size()
    n = max(1, CHUNK_BYTES // per_image)
    return [(i, min(i + n, N)) for i in range(0, N, n)]


def _forward(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
             keep_tiles: bool = False) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """(output [N, K, H, W] in x's memory format, and if keep_tiles each batch chunk's bounds (i, j) with its
    input tiles v [36, (j - i)*th*tw, C]) for filter tiles u [36, K, C]."""
    N, C, H, W = x.shape
    K = u.shape[1]
    th, tw = H // 4, W // 4
    kb, _, ka = _mats(x.dtype)
    cl = _is_channels_last(x)
    out = torch.empty((N, K, H, W), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    tiles = []
    for i, j in _chunks(x, K):
        n = j - i
        P = n * th * tw
        d = _input_tiles(x[i:j])
        # the transformed tiles are kept for backward in training, so only inference writes them to scratch
        v = (kb @ d if keep_tiles else torch.mm(kb, d, out=_scratch("v", (36, P * C), x))).view(36, P, C)
        m = torch.bmm(v, u.transpose(1, 2), out=_scratch("m", (36, P, K), x))
        if bias is not None:
            m[_BIAS_POS].add_(bias)
        y = torch.mm(ka, m.view(36, -1), out=_scratch("y", (16, P * K), x))
        out[i:j].view(n, K, th, 4, tw, 4).copy_(y.view(4, 4, n, th, tw, K).permute(2, 5, 3, 0, 4, 1))
        if keep_tiles:
            tiles.append((i, j, v))
    return out, tiles


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _Conv3x3Winograd(torch.autograd.Function):
    """Autograd for the training path: forward keeps the transformed input tiles and the weights (the filter
    tiles, needed for the input gradient only, are computed again in backward into a scratch buffer); backward
    maps the output gradient into the same domain (transposed output transform), multiplies there, and maps
    back (transposed input transform and the overlap-add of the tiles; transposed filter transform)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y, tiles = _forward(x, _filter_tiles(weight), bias, keep_tiles=True)
        ctx.save_for_backward(weight)
        ctx.tiles = tiles
        ctx.shape = (*x.shape, weight.shape[0], _is_channels_last(x))
        return y

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        N, C, H, W, K, cl = ctx.shape
        th, tw = H // 4, W // 4
        kb, kg, ka = _mats(gy.dtype)
        gx = gw = gu = None
        gb = gy.new_zeros(K) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            u = _filter_tiles(weight)
            gx = torch.empty((N, C, H, W), dtype=gy.dtype, device=gy.device,
                             memory_format=torch.channels_last if cl else torch.contiguous_format)
        for i, j, v in ctx.tiles:
            n = j - i
            P = n * th * tw
            gy_tiles = _scratch("gy", (4, 4, n, th, tw, K), gy)
            gy_tiles.copy_(gy[i:j].reshape(n, K, th, 4, tw, 4).permute(3, 5, 0, 2, 4, 1))
            gm = torch.mm(ka.t(), gy_tiles.view(16, -1), out=_scratch("gm", (36, P * K), gy)).view(36, P, K)
            if gb is not None:
                gb += gm[_BIAS_POS].sum(0)  # the bias entered at that tile position only
            if gx is not None:
                gv = torch.bmm(gm, u, out=_scratch("gv", (36, P, C), gy))
                gd = torch.mm(kb.t(), gv.view(36, -1), out=_scratch("gd", (36, P * C), gy))
                gd = gd.view(6, 6, n, th, tw, C).permute(2, 3, 0, 4, 1, 5)  # n th 6 tw 6 C
                gd = _fold_axis(_fold_axis(gd, 1, "fold rows"), 3, "fold columns")  # [n, th, 4, tw, 4, C]
                gx[i:j].view(n, C, th, 4, tw, 4).copy_(gd.permute(0, 5, 1, 2, 3, 4))
            if ctx.needs_input_grad[1]:
                gmt = gm.transpose(1, 2)
                gu = torch.bmm(gmt, v) if gu is None else gu.baddbmm_(gmt, v)  # [36, K, C]
        if gu is not None:
            gw = (gu.view(36, K * C).t() @ kg).view(K, C, 3, 3)
        return gx, gw, gb


def conv3x3_winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     filter_tiles: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for x [N, C, H, W] with H and W multiples of 4 and weight
    [K, C, 3, 3], by Winograd F(4x4, 3x3); differentiable in x, weight and bias. The output has x's memory
    format (channels-last or contiguous). Without autograd, `filter_tiles` may pass a precomputed
    `filter_transform(weight)` (the weights do not change between sampling steps)."""
    if x.dim() != 4 or weight.shape[1:] != (x.shape[1], 3, 3) or x.shape[2] % 4 or x.shape[3] % 4:
        raise ValueError(f"conv3x3_winograd takes x [N, C, H, W] with H, W multiples of 4 and weight [K, C, 3, 3]; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Conv3x3Winograd.apply(x, weight, bias)
    u = _filter_tiles(weight) if filter_tiles is None else filter_tiles
    return _forward(x, u, bias)[0]


@functools.cache
def _l2_bytes() -> int:
    """The first CPU's level-2 cache in bytes (Linux's sysfs), 1 MiB where it cannot be read."""
    try:
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                text = (index / "size").read_text().strip().upper()
                return int(text.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    except (OSError, ValueError):
        pass
    return 1 << 20


def _tiles(shape) -> int:
    """The 4x4 output tiles of an [N, C, H, W] convolution (the last row and column cut short)."""
    return shape[0] * -(-shape[2] // 4) * -(-shape[3] // 4)


def _forced() -> str | None:
    """DDPM_WINOGRAD's "1" or "0" (Winograd wherever it can run, or nowhere, without measuring), else None."""
    forced = os.environ.get("DDPM_WINOGRAD", "").strip()
    return forced if forced in ("0", "1") else None


_TILE_ROWS = 6  # the fused kernel's register block of tiles (R in _winograd_cpu.c): a block is a multiple of it


@functools.lru_cache(maxsize=4096)  # asked on every fused call (3-9 us to work out)
def tiles_per_block(C: int, K: int, tiles: int, threads: int) -> int:
    """The fused kernels' block of tiles, a multiple of their 6. Each block reads every filter tile (36 C K floats;
    in the weight gradient, the thread's sums, as many) beside its own tiles' transforms (36 (C + K) floats a
    tile), so blocks of about C K / (C + K) tiles move no more filter than tile data. Within half an octave of
    that (and no more than an even share), the block that gives the busiest thread the fewest tiles, then the
    nearest: blocks go to threads in a static schedule, and one block more on one thread than on the other made
    that thread run the whole call. Against blocks that filled half the L2 cache: RESULTS.md, "Blocks of tiles by
    the filter's traffic"."""
    rows = _TILE_ROWS
    tiles, threads = max(tiles, 1), max(threads, 1)
    target = max(rows, C * K / (C + K))
    share = math.ceil(tiles / threads / rows) * rows
    high = min(share, max(rows, int(target * 2**0.5) // rows * rows))
    low = min(share, math.ceil(target / 2**0.5 / rows) * rows)

    def busiest(block: int) -> int:
        return min(tiles, math.ceil(math.ceil(tiles / block) / threads) * block)

    return min(range(low, max(low, high) + 1, rows), key=lambda b: (busiest(b), abs(math.log(b / target))))


def fused_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `conv3x3_fused` can run this convolution: the compiled kernel loaded (ddpm.nn.fused), float32
    channels-last x [N, C, H, W] on the CPU, weight [K, C, 3, 3] in float32 with K a multiple of the kernel's
    vector width, and no graph to record (it has no backward)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return _fused_takes(x, weight)


def _fused_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fused_applies without the question of autograd."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and weight.dim() == 4 and weight.shape[1:] == (x.shape[1], 3, 3)
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()):
        return False
    return fused_library() is not None and weight.shape[0] % _vector_width() == 0


@functools.cache
def _vector_width() -> int:
    """The compiled kernel's vector width in floats (asked once; only where the library loaded)."""
    return int(fused_library().ddpm_winograd_vector_width())


def fused_filter_tiles(weight: torch.Tensor) -> torch.Tensor:
    """G w G^T per (c, k), laid out [36, C, K] as the fused kernel reads them (filter_transform's [36, K, C]
    transposed), from w [K, C, 3, 3]."""
    return filter_transform(weight.detach().transpose(0, 1))


def conv3x3_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  filter_tiles: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd F(4x4, 3x3) in one compiled kernel (`_winograd_cpu.c`),
    for inference: each block of tiles is transformed, multiplied and transformed back on one thread, where
    `conv3x3_winograd` passes whole batch chunks through memory between torch's operators. Any
    height and width (the last tiles are cut short). Where `fused_applies` says no, ValueError. Returns a
    channels-last [N, K, H, W]; `filter_tiles` may pass `fused_filter_tiles(weight)` computed once."""
    if not fused_applies(x, weight):
        raise ValueError(f"conv3x3_fused takes float32 channels-last x [N, C, H, W] and weight [K, C, 3, 3] on the "
                         f"CPU, without autograd, with the compiled kernel loaded; got x {tuple(x.shape)} {x.dtype}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}")
    return _fused_run(x, weight, bias, fused_filter_tiles(weight) if filter_tiles is None else filter_tiles)


def _fused_run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """conv3x3_fused's call of the kernel, for arguments `fused_applies` has passed."""
    N, C, H, W = x.shape
    K = weight.shape[0]
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    y = torch.empty((N, K, H, W), dtype=torch.float32, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    threads = torch.get_num_threads()
    tiles = _tiles(x.shape)
    rc = fused_library().ddpm_winograd_forward(x.data_ptr(), u.data_ptr(), None if b is None else b.data_ptr(),
                                               y.data_ptr(), N, H, W, C, K, tiles_per_block(C, K, tiles, threads),
                                               threads)
    if rc != 0:
        raise RuntimeError(f"fused Winograd convolution: {'out of memory' if rc == -2 else 'arguments refused'} "
                           f"for x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y


def _fused_weight_grad(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the convolution x [N, C, H, W] -> gy [N, K, H, W] (both channels-last float32, K
    a multiple of the vector width) in Winograd's domain: the kernel sums V^T (A g A^T) over each thread's tiles
    and adds the threads' sums in thread order; mapped back here through G^T . G. Its rounding depends on the
    thread count, as oneDNN's own weight gradient's does."""
    N, C, H, W = x.shape
    K = gy.shape[1]
    rows = _TILE_ROWS
    padded = -(-C // rows) * rows  # the kernel's register block runs over 6 input channels at a time
    threads = torch.get_num_threads()
    gu = torch.empty(36, C, K)
    parts = torch.empty(threads, 36, padded, K)  # the threads' sums: scratch, every element written first
    rc = fused_library().ddpm_winograd_weight_grad(x.data_ptr(), gy.data_ptr(), gu.data_ptr(), parts.data_ptr(),
                                                   N, H, W, C, K, tiles_per_block(padded, K, _tiles(x.shape), threads),
                                                   threads)
    if rc != 0:
        raise RuntimeError(f"fused Winograd weight gradient: {'out of memory' if rc == -2 else 'arguments refused'} "
                           f"for x {tuple(x.shape)}, gradient {tuple(gy.shape)}")
    return (_mats(torch.float32)[1].t() @ gu.view(36, C * K)).view(3, 3, C, K).permute(3, 2, 0, 1).contiguous()


class _FusedForward(torch.autograd.Function):
    """Training with the fused kernels: the forward; the input gradient, which is itself a 3x3 convolution (of
    the output gradient, by the weights flipped in space with input and output channels swapped); and the weight
    gradient in Winograd's domain (`_fused_weight_grad`, from the saved x). The bias gradient is the output
    gradient's sum. Only the rounding differs from the direct kernel's: Winograd's, about 1e-5 of the scale.
    Where a width does not suit the kernel (the input gradient's output channels not a multiple of the vector
    width), oneDNN's backward computes that gradient. For the layers the Winograd-domain backward above does not
    take or does not pay."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _fused_run(x.detach(), weight.detach(), bias, fused_filter_tiles(weight))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        gy = gy.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[0]:
            flipped = weight.detach().flip(2, 3).transpose(0, 1)  # [C, K, 3, 3]
            if _fused_takes(gy, flipped):
                gx = _fused_run(gy, flipped, None, fused_filter_tiles(flipped))
        if ctx.needs_input_grad[1] and x.numel() and _fused_takes(x.detach(), weight.detach()):
            gw = _fused_weight_grad(x.detach(), gy)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        mask = [ctx.needs_input_grad[0] and gx is None, ctx.needs_input_grad[1] and gw is None, False]
        if any(mask):
            dx, dw, _ = torch.ops.aten.convolution_backward(gy, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                            [0, 0], 1, mask)
            gx = dx if gx is None else gx
            gw = dw if gw is None else gw
        return gx, gw, gb


# ---------------------------------------------------------------------- where it pays: measured per machine

# (channels, height = width) of the paper's CIFAR-10 network's widest 3x3 layers, one per resolution, timed at
# batch 16 in the channels-last layout the U-Net runs in; narrower layers lost everywhere measured (0.3-1.0x)
CALIBRATION = ((128, 32), (256, 16), (256, 8), (256, 4))
# (channels, height = width) of the layers the fused inference kernel is timed on, C -> C at batch 16: the small
# presets' widths and the paper's, each resolution
FUSED_CALIBRATION = ((32, 32), (64, 16), (64, 8), (128, 32), (256, 16), (256, 8), (256, 4))
MIN_SPEEDUP = 1.05  # below it the direct kernel keeps its smaller rounding error
_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
             "DDPM_FUSED_CPU")  # instruction sets, and the compiled kernels off
_keys: dict[tuple, str] = {}
_measured: dict[str, dict[str, dict]] = {}
_KERNEL_SOURCE = Path(__file__).with_name("_winograd_cpu.c")
_measure_lock = threading.Lock()


def best_ms(fn, reps: int, warmup: int = 1) -> float:
    """The fastest of `reps` timed calls of fn() in milliseconds, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def _interleaved_ratio(a, b, reps: int) -> float:
    """a()'s fastest time over b()'s, the two called in turn `reps` times each after one warm-up call each (the
    fused kernel's gains in training are 1.1-1.2x per layer, within what one machine drifts between two runs of
    `best_ms` one kernel after the other: the tables this measures use it)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(reps + 1):
        for k, fn in enumerate((a, b) if i % 2 else (b, a)):
            t0 = time.perf_counter()
            fn()
            if i:
                times[k if i % 2 else 1 - k].append(time.perf_counter() - t0)
    return min(times[0]) / min(times[1])


def _backward_of(kernel, leaves: list[torch.Tensor], gy: torch.Tensor):
    return lambda: torch.autograd.grad(kernel(*leaves), leaves, gy)


def _call_of(kernel, args: tuple[torch.Tensor, ...]):
    return lambda: kernel(*args)


def measure_speedups(reps: int = 3, batch: int = 16) -> dict[str, dict]:
    """{"train" | "inference": {height: direct time / Winograd time}, "fused" | "fused train": {"CxH": direct
    time / fused kernel's time}} on this machine, now: the CALIBRATION layers, forward + backward (x, weight,
    bias) for training and forward alone for inference, and the FUSED_CALIBRATION layers' forward by
    `conv3x3_fused` and forward + backward by `_FusedForward` (both empty where the compiled kernel is not
    available), the two kernels called in turn at `batch` (the fused kernels' training at `tile_floor` tiles
    where `batch` has fewer), the fastest of 2 `reps` + 1 calls each."""
    out: dict[str, dict] = {"train": {}, "inference": {}}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
        for C, H in CALIBRATION:
            x = torch.randn(batch, C, H, H, generator=g).contiguous(memory_format=torch.channels_last)
            w = torch.randn(C, C, 3, 3, generator=g) / (3 * C**0.5)
            b = torch.randn(C, generator=g)
            gy = torch.randn(batch, C, H, H, generator=g).contiguous(memory_format=torch.channels_last)
            kernels = (lambda *a: F.conv2d(*a, padding=1), conv3x3_winograd)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            with torch.enable_grad():
                out["train"][H] = _interleaved_ratio(*(_backward_of(k, leaves, gy) for k in kernels), 2 * reps + 1)
            with torch.no_grad():
                out["inference"][H] = _interleaved_ratio(*(_call_of(k, (x, w, b)) for k in kernels), 2 * reps + 1)
        out["fused"], out["fused train"] = {}, {}
        for C, H in FUSED_CALIBRATION:
            # training from `tile_floor` tiles a call only, so timed there (at batch 16 the 8x8 layer's 64 tiles
            # measured 0.95x where the digits network's 512 ran 1.1-1.7x)
            trained = max(batch, -(-tile_floor(True, filter_tile_bytes(C, C)) // _tiles((1, C, H, H))))
            x = torch.randn(trained, C, H, H, generator=g).contiguous(memory_format=torch.channels_last)
            w = torch.randn(C, C, 3, 3, generator=g) / (3 * C**0.5)
            b = torch.randn(C, generator=g)
            gy = torch.randn(trained, C, H, H, generator=g).contiguous(memory_format=torch.channels_last)
            if not _fused_takes(x, w):
                break  # no compiled kernel (or not this width): the fused kernel is never chosen
            with torch.no_grad():
                args = (x[:batch], w, b)
                out["fused"][f"{C}x{H}"] = _interleaved_ratio(_call_of(lambda *a: F.conv2d(*a, padding=1), args),
                                                              _call_of(conv3x3_fused, (*args, fused_filter_tiles(w))),
                                                              2 * reps + 1)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            with torch.enable_grad():
                out["fused train"][f"{C}x{H}"] = _interleaved_ratio(
                    _backward_of(lambda *a: F.conv2d(*a, padding=1), leaves, gy),
                    _backward_of(_FusedForward.apply, leaves, gy), 2 * reps + 1)
    release_scratch()
    return out


@functools.cache
def _kernel_digest() -> str:
    """The kernels' code: the compiled one's source and this module's (a change to either is timed again)."""
    return hashlib.sha256(_KERNEL_SOURCE.read_bytes() + Path(__file__).read_bytes()).hexdigest()


def _machine_key() -> str:
    """The measurement's key: the CPU, torch, the thread count, the calibration layers, the kernel's source and
    the instruction-set switches (the hash kept per state of the parts that can change in a process: a call costs
    a few microseconds, on every wide convolution)."""
    state = (torch.get_num_threads(), *(os.environ.get(k, "") for k in _SWITCHES))
    key = _keys.get(state)
    if key is None:
        parts = [cpu_key(), torch.__version__, repr(CALIBRATION), repr(FUSED_CALIBRATION), _kernel_digest(),
                 *map(str, state)]
        key = _keys[state] = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return key


def machine_speedups() -> dict[str, dict]:
    """`measure_speedups()` for this machine, measured once and kept on disk (then read back by every process);
    measured again where no cache folder is writable (once per process)."""
    key = _machine_key()
    if key in _measured:
        return _measured[key]
    with _measure_lock:
        if key in _measured:
            return _measured[key]
        path = cache_dir("winograd") / f"speedups-{key}.json"
        found = None
        try:
            found = {mode: {(k if mode.startswith("fused") else int(k)): float(r) for k, r in v.items()}
                     for mode, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass
        if found is None or set(found) != {"train", "inference", "fused", "fused train"}:
            found = measure_speedups()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(found, f)
                os.replace(tmp, path)  # atomic: a process beside this one reads a whole file or none
            except OSError:
                pass
        _measured[key] = found
        return found


def pays(training: bool, height: int) -> bool:
    """Whether Winograd is the faster kernel on this machine for a wide layer of this height (the measured
    resolution nearest to it in octaves) in training (autograd on) or inference. DDPM_WINOGRAD=1 / 0: yes / no
    without measuring."""
    forced = _forced()
    if forced:
        return forced == "1"
    return speedup(training, height) >= MIN_SPEEDUP


def speedup(training: bool, height: int) -> float:
    """The torch Winograd path's measured speed-up over the direct kernel at the resolution nearest to `height`."""
    table = machine_speedups()["train" if training else "inference"]
    return table[min(table, key=lambda h: abs(math.log2(max(height, 1) / h)))]


def fused_speedup(channels: int, height: int, training: bool = False) -> float:
    """The fused kernels' measured speed-up over the direct kernel at the FUSED_CALIBRATION layer nearest to
    (channels, height) in octaves of both; 0 where the compiled kernel is not available."""
    table = machine_speedups()["fused train" if training else "fused"]
    memo = (id(table), channels, height)
    if memo not in _fused_choices:  # (the table is kept with the answer, so its id is not reused meanwhile)

        def distance(key: str) -> float:
            c, h = map(int, key.split("x"))
            return math.log2(max(channels, 1) / c) ** 2 + math.log2(max(height, 1) / h) ** 2

        _fused_choices[memo] = (table, table[min(table, key=distance)] if table else 0.0)
    return _fused_choices[memo][1]


def fused_pays(channels: int, height: int, tiles: int, training: bool = False, filter_bytes: int = 0) -> bool:
    """Whether the fused kernel is the faster on this machine for a layer of about this many channels (the wider
    of input and output) and this height, cut into this many 4x4 tiles, for inference (`conv3x3_fused`) or in
    training (`_FusedForward`): the FUSED_CALIBRATION layer nearest to it in octaves of both, and at least
    `tile_floor` tiles. DDPM_WINOGRAD=1 / 0: yes / no without measuring."""
    forced = _forced()
    if forced:
        return forced == "1"
    if tiles < tile_floor(training, filter_bytes):
        return False
    return fused_speedup(channels, height, training) >= MIN_SPEEDUP


def filter_tile_bytes(C: int, K: int) -> int:
    """The bytes of a C -> K layer's Winograd filter tiles: 36 C K floats, 4x its weights."""
    return 36 * 4 * C * K


def tile_floor(training: bool, filter_bytes: int) -> int:
    """The fewest tiles a call takes the fused kernels from: MIN_TILES in inference, MIN_TRAINING_TILES in
    training, where the layer's filter tiles (`filter_bytes`, 36 C K floats) do not fit in half the L2 cache 4x
    and 2x as many."""
    beyond = filter_bytes > _l2_bytes() // 2
    return MIN_TRAINING_TILES * (2 if beyond else 1) if training else MIN_TILES * (4 if beyond else 1)


# Each call reads the filter tiles, 36 C K floats (4x the weights), and multiplies them by 6 tiles at a time: with
# T tiles, T / 2 flops a byte of them (T rounded up to 6s). With few tiles the kernel waits on memory where the
# direct one reads 9 C K floats: at batch 1 in the paper's network, 4 tiles (8x8) ran 0.6x the direct kernel and
# 1 tile (4x4) 0.5x, 16 tiles (16x16) 1.0-1.4x, 64 tiles 1.7x (RESULTS.md). Where the filter tiles do not stay in
# L2 it takes more: over a pool of such layers (their tiles out of cache, as in a network), 16 tiles of 512 -> 256
# channels ran 0.64x the direct kernel, 64 tiles of 256 channels 1.36x. Timed alone, with the tiles still in the
# cache from the call before, the same layers measured faster than the direct kernel, so this is not left to the
# calibration's timing.
MIN_TILES = 16
# In training each call also transforms the weights twice (forward, input gradient) and passes through an autograd
# Function. With session 19's blocks, the whole training step against a floor of 256 tiles: the digits network at
# batch 128 (its 4x4 layers: 128 tiles) 1.10-1.11x, the fashion network at batch 4 (196 tiles at 28x28) 1.06x,
# at batch 1-2 (a floor of 16) 0.96-0.97x; the CIFAR-10 network at batch 2 (128 tiles at 32x32, filter tiles of
# 2.4 MB) 0.91x, hence twice as many where the filter tiles do not fit in half the L2 (RESULTS.md)
MIN_TRAINING_TILES = 128
_fused_choices: dict[tuple[int, int, int], tuple[dict, float]] = {}


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(in_ch, out_ch, 3, padding=1) (same parameters, same state dict) that runs Winograd where it
    is faster than the direct kernel, on the CPU in float32 outside autocast and torch.compile (Inductor gets the
    direct convolution), each path where this machine measured it faster: without autograd the fused kernel
    (`uses_fused`: any width and size, from 16 tiles a call, its filter tiles kept); then `conv3x3_winograd`
    (`uses_winograd`: both widths >= 128, where its torch operators ran 0.3-1.0x below that on every machine
    measured, height and width multiples of 4; in training its Winograd-domain backward, unless the fused kernels
    measured faster still); then in training the fused kernels for the forward, input and weight gradients
    (`trains_fused`); else oneDNN's direct kernel
    (`benchmarks/winograd_layers.py`, `benchmarks/winograd_fused.py`, RESULTS.md). Set `winograd = False` for
    the direct kernel everywhere."""

    MIN_CHANNELS = 128

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)
        self.winograd = True
        self._fused_tiles: tuple[tuple[int, int], torch.Tensor] | None = None

    def uses_winograd(self, x: torch.Tensor) -> bool:
        """Whether this call takes `conv3x3_winograd` (where `uses_fused` has not taken it): in training, not
        where the fused kernels measured faster still on this machine; in inference from MIN_TILES tiles (below,
        its filter transform and fixed costs lose to the direct kernel as the fused kernel's reading of its
        filter tiles does: at batch 1 the paper's network's 8x8 and 4x4 layers ran 0.3-0.5x, RESULTS.md)."""
        return (self.winograd and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and min(self.in_channels, self.out_channels) >= self.MIN_CHANNELS
                and x.shape[2] % 4 == 0 and x.shape[3] % 4 == 0 and not torch.compiler.is_compiling()
                and (torch.is_grad_enabled() or _forced() or _tiles(x.shape) >= MIN_TILES)
                and pays(torch.is_grad_enabled(), x.shape[2]) and not self._fused_trains_faster(x))

    def _fused_trains_faster(self, x: torch.Tensor) -> bool:
        """In training, measured: the fused kernels' speed-up above the torch Winograd path's at this layer (at
        the paper's network's 32x32 layers they measured 2.08x against 1.69x on the Xeon of RESULTS.md; on a
        machine where MKL's products are slow the torch path's margin is thin), where the fused kernels train this
        call at all (`_fused_training_pays`). With DDPM_WINOGRAD forced, no."""
        if _forced() or not self._fused_training_pays(x):
            return False
        channels = max(self.in_channels, self.out_channels)
        return fused_speedup(channels, x.shape[2], training=True) > speedup(True, x.shape[2])

    def uses_fused(self, x: torch.Tensor) -> bool:
        """Whether this call takes `conv3x3_fused`: without a graph to record (sampling, evaluation), on the
        CPU in float32 outside autocast, any width and size, where this machine measured it faster
        (`fused_pays`)."""
        return (self.winograd and not torch.is_autocast_enabled("cpu") and fused_applies(x, self.weight)
                and fused_pays(max(self.in_channels, self.out_channels), x.shape[2], _tiles(x.shape),
                               filter_bytes=self._filter_bytes()))

    def _filter_bytes(self) -> int:
        return filter_tile_bytes(self.in_channels, self.out_channels)

    def fused_filter_tiles(self) -> torch.Tensor:
        """`fused_filter_tiles(self.weight)`, kept while the weights stay the same tensor at the same version (an
        optimizer step, an EMA update or load_state_dict changes the version): at batch 1 computing them on every
        call took longer than the convolution itself (RESULTS.md). They take 4x the weights' memory, only in
        networks that run without autograd."""
        key = (self.weight.data_ptr(), self.weight._version)
        kept = self._fused_tiles
        if kept is None or kept[0] != key:
            kept = self._fused_tiles = (key, fused_filter_tiles(self.weight))
        return kept[1]

    def trains_fused(self, x: torch.Tensor) -> bool:
        """Whether this call, with a graph to record, takes the fused kernels for its forward and its input and
        weight gradients (`_FusedForward`): where the Winograd-domain backward in torch's operators
        (`uses_winograd`) does not run or measured slower than these, and this machine measured them faster than
        the direct kernel (RESULTS.md)."""
        return self._fused_training_pays(x) and not self.uses_winograd(x)

    def _fused_training_pays(self, x: torch.Tensor) -> bool:
        """trains_fused without the question of the torch path (which `forward` has asked already)."""
        return (self.winograd and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and _fused_takes(x, self.weight)
                and fused_pays(max(self.in_channels, self.out_channels), x.shape[2], _tiles(x.shape), training=True,
                               filter_bytes=self._filter_bytes()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fused(x):
            return _fused_run(x, self.weight, self.bias, self.fused_filter_tiles())
        if self.uses_winograd(x):
            return conv3x3_winograd(x, self.weight, self.bias)
        if self._fused_training_pays(x):
            return _FusedForward.apply(x, self.weight, self.bias)
        return super().forward(x)
