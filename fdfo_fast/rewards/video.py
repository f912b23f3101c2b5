"""Rewards for videos: every image term scored on the frames and averaged, plus a temporal-consistency term.

A video model (`FlowModel.is_video`, e.g. Wan2.1) decodes [B, 3, F, H, W]. `CompositeReward` scores such a batch by
`score_video_terms`: each image term (PickScore, CLIP score, JPEG, a plugin, ...) sees the B·F frames as images with
their video's prompt, and a video's score is the mean over its frames (so any image reward model serves a video
model, no video reward model needed). Terms that need the whole clip (`Reward.wants_video`) get
the videos themselves; `temporal_consistency` is the one shipped.

`temporal_consistency` ∈ [0, 1] penalises flicker, not motion. On frames low-passed by 4× area pooling (so fine
texture that moves does not count), with pixels u in [0, 1]:

    flicker = mean over t = 1 … F−2 and pixels of |u_{t+1} − 2·u_t + u_{t−1}|,    score = 1 − flicker / 2

the mean absolute second temporal difference (≤ 2, hence /2). A still clip, a constant-speed change of intensity
(a fade, a smooth pan of a smooth scene) scores 1; a value that jumps and comes back (flicker, popping objects,
frame-to-frame colour shifts) lowers it. It is a regulariser to weigh beside a per-frame quality or alignment term:
alone it is maximised by a still video, as a first-difference (|u_{t+1} − u_t|) term would be even more directly.
"""

from __future__ import annotations

import contextlib

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.base import SCORED_ROWS, Reward, report_scored

TEMPORAL_POOL = 4  # the low-pass before the second difference: 4×4 area pooling of each frame


def check_videos(videos: torch.Tensor) -> None:
    """Videos are [B, 3, F, H, W], float in [-1, 1] or uint8."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[1] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise FdfoError(f"reward videos must be a [B, 3, F, H, W] tensor, got {shape}")


def video_frames(videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> the frames as images [B·F, 3, H, W], video-major (row b·F + t is frame t of video b)."""
    check_videos(videos)
    b, c, f, h, w = videos.shape
    return videos.transpose(1, 2).reshape(b * f, c, h, w)


def temporal_consistency(videos: torch.Tensor) -> torch.Tensor:
    """1 − mean |u_{t+1} − 2u_t + u_{t−1}| / 2 per video on 4×-pooled frames in [0, 1] (module docstring); 1 for
    fewer than 3 frames (no second difference exists)."""
    check_videos(videos)
    unit = videos.float() / 255.0 if videos.dtype == torch.uint8 else (videos.float().clamp(-1, 1) + 1) / 2
    b, c, f, h, w = unit.shape
    if f < 3:
        return torch.ones(b)
    k = max(1, min(TEMPORAL_POOL, h, w))
    pooled = torch.nn.functional.avg_pool3d(unit, kernel_size=(1, k, k))  # [B, 3, F, H/k, W/k]
    second = pooled[:, :, 2:] - 2 * pooled[:, :, 1:-1] + pooled[:, :, :-2]
    return (1 - second.abs().flatten(1).mean(1) / 2).cpu()


class TemporalConsistencyReward(Reward):
    """`temporal_consistency` ∈ [0, 1] of each video (module docstring); prompt-free."""

    names = ("temporal_consistency",)
    wants_video = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.check_batch(images, prompts)
        if images.ndim != 5:
            raise FdfoError("reward term 'temporal_consistency' scores videos ([B, 3, F, H, W]); this model makes "
                            "images")  # fmt: skip
        return {"temporal_consistency": temporal_consistency(images)}


@contextlib.contextmanager
def _frames_not_counted():
    """Frame scoring must not tick the progress bar per frame (it counts samples): silenced, then B reported."""
    token = SCORED_ROWS.set(None)
    try:
        yield
    finally:
        SCORED_ROWS.reset(token)


def score_video_terms(score_frames, parts: list[Reward], videos: torch.Tensor, prompts: list[str], seeds, metadata):
    """Every term of `parts` for a batch of videos: the frame parts (through `score_frames(frames, prompts, seeds,
    metadata, parts)`, i.e. the composite's image path) on the B·F frames, averaged per video; the video parts
    (`wants_video`) on the videos."""
    b, f = videos.shape[0], videos.shape[2]
    frame_parts = [p for p in parts if not getattr(p, "wants_video", False)]
    video_parts = [p for p in parts if getattr(p, "wants_video", False)]
    out: dict[str, torch.Tensor] = {}
    if frame_parts:
        repeat = lambda xs: None if xs is None else [x for x in xs for _ in range(f)]
        with _frames_not_counted():
            per_frame = score_frames(video_frames(videos), repeat(prompts), repeat(seeds), repeat(metadata),
                                     frame_parts)  # fmt: skip
        out.update({name: value.view(b, f).mean(1) for name, value in per_frame.items()})
    for part in video_parts:
        from fdfo_fast.rewards import check_scores

        out.update(check_scores(part, part(videos, prompts), b))
    report_scored(b)
    return out
