"""Image files: grids (PNG), animated GIFs and reading a user's input image (checked against the run, never
resized), all through Pillow/torchvision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ddpm.data import to_channels, to_rgb8, to_uint8


class ImageMismatchError(ValueError):
    """An input image that does not fit the command; the message names the file, its shape and the one needed."""


def read_input_image(path: str | Path, resolution: int, channels: int, what: str = "--image",
                     like: str | None = None) -> torch.Tensor:
    """A user's image for a run whose images are [channels, resolution, resolution] -> uint8 [channels, R, R].

    Nothing is resized or cropped: an image of another height or width is refused with an ImageMismatchError
    (`like` names the input it must match, e.g. the image an inpainting mask belongs to). For a 3-channel run
    any colour mode is taken (gray repeated, transparency onto white: `ddpm.data.to_rgb8`); for a 1-channel
    run (and a mask) only a gray image, every pixel R = G = B: a colour one is refused rather than reduced to
    its luma without a word. `what` names the input in the errors (the option that gave it)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            rgb, mode, bands = to_rgb8(img), img.mode, len(img.getbands())
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for a damaged or non-image file
        raise ValueError(f"cannot read {what} {path}: {e}") from None
    h, w = rgb.shape[:2]
    shape = f"{h}x{w} (H x W, {bands} channel{'s' if bands > 1 else ''} {mode})"
    if (h, w) != (resolution, resolution):
        needed = f"it must be {resolution}x{resolution} like {like}" if like else \
            f"the run takes {resolution}x{resolution} images"
        raise ImageMismatchError(f"{what} {path} is {shape}, but {needed}: resize or crop it to "
                                 f"{resolution}x{resolution} first (this command does not resize)")
    if channels == 1 and not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise ImageMismatchError(f"{what} {path} is {shape} in colour, but a 1-channel (grayscale) {resolution}x"
                                 f"{resolution} image is needed: convert it to grayscale first (Pillow: convert('L'))")
    return to_channels(rgb, channels)


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
