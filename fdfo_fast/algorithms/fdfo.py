"""FDFO (method.md §1): paired rollouts, finite-difference direction, SPO trust-region loss on every step."""

from __future__ import annotations

import torch

from fdfo_fast.algorithms.base import Algorithm, Rollout, policy_velocity
from fdfo_fast.kernels.fd_loss import fd_loss
from fdfo_fast.sampling import sample_fdfo_pairs


def fd_direction(x0: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§1.2 for a pair-major batch (row 2p + b): advantages a [2P] and directions d [2P, ...].

    a_A = (R_A − R_B)/2, a_B = −a_A (raw reward units); δ_A = (x₀^A − x₀^B)/2, δ_B = −δ_A;
    d = δ / (mean(δ²) + 1e-6), the mean over all elements of one sample (so d ≈ N·δ/‖δ‖²).
    """
    r = rewards.float().view(-1, 2)
    a_A = (r[:, 0] - r[:, 1]) / 2
    a = torch.stack([a_A, -a_A], dim=1).flatten()  # [2P]
    x = x0.float().unflatten(0, (-1, 2))  # [P, 2, ...]
    delta_A = (x[:, 0] - x[:, 1]) / 2
    delta = torch.stack([delta_A, -delta_A], dim=1).flatten(0, 1)  # [2P, ...]
    d = delta / (delta.pow(2).flatten(1).mean(1).view(-1, *[1] * (delta.ndim - 1)) + 1e-6)
    return a, d


class FDFO(Algorithm):
    name = "fdfo"

    @property
    def needs_reference(self) -> bool:
        return self.cfg.velocity_penalty > 0

    def rollout(self, ctx, epoch: int, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        prompts, seeds = ctx.draw_prompts(cfg.pairs_per_epoch, generator)
        cond, uncond = ctx.encode(prompts)
        traj = ctx.sample_in_chunks(
            lambda c, u, sd: sample_fdfo_pairs(
                ctx.model, c, u, sd, ctx.shape, ctx.sigmas, cfg.cfg_scale, cfg.churn, cfg.impl_or_none, ctx.runner
            ),
            cond,
            uncond,
            seeds,
            max(1, cfg.sample_batch // 2),  # pairs per call: both branches in one batch
        )
        images = ctx.decode(traj.x0)
        pair_prompts = [p for p in prompts for _ in (0, 1)]
        rewards = ctx.score(images, pair_prompts, seeds=[s for s in seeds for _ in (0, 1)])
        a, d = fd_direction(traj.x0, rewards["reward"])
        T, B = traj.states.shape[:2]
        items = torch.cartesian_prod(torch.arange(B), torch.arange(T))  # all steps, uniform weight (§1.3)
        k = cfg.steps_per_sample
        if 0 < k < T:
            # Beyond the paper: train on a uniform random k-subset of each sample's T steps, re-drawn every epoch.
            # The loop averages the loss over the items it trains on, so this is an unbiased estimate of the
            # all-steps loss at k/T of the forward+backward passes. Drawn for the whole global batch (rank-count
            # invariant), then sharded.
            n_global = 2 * cfg.pairs_per_epoch
            picks = torch.stack([torch.randperm(T, generator=generator)[:k] for _ in range(n_global)])
            picks = picks[ctx.env.shard(n_global)]  # [B, k]
            items = torch.stack([torch.arange(B).repeat_interleave(k), picks.flatten()], dim=1)
        # Samples with a = 0 have ℓ ≡ 0 and zero gradient unless the velocity penalty is on: their passes are
        # skipped (the loop still divides by the full chunk size, so the update is unchanged).
        active = a != 0 if cfg.velocity_penalty == 0 else None
        r = rewards["reward"].view(-1, 2)
        stats = {
            "fdfo/pairs_with_reward_gap": float((r[:, 0] != r[:, 1]).float().mean()),
            "fdfo/mean_abs_advantage": float(a.abs().mean()),
        }
        ro = Rollout(
            prompts=pair_prompts,
            seeds=[s for s in seeds for _ in (0, 1)],
            cond={k: v.repeat_interleave(2, 0) for k, v in cond.items()},
            uncond=None if uncond is None else {k: v.repeat_interleave(2, 0) for k, v in uncond.items()},
            traj=traj,
            images=images,
            rewards=rewards,
            advantages=a,
            items=items,
            active=active,
            extras={"d": d},
            stats=stats,
        )
        return ro

    def loss(self, ctx, rollout: Rollout, items: torch.Tensor, first_step: bool):
        i, k = items[:, 0], items[:, 1]
        v_theta = policy_velocity(ctx.model, rollout, items, self.cfg.cfg_scale)
        v_ref = rollout.traj.velocities[k, i]
        v_base = None
        if self.cfg.velocity_penalty > 0:
            with torch.no_grad():
                v_base = policy_velocity(ctx.reference, rollout, items, self.cfg.cfg_scale)
        # §1.3 per item (ℓ, ρ): the fused Triton op on CUDA, its reference (kernels/fd_loss.py) elsewhere
        loss, rho = fd_loss(
            v_theta,
            v_ref,
            rollout.extras["d"][i],
            rollout.advantages[i].to(v_theta.device),  # rewards and advantages are kept on the CPU
            self.cfg.trust_eps,
            v_base,
            self.cfg.velocity_penalty,
            impl=self.cfg.impl_or_none,
        )
        dev = (rho.detach() - 1).abs()
        stats = {
            "loss_abs_sum": float(loss.detach().abs().sum()),  # the scale of the (cancelling) loss sum's terms
            "rho_dev_sum": float(dev.sum()),
            "rho_beyond_eps": float((dev > self.cfg.trust_eps).sum()),
            "n": len(items),
        }
        if first_step:
            stats["rho_dev_first_max"] = float(dev.max())
        return loss.sum(), stats
