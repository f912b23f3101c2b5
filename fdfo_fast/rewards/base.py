"""Reward interface: a batch of images + prompts -> a dict of named per-image scalar tensors."""

from __future__ import annotations

import numpy as np
import torch

from fdfo_fast.errors import FdfoError


def check_images(images: torch.Tensor) -> None:
    """Images are [B, 3, H, W], float in [-1, 1] or uint8 in [0, 255]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FdfoError(f"reward images must be a [B, 3, H, W] tensor, got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise FdfoError(f"reward images must be float in [-1, 1] or uint8, got dtype {images.dtype}")


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [-1, 1] or uint8 -> uint8 numpy [B, H, W, 3] (round to nearest, clamp)."""
    check_images(images)
    if images.dtype != torch.uint8:
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def to_unit_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [-1, 1] or uint8 -> float32 numpy [B, H, W, 3] in [0, 1]."""
    check_images(images)
    if images.dtype == torch.uint8:
        unit = images.float() / 255.0
    else:
        unit = (images.detach().float().clamp(-1, 1) + 1) / 2
    return unit.permute(0, 2, 3, 1).cpu().numpy()


class Reward:
    """Base class: `names` lists the keys `__call__` returns, each a float32 [B] tensor on the CPU."""

    names: tuple[str, ...] = ()

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def check_batch(images, prompts: list[str]) -> None:
        if len(images) != len(prompts):
            raise FdfoError(f"reward got {len(images)} images but {len(prompts)} prompts")
