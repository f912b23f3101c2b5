"""Reward interface: a batch of images + prompts -> a dict of named per-image scalar tensors."""

from __future__ import annotations

import contextvars

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
    """[B, 3, H, W] float in [-1, 1] or uint8 -> uint8 numpy [B, H, W, 3] (clamp, round half up as PIL does)."""
    check_images(images)
    if images.dtype == torch.uint8:
        return images.permute(0, 2, 3, 1).cpu().numpy()
    from fdfo_fast.rewards.preprocess import to_uint8_nhwc

    return to_uint8_nhwc(images.detach()).cpu().numpy()


def to_unit_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [-1, 1] or uint8 -> float32 numpy [B, H, W, 3] in [0, 1]."""
    check_images(images)
    if images.dtype == torch.uint8:
        unit = images.float() / 255.0
    else:
        unit = (images.detach().float().clamp(-1, 1) + 1) / 2
    return unit.permute(0, 2, 3, 1).cpu().numpy()


class Reward:
    """Base class: `names` lists the keys `__call__` returns, each a float32 [B] tensor on the CPU.

    What a part reads besides (images, prompts) it declares, and the composite passes it as a keyword:
    - `wants_uint8`: the uint8 [B, H, W, 3] images as `uint8_nhwc=`, from the same fused preprocessing pass that
      prepares the model rewards' inputs;
    - `wants_seeds`: the samples' seeds as `seeds=` (the human term shows them);
    - `wants_metadata`: each row's prompt metadata as `metadata=` (a list of dicts: the fields of a JSONL prompt
      file's record besides "prompt", e.g. GenEval's tag / include; `{}` for a prompt without any);
    - `wants_video`: a video model's whole clips [B, 3, F, H, W] (else a video's score is the mean of its frames'
      scores, fdfo_fast.rewards.video).
    """

    names: tuple[str, ...] = ()
    wants_uint8: bool = False
    wants_seeds: bool = False
    wants_metadata: bool = False
    wants_video: bool = False
    # Where the part's networks are (None: it has none). A part with networks sets it and implements `to`, so that
    # --offload-frozen can move it off the training GPU for the training passes (fdfo_fast.placement).
    device: torch.device | None = None

    @property
    def score_block(self) -> int | None:
        """Rows whose scores do not depend on which other rows share the call, as long as each call covers whole
        blocks of this many rows from the batch's start: 1 for a per-image reward; a reward scoring in fixed-size
        micro-batches (`micro_batch`), its micro-batch; None for one that needs the whole batch at once (the human
        term publishes an epoch's pairs together). Overlapped scoring (fdfo_fast.scoring) relies on it."""
        return int(getattr(self, "micro_batch", 1))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Reward:
        """Move the part's networks to `device` (its inputs follow them there); a part without any ignores it."""
        return self

    @staticmethod
    def check_batch(images, prompts: list[str]) -> None:
        if len(images) != len(prompts):
            raise FdfoError(f"reward got {len(images)} images but {len(prompts)} prompts")


# Set by whoever shows scoring progress (the trainer's progress bar): called with the number of rows each scoring
# call or micro-batch finished. A context variable, so no reward signature carries it.
SCORED_ROWS: contextvars.ContextVar = contextvars.ContextVar("fdfo_scored_rows", default=None)


def report_scored(n: int) -> None:
    tick = SCORED_ROWS.get()
    if tick is not None:
        tick(n)


def score_in_micro_batches(score_fn, pixels: torch.Tensor, prompts: list[str], micro_batch: int) -> dict:
    """Run `score_fn(pixels[i:i + m], prompts[i:i + m])` on fixed-size chunks; the last is padded by repeating its
    final row and the padding's scores dropped. Static shapes let a GPU scorer be CUDA-graph captured once."""
    if micro_batch < 1:
        raise FdfoError(f"micro_batch must be >= 1, got {micro_batch}")
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(pixels), micro_batch):
        chunk, texts = pixels[i : i + micro_batch], list(prompts[i : i + micro_batch])
        n = len(chunk)
        if n < micro_batch:
            pad = micro_batch - n
            chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            texts += [texts[-1]] * pad
        for name, value in score_fn(chunk, texts).items():
            if value.shape != (micro_batch,):
                raise FdfoError(f"reward term {name!r} returned shape {tuple(value.shape)}, expected ({micro_batch},)")
            parts.setdefault(name, []).append(value[:n].detach().float().cpu())
        report_scored(n)
    return {name: torch.cat(v) for name, v in parts.items()}


class ModelReward(Reward):
    """A reward computed by a network from its own preprocessed pixel tensor, in fixed-size micro-batches.

    Subclasses set `input_spec` (what the model's image processor does) and implement `score(pixels, prompts)` for
    one micro-batch. Called alone it preprocesses for itself; inside a `CompositeReward` it receives `pixels` from
    the one fused pass that serves every model reward.
    """

    input_spec = None  # fdfo_fast.rewards.preprocess.ImageInputSpec
    micro_batch: int = 16

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, images, prompts, pixels: torch.Tensor | None = None, impl: str | None = None):
        self.check_batch(images, prompts)
        if pixels is None:
            from fdfo_fast.rewards.preprocess import preprocess_images

            (pixels,), _ = preprocess_images(images, [self.input_spec], impl=impl)
        with torch.no_grad():
            return score_in_micro_batches(self.score, pixels, prompts, self.micro_batch)
