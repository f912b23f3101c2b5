"""What every RL algorithm shares: the run context it samples and trains in, the rollout record, the rollout
skeleton (draw → encode → sample in chunks → decode → score), the step-subset draw, loss statistics, and the
algorithm interface. Nothing here reaches back into the trainer: the loop builds a `RunContext` and hands it over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fdfo_fast.config import SamplingConfig
from fdfo_fast.distributed import DistEnv
from fdfo_fast.models.base import FlowModel
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards.base import SCORED_ROWS
from fdfo_fast.sampling import Trajectory, combine_guidance, cond_map, guided_velocity, model_velocities


# ---------------------------------------------------------------------------------------------------------------
# The run as the algorithms see it
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """The policy and everything a rollout or a loss needs besides the algorithm's own options."""

    model: FlowModel  # the policy being trained
    reference: FlowModel | None  # frozen base model (KL / velocity penalty), None when no loss reads it
    reward: CompositeReward
    prompt_pool: dict[str, tuple[str, ...]]  # category (or "file") -> prompts
    sigmas: torch.Tensor  # the training σ grid [T + 1] (the model's own scheduler's)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    impl: str | None = None  # fused ops: None = auto, "ref", "triton"
    env: DistEnv = field(default_factory=DistEnv)
    runner: object = None  # runs a Sampler (a CudaGraphSampler on CUDA); None = eager
    progress: object = None  # fdfo_fast.metrics.Progress: bars for the sampling and scoring phases (None = none)
    overlap_scoring: bool = True  # score chunk j's images while chunk j + 1 samples (fdfo_fast.scoring)

    def phase(self, desc: str, total: int | None = None, unit: str = "it"):
        """A progress bar for one phase of the rollout (a no-op bar without `progress`)."""
        if self.progress is None:
            from fdfo_fast.metrics import Progress

            return Progress(False).phase(desc, total, unit)
        return self.progress.phase(desc, total, unit)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.model.latent_shape)

    def draw_prompts(self, n: int, generator: torch.Generator) -> tuple[list[str], list[int]]:
        """This rank's shard of n globally drawn prompts (uniform over categories, then over the category's
        prompts) with one seed each; the draw is the same on every rank, so the global batch does not depend on
        the number of processes."""
        cats = list(self.prompt_pool)
        prompts = []
        for _ in range(n):
            pool = self.prompt_pool[cats[int(torch.randint(len(cats), (1,), generator=generator))]]
            prompts.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        mine = self.env.shard(n)
        return prompts[mine], seeds[mine]

    def global_advantages(self, fn, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """`fn(prompts, rewards)` over the whole batch of all ranks (statistics that span ranks, e.g. DDPO's
        per-prompt tracker, see every reward in the same order everywhere), returning this rank's part."""
        if not self.env.enabled:
            return fn(prompts, rewards)
        all_prompts = [p for part in self.env.all_gather_objects(list(prompts)) for p in part]
        adv = fn(all_prompts, self.env.cat_from_all(rewards.float()))
        return adv[self.env.shard(len(all_prompts))]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[dict, dict | None]:
        """Text conditioning (frozen text encoder) and the empty-prompt conditioning when CFG is on."""
        cond = self.model.encode_prompts(prompts)
        uncond = self.model.encode_negative(len(prompts)) if self.sampling.cfg_scale != 1.0 else None
        return cond, uncond

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images of the epoch's samples, decoded `sample_batch` at a time as they were sampled: one VAE call over
        every sample of an epoch is the largest activation spike of a real-model run (432 pairs at 1024² on
        SD3.5). Model rewards then score in their own fixed-size micro-batches."""
        chunk = max(1, self.sampling.sample_batch)
        if len(x0) <= chunk:
            return self.model.decode(x0)
        return torch.cat([self.model.decode(x0[j : j + chunk]) for j in range(0, len(x0), chunk)])

    def sample_in_chunks(
        self, sample, cond: dict, uncond: dict | None, seeds: list[int], chunk: int, on_chunk=None
    ) -> Trajectory:
        """Run `sample(cond, uncond, seeds)` on slices of at most `chunk` prompts and join the trajectories;
        `on_chunk(trajectory)` sees each slice's trajectory as soon as it is sampled (the rollout decodes it there
        and hands the images to the scorer, which may score them while the next slice samples)."""
        trajs = []
        with self.phase("sampling", total=len(seeds), unit="prompt") as bar:
            for j in range(0, len(seeds), chunk):
                rows = lambda v, j=j: v[j : j + chunk]  # noqa: E731
                trajs.append(sample(cond_map(rows, cond), cond_map(rows, uncond), seeds[j : j + chunk]))
                if on_chunk is not None:
                    on_chunk(trajs[-1])
                bar.update(len(seeds[j : j + chunk]))
        return Trajectory.cat(trajs)

    def sample_decode_score(
        self, sample, cond: dict, uncond: dict | None, seeds: list[int], chunk: int, prompts: list[str],
        score_seeds: list[int] | None,
    ) -> tuple[Trajectory, dict]:  # fmt: skip
        """Sample in chunks, decode each chunk as it is sampled, and score the images (`prompts`: one per row):
        on a worker thread while the next chunk samples with `overlap_scoring` (fdfo_fast.scoring: the same
        rewards bit for bit), else after the last chunk. Returns the joined trajectory and the rewards."""
        from fdfo_fast.scoring import ChunkScorer

        scorer = ChunkScorer(self.reward, prompts, score_seeds, overlap=self.overlap_scoring)
        # The scorer keeps every decoded chunk until the epoch's rewards are in. Decoded videos go to the host at
        # once: an epoch's clips at full size would not fit beside the model (wan21-1.3b-fdfo: 192 clips of
        # 3 × 33 × 480 × 832 fp32, ~30 GB); their frames are scored from there (reward models move their inputs).
        to_scorer = (lambda images: images.cpu()) if self.model.is_video else (lambda images: images)
        try:
            traj = self.sample_in_chunks(
                sample, cond, uncond, seeds, chunk, lambda t: scorer.add(to_scorer(self.decode(t.x0)))
            )
            parts = len(getattr(self.reward, "parts", ())) or 1  # each term part scores every image
            with self.phase("scoring", total=len(prompts) * parts, unit="img") as bar:
                bar.update(scorer.take_ticks())  # what the worker scored while the chunks sampled
                token = SCORED_ROWS.set(bar.update)
                try:
                    rewards = scorer.result(bar)
                finally:
                    SCORED_ROWS.reset(token)
        finally:
            scorer.close()
        return traj, rewards


# ---------------------------------------------------------------------------------------------------------------
# What a rollout produced, and what a loss reports
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One epoch's samples. B samples, T steps; `items` are the (sample, step) pairs the loss trains on."""

    prompts: list[str]  # [B]
    cond: dict  # conditioning of the B samples (text encoder frozen, so computed once)
    uncond: dict | None  # the empty prompt, B rows (CFG)
    traj: Trajectory
    rewards: dict[str, torch.Tensor]  # name -> [B]; "reward" is the trained one
    advantages: torch.Tensor  # [B]
    items: torch.Tensor  # [N, 2] long: (sample i, step k)
    active: torch.Tensor | None = None  # [B] bool: samples whose items can have a non-zero loss (None = all)
    extras: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # logged per epoch

    def select_cond(self, idx: torch.Tensor) -> tuple[dict, dict | None]:
        return cond_map(lambda v: v[idx], self.cond), cond_map(lambda v: v[idx], self.uncond)

    def active_items(self, items: torch.Tensor) -> torch.Tensor:
        """The items of a chunk that need a forward/backward pass."""
        return items if self.active is None else items[self.active[items[:, 0]]]


@dataclass
class LossStats:
    """Statistics of a loss over a set of items, merged over micro-batches, ranks and optimiser steps.

    `sums` are per-item sums (logged as means over the items, overall and per optimiser step), `counts` per-item
    counts (logged as fractions of the items), `maxima` maxima (the first step's |ρ − 1|, which must be 0).
    """

    items: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)

    def merge(self, other: LossStats) -> LossStats:
        """The statistics of the union of both item sets (sums and counts add up, maxima take the max)."""

        def add(a: dict, b: dict, op) -> dict:
            out = dict(a)
            for k, v in b.items():
                out[k] = op(out[k], float(v)) if k in out else float(v)
            return out

        return LossStats(
            self.items + other.items,
            add(self.sums, other.sums, float.__add__),
            add(self.counts, other.counts, float.__add__),
            add(self.maxima, other.maxima, max),
        )


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces of the algorithms
# ---------------------------------------------------------------------------------------------------------------
def draw_step_items(
    n_local: int, T: int, k: int, selection: str, generator: torch.Generator, env: DistEnv, n_global: int
) -> torch.Tensor:
    """The (sample, step) items [n_local·k, 2] an epoch trains on, k steps of each of this rank's samples.

    selection "all": every step (k = T); "first": steps 0 … k − 1 (Flow-GRPO's reference); "random": a uniform
    k-subset of each sample's T steps (a per-sample randperm), drawn for all `n_global` samples of the global
    batch with the shared generator and sharded, so the subsets do not depend on the number of ranks.
    """
    if selection == "all":
        return torch.cartesian_prod(torch.arange(n_local), torch.arange(T))
    if selection == "first":
        steps = torch.arange(k).expand(n_local, k)
    else:
        steps = torch.stack([torch.randperm(T, generator=generator)[:k] for _ in range(n_global)])
        steps = steps[env.shard(n_global)]  # [n_local, k]
    return torch.stack([torch.arange(n_local).repeat_interleave(k), steps.flatten()], dim=1)


def draw_groups(
    ctx: RunContext, prompts_per_epoch: int, group_size: int, generator: torch.Generator
) -> tuple[list[str], list[int]]:
    """This rank's prompts, each repeated `group_size` times in group order, and one seed per sample; drawn for the
    whole global batch with the shared generator and sharded (the batch does not depend on the number of ranks)."""
    prompts, _ = ctx.draw_prompts(prompts_per_epoch, generator)
    prompts = [p for p in prompts for _ in range(group_size)]
    n_global = prompts_per_epoch * group_size
    seeds = torch.randint(0, 2**62, (n_global,), generator=generator).tolist()
    return prompts, seeds[ctx.env.shard(n_global)]


def policy_velocity(
    model, rollout: Rollout, items: torch.Tensor, cfg_scale: float, detach_uncond: bool = False
) -> torch.Tensor:
    """v_θ(x_k, σ_k, c) for a batch of (sample, step) items, CFG-combined through the trained weights.

    With `detach_uncond` (Flow-GRPO) the unconditional half of the one batched call carries no gradient:
    v = sg(v_u) + w·(v_c − sg(v_u)); the value is the same bit for bit, only the backward differs.
    """
    i, k = items[:, 0], items[:, 1]
    x = rollout.traj.states[k, i]  # [N, *latent_shape]
    sigma = rollout.traj.sigmas.to(x.device)[k]  # [N]
    cond, uncond = rollout.select_cond(i)
    if not detach_uncond:
        return guided_velocity(model, x, sigma, cond, uncond, cfg_scale)
    v_c, v_u = model_velocities(model, x, sigma, cond, uncond, cfg_scale)
    return combine_guidance(model, v_c, None if v_u is None else v_u.detach(), cfg_scale)  # guided_velocity's combine


@dataclass
class Samples:
    """What the rollout skeleton produced before the algorithm turns it into a Rollout."""

    prompts: list[str]  # [P] encoded prompts
    seeds: list[int]  # [P] their seeds
    cond: dict
    uncond: dict | None
    traj: Trajectory  # [P · rows_per_prompt] sampled rows
    rewards: dict[str, torch.Tensor]  # name -> [P · rows_per_prompt]


class Algorithm:
    """An RL objective on top of the shared loop: `rollout` samples & scores, `loss` trains on items.

    A subclass supplies `draw` (this rank's prompts and seeds), `sample` (one chunk of them), `finish` (samples
    -> advantages and the items to train on) and `loss`; `rollout` is the shared skeleton.
    """

    name = "base"
    config_section: str | tuple[str, ...] = ""  # the TrainConfig section(s) the algorithm receives
    rows_per_prompt = 1  # sampled rows per drawn prompt (FDFO: 2, the branches of a pair)
    needs_full_weights = False  # True: keeps a copy of the trained tensors (refused under ZeRO-3 partitioning)

    def __init__(self, cfg):
        self.cfg = cfg  # the algorithm's own config section

    @property
    def needs_reference(self) -> bool:
        """True when the loss reads the frozen base model."""
        return False

    def setup(self, params: list[torch.nn.Parameter]) -> None:
        """Called once with the trainable parameters, before a checkpoint's state is loaded."""

    def end_epoch(self, ctx: RunContext, optimizer_steps: int) -> None:
        """Called after an epoch's optimiser steps (`optimizer_steps` of them were taken)."""

    # -- the rollout skeleton ------------------------------------------------------------------------------------
    def rollout(self, ctx: RunContext, epoch: int, generator: torch.Generator) -> Rollout:
        prompts, seeds = self.draw(ctx, generator)
        cond, uncond = ctx.encode(prompts)
        chunk = max(1, ctx.sampling.sample_batch // self.rows_per_prompt)  # both branches of a pair in one batch
        rows = [p for p in prompts for _ in range(self.rows_per_prompt)]
        sample = lambda c, u, sd: self.sample(ctx, c, u, sd)  # noqa: E731
        traj, rewards = ctx.sample_decode_score(sample, cond, uncond, seeds, chunk, rows, self.score_seeds(seeds))
        return self.finish(ctx, Samples(prompts, seeds, cond, uncond, traj, rewards), generator)

    def draw(self, ctx: RunContext, generator: torch.Generator) -> tuple[list[str], list[int]]:
        raise NotImplementedError

    def sample(self, ctx: RunContext, cond: dict, uncond: dict | None, seeds: list[int]) -> Trajectory:
        raise NotImplementedError

    def score_seeds(self, seeds: list[int]) -> list[int] | None:
        """The per-row seeds handed to the reward (the human term shows them; None = not needed)."""
        return None

    def finish(self, ctx: RunContext, samples: Samples, generator: torch.Generator) -> Rollout:
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------------------------------
    def loss(
        self, ctx: RunContext, rollout: Rollout, items: torch.Tensor, first_step: bool
    ) -> tuple[torch.Tensor, LossStats]:
        """Sum of per-item losses over `items` (the caller divides by the chunk size) and its statistics."""
        raise NotImplementedError

    def reward_queries(self, rollout: Rollout) -> int:
        return len(rollout.prompts)

    # -- what a person is shown of a rollout (fdfo_fast.metrics.rollout_panel) -------------------------------------
    @property
    def preview_group_size(self) -> int:
        """Rows shown side by side: the rows that share a starting draw (FDFO: the pair's two branches)."""
        return self.rows_per_prompt

    def preview_groups(self, rollout: Rollout, k: int) -> list[list[int]]:
        """k groups of rows of this rank's rollout, spread over the range of their |advantage| (the largest, the
        smallest and evenly between), in rollout order."""
        g = max(1, self.preview_group_size)
        n = len(rollout.prompts) // g
        if n == 0:
            return []
        spread = rollout.advantages.float().abs()[: n * g].view(n, g).amax(1).tolist()
        order = sorted(range(n), key=lambda i: (-spread[i], i))
        picks = sorted({order[round(j * (n - 1) / max(1, k - 1))] for j in range(min(k, n))})
        return [list(range(i * g, (i + 1) * g)) for i in picks]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
