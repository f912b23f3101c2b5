"""DDPO-IS (docs/method.md §3) on the Flow-GRPO SDE policy: per-prompt running advantage statistics, PPO clip, no KL."""

from __future__ import annotations

from collections import deque

import torch

from fdfo_fast.algorithms.sde_policy import SDEPolicyGradient


class PerPromptStatTracker:
    """Running reward buffers per prompt; a prompt with fewer than `min_count` rewards uses the batch statistics."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.double()
        adv = torch.empty_like(r)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([j for j, p in enumerate(prompts) if p == prompt])
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = r.mean(), r.std(unbiased=False)
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[idx] = (r[idx] - mean) / (std + 1e-6)
        return adv.float()

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


class DDPO(SDEPolicyGradient):
    name = "ddpo"
    # ddpo-pytorch (scripts/train.py) combines v_u + w·(v_c − v_u) without detaching: both CFG passes are trained.
    detach_uncond = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tracker = PerPromptStatTracker(cfg.stat_buffer, cfg.stat_min_count)

    def advantages(self, prompts, rewards):
        if not torch.isfinite(rewards).all():
            # Keep non-finite rewards out of the running buffers: the loop skips this epoch and counts it.
            return torch.full_like(rewards, float("nan"))
        return self.tracker.update(prompts, rewards).clamp(-self.cfg.adv_clip, self.cfg.adv_clip)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))
