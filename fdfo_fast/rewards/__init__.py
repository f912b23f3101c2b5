"""Rewards: named per-image scores and their weighted composite."""

from __future__ import annotations

import math

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.alignment import AlignmentReward
from fdfo_fast.rewards.base import ModelReward, Reward, report_scored
from fdfo_fast.rewards.image_stats import JpegReward, PaletteQualityReward
from fdfo_fast.rewards.video import TemporalConsistencyReward, score_video_terms

# term name -> the Reward class that produces it
REWARD_TERMS: dict[str, type[Reward]] = {
    name: cls
    for cls in (AlignmentReward, JpegReward, PaletteQualityReward, TemporalConsistencyReward)
    for name in cls.names
}
# Terms that score a whole clip: they need a video model (the config refuses them for image models).
VIDEO_TERMS: frozenset[str] = frozenset(TemporalConsistencyReward.names)
# Terms that parse the prompt with the shapes world's grammar: they cannot score a real model's image (the config
# refuses them for the diffusers models).
# `quality` (closeness to the world's palette) and the JPEG terms are prompt-free.
TOY_WORLD_TERMS: frozenset[str] = frozenset(AlignmentReward.names)


def parse_weights(spec: str | dict[str, float], known: dict[str, object] | None = None) -> dict[str, float]:
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
    known = REWARD_TERMS if known is None else known
    for name, w in items:
        if name not in known:
            raise FdfoError(f"unknown reward term {name!r}; known: {', '.join(known)}")
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise FdfoError(f"reward weight for {name!r} must be a finite number, got {w!r}")
    return {name: float(w) for name, w in items}


class CompositeReward(Reward):
    """Σ_i w_i·term_i as `reward`, plus every term the underlying rewards compute (for logging).

    `models` adds reward instances built elsewhere (e.g. network rewards loaded from a path); their terms become
    usable in `weights`. Scoring a batch runs one fused preprocessing pass (`preprocess_images`: every model
    reward's input spec plus the uint8 images when a part wants them), then each part on its input; model rewards
    score in fixed-size micro-batches. `preprocess_impl` picks the extension or the PyTorch reference.
    """

    def __init__(self, weights: str | dict[str, float], models: list[Reward] | None = None, preprocess_impl=None):
        self.models = list(models or [])
        instances = {name: m for m in self.models for name in m.names}
        known = {**REWARD_TERMS, **instances}
        self.weights = parse_weights(weights, known)
        parts: dict[int, Reward] = {}
        for name in self.weights:
            part = instances.get(name)
            if part is None:  # built-in classes: one instance per class, shared by its terms
                cls = REWARD_TERMS[name]
                part = next((p for p in parts.values() if type(p) is cls), None) or cls()
            parts.setdefault(id(part), part)
        self.parts = list(parts.values())
        self.names = ("reward", *(n for p in self.parts for n in p.names))
        self.preprocess_impl = preprocess_impl
        specs = [p.input_spec for p in self.parts if isinstance(p, ModelReward)]
        self.specs = list(dict.fromkeys(specs))  # models sharing a processor share one prepared tensor
        self.wants_uint8 = any(p.wants_uint8 for p in self.parts)
        self.wants_seeds = any(p.wants_seeds for p in self.parts)
        self.wants_metadata = any(p.wants_metadata for p in self.parts)
        self.prompt_metadata: dict[str, dict] = {}  # prompt -> its prompt-file fields (fdfo_fast.prompts)

    def begin_epoch(self, epoch: int) -> None:
        for part in self.parts:
            if hasattr(part, "begin_epoch"):
                part.begin_epoch(epoch)

    def close(self) -> None:
        for part in self.parts:
            if hasattr(part, "close"):
                part.close()

    def __call__(
        self,
        images: torch.Tensor,
        prompts: list[str],
        seeds: list[int] | None = None,
        metadata: list[dict] | None = None,
    ) -> dict:
        """Score a batch. `seeds` (the samples' seeds) reach the parts that record them (the human term);
        `metadata` (one dict per row) the parts that read prompt fields; without it each prompt's record from
        `prompt_metadata` (the prompt files' extra fields), `{}` for a prompt without one."""
        return self.weigh(self.score_terms(images, prompts, seeds, metadata))

    def weigh(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms plus `reward` = Σ_i w_i·term_i (row by row: the same whichever calls scored the rows)."""
        return {**terms, "reward": sum(w * terms[n] for n, w in self.weights.items())}

    @property
    def score_block(self) -> int | None:
        """The least common multiple of the parts' blocks (`Reward.score_block`) over the parts that have one."""
        return math.lcm(*(p.score_block for p in self.parts if p.score_block is not None))

    def score_terms(
        self,
        images: torch.Tensor,
        prompts: list[str],
        seeds: list[int] | None = None,
        metadata: list[dict] | None = None,
        parts: list[Reward] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every term of `parts` (default: all) for a batch of images [B, 3, H, W] or videos [B, 3, F, H, W]
        (frames scored as images and averaged per video, fdfo_fast.rewards.video), without the weighted sum."""
        self.check_batch(images, prompts)
        parts = self.parts if parts is None else parts
        if images.ndim == 5:
            return score_video_terms(self.score_terms, parts, images, prompts, seeds, metadata)
        if metadata is None and any(p.wants_metadata for p in parts):
            metadata = [self.prompt_metadata.get(p, {}) for p in prompts]
        if metadata is not None and len(metadata) != len(prompts):
            raise FdfoError(f"reward got {len(metadata)} metadata records for {len(prompts)} prompts")
        specs = [s for s in self.specs if any(isinstance(p, ModelReward) and p.input_spec == s for p in parts)]
        wants_uint8 = any(p.wants_uint8 for p in parts)
        pixels, uint8 = [], None
        if specs or wants_uint8:
            from fdfo_fast.rewards.preprocess import preprocess_images

            pixels, uint8 = preprocess_images(images, specs, wants_uint8, impl=self.preprocess_impl)
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            extras = {}
            if part.wants_uint8:
                extras["uint8_nhwc"] = uint8
            if part.wants_seeds:
                extras["seeds"] = seeds
            if part.wants_metadata:
                extras["metadata"] = metadata
            if isinstance(part, ModelReward):  # reports its micro-batches itself (score_in_micro_batches)
                extras["pixels"] = pixels[specs.index(part.input_spec)]
            out.update(check_scores(part, part(images, prompts, **extras), len(images)))
            if not isinstance(part, ModelReward):
                report_scored(len(images))
        return out


def check_scores(part: Reward, scores: dict, n: int) -> dict[str, torch.Tensor]:
    """A part's scores as the composite needs them: exactly its declared `names`, each a float [n] tensor (on the
    CPU, float32). Anything else (a plugin returning a list, [n, 1], an int tensor, another term's name) is one
    FdfoError naming the term; non-finite values pass through (the trainer skips such an epoch and counts it)."""
    what = type(part).__name__
    if not isinstance(scores, dict):
        raise FdfoError(f"reward {what} returned {type(scores).__name__}; expected a dict of term -> [B] tensor")
    if set(scores) != set(part.names):
        raise FdfoError(f"reward {what} returned terms {sorted(scores)}; it declares {sorted(part.names)}")
    checked = {}
    for name, value in scores.items():
        if not isinstance(value, torch.Tensor):
            raise FdfoError(
                f"reward term {name!r} returned {type(value).__name__}; expected a float tensor of shape ({n},)"
            )
        if tuple(value.shape) != (n,):
            raise FdfoError(f"reward term {name!r} returned shape {tuple(value.shape)}, expected ({n},)")
        if not value.is_floating_point():
            raise FdfoError(f"reward term {name!r} returned dtype {value.dtype}; expected a floating-point tensor")
        checked[name] = value.detach().to("cpu", torch.float32)
    return checked


__all__ = [
    "AlignmentReward",
    "CompositeReward",
    "JpegReward",
    "ModelReward",
    "PaletteQualityReward",
    "Reward",
    "REWARD_TERMS",
    "TOY_WORLD_TERMS",
    "TemporalConsistencyReward",
    "VIDEO_TERMS",
]
