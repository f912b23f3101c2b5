"""DiffusionNFT (arXiv 2509.16117; docs/method.md §3b): online RL on the forward process, likelihood-free.

Rollouts sample clean images with the deterministic ODE sampler from a slowly updated *sampling policy* (v_old: a
soft-updated copy of the trained weights — for LoRA that is a second adapter's worth of weights) and keep only x₀.
Training items are forward-noised points x_t = (1 − t)·x₀ + t·ε at the sampling grid's σ, as in flow matching.
Around v_old the paper defines an implicit positive and negative policy (§3, Eq. 6–8),

    v⁺ = β·v_θ + (1 − β)·v_old,        v⁻ = (1 + β)·v_old − β·v_θ,

each turned into an x₀ prediction x̂₀ = x_t − t·v and regressed onto the sample with the adaptive weight
1 / mean|x̂₀ − x₀| (detached); the reward, as a group-normalised advantage A clipped to ±c, becomes the optimality
probability r = A/(2c) + ½ ∈ [0, 1]:

    ℓ = c·[r·‖x̂₀⁺ − x₀‖²/w⁺ + (1 − r)·‖x̂₀⁻ − x₀‖²/w⁻]/β + λ_KL·‖v_θ − v_base‖²     (means over elements)

After each epoch's optimiser steps the sampling policy moves toward the trained weights,
θ_old ← η·θ_old + (1 − η)·θ with η = min(rate·(n − flat), max) after n optimiser steps (0 before `flat`).
The constants are those of the public code (NVlabs/DiffusionNFT scripts/train_nft_sd3.py, config/nft.py); this is
an independent implementation.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from fdfo_fast.algorithms.base import Algorithm, LossStats, Rollout, draw_groups, draw_step_items
from fdfo_fast.algorithms.flow_grpo import prompt_advantages
from fdfo_fast.sampling import NoiseStream, Sampler, Trajectory, cond_map, derive_seed, guided_velocity, sample_euler

if TYPE_CHECKING:
    from fdfo_fast.algorithms.base import RunContext, Samples


# ---------------------------------------------------------------------------------------------------------------
# The loss (the specification the test transcribes the public code against)
# ---------------------------------------------------------------------------------------------------------------
def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = clip(A, −c, c)/(2c) + ½, clamped to [0, 1] (§3.2: the reward as the probability of being optimal)."""
    return (advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adv_clip: float,
    v_base: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-item DiffusionNFT loss [N] (module docstring) and its parts (policy term, KL term), in fp32.

    v_theta carries the gradient; v_old, v_base, x_t, x0 [N, ...]; t, r [N]. The adaptive weights are computed in
    fp64 and detached, floored at 1e-5 as in the public code."""
    dims = tuple(range(1, x0.ndim))
    t = t.float().view(-1, *[1] * (x0.ndim - 1))
    v_theta, v_old, x_t, x0 = v_theta.float(), v_old.float().detach(), x_t.float(), x0.float()

    def weighted_error(v: torch.Tensor) -> torch.Tensor:
        err = x_t - t * v - x0  # x̂₀ − x₀
        with torch.no_grad():
            w = err.double().abs().mean(dims, keepdim=True).clamp(min=1e-5).float()
        return (err.pow(2) / w).mean(dims)

    positive = weighted_error(beta * v_theta + (1 - beta) * v_old)
    negative = weighted_error((1 + beta) * v_old - beta * v_theta)
    r = r.float().to(v_theta.device)
    policy = (r * positive + (1 - r) * negative) / beta * adv_clip
    parts = {"policy": policy}
    loss = policy
    if v_base is not None and kl_beta > 0:
        kl = (v_theta - v_base.float().detach()).pow(2).mean(dims)
        parts["kl"] = kl
        loss = loss + kl_beta * kl
    return loss, parts


# ---------------------------------------------------------------------------------------------------------------
# The sampling policy: a soft-updated copy of the trained parameters
# ---------------------------------------------------------------------------------------------------------------
def sampling_policy_decay(optimizer_steps: int, rate: float, ceiling: float, flat: int) -> float:
    """η after n optimiser steps: 0 before `flat`, then min(rate·(n − flat), ceiling) (the public code's
    `return_decay`; config/nft.py uses rate 1e-3, ceiling 0.5, flat 0 for GenEval and PickScore)."""
    return 0.0 if optimizer_steps < flat else min((optimizer_steps - flat) * rate, ceiling)


class SamplingPolicy:
    """θ_old for the trainable parameters: swapped in for the rollout (and the v_old predictions), soft-updated
    after every epoch. Holding only the trainable tensors, a LoRA run keeps a second adapter's worth of weights."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def swapped(self):
        """The sampling policy's weights in the model (exchanged, then exchanged back)."""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def _exchange(self):
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach(), alpha=1 - decay)

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)


# ---------------------------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------------------------
class DiffusionNFT(Algorithm):
    name = "diffusion_nft"
    config_section = ("sde", "nft")  # groups, advantage clip, trained-step fraction; and its own options
    needs_full_weights = True  # the sampling policy copies the trained tensors: not under ZeRO-3 partitioning

    def __init__(self, cfg, nft_cfg):
        super().__init__(cfg)
        self.nft = nft_cfg
        self.policy_old: SamplingPolicy | None = None
        self.optimizer_steps = 0

    @property
    def needs_reference(self) -> bool:
        return self.nft.nft_kl_beta > 0

    @property
    def preview_group_size(self) -> int:
        return self.cfg.group_size

    def setup(self, params: list[torch.nn.Parameter]) -> None:
        self.policy_old = SamplingPolicy(params)  # θ_old = θ at the start (the reference's fresh "old" adapter)

    # -- rollout: the sampling policy samples, then predicts v_old on the training items --------------------------
    def rollout(self, ctx: RunContext, epoch: int, generator: torch.Generator) -> Rollout:
        with self.policy_old.swapped():
            return super().rollout(ctx, epoch, generator)

    def draw(self, ctx: RunContext, generator: torch.Generator):
        return draw_groups(ctx, self.cfg.prompts_per_epoch, self.cfg.group_size, generator)

    def sample(self, ctx: RunContext, cond: dict, uncond: dict | None, seeds: list[int]) -> Trajectory:
        sampler = Sampler("euler", ctx.sigmas, 1.0, impl=ctx.impl)  # deterministic, CFG-free: only x₀ is kept
        return sample_euler(ctx.model, sampler, cond, None, seeds, ctx.shape, ctx.runner)

    def finish(self, ctx: RunContext, samples: Samples, generator: torch.Generator) -> Rollout:
        cfg, x0 = self.cfg, samples.traj.x0
        adv = ctx.global_advantages(
            lambda p, r: prompt_advantages(p, r, cfg.adv_clip), samples.prompts, samples.rewards["reward"]
        )  # the public code's PerPromptStatTracker(global_std=True), cleared every epoch
        T, B = len(ctx.sigmas) - 1, len(x0)
        # ⌊f·T⌋ of the T sampling σ per sample (the public code: int(num_steps · timestep_fraction) of a fresh
        # permutation of the scheduler's timesteps per sample); each item gets its own forward noise ε, keyed by
        # the sample's seed and the step so the draw does not depend on the number of ranks.
        items = draw_step_items(
            B, T, int(cfg.train_timestep_fraction * T), cfg.timestep_selection, generator, ctx.env,
            cfg.prompts_per_epoch * cfg.group_size,
        )  # fmt: skip
        i, k = items[:, 0], items[:, 1]
        sigma = ctx.sigmas.to(x0.device)[k].float()
        keys = [derive_seed(samples.seeds[a], 3, b) for a, b in items.tolist()]  # one generator per item
        eps = NoiseStream(keys, x0.device).randn(tuple(x0.shape[1:])) if keys else x0[:0]
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - s) * x0[i] + s * eps
        # v_old (this epoch's sampling policy, swapped in) and v_base are fixed during the epoch: predicted once here
        v_old = self._predict(ctx.model, ctx, x_t, sigma, samples.cond, i)
        v_base = self._predict(ctx.reference, ctx, x_t, sigma, samples.cond, i) if self.needs_reference else None
        r = samples.rewards["reward"].view(-1, cfg.group_size)
        stats = {f"{self.name}/mean_abs_advantage": float(adv.abs().mean()),
                 f"{self.name}/groups_with_reward_spread": float((r.amax(1) != r.amin(1)).float().mean())}  # fmt: skip
        return Rollout(
            prompts=samples.prompts,
            cond=samples.cond,
            uncond=None,
            traj=samples.traj,
            rewards=samples.rewards,
            advantages=adv,
            items=items,
            extras={"x_t": x_t, "sigma": sigma, "v_old": v_old, "v_base": v_base, "row": _row_index(items, T)},
            stats=stats,
        )

    @torch.no_grad()
    def _predict(self, model, ctx: RunContext, x_t, sigma, cond: dict, i: torch.Tensor) -> torch.Tensor:
        chunk = max(1, ctx.sampling.sample_batch)
        out = []
        for j in range(0, len(x_t), chunk):
            rows = i[j : j + chunk]
            c = cond_map(lambda v, rows=rows: v[rows], cond)
            out.append(guided_velocity(model, x_t[j : j + chunk], sigma[j : j + chunk], c, None, 1.0))
        return torch.cat(out) if out else x_t.clone()

    # -- training ------------------------------------------------------------------------------------------------
    def loss(self, ctx: RunContext, rollout: Rollout, items: torch.Tensor, first_step: bool):
        ex, nft = rollout.extras, self.nft
        T = len(ctx.sigmas) - 1
        rows = ex["row"][items[:, 0] * T + items[:, 1]]  # the precomputed item of each (sample, step)
        i = items[:, 0]
        cond, _ = rollout.select_cond(i)
        x_t, sigma = ex["x_t"][rows], ex["sigma"][rows]
        v_theta = guided_velocity(ctx.model, x_t, sigma, cond, None, 1.0)
        r = optimality_probability(rollout.advantages[i], self.cfg.adv_clip)
        v_base = ex["v_base"][rows] if ex["v_base"] is not None else None
        loss, parts = nft_loss(
            v_theta, ex["v_old"][rows], x_t, rollout.traj.x0[i], sigma, r, nft.nft_beta, self.cfg.adv_clip,
            v_base, nft.nft_kl_beta,
        )  # fmt: skip
        stats = LossStats(
            items=len(items),
            sums={
                "loss_abs": float(loss.detach().abs().sum()),
                "policy_loss": float(parts["policy"].detach().sum()),
                "old_deviation": float((v_theta.detach() - ex["v_old"][rows]).pow(2).flatten(1).mean(1).sum()),
            },
        )
        if "kl" in parts:
            stats.sums["kl"] = float(parts["kl"].detach().sum())
        return loss.sum(), stats

    def end_epoch(self, ctx: RunContext, optimizer_steps: int) -> None:
        """θ_old ← η·θ_old + (1 − η)·θ after the epoch's steps (η from the run's optimiser steps so far)."""
        self.optimizer_steps += optimizer_steps
        nft = self.nft
        self.policy_old.update(
            sampling_policy_decay(self.optimizer_steps, nft.old_decay_rate, nft.old_decay_max, nft.old_decay_flat)
        )

    def state_dict(self) -> dict:
        return {"sampling_policy": self.policy_old.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.policy_old.load_state_dict(state["sampling_policy"])
        self.optimizer_steps = state["optimizer_steps"]


def _row_index(items: torch.Tensor, T: int) -> torch.Tensor:
    """(sample i, step k) -> the item's row in the precomputed tensors, as a dense [B·T] lookup (−1 = not drawn)."""
    n = int(items[:, 0].max()) + 1 if len(items) else 0
    row = torch.full((n * T,), -1, dtype=torch.long)
    row[items[:, 0] * T + items[:, 1]] = torch.arange(len(items))
    return row
