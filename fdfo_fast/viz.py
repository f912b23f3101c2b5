"""Image grids as PNG: nearest-neighbour upscaled tiles, optional coloured borders (green = correct)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdfo_fast.rewards.base import to_uint8_hwc

GOOD, BAD = (40, 200, 60), (220, 40, 40)


def image_grid(
    images: torch.Tensor, ncol: int, scale: int = 4, borders: list[tuple[int, int, int]] | None = None, pad: int = 2
) -> Image.Image:
    """[N, 3, H, W] in [-1, 1] (or uint8) -> one PIL image, tiles row-major, each framed by `borders[i]`."""
    tiles = to_uint8_hwc(images)  # [N, H, W, 3]
    n, h, w, _ = tiles.shape
    nrow = (n + ncol - 1) // ncol
    th, tw = h * scale + 2 * pad, w * scale + 2 * pad
    canvas = np.full((nrow * th, ncol * tw, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = r * th, c * tw
        if borders is not None:
            canvas[y : y + th, x : x + tw] = borders[i]
        canvas[y + pad : y + pad + h * scale, x + pad : x + pad + w * scale] = tile.repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, ncol: int, correct: torch.Tensor | None = None, scale: int = 4):
    borders = None if correct is None else [GOOD if bool(c) else BAD for c in correct]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, ncol, scale, borders).save(path)
    return path


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """One [3, H, W] image in [-1, 1] as a lossless PNG at its own resolution (written to a temp file, then moved)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(to_uint8_hwc(image[None])[0]).save(tmp, format="PNG")
    tmp.replace(path)
    return path
