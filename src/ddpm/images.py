"""Image files: grids (PNG), animated GIFs and reading a user's image, through Pillow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ddpm.data import to_uint8

MIN_GRID_SIDE = 256  # grids are upscaled (nearest neighbour, an integer factor) until both sides reach this
MAX_GRID_SIDE = 4096  # ... unless a long strip would pass this on its long side first
MIN_GAP = 2  # output pixels between cells at least; at large factors a quarter of a source pixel


def grid_scale(n: int, nrow: int, h: int, w: int) -> tuple[int, int]:
    """(factor, gap) for n cells of h x w in rows of nrow: the smallest integer factor that makes both sides of
    the grid at least MIN_GRID_SIDE pixels (an 8x8 or 28x28 image is a few millimetres on a screen), as long as
    the long side stays within MAX_GRID_SIDE; the gap between cells is max(MIN_GAP, factor // 4) pixels."""
    cols, rows = min(n, nrow), -(-n // nrow)

    def sides(f: int) -> tuple[int, int]:
        g = max(MIN_GAP, f // 4)
        return rows * h * f + (rows + 1) * g, cols * w * f + (cols + 1) * g

    f = 1
    while min(sides(f)) < MIN_GRID_SIDE and max(sides(f + 1)) <= MAX_GRID_SIDE:
        f += 1
    return f, max(MIN_GAP, f // 4)


def grid_image(x: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """Images x [N, C, H, W] in [-1, 1] -> one uint8 grid [H', W'] (C = 1) or [H', W', C]: nrow per row (default
    about square), each image upscaled by `grid_scale`'s factor (nearest neighbour), white gaps between and
    around the cells (a single image gets its border too)."""
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    f, gap = grid_scale(n, nrow, h, w)
    u8 = to_uint8(x.detach().float().cpu()).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    u8 = u8.repeat(f, axis=1).repeat(f, axis=2)  # nearest neighbour: every pixel an f x f block
    rows, cols = -(-n // nrow), min(n, nrow)
    hf, wf = h * f, w * f
    grid = np.full((rows * hf + (rows + 1) * gap, cols * wf + (cols + 1) * gap, c), 255, dtype=np.uint8)
    for i in range(n):
        top, left = gap + (i // nrow) * (hf + gap), gap + (i % nrow) * (wf + gap)
        grid[top : top + hf, left : left + wf] = u8[i]
    return grid[..., 0] if c == 1 else grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images x [N, C, H, W] in [-1, 1] as one PNG grid (`grid_image`: upscaled, nrow per row)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(x, nrow)).save(path)
    return path


def save_gif(frames: list[torch.Tensor], path: str | Path, nrow: int | None = None, duration_ms: int = 120) -> Path:
    """An animated GIF from a list of image batches [N, C, H, W] in [-1, 1] (each frame a `grid_image`)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(grid_image(x, nrow)) for x in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def to_nhwc_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 array [N, H, W, C] (the .npz `arr_0` layout)."""
    return to_uint8(x.detach().float().cpu()).permute(0, 2, 3, 1).contiguous().numpy()
