"""Flow-GRPO (method.md §2): SDE rollouts with Gaussian per-step policies, group-relative advantages, PPO clip, KL."""

from __future__ import annotations

import torch

from fdfo_fast.algorithms.base import Algorithm, Rollout, policy_velocity
from fdfo_fast.sampling import gaussian_log_prob, largest_sigma_below_one, sample_sde, sde_mean, sde_std


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


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """PPO per item: max(−A·r, −A·clip(r, 1 − c, 1 + c)) with r = exp(logπ_θ − logπ_old); returns (loss, r)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


class SDEPolicyGradient(Algorithm):
    """Shared machinery of Flow-GRPO and DDPO: SDE sampling, per-step log-probs, the clipped objective."""

    detach_uncond = False  # with CFG: no gradient through the unconditional pass (see FlowGRPO)

    def _advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _draw(self, ctx, generator):
        """This rank's prompts (in group order) and per-sample seeds, drawn globally (rank-count invariant)."""
        cfg = self.cfg
        prompts, _ = ctx.draw_prompts(cfg.prompts_per_epoch, generator)
        prompts = [p for p in prompts for _ in range(cfg.group_size)]
        n_global = cfg.prompts_per_epoch * cfg.group_size
        seeds = torch.randint(0, 2**62, (n_global,), generator=generator).tolist()
        return prompts, seeds[ctx.env.shard(n_global)]

    def rollout(self, ctx, epoch: int, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        prompts, seeds = self._draw(ctx, generator)
        cond, uncond = ctx.encode(prompts)
        traj = ctx.sample_in_chunks(
            lambda c, u, sd: sample_sde(
                ctx.model, c, u, sd, ctx.shape, ctx.sigmas, cfg.cfg_scale, cfg.noise_level, cfg.impl_or_none, ctx.runner
            ),
            cond,
            uncond,
            seeds,
            cfg.sample_batch,
        )
        images = ctx.decode(traj.x0)
        rewards = ctx.score(images, prompts)
        adv = ctx.global_advantages(self._advantages, prompts, rewards["reward"])
        T, B = traj.states.shape[:2]
        # k = ⌊f·T⌋ steps per trajectory, as both references count them: int(num_steps · timestep_fraction)
        # (flow_grpo scripts/train_sd3.py, ddpo-pytorch scripts/train.py); validate() keeps k >= 1.
        k_train = int(cfg.train_timestep_fraction * T)
        if cfg.timestep_selection == "first":
            # Flow-GRPO: steps 0 … k − 1 of every trajectory (f = 0.99 of 10 steps drops the last one).
            steps = torch.arange(k_train).expand(B, k_train)
        else:
            # DDPO: a random k-subset of each trajectory's steps (a per-sample randperm), redrawn per epoch for
            # every sample of the global batch (so the subsets do not depend on the number of ranks).
            n_global = cfg.prompts_per_epoch * cfg.group_size
            steps = torch.stack([torch.randperm(T, generator=generator)[:k_train] for _ in range(n_global)])
            steps = steps[ctx.env.shard(n_global)]  # [B, k]
        items = torch.stack([torch.arange(B).repeat_interleave(k_train), steps.flatten()], dim=1)
        return Rollout(
            prompts=prompts,
            seeds=seeds,
            cond=cond,
            uncond=uncond,
            traj=traj,
            images=images,
            rewards=rewards,
            advantages=adv,
            items=items,
        )

    def step_log_probs(self, ctx, rollout: Rollout, items: torch.Tensor, model=None):
        """log π(x_{k+1} | x_k) under `model` (default: the policy) for items -> (log_prob [N], μ, g [N,1,1,1])."""
        cfg = self.cfg
        traj = rollout.traj
        i, k = items[:, 0], items[:, 1]
        sig = traj.sigmas.tolist()
        T = len(sig) - 1
        sigma_max = largest_sigma_below_one(traj.sigmas)
        t = traj.sigmas[k].view(-1, 1, 1, 1).double()
        s = traj.sigmas[k + 1].view(-1, 1, 1, 1).double()
        g = torch.tensor([sde_std(sig[j], cfg.noise_level, sigma_max) for j in range(T)], dtype=torch.float64)[k]
        g = g.view(-1, 1, 1, 1)
        x, x_next = traj.states[k, i], traj.next_state(k, i)
        t, s, g = t.to(x.device), s.to(x.device), g.to(x.device)  # the schedule lives on the CPU
        std = (g * (t - s).sqrt()).float()  # [N, 1, 1, 1]: g·√(−dt)
        v = policy_velocity(
            model if model is not None else ctx.model, rollout, items, cfg.cfg_scale, self.detach_uncond
        )
        mean = sde_mean(x, v, t, s, g)
        return gaussian_log_prob(x_next, mean, std), mean, g

    def loss(self, ctx, rollout: Rollout, items: torch.Tensor, first_step: bool):
        cfg = self.cfg
        i, k = items[:, 0], items[:, 1]
        log_prob, mean, g = self.step_log_probs(ctx, rollout, items)
        old = rollout.traj.log_probs[k, i]
        adv = rollout.advantages[i].to(log_prob.device)  # rewards and advantages are kept on the CPU
        loss, ratio = clipped_policy_loss(log_prob, old, adv, cfg.clip_range)
        stats = {
            "ratio_dev_sum": float((ratio.detach() - 1).abs().sum()),
            "clipped": float(((ratio.detach() - 1).abs() > cfg.clip_range).sum()),
            "n": len(items),
        }
        if cfg.kl_beta > 0:
            # KL to the frozen base policy as in the reference code: mean_elements(μ_θ − μ_ref)² / (2·g²)
            with torch.no_grad():
                _, mean_ref, _ = self.step_log_probs(ctx, rollout, items, ctx.reference)
            kl = (mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * g.flatten().float() ** 2)
            loss = loss + cfg.kl_beta * kl
            stats["kl_sum"] = float(kl.detach().sum())
        if first_step:
            stats["ratio_dev_first_max"] = float((ratio.detach() - 1).abs().max())
        stats["loss_abs_sum"] = float(loss.detach().abs().sum())  # the scale of the (cancelling) loss sum's terms
        return loss.sum(), stats


class FlowGRPO(SDEPolicyGradient):
    name = "flow_grpo"
    # The reference's training forward (scripts/train_sd3.py `compute_log_prob`) runs cond and uncond in one batched
    # call and detaches the unconditional prediction before the CFG combine: only v_c carries gradient.
    detach_uncond = True

    @property
    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def _advantages(self, prompts, rewards):
        if self.cfg.grpo_std == "global":
            return prompt_advantages(prompts, rewards, self.cfg.adv_clip)
        return group_advantages(rewards, self.cfg.group_size, self.cfg.adv_clip)
