"""Flow-GRPO (docs/method.md §2): group-relative advantages on the SDE policy (fdfo_fast.algorithms.sde_policy:
Gaussian per-step policies, PPO clip, KL)."""

from __future__ import annotations

import torch

from fdfo_fast.algorithms.sde_policy import SDEPolicyGradient


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """A = (R − mean_group)/(std_group + 1e-4) for consecutive groups of `group_size`, clipped to ±clip."""
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return adv.flatten().clamp(-clip, clip)


def prompt_advantages(prompts: list[str], rewards: torch.Tensor, clip: float) -> torch.Tensor:
    """Flow-GRPO's reference advantages (flow_grpo/stat_tracking.py `PerPromptStatTracker(global_std=True)`, cleared
    after every epoch in scripts/train_sd3.py): samples are pooled by prompt text (a prompt drawn twice in one batch
    is one group), A = (R − mean over that prompt's samples)/(std + 1e-4) with std the population std (ddof 0) of the
    WHOLE batch's rewards; float64 as the reference's numpy; then clipped to ±clip (train_sd3.py: adv_clip_max)."""
    r = rewards.double()
    std = r.std(unbiased=False) + 1e-4
    adv = torch.empty_like(r)
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([j for j, p in enumerate(prompts) if p == prompt])
        adv[idx] = (r[idx] - r[idx].mean()) / std
    return adv.float().clamp(-clip, clip)


class FlowGRPO(SDEPolicyGradient):
    name = "flow_grpo"
    # The reference's training forward (scripts/train_sd3.py `compute_log_prob`) runs cond and uncond in one batched
    # call and detaches the unconditional prediction before the CFG combine: only v_c carries gradient.
    detach_uncond = True

    @property
    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def advantages(self, prompts, rewards):
        if self.cfg.grpo_std == "global":
            return prompt_advantages(prompts, rewards, self.cfg.adv_clip)
        return group_advantages(rewards, self.cfg.group_size, self.cfg.adv_clip)
