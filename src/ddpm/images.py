"""Image files: grids (PNG), animated GIFs and reading a user's image, all through Pillow/torchvision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ddpm.data import to_uint8


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images x [N, C, H, W] in [-1, 1] as one PNG grid (nrow per row; default about square)."""
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = x.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    grid = make_grid(to_uint8(x.detach().float().cpu()), nrow=nrow, padding=1, pad_value=255)  # [C, H, W] uint8
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
    return path


def save_gif(frames: list[torch.Tensor], path: str | Path, nrow: int | None = None, duration_ms: int = 120) -> Path:
    """An animated GIF from a list of image batches [N, C, H, W] in [-1, 1] (each frame a grid)."""
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for x in frames:
        n = x.shape[0]
        grid = make_grid(to_uint8(x.float().cpu()), nrow=nrow or max(1, int(math.ceil(math.sqrt(n)))), padding=1, pad_value=255)
        arr = grid.permute(1, 2, 0).numpy()
        images.append(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def to_nhwc_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 array [N, H, W, C] (the .npz `arr_0` layout)."""
    return to_uint8(x.detach().float().cpu()).permute(0, 2, 3, 1).contiguous().numpy()
