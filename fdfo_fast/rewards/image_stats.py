"""Prompt-free image rewards: JPEG (in)compressibility as in DDPO, and a palette-fidelity quality score."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from fdfo_fast.rewards.base import Reward, to_uint8_hwc, to_unit_hwc
from fdfo_fast.world.render import BACKGROUND, PALETTE


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95, uint8_nhwc: torch.Tensor | None = None) -> torch.Tensor:
    """Encoded JPEG size of each image in kB (DDPO's compressibility measure)."""
    arrays = uint8_nhwc.cpu().numpy() if uint8_nhwc is not None else to_uint8_hwc(images)
    sizes = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward(Reward):
    """DDPO's JPEG rewards: `jpeg_compressibility` = −kB and `jpeg_incompressibility` = +kB."""

    names = ("jpeg_compressibility", "jpeg_incompressibility")
    wants_uint8 = True

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str], uint8_nhwc: torch.Tensor | None = None):
        self.check_batch(images, prompts)
        kb = jpeg_kilobytes(images, self.quality, uint8_nhwc)
        return {"jpeg_compressibility": -kb, "jpeg_incompressibility": kb}


class PaletteQualityReward(Reward):
    """`quality` ∈ [0, 1]: how close each pixel is to a clean world colour (palette or background).

    Muddy, blurred or off-palette pixels score low; a crisp rendered scene scores 1. An image-statistics
    proxy for "clean image" that ignores the prompt.
    """

    names = ("quality",)
    TABLE = np.array([*PALETTE.values(), BACKGROUND], dtype=np.float32)

    def __init__(self, scale: float = 0.15):
        self.scale = scale

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.check_batch(images, prompts)
        unit = to_unit_hwc(images)  # [B, H, W, 3]
        d = np.linalg.norm(unit[..., None, :] - self.TABLE, axis=-1).min(-1)  # [B, H, W]
        score = np.exp(-0.5 * (d / self.scale) ** 2).mean(axis=(1, 2))
        return {"quality": torch.from_numpy(score.astype(np.float32))}
