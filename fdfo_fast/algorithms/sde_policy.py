"""The SDE policy shared by Flow-GRPO and DDPO (docs/method.md §2, §3): SDE rollouts whose steps are Gaussian
policies π(x_{k+1} | x_k) with per-step log-probs, and the PPO clipped objective on them."""

from __future__ import annotations

import torch

from fdfo_fast.algorithms.base import (
    Algorithm,
    LossStats,
    Rollout,
    RunContext,
    Samples,
    draw_groups,
    draw_step_items,
    policy_velocity,
)
from fdfo_fast.kernels.sampler_step import gaussian_log_prob, largest_sigma_below_one, sde_mean, sde_std
from fdfo_fast.sampling import Sampler, Trajectory, sample_sde


def sde_window(cfg, T: int, epoch: int, generator: torch.Generator) -> tuple[int, int] | None:
    """The steps [start, start + k) that get SDE noise and training this epoch (--sde-window k), None = all T.

    Flow-GRPO-Fast (flow_grpo's fast trainer; docs/method.md §2) draws the window's start uniformly within the first
    `sde_window_range` steps; MixGRPO (arXiv 2507.21802) slides it one step later every `sde_window_every` epochs,
    wrapping around. A window of k steps costs k/T of the all-steps training passes."""
    k = cfg.sde_window
    if not k:
        return None
    starts = (cfg.sde_window_range or T) - k + 1
    if cfg.sde_window_mode == "sliding":
        start = (epoch // cfg.sde_window_every) % starts
    else:  # drawn from the epoch's shared generator: the same window on every rank
        start = int(torch.randint(starts, (1,), generator=generator))
    return start, start + k


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """PPO per item: max(−A·r, −A·clip(r, 1 − c, 1 + c)) with r = exp(logπ_θ − logπ_old); returns (loss, r)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


class SDEPolicyGradient(Algorithm):
    """Shared machinery of Flow-GRPO and DDPO: SDE sampling, per-step log-probs, the clipped objective.
    Subclasses supply `advantages(prompts, rewards)` over the global batch."""

    config_section = "sde"  # SDEPolicyConfig
    detach_uncond = False  # with CFG: no gradient through the unconditional pass (see FlowGRPO)
    window: tuple[int, int] | None = None  # this epoch's SDE window (--sde-window), None = every step

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def preview_group_size(self) -> int:
        return self.cfg.group_size  # the images of one drawn prompt

    def rollout(self, ctx: RunContext, epoch: int, generator: torch.Generator) -> Rollout:
        self.window = sde_window(self.cfg, len(ctx.sigmas) - 1, epoch, generator)
        return super().rollout(ctx, epoch, generator)

    def draw(self, ctx: RunContext, generator: torch.Generator):
        """This rank's prompts (in group order) and per-sample seeds, drawn globally (rank-count invariant)."""
        return draw_groups(ctx, self.cfg.prompts_per_epoch, self.cfg.group_size, generator)

    def sample(self, ctx: RunContext, cond: dict, uncond: dict | None, seeds: list[int]) -> Trajectory:
        sampler = Sampler(
            "sde",
            ctx.sigmas,
            ctx.sampling.cfg_scale,
            noise_level=self.cfg.noise_level,
            record=True,
            impl=ctx.impl,
            sde_window=self.window,
        )
        return sample_sde(ctx.model, sampler, cond, uncond, seeds, ctx.shape, ctx.runner)

    def finish(self, ctx: RunContext, samples: Samples, generator: torch.Generator) -> Rollout:
        cfg, traj = self.cfg, samples.traj
        adv = ctx.global_advantages(self.advantages, samples.prompts, samples.rewards["reward"])
        T, B = traj.states.shape[:2]
        # k = ⌊f·T⌋ steps per trajectory, as both references count them: int(num_steps · timestep_fraction)
        # (flow_grpo scripts/train_sd3.py, ddpo-pytorch scripts/train.py); validate() keeps k >= 1. "first" is
        # Flow-GRPO's steps 0 … k − 1 (f = 0.99 of 10 steps drops the last one), "random" DDPO's per-sample subset.
        k_train = int(cfg.train_timestep_fraction * T)
        n_global = cfg.prompts_per_epoch * cfg.group_size
        window, stats = self.window, {}
        if window is None:
            items = draw_step_items(B, T, k_train, cfg.timestep_selection, generator, ctx.env, n_global)
        else:  # the window's steps, the only stochastic ones (outside it the policy is deterministic)
            items = torch.cartesian_prod(torch.arange(B), torch.arange(*window))
            stats[f"{self.name}/sde_window_start"] = float(window[0])
        return Rollout(
            prompts=samples.prompts,
            cond=samples.cond,
            uncond=samples.uncond,
            traj=traj,
            rewards=samples.rewards,
            advantages=adv,
            items=items,
            stats=stats,
        )

    def step_log_probs(self, ctx: RunContext, rollout: Rollout, items: torch.Tensor, model=None):
        """log π(x_{k+1} | x_k) under `model` (default: the policy) for items -> (log_prob [N], μ, g [N,1,1,1])."""
        traj = rollout.traj
        i, k = items[:, 0], items[:, 1]
        sig = traj.sigmas.tolist()
        T = len(sig) - 1
        sigma_max = largest_sigma_below_one(traj.sigmas)
        x, x_next = traj.states[k, i], traj.next_state(k, i)
        per_item = (-1, *[1] * (x.ndim - 1))  # [N, 1, 1, 1] (images) or [N, 1, 1, 1, 1] (video latents)
        t = traj.sigmas[k].view(per_item).double()
        s = traj.sigmas[k + 1].view(per_item).double()
        g = torch.tensor([sde_std(sig[j], self.cfg.noise_level, sigma_max) for j in range(T)], dtype=torch.float64)
        g = g[k].view(per_item)
        t, s, g = t.to(x.device), s.to(x.device), g.to(x.device)  # the schedule lives on the CPU
        std = (g * (t - s).sqrt()).float()  # [N, 1, 1, 1]: g·√(−dt)
        v = policy_velocity(
            model if model is not None else ctx.model, rollout, items, ctx.sampling.cfg_scale, self.detach_uncond
        )
        mean = sde_mean(x, v, t, s, g)
        return gaussian_log_prob(x_next, mean, std), mean, g

    def loss(self, ctx: RunContext, rollout: Rollout, items: torch.Tensor, first_step: bool):
        cfg = self.cfg
        i, k = items[:, 0], items[:, 1]
        log_prob, mean, g = self.step_log_probs(ctx, rollout, items)
        old = rollout.traj.log_probs[k, i]
        adv = rollout.advantages[i].to(log_prob.device)  # rewards and advantages are kept on the CPU
        loss, ratio = clipped_policy_loss(log_prob, old, adv, cfg.clip_range)
        dev = (ratio.detach() - 1).abs()
        stats = LossStats(
            items=len(items),
            sums={"ratio_dev": float(dev.sum())},
            counts={"clipped": float((dev > cfg.clip_range).sum())},
        )
        if cfg.kl_beta > 0:
            # KL to the frozen base policy as in the reference code: mean_elements(μ_θ − μ_ref)² / (2·g²)
            with torch.no_grad():
                _, mean_ref, _ = self.step_log_probs(ctx, rollout, items, ctx.reference)
            kl = (mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * g.flatten().float() ** 2)
            loss = loss + cfg.kl_beta * kl
            stats.sums["kl"] = float(kl.detach().sum())
        if first_step:
            stats.maxima["ratio_dev_first_max"] = float(dev.max())
        stats.sums["loss_abs"] = float(loss.detach().abs().sum())  # the scale of the (cancelling) loss sum's terms
        return loss.sum(), stats
