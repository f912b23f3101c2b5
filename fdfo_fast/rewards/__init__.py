"""Rewards: named per-image scores and their weighted composite."""

from __future__ import annotations

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.alignment import AlignmentReward
from fdfo_fast.rewards.base import Reward
from fdfo_fast.rewards.image_stats import JpegReward, PaletteQualityReward

# term name -> the Reward class that produces it
REWARD_TERMS: dict[str, type[Reward]] = {
    name: cls for cls in (AlignmentReward, JpegReward, PaletteQualityReward) for name in cls.names
}


def parse_weights(spec: str | dict[str, float]) -> dict[str, float]:
    """'alignment:1,quality:0.1' (or a dict) -> {term: weight}; clear error on unknown terms or bad numbers."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, w = part.partition(":")
            try:
                items.append((name.strip(), float(w) if w else 1.0))
            except ValueError:
                raise FdfoError(f"reward weight for {name!r} is not a number: {w!r}") from None
    if not items:
        raise FdfoError("reward must name at least one term, e.g. 'alignment:1.0'")
    for name, w in items:
        if name not in REWARD_TERMS:
            raise FdfoError(f"unknown reward term {name!r}; known: {', '.join(REWARD_TERMS)}")
        if not isinstance(w, (int, float)) or w != w:
            raise FdfoError(f"reward weight for {name!r} must be a finite number, got {w!r}")
    return {name: float(w) for name, w in items}


class CompositeReward(Reward):
    """Σ_i w_i·term_i as `reward`, plus every term the underlying rewards compute (for logging)."""

    def __init__(self, weights: str | dict[str, float]):
        self.weights = parse_weights(weights)
        classes = dict.fromkeys(REWARD_TERMS[n] for n in self.weights)  # ordered, deduplicated
        self.parts = [cls() for cls in classes]
        self.names = ("reward", *(n for p in self.parts for n in p.names))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.check_batch(images, prompts)
        out: dict[str, torch.Tensor] = {}
        for part in self.parts:
            out.update(part(images, prompts))
        out["reward"] = sum(w * out[n] for n, w in self.weights.items())
        return out


__all__ = ["AlignmentReward", "CompositeReward", "JpegReward", "PaletteQualityReward", "Reward", "REWARD_TERMS"]
