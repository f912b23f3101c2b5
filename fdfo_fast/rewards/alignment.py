"""Programmatic prompt-alignment reward for the shapes world: colour segmentation -> components -> shapes -> check."""

from __future__ import annotations

import numpy as np
import torch

from fdfo_fast.rewards.base import Reward, to_unit_hwc
from fdfo_fast.world.evaluate import FoundObject, check
from fdfo_fast.world.grammar import SHAPES, parse_prompt
from fdfo_fast.world.render import BACKGROUND, PALETTE, relation_margin, shape_mask

_COLOUR_NAMES = tuple(PALETTE)
_COLOUR_TABLE = np.array([*PALETTE.values(), BACKGROUND], dtype=np.float32)  # [K+1, 3]; last = background
# A pixel farther than this from every palette colour and the background is noise, not an object.
MAX_COLOUR_DISTANCE = 0.5


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """4-connected components of a boolean [H, W] mask -> list of (ys, xs) index arrays."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, ys, xs = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append((np.asarray(ys), np.asarray(xs)))
    return out


def classify_shape(crop: np.ndarray) -> str:
    """Shape whose template, drawn in the crop's bounding box, has the highest IoU with it."""
    h, w = crop.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t = shape_mask(shape, w, h)
        iou = (t & crop).sum() / max(1, (t | crop).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def detect(image: np.ndarray) -> list[FoundObject]:
    """Objects in one [H, W, 3] image with values in [0, 1]."""
    size = image.shape[0]
    dist = np.linalg.norm(image[:, :, None, :] - _COLOUR_TABLE[None, None], axis=-1)  # [H, W, K+1]
    label = dist.argmin(-1)
    label[dist.min(-1) > MAX_COLOUR_DISTANCE] = len(_COLOUR_NAMES)  # noise -> background
    min_area = max(3, round(5 * (size / 16) ** 2))
    found = []
    for k, colour in enumerate(_COLOUR_NAMES):
        for ys, xs in _components(label == k):
            if len(ys) < min_area:
                continue
            y0, x0 = ys.min(), xs.min()
            crop = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
            crop[ys - y0, xs - x0] = True
            found.append(FoundObject(classify_shape(crop), colour, float(xs.mean() + 0.5), float(ys.mean() + 0.5)))
    return found


class AlignmentReward(Reward):
    """GenEval-style correctness (`geneval`, 0/1) and dense partial credit (`alignment`, in [0, 1])."""

    names = ("geneval", "alignment")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        unit = to_unit_hwc(images)  # [B, H, W, 3] in [0, 1]
        self.check_batch(unit, prompts)
        margin = relation_margin(unit.shape[1])
        correct, dense = [], []
        for img, prompt in zip(unit, prompts):
            ok, score = check(parse_prompt(prompt), detect(img), margin)
            correct.append(float(ok))
            dense.append(score)
        return {
            "geneval": torch.tensor(correct, dtype=torch.float32),
            "alignment": torch.tensor(dense, dtype=torch.float32),
        }
