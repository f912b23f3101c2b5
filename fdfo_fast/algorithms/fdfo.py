"""FDFO (arXiv 2603.12893; docs/method.md §1): paired rollouts, finite-difference direction, SPO trust-region loss
on every step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fdfo_fast.algorithms.base import Algorithm, LossStats, Rollout, draw_step_items, policy_velocity
from fdfo_fast.kernels.fd_loss import fd_loss
from fdfo_fast.sampling import Sampler, Trajectory, cond_map, sample_fdfo_pairs

if TYPE_CHECKING:
    from fdfo_fast.algorithms.base import RunContext, Samples


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
    config_section = "fdfo"  # FDFOConfig
    rows_per_prompt = 2  # row 2p + b: prompt p, branch b (§1.1)

    @property
    def needs_reference(self) -> bool:
        return self.cfg.velocity_penalty > 0

    def draw(self, ctx: RunContext, generator: torch.Generator):
        return ctx.draw_prompts(self.cfg.pairs_per_epoch, generator)

    def sample(self, ctx: RunContext, cond: dict, uncond: dict | None, seeds: list[int]) -> Trajectory:
        sampler = Sampler("churn", ctx.sigmas, ctx.sampling.cfg_scale, gamma=self.cfg.churn, record=True, impl=ctx.impl)
        return sample_fdfo_pairs(ctx.model, sampler, cond, uncond, seeds, ctx.shape, ctx.runner)

    def score_seeds(self, seeds: list[int]) -> list[int]:
        return [s for s in seeds for _ in (0, 1)]

    def finish(self, ctx: RunContext, samples: Samples, generator: torch.Generator) -> Rollout:
        cfg, traj, rewards = self.cfg, samples.traj, samples.rewards
        a, d = fd_direction(traj.x0, rewards["reward"])
        T, B = traj.states.shape[:2]
        # All steps with uniform weight (§1.3); or, beyond the paper, a uniform random k-subset of each sample's T
        # steps re-drawn every epoch: the loop averages the loss over the items it trains on, so this is an
        # unbiased estimate of the all-steps loss at k/T of the forward+backward passes.
        k = cfg.steps_per_sample
        random_subset = 0 < k < T
        items = draw_step_items(
            B, T, k if random_subset else T, "random" if random_subset else "all", generator, ctx.env,
            2 * cfg.pairs_per_epoch,
        )  # fmt: skip
        # Samples with a = 0 have ℓ ≡ 0 and zero gradient unless the velocity penalty is on: their passes are
        # skipped (the loop still divides by the full chunk size, so the update is unchanged).
        active = a != 0 if cfg.velocity_penalty == 0 else None
        r = rewards["reward"].view(-1, 2)
        stats = {
            "fdfo/pairs_with_reward_gap": float((r[:, 0] != r[:, 1]).float().mean()),
            "fdfo/mean_abs_advantage": float(a.abs().mean()),
        }
        pair_rows = lambda v: v.repeat_interleave(2, 0)  # noqa: E731
        return Rollout(
            prompts=[p for p in samples.prompts for _ in (0, 1)],
            cond=cond_map(pair_rows, samples.cond),
            uncond=cond_map(pair_rows, samples.uncond),
            traj=traj,
            rewards=rewards,
            advantages=a,
            items=items,
            active=active,
            extras={"d": d},
            stats=stats,
        )

    def loss(self, ctx: RunContext, rollout: Rollout, items: torch.Tensor, first_step: bool):
        i, k = items[:, 0], items[:, 1]
        cfg_scale = ctx.sampling.cfg_scale
        v_theta = policy_velocity(ctx.model, rollout, items, cfg_scale)
        v_ref = rollout.traj.velocities[k, i]
        v_base = None
        if self.cfg.velocity_penalty > 0:
            with torch.no_grad():
                v_base = policy_velocity(ctx.reference, rollout, items, cfg_scale)
        # §1.3 per item (ℓ, ρ): the fused Triton op on CUDA, its reference (kernels/fd_loss.py) elsewhere
        loss, rho = fd_loss(
            v_theta,
            v_ref,
            rollout.extras["d"][i],
            rollout.advantages[i].to(v_theta.device),  # rewards and advantages are kept on the CPU
            self.cfg.trust_eps,
            v_base,
            self.cfg.velocity_penalty,
            impl=ctx.impl,
        )
        dev = (rho.detach() - 1).abs()
        stats = LossStats(
            items=len(items),
            sums={"loss_abs": float(loss.detach().abs().sum()), "rho_dev": float(dev.sum())},
            counts={"rho_beyond_eps": float((dev > self.cfg.trust_eps).sum())},
            maxima={"rho_dev_first_max": float(dev.max())} if first_step else {},
        )  # loss_abs: the scale of the (cancelling) loss sum's terms
        return loss.sum(), stats
