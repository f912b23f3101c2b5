"""Setup of a training run: config → device and processes, model, reward, prompts, algorithm, engine, context,
checkpoint state, metrics log and evaluator. Small constructors, each handed its own config section; `build_run`
calls them in the order the run's randomness depends on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdfo_fast.algorithms import make_algorithm
from fdfo_fast.algorithms.base import Algorithm, RunContext
from fdfo_fast.backends import cuda_graphs_choice
from fdfo_fast.config import (
    HumanConfig,
    RewardConfig,
    TrainConfig,
    reward_term_names,
    save_resolved,
    torch_dtype,
    tracker_names,
)  # fmt: skip
from fdfo_fast.cuda_graph import CudaGraphSampler
from fdfo_fast.distributed import DistEnv, check_ranks_agree, init_distributed
from fdfo_fast.engine import make_engine
from fdfo_fast.errors import FdfoError
from fdfo_fast.evaluation import RunEvaluator
from fdfo_fast.metrics import MetricsLog, Progress
from fdfo_fast.models.base import FlowModel, load_model
from fdfo_fast.placement import FrozenOffload, check_device
from fdfo_fast.prompts import load_eval_items, load_prompt_pool, merge_metadata, prompt_metadata
from fdfo_fast.rewards import REWARD_TERMS, CompositeReward, parse_weights
from fdfo_fast.rewards.remote import RemoteReward, names_remote_term
from fdfo_fast.run_state import RunCheckpoint, RunProgress, check_run_folder
from fdfo_fast.sampling import derive_seed
from fdfo_fast.trackers import Trackers, check_trackers_available


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FdfoError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def check_reward_placement(rc: RewardConfig) -> None:
    """--reward-device and every --reward-models entry's options (its ';device=' included), checked without
    loading anything."""
    if rc.reward_device:
        check_device(rc.reward_device, "--reward-device")
    if rc.reward_models:
        from fdfo_fast.rewards.hf_models import parse_reward_models

        parse_reward_models(rc.reward_models)


def make_reward(rc: RewardConfig, hc: HumanConfig, out: Path, seed: int, device: torch.device) -> CompositeReward:
    """The configured reward terms; network rewards (--reward-models) are loaded, the reward servers of the `remote`
    term asked for their terms, and the labelling page for the `human` term is started here. fdfo-reward-server
    builds its reward through this function too (fdfo_fast.reward_server.build_served_reward)."""
    models = []
    reward_device = torch.device(rc.reward_device) if rc.reward_device else device
    if rc.reward_models:
        from fdfo_fast.rewards.hf_models import load_reward_models

        models = load_reward_models(rc.reward_models, device=reward_device, dtype=rc.reward_dtype)
    if names_remote_term(rc.reward):  # its term names come from the servers' /info
        models.append(RemoteReward.from_config(rc))
    models += load_reward_plugins(rc, models, reward_device)
    if "human" in parse_weights(rc.reward, {"human": None, **REWARD_TERMS, **{n: m for m in models for n in m.names}}):
        from fdfo_fast.human import HumanPreferenceReward

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FdfoError("--reward human: label one process's pairs; run without torchrun / deepspeed")
        auto = CompositeReward(hc.human_auto_label, models=models) if hc.human_auto_label else None
        models.append(
            HumanPreferenceReward(
                out / "labels",
                hc.human_fraction,
                auto,
                hc.human_host,
                hc.human_port,
                hc.human_token,
                hc.human_timeout,
                seed,
            )  # fmt: skip
        )
    return CompositeReward(rc.reward, models=models)


def load_reward_plugins(rc: RewardConfig, models: list, device: torch.device) -> list:
    """--reward-plugin's rewards, and installed entry-point plugins for the terms of --reward that nothing else
    (built-ins, `models`) defines (fdfo_fast.rewards.plugins)."""
    from fdfo_fast.rewards.plugins import load_plugins

    wanted = reward_term_names(rc.reward)
    known = {"human", "remote", *REWARD_TERMS, *(n for m in models for n in m.names)}
    if not rc.reward_plugin and all(t in known for t in wanted):
        return []  # nothing to import: no entry-point scan for the common case
    return load_plugins(rc.reward_plugin, wanted, known, device=device, dtype=torch_dtype(rc.reward_dtype))


def make_eval_reward(reward: CompositeReward, world_metric: bool) -> CompositeReward:
    """Evaluation scores with the training terms, never the human one (nobody labels held-out images); the toy
    world adds its GenEval-style accuracy."""
    weights = {k: v for k, v in reward.weights.items() if k != "human"}
    if world_metric:
        weights.setdefault("geneval", 0.0)
    if weights == reward.weights:
        return reward
    return CompositeReward(weights or {"quality": 0.0}, models=[m for m in reward.models if "human" not in m.names])


def attach_prompt_metadata(cfg: TrainConfig, rewards, world_grammar: bool) -> None:
    """Give the rewards that read prompt metadata (`wants_metadata`) the table of the run's training and
    evaluation prompts (fdfo_fast.prompts.prompt_metadata); nothing is read when no term wants it."""
    if not any(r.wants_metadata for r in rewards):
        return
    table = merge_metadata(
        prompt_metadata(cfg.run.prompts, world_grammar), prompt_metadata(cfg.eval.eval_prompts, world_grammar)
    )
    for r in rewards:
        r.prompt_metadata = table


def make_context(
    cfg: TrainConfig, model: FlowModel, device: torch.device | str = "cpu", env: DistEnv | None = None
) -> tuple[RunContext, Algorithm, list[torch.nn.Parameter]]:
    """(RunContext, algorithm, trainable parameters) for a loaded base model; freezes what is not trained."""
    algo = make_algorithm(cfg)
    torch.manual_seed(derive_seed(cfg.run.seed, 2))  # a LoRA init draws from the global generator: make it the run's
    params = model.setup_finetune(cfg.model)
    algo.setup(params)
    reference = model.reference_model() if algo.needs_reference else None  # LoRA: the adapters off; else a copy
    ctx = RunContext(
        model=model,
        reference=reference,
        reward=make_reward(cfg.rewards, cfg.human, Path(cfg.run.out), cfg.run.seed, torch.device(device)),
        prompt_pool=load_prompt_pool(cfg.run.prompts, world_grammar=model.has_world_metric),
        sigmas=model.sigma_schedule(cfg.sampling.num_steps, cfg.sampling.shift or None),
        sampling=cfg.sampling,
        impl=cfg.run.impl_or_none,
        env=env or DistEnv(),
        overlap_scoring=cfg.rewards.overlap_scoring,
    )
    return ctx, algo, params


@dataclass
class Run:
    """A built run: what the training loop reads and drives."""

    cfg: TrainConfig
    out: Path
    env: DistEnv
    model: FlowModel
    algorithm: Algorithm
    ctx: RunContext
    engine: object  # fdfo_fast.engine.PlainEngine | DeepSpeedEngine
    checkpoint: RunCheckpoint
    progress: RunProgress
    log: MetricsLog
    bar: Progress
    evaluate: RunEvaluator
    resumed: bool
    offload: FrozenOffload = field(default_factory=lambda: FrozenOffload(None))  # --offload-frozen (off: no-op)

    def close(self) -> None:
        self.bar.close()
        self.log.close()
        self.ctx.reward.close()


def build_run(cfg: TrainConfig, resume: bool = False) -> Run:
    """Everything a (new or resumed) run needs, in the order its randomness depends on."""
    out = Path(cfg.run.out)
    check_run_folder(out, resume)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    env = init_distributed(device, cfg.run.collective_timeout)
    check_ranks_agree({**cfg.to_dict(), "resume": resume}, env)  # every node launched with the same options
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    check_reward_placement(cfg.rewards)  # a reward device this machine lacks fails now, not after the model loads
    if env.is_main:
        check_trackers_available(cfg)  # a missing wandb fails now, not after minutes of model loading
    bar = Progress(cfg.logging.progress and env.is_main)
    with bar.phase("setup", total=4, unit="step") as setup:
        setup.describe(f"loading the {cfg.model.model} model")
        model = load_model(cfg.model).to(device)
        model.set_attention_backend(cfg.model.attention)
        setup.update()
        setup.describe("loading the rewards and prompts")
        ctx, algo, params = make_context(cfg, model, device, env)
        eval_reward = make_eval_reward(ctx.reward, model.has_world_metric)
        attach_prompt_metadata(cfg, (ctx.reward, eval_reward), model.has_world_metric)
        eval_items = load_eval_items(cfg.eval.eval_prompts, cfg.eval.eval_per_category, cfg.run.seed)
        setup.update()
        setup.describe("building the optimiser")
        engine = make_engine(model, params, cfg.optim, env)
        if algo.needs_full_weights and engine.zero_stage == 3:
            raise FdfoError(f"--algorithm {algo.name} keeps a copy of the trained weights on every rank: use ZeRO "
                            "stage <= 2 or the plain optimiser (a LoRA run fits without ZeRO-3)")  # fmt: skip
        if cuda_graphs_choice(cfg.run.cuda_graph, device, cfg.run.impl_or_none, engine.zero_stage):
            ctx.runner = CudaGraphSampler()
        ctx.progress = bar
        checkpoint = RunCheckpoint(cfg, env, model, engine, algo)
        setup.update()
        setup.describe("restoring the checkpoint" if resume else "starting the run")
        progress = checkpoint.load() if resume else RunProgress()
        setup.update()
    trackers = None
    if env.is_main:
        save_resolved(cfg, out)
        if tracker_names(cfg.logging.log_with):
            resume_step = progress.counters["reward_queries"] if resume else None
            trackers = Trackers(cfg, out, progress.tracker_ids, resume_step)
            progress.tracker_ids = trackers.run_ids  # checkpoint.pt keeps them: a resume continues the same runs
    log = MetricsLog(out, trackers, progress.metrics_lines, write=env.is_main)
    bar.start_epochs(cfg.run.epochs, progress.epoch, cfg.run.algorithm)
    run = Run(cfg, out, env, model, algo, ctx, engine, checkpoint, progress, log, bar, None, resume)
    run.evaluate = RunEvaluator(run, eval_items, eval_reward)
    run.offload = FrozenOffload(model, ctx.reward.models, enabled=cfg.model.offload_frozen)
    return run
