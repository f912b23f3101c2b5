"""Procedural renderer of the shapes world: scenes that satisfy a prompt, drawn as crisp RGB images in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.world.grammar import COLOURS, PromptSpec

# RGB in [0, 1]; far apart so a colour survives blur and model error.
PALETTE = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.10, 0.78, 0.18),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.0, 0.0, 0.0)
MIN_SIZE = 16


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its bounding box's top-left corner (x, y) and side length in pixels."""

    shape: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def mask(self) -> np.ndarray:
        return shape_mask(self.shape, self.size, self.size)

    @property
    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(self.x + xs.mean() + 0.5), float(self.y + ys.mean() + 0.5)


@cache
def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean [h, w] mask of `shape` inscribed in a w×h box (4×4 supersampled, coverage ≥ 1/2)."""
    sub = 4
    ys, xs = np.meshgrid((np.arange(h * sub) + 0.5) / sub, (np.arange(w * sub) + 0.5) / sub, indexing="ij")
    if shape == "circle":
        inside = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1.0
    elif shape == "square":
        inside = np.ones_like(xs, dtype=bool)
    elif shape == "triangle":  # apex up, base on the bottom edge
        inside = np.abs(xs - w / 2) <= (w / 2) * (ys / h)
    else:
        raise FdfoError(f"unknown shape {shape!r}")
    cover = inside.reshape(h, sub, w, sub).mean(axis=(1, 3))
    mask = cover >= 0.5
    mask.setflags(write=False)
    return mask


def _sizes(n: int, image_size: int) -> tuple[int, int]:
    """Side-length range for n objects, scaled from the 16-pixel world."""
    lo, hi = (5, 7) if n <= 2 else (5, 6)
    scale = image_size / 16
    return max(3, round(lo * scale)), max(3, round(hi * scale))


def _separated(a: SceneObject, b: SceneObject, gap: int) -> bool:
    return (
        a.x + a.size + gap <= b.x or b.x + b.size + gap <= a.x or a.y + a.size + gap <= b.y or b.y + b.size + gap <= a.y
    )


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Does centroid a stand in relation `rel` to centroid b (image y grows downwards)?"""
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {
        "left of": dx < -margin,
        "right of": dx > margin,
        "above": dy < -margin,
        "below": dy > margin,
    }[rel]


def relation_margin(image_size: int) -> float:
    """Centroids must differ by more than this along the relation's axis (1/8 of the image)."""
    return image_size / 8


def sample_scene(spec: PromptSpec, rng: np.random.Generator, image_size: int = 16) -> list[SceneObject]:
    """A random scene that satisfies `spec` and contains exactly the objects it names."""
    if image_size < MIN_SIZE:
        raise FdfoError(f"image_size must be >= {MIN_SIZE}, got {image_size}")
    if spec.category == "counting":
        wanted = [(spec.objects[0].shape, None)] * spec.count
    else:
        wanted = [(o.shape, o.colour) for o in spec.objects]
    wanted = [(s, c if c is not None else COLOURS[rng.integers(len(COLOURS))]) for s, c in wanted]
    lo, hi = _sizes(len(wanted), image_size)
    gap = max(1, image_size // 16)
    for _ in range(200):
        objs: list[SceneObject] = []
        for shape, colour in wanted:
            size = int(rng.integers(lo, hi + 1))
            for _ in range(100):
                o = SceneObject(
                    shape,
                    colour,
                    int(rng.integers(0, image_size - size + 1)),
                    int(rng.integers(0, image_size - size + 1)),
                    size,
                )
                if all(_separated(o, p, gap) for p in objs):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) != len(wanted):
            continue
        if spec.category == "position":
            (ax, ay), (bx, by) = objs[0].centroid, objs[1].centroid
            dominant = (
                abs(ax - bx) > abs(ay - by)
                if spec.relation in ("left of", "right of")
                else (abs(ay - by) > abs(ax - bx))
            )
            # Render with a wider margin than the scorer uses, and on the relation's dominant axis.
            margin = relation_margin(image_size) + 1
            if not (dominant and relation_holds(spec.relation, objs[0].centroid, objs[1].centroid, margin)):
                continue
        return objs
    raise RuntimeError(f"could not place a scene for {spec.text()!r} at {image_size}px")  # pragma: no cover


def render(objects: list[SceneObject], image_size: int = 16) -> np.ndarray:
    """Scene -> float32 [3, H, W] image in [-1, 1]."""
    img = np.empty((image_size, image_size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for o in objects:
        region = img[o.y : o.y + o.size, o.x : o.x + o.size]
        region[o.mask] = PALETTE[o.colour]
    return img.transpose(2, 0, 1) * 2.0 - 1.0


def render_batch(specs: list[PromptSpec], seeds: list[int], image_size: int = 16) -> torch.Tensor:
    """Deterministic batch: scene i drawn from `seeds[i]` -> [B, 3, H, W] float32 in [-1, 1]."""
    out = np.stack(
        [render(sample_scene(s, np.random.default_rng(seed), image_size), image_size) for s, seed in zip(specs, seeds)]
    )
    return torch.from_numpy(out)
