"""Held-out evaluation: sample prompts with the deterministic ODE sampler, score them, report accuracy per category."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdfo_fast.rewards import CompositeReward
from fdfo_fast.sampling import model_sigma_schedule, sample_euler
from fdfo_fast.world.grammar import CATEGORIES, PromptSpec


@dataclass
class EvalResult:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    prompts: list[str]
    categories: list[str]
    seeds: list[int]
    scores: dict[str, torch.Tensor]  # name -> [N]

    def accuracy(self) -> float:
        """GenEval-style accuracy (shapes world only)."""
        return float(self.scores["geneval"].mean())

    def per_category(self, key: str = "geneval") -> dict[str, float]:
        if key not in self.scores:
            return {}
        out = {}
        for cat in CATEGORIES:
            idx = [i for i, c in enumerate(self.categories) if c == cat]
            if idx:
                out[cat] = float(self.scores[key][idx].mean())
        return out

    def summary(self) -> dict[str, float]:
        s = {k: float(v.mean()) for k, v in self.scores.items()}
        s.update({f"geneval/{c}": a for c, a in self.per_category().items()})
        return s


@torch.no_grad()
def evaluate(
    model,
    items: list[tuple[PromptSpec | str, int]],
    reward: CompositeReward | None = None,
    num_steps: int = 20,
    shift: float = 0.0,
    cfg_scale: float = 1.0,
    batch_size: int = 128,
    impl: str | None = None,
) -> EvalResult:
    """Sample every (prompt, seed) item with the Euler ODE sampler, decode and score it.

    A prompt is a world `PromptSpec` (categorised) or plain text (category "prompts", e.g. for SD3 / FLUX runs).
    """
    reward = reward or CompositeReward("alignment:1")
    shape = model.latent_shape
    sigmas = model_sigma_schedule(model, num_steps, shift)
    texts = [p if isinstance(p, str) else p.text() for p, _ in items]
    images = []
    for i in range(0, len(items), batch_size):
        chunk = texts[i : i + batch_size]
        cond = model.encode_prompts(chunk)
        uncond = model.encode_prompts([""] * len(chunk)) if cfg_scale != 1.0 else None
        seeds = [s for _, s in items[i : i + batch_size]]
        traj = sample_euler(model, cond, uncond, seeds, shape, sigmas, cfg_scale, impl=impl)
        images.append(model.decode(traj.x0).float().clamp(-1, 1).cpu())
    images = torch.cat(images)
    scores = reward(images, texts)
    categories = ["prompts" if isinstance(p, str) else p.category for p, _ in items]
    return EvalResult(images, texts, categories, [s for _, s in items], scores)


@torch.no_grad()
def sample_diversity(
    model,
    prompts: list[str],
    samples: int,
    seed: int,
    num_steps: int = 20,
    shift: float = 0.0,
    cfg_scale: float = 1.0,
    impl: str | None = None,
    size: int = 64,
) -> float:
    """Mean over prompts of the mean pairwise RMS distance between `samples` images of the same prompt.

    Images in [-1, 1] (real models' decodes area-downsampled to `size` px first, so the number does not grow with
    resolution). RL post-training tends to collapse the samples of a prompt; this tracks how fast.
    """
    import torch.nn.functional as F

    from fdfo_fast.sampling import derive_seed

    texts = [p for p in prompts for _ in range(samples)]
    seeds = [derive_seed(seed, 3, j, i) for j in range(len(prompts)) for i in range(samples)]
    cond = model.encode_prompts(texts)
    uncond = model.encode_prompts([""] * len(texts)) if cfg_scale != 1.0 else None
    sigmas = model_sigma_schedule(model, num_steps, shift)
    x0 = sample_euler(model, cond, uncond, seeds, model.latent_shape, sigmas, cfg_scale, impl=impl).x0
    images = model.decode(x0).float().clamp(-1, 1)
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    flat = images.flatten(1).view(len(prompts), samples, -1)
    d = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # [P, n, n] RMS distances
    iu = torch.triu_indices(samples, samples, 1)
    return float(d[:, iu[0], iu[1]].mean())
