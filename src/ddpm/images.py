"""Image files: grids (PNG), animated GIFs and reading a user's input image (checked against the run, never
resized), through Pillow."""

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


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PNG modes read as 1 channel


def _read_png(path: Path, channels: int | None, what: str) -> torch.Tensor:
    """One PNG -> uint8 [C, H, W]: C = `channels`, or by its mode (gray 1, else 3). A colour image for 1 channel is
    refused as in `read_input_image`."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            rgb, mode = to_rgb8(img), img.mode
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None
    c = channels or (1 if mode in GRAY_MODES else 3)
    if c == 1 and not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise ImageMismatchError(f"{what} {path} is a colour image, but 1-channel (grayscale) images are needed: "
                                 "convert it to grayscale first (Pillow: convert('L'))")
    return to_channels(rgb, c)


def read_images(path: str | Path, channels: int | None = None, what: str = "--input") -> torch.Tensor:
    """Images from a PNG, a folder of PNGs (sorted by name, all one size) or an .npz of uint8 [N, H, W, C] under
    arr_0 -> uint8 [N, C, H, W], nothing resized. `channels`: PNGs are read with that many (default: gray
    modes 1, others 3); an .npz keeps its own. Errors name `what` and the file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"{what} {path}: a folder without .png files")
        images = [_read_png(f, channels, what) for f in files]
        for f, im in zip(files, images, strict=True):
            if im.shape != images[0].shape:
                raise ImageMismatchError(f"{what} {f} is {_hwc(im.shape)}, but {files[0].name} is "
                                         f"{_hwc(images[0].shape)}: the images of a folder must share one size")
        return torch.stack(images)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file or folder")
    if path.suffix.lower() == ".npz":
        try:
            arr = np.load(path)["arr_0"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{what} {path}: not an .npz of images under arr_0 ({e})") from None
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise ImageMismatchError(f"{what} {path}: arr_0 must be uint8 [N, H, W, C]; got {arr.dtype} "
                                     f"{list(arr.shape)}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    if path.suffix.lower() != ".png":
        raise ValueError(f"{what} {path}: expected a .png, a folder of .png files or an .npz")
    return _read_png(path, channels, what)[None]


def _hwc(chw: tuple[int, ...]) -> str:
    c, h, w = chw
    return f"{h}x{w} with {c} channel{'s' if c > 1 else ''}"


def check_images(images: torch.Tensor, shape: tuple[int, int, int], path: str | Path, what: str, why: str) -> None:
    """Refuse images uint8 [N, C, H, W] that are not [N, *shape] (C, H, W): an ImageMismatchError naming the file,
    both shapes in the .npz layout [N, H, W, C], and `why` (what needs that shape)."""
    c, h, w = shape
    if tuple(images.shape[1:]) != tuple(shape):
        got = [images.shape[0], images.shape[2], images.shape[3], images.shape[1]]
        raise ImageMismatchError(f"{what} {path} holds images {got} ([N, H, W, C]), but {why} needs "
                                 f"[N, {h}, {w}, {c}] (nothing is resized)")


def write_images(x: torch.Tensor, path: str | Path) -> Path:
    """Images x [N, C, H, W] in [-1, 1] -> `path`: an .npz of uint8 [N, H, W, C] under arr_0, or a .png (one image
    at its own size, several as a `save_grid` grid)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, arr_0=to_nhwc_uint8(x))
        return path
    if x.shape[0] == 1:
        u8 = to_nhwc_uint8(x)[0]
        Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8).save(path)
        return path
    return save_grid(x, path)
