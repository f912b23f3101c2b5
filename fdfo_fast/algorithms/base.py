"""What every RL algorithm shares: the rollout record, item batching, and the algorithm interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fdfo_fast.sampling import guided_velocity, model_velocities


@dataclass
class Rollout:
    """One epoch's samples. B samples, T steps; `items` are the (sample, step) pairs the loss trains on."""

    prompts: list[str]  # [B]
    seeds: list[int]  # [B]
    cond: dict  # conditioning of the B samples (text encoder frozen, so computed once)
    uncond: dict | None  # the empty prompt, B rows (CFG)
    traj: object  # sampling.Trajectory
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    rewards: dict[str, torch.Tensor]  # name -> [B]; "reward" is the trained one
    advantages: torch.Tensor  # [B]
    items: torch.Tensor  # [N, 2] long: (sample i, step k)
    active: torch.Tensor | None = None  # [B] bool: samples whose items can have a non-zero loss (None = all)
    extras: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # logged per epoch

    def select_cond(self, idx: torch.Tensor) -> tuple[dict, dict | None]:
        cond = {k: v[idx] for k, v in self.cond.items()}
        uncond = None if self.uncond is None else {k: v[idx] for k, v in self.uncond.items()}
        return cond, uncond


def split_items(items: torch.Tensor, n_steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffle the epoch's items and split them into `n_steps` near-equal optimiser-step chunks."""
    perm = torch.randperm(len(items), generator=generator)
    return [c for c in items[perm].tensor_split(n_steps) if len(c)]


def active_items(rollout: Rollout, items: torch.Tensor) -> torch.Tensor:
    """The items of a chunk that need a forward/backward pass."""
    return items if rollout.active is None else items[rollout.active[items[:, 0]]]


def policy_velocity(
    model, rollout: Rollout, items: torch.Tensor, cfg_scale: float, detach_uncond: bool = False
) -> torch.Tensor:
    """v_θ(x_k, σ_k, c) for a batch of (sample, step) items, CFG-combined through the trained weights.

    With `detach_uncond` (Flow-GRPO) the unconditional half of the one batched call carries no gradient:
    v = sg(v_u) + w·(v_c − sg(v_u)); the value is the same bit for bit, only the backward differs.
    """
    i, k = items[:, 0], items[:, 1]
    x = rollout.traj.states[k, i]  # [N, C, H, W]
    sigma = rollout.traj.sigmas.to(x.device)[k]  # [N]
    cond, uncond = rollout.select_cond(i)
    if not detach_uncond:
        return guided_velocity(model, x, sigma, cond, uncond, cfg_scale)
    v_c, v_u = model_velocities(model, x, sigma, cond, uncond, cfg_scale)
    if v_u is None:
        return v_c.float()
    v_u = v_u.detach()
    return v_u.float() + cfg_scale * (v_c.float() - v_u.float())  # guided_velocity's combine, same op order


class Algorithm:
    """An RL objective on top of the shared loop: `rollout` samples & scores, `loss` trains on items."""

    name = "base"
    needs_reference = False  # True when the loss reads the frozen base model

    def __init__(self, cfg):
        self.cfg = cfg

    def rollout(self, ctx, epoch: int, generator: torch.Generator) -> Rollout:
        raise NotImplementedError

    def loss(self, ctx, rollout: Rollout, items: torch.Tensor, first_step: bool) -> tuple[torch.Tensor, dict]:
        """Sum of per-item losses over `items` (the caller divides by the chunk size) and stats to log."""
        raise NotImplementedError

    def reward_queries(self, rollout: Rollout) -> int:
        return len(rollout.prompts)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
