"""RL post-training of a flow model with FDFO, Flow-GRPO or DDPO: one training loop, read top to bottom."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdfo_fast import coco_prompts
from fdfo_fast.algorithms import make_algorithm
from fdfo_fast.algorithms.base import active_items
from fdfo_fast.checkpoint import (
    TOY_BASE_CHECKPOINT,
    atomic_save,
    load_state_dict_strict,
    load_toy_model,
    read_checkpoint,
    save_toy_model,
)
from fdfo_fast.cli_args import add_dataclass_args, overrides_from_args
from fdfo_fast.config import PRESETS, TrainConfig, make_config, save_resolved
from fdfo_fast.cuda_graph import CudaGraphSampler, graphs_wanted
from fdfo_fast.dispatch import choose_impl
from fdfo_fast.distributed import DistEnv, init_distributed
from fdfo_fast.engine import make_engine
from fdfo_fast.errors import FdfoError, cli_entry
from fdfo_fast.evaluation import EvalResult, evaluate, sample_diversity
from fdfo_fast.rewards import REWARD_TERMS, CompositeReward, parse_weights
from fdfo_fast.sampling import Trajectory, derive_seed, model_sigma_schedule
from fdfo_fast.viz import save_grid
from fdfo_fast.world.grammar import CATEGORIES, eval_prompts, parse_prompt, prompt_sets

STATE_FORMAT = "fdfo_fast.train_state"
# Options that may differ between a run and its resumption.
# (a different thread count or impl changes float rounding: bit-identical resumes need the same --threads, --impl)
RESUMABLE_CHANGES = (
    "epochs", "progress", "tensorboard", "threads", "eval_every", "save_every", "out", "impl", "device",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# What the algorithms see of the run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    cfg: TrainConfig
    model: torch.nn.Module  # the policy being trained
    reference: torch.nn.Module | None  # frozen base model (KL / velocity penalty)
    reward: CompositeReward
    prompt_pool: dict[str, tuple[str, ...]]  # category (or "file") -> prompts
    shape: tuple[int, int, int]
    sigmas: torch.Tensor
    env: DistEnv = field(default_factory=DistEnv)
    runner: object = None  # replaces sampling.run_sampler (a CudaGraphSampler on CUDA), None = eager

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
        uncond = self.model.encode_prompts([""] * len(prompts)) if self.cfg.cfg_scale != 1.0 else None
        return cond, uncond

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images of the epoch's samples, decoded `sample_batch` at a time as they were sampled: one VAE call over
        every sample of an epoch is the largest activation spike of a real-model run (432 pairs at 1024² on
        SD3.5). Model rewards then score in their own fixed-size micro-batches."""
        chunk = max(1, self.cfg.sample_batch)
        if len(x0) <= chunk:
            return self.model.decode(x0)
        return torch.cat([self.model.decode(x0[j : j + chunk]) for j in range(0, len(x0), chunk)])

    def score(self, images: torch.Tensor, prompts: list[str], seeds: list[int] | None = None) -> dict:
        return self.reward(images, prompts, seeds=seeds)

    def sample_in_chunks(self, sampler, cond: dict, uncond: dict | None, seeds: list[int], chunk: int) -> Trajectory:
        """Run `sampler(cond, uncond, seeds)` on slices of at most `chunk` prompts and join the trajectories."""
        trajs = []
        for j in range(0, len(seeds), chunk):
            sl = slice(j, j + chunk)
            sub_u = None if uncond is None else {k: v[sl] for k, v in uncond.items()}
            trajs.append(sampler({k: v[sl] for k, v in cond.items()}, sub_u, seeds[sl]))
        return self.cat_trajectories(trajs)

    @staticmethod
    def cat_trajectories(trajs: list[Trajectory]) -> Trajectory:
        if len(trajs) == 1:
            return trajs[0]
        cat = lambda name, dim: (
            None
            if getattr(trajs[0], name) is None
            else torch.cat(  # noqa: E731
                [getattr(t, name) for t in trajs], dim
            )
        )
        return Trajectory(
            sigmas=trajs[0].sigmas,
            x0=cat("x0", 0),
            states=cat("states", 1),
            velocities=cat("velocities", 1),
            log_probs=cat("log_probs", 1),
            step_std=trajs[0].step_std,
        )


def read_prompt_file(spec: str) -> tuple[str, ...]:
    """One prompt per line ('#' starts a comment, blank lines skipped), or for a `.jsonl` file one JSON object per
    line with a string "prompt" field (GenEval's evaluation_metadata.jsonl); FdfoError naming the file on any
    problem."""
    path = Path(spec)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise FdfoError(f"prompt file {spec} cannot be read ({err})") from None
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FdfoError(f"prompt file {spec}, line {n}: not JSON ({err})") from None
            text = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise FdfoError(f'prompt file {spec}, line {n}: needs a non-empty string "prompt" field')
            prompts.append(text.strip())
        if not prompts:
            raise FdfoError(f'prompt file {spec} holds no prompts (one JSON object with a "prompt" per line)')
        return tuple(prompts)
    prompts = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not prompts:
        raise FdfoError(f"prompt file {spec} holds no prompts (one per line, '#' starts a comment)")
    return prompts


def load_prompt_pool(spec: str, world_grammar: bool = True) -> dict[str, tuple[str, ...]]:
    """'train' -> the world's training split by category; a named set ('geneval-coco:train', fdfo_fast.coco_prompts)
    -> its prompts by category; otherwise a prompt file (`read_prompt_file`; checked against the shapes world's
    grammar when the run scores with the world's programmatic rewards)."""
    if spec == "train":
        return {c: tuple(p.text() for p in prompt_sets()["train"][c]) for c in CATEGORIES}
    if coco_prompts.is_named_set(spec):
        return coco_prompts.prompt_pool(spec)
    prompts = read_prompt_file(spec)
    for n, p in enumerate(prompts if world_grammar else (), 1):
        try:
            parse_prompt(p)
        except FdfoError as err:
            raise FdfoError(f"prompt file {spec}, prompt {n}: {err}") from None
    return {"file": prompts}


def load_eval_items(spec: str, per_category: int, seed: int) -> list[tuple[object, int]]:
    """The fixed evaluation items (prompt, seed): 'heldout' -> the world's held-out split (categorised PromptSpecs,
    `per_category` each); a named set ('geneval-coco:test') -> `per_category` prompts of each of its categories; a
    prompt file -> each of its prompts once."""
    if spec == "heldout":
        return eval_prompts(per_category)
    if coco_prompts.is_named_set(spec):
        return coco_prompts.eval_items(spec, per_category)
    return [(p, derive_seed(seed, 1, j)) for j, p in enumerate(read_prompt_file(spec))]


class EMA:
    """Exponential moving average of the trainable parameters; swapped in for evaluation.

    `update` is called after every optimiser step taken; the average moves on every `every`-th of them
    (steps n = every, 2·every, …; `steps` counts them and is checkpointed)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1):
        self.params, self.decay, self.every = params, decay, every
        self.shadow = [p.detach().clone() for p in params]
        self.steps = 0

    @torch.no_grad()
    def update(self):
        self.steps += 1
        if self.steps % self.every:
            return
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1 - self.decay)

    def swap(self):
        """Exchange live and EMA weights (call twice to undo)."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                tmp = p.detach().clone()
                p.copy_(s)
                s.copy_(tmp)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard scalars when available."""

    def __init__(self, out: Path, tensorboard: bool, keep_lines: int | None, write: bool = True):
        self.path = out / "metrics.jsonl"
        self.enabled = write  # only rank 0 writes; every rank counts lines so checkpoints agree
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if keep_lines is not None:  # resume: drop lines written after the checkpoint we resume from
            lines = lines[:keep_lines]
        else:
            lines = []
        if write:
            self.path.write_text("".join(ln + "\n" for ln in lines))
        self.lines = len(lines)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only", stacklevel=2)

    def write(self, record: dict, step: int):
        self.lines += 1
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def load_model(cfg: TrainConfig) -> torch.nn.Module:
    """The base model: the shipped toy model (or --base-checkpoint), or SD3 / FLUX through diffusers."""
    if cfg.model == "toy":
        return load_toy_model(cfg.base_checkpoint or TOY_BASE_CHECKPOINT)
    from fdfo_fast.models.diffusers_flow import DTYPES, MODEL_KINDS

    extra = {"guidance": cfg.flux_guidance} if cfg.model == "flux" else {}
    return MODEL_KINDS[cfg.model].from_pretrained(
        cfg.model_path,
        dtype=DTYPES[cfg.dtype],
        resolution=cfg.resolution,
        max_sequence_length=cfg.max_sequence_length,
        **extra,
    )


def apply_finetune_mode(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze what is not trained and return the trainable parameters (text encoders always frozen)."""
    if hasattr(model, "setup_finetune"):  # SD3 / FLUX: LoRA on the attention projections, or the full transformer
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        torch.manual_seed(derive_seed(cfg.seed, 2))  # the LoRA init draws from the global generator: make it the run's
        return model.setup_finetune(cfg.finetune, cfg.lora_rank, cfg.lora_alpha, targets, cfg.gradient_checkpointing)
    model.requires_grad_(False)
    for name, p in model.named_parameters():  # the toy model: everything but its text encoder
        p.requires_grad_(not name.startswith("text."))
    return [p for p in model.parameters() if p.requires_grad]


def make_reward(cfg: TrainConfig, device: torch.device) -> CompositeReward:
    """The configured reward terms; network rewards (--reward-models) are loaded and the labelling page for the
    `human` term is started here."""
    models = []
    if cfg.reward_models:
        from fdfo_fast.rewards.hf_models import load_reward_models

        models = load_reward_models(cfg.reward_models, device=device, dtype=cfg.reward_dtype)
    if "human" in parse_weights(cfg.reward, {"human": None, **REWARD_TERMS, **{n: m for m in models for n in m.names}}):
        from fdfo_fast.human import HumanPreferenceReward

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FdfoError("--reward human: label one process's pairs; run without torchrun / deepspeed")
        auto = CompositeReward(cfg.human_auto_label, models=models) if cfg.human_auto_label else None
        models.append(
            HumanPreferenceReward(
                Path(cfg.out) / "labels",
                cfg.human_fraction,
                auto,
                cfg.human_host,
                cfg.human_port,
                cfg.human_token,
                cfg.human_timeout,
                cfg.seed,
            )  # fmt: skip
        )
    return CompositeReward(cfg.reward, models=models)


def make_context(cfg: TrainConfig, model: torch.nn.Module, device: torch.device | str = "cpu", env=None):
    """(RunContext, algorithm, trainable parameters) for a loaded base model; freezes what is not trained."""
    algo = make_algorithm(cfg)
    params = apply_finetune_mode(model, cfg)
    reference = None
    if algo.needs_reference:  # LoRA: the same weights with the adapters off; otherwise a frozen copy
        ref = model.reference_model() if hasattr(model, "reference_model") else copy.deepcopy(model)
        reference = ref.requires_grad_(False).eval()
    ctx = RunContext(
        cfg,
        model,
        reference,
        make_reward(cfg, torch.device(device)),
        load_prompt_pool(cfg.prompts, world_grammar=cfg.model == "toy"),
        tuple(model.latent_shape),
        model_sigma_schedule(model, cfg.num_steps, cfg.shift),
        env or DistEnv(),
    )
    return ctx, algo, params


def model_state(model: torch.nn.Module) -> dict:
    """What a checkpoint keeps of the model: the trainable weights of an adapter (LoRA), or the whole toy model."""
    return model.trainable_state_dict() if hasattr(model, "trainable_state_dict") else model.state_dict()


def load_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    if hasattr(model, "load_trainable_state_dict"):
        model.load_trainable_state_dict(state, where)
    else:
        load_state_dict_strict(model, state, where)


def export_lora_atomic(model, directory: Path) -> None:
    """Write the LoRA next to the checkpoint (one folder, both the diffusers and the PEFT format: export_lora); it is
    written whole under DIR.tmp and renamed into place, so a crash never leaves a half-written or mixed folder."""
    import shutil

    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.export_lora(tmp)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FdfoError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def split_items_global(items: torch.Tensor, n_local: int, env: DistEnv, n_steps: int, gen: torch.Generator):
    """[(this rank's items of step j, global item count of step j)] for the epoch's optimiser steps.

    The items of all ranks (sample indices offset by rank) are shuffled with the shared generator and split into
    `n_steps` near-equal chunks, as a single process would shuffle the same global batch; each rank keeps its own.
    """
    offset = env.rank * n_local
    every = env.cat_from_all(items + torch.tensor([offset, 0])) if env.enabled else items
    perm = torch.randperm(len(every), generator=gen)
    out = []
    for chunk in every[perm].tensor_split(n_steps):
        if not len(chunk):
            continue
        mine = chunk[(chunk[:, 0] >= offset) & (chunk[:, 0] < offset + n_local)]
        out.append((mine - torch.tensor([offset, 0]), len(chunk)))
    return out


def merge_stats(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Loss statistics of two item sets -> their union's: sums add up, `*_max` keys take the max."""
    out = dict(a)
    for k, v in b.items():
        merge = max if k.endswith("_max") else float.__add__
        out[k] = merge(out[k], float(v)) if k in out else float(v)
    return out


def gather_eval(res: EvalResult, env: DistEnv) -> EvalResult:
    """Every rank evaluated a shard of the held-out items: reassemble them in order on every rank."""
    if not env.enabled:
        return res
    parts = env.all_gather_objects((res.images, res.prompts, res.categories, res.seeds, res.scores))
    return EvalResult(
        torch.cat([p[0] for p in parts]),
        [x for p in parts for x in p[1]],
        [x for p in parts for x in p[2]],
        [x for p in parts for x in p[3]],
        {k: torch.cat([p[4][k] for p in parts]) for k in parts[0][4]},
    )


def set_attention_backend(model: torch.nn.Module, choice: str) -> str:
    """--attention auto|sdpa|flash|xformers for the diffusers transformers (the toy model always uses SDPA).

    auto = flash-attn when installed and on CUDA, else PyTorch SDPA; an explicit choice that cannot run raises."""
    from fdfo_fast.backends import package_version

    on_cuda = next(model.parameters()).is_cuda
    usable = {
        "sdpa": (True, ""),
        "flash": (package_version("flash_attn") is not None and on_cuda, "needs flash-attn and a CUDA device"),
        "xformers": (package_version("xformers") is not None and on_cuda, "needs xformers and a CUDA device"),
    }
    chosen = choice
    if choice == "auto":
        chosen = "flash" if usable["flash"][0] else "sdpa"
    elif not usable[choice][0]:
        raise FdfoError(f"--attention {choice} {usable[choice][1]}")
    transformer = getattr(model, "transformer", None)
    if transformer is None:
        if chosen != "sdpa":
            raise FdfoError(f"--attention {chosen}: the toy model supports sdpa only")
        return chosen
    transformer.set_attention_backend({"sdpa": "native", "flash": "flash", "xformers": "xformers"}[chosen])
    return chosen


def _all_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or continue) a training run; returns the last evaluation summary.

    Runs as one process, or as every rank of a `torchrun` / `deepspeed` launch (fdfo_fast.distributed); with
    `--ds-config` the optimiser is DeepSpeed ZeRO (fdfo_fast.engine). The loop below is the same in every case.
    """
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise FdfoError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it or pick --out")
    if resume and not ckpt_path.exists():
        raise FdfoError(f"--resume: {ckpt_path} does not exist")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    env = init_distributed(device)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    model = load_model(cfg).to(device)
    set_attention_backend(model, cfg.attention)
    ctx, algo, params = make_context(cfg, model, device, env)
    world = cfg.model == "toy"  # the shapes world's GenEval-style accuracy applies to the toy model only
    # Evaluation scores with the training terms, never the human one (nobody labels held-out images); the toy
    # world adds its GenEval-style accuracy.
    eval_weights = {k: v for k, v in ctx.reward.weights.items() if k != "human"}
    if world:
        eval_weights.setdefault("geneval", 0.0)
    eval_models = [m for m in ctx.reward.models if "human" not in m.names]
    eval_reward = ctx.reward
    if eval_weights != ctx.reward.weights:
        eval_reward = CompositeReward(eval_weights or {"quality": 0.0}, models=eval_models)
    eval_items = load_eval_items(cfg.eval_prompts, cfg.eval_per_category, cfg.seed)
    ema = EMA(params, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 else None
    engine = make_engine(model, params, cfg, env)
    if graphs_wanted(cfg.cuda_graph, device, cfg.impl_or_none, engine.zero_stage):
        ctx.runner = CudaGraphSampler()
    if ema is not None and engine.zero_stage == 3:
        raise FdfoError("--ema-decay needs the full weights on every rank: use ZeRO stage <= 2 or --ema-decay 0")
    cfg_factor = 2 if cfg.cfg_scale != 1.0 else 1
    # which implementation the fused ops take in this run (recorded in every training record)
    impl_used = choose_impl("fd_loss", cfg.impl_or_none, params[0])
    counters = {
        "reward_queries": 0,
        "train_passes": 0,
        "sample_passes": 0,
        "wall_time": 0.0,
        "skipped_epochs_nonfinite": 0,
        "skipped_steps_nonfinite": 0,
    }
    start_epoch, keep_lines, last_eval = 0, None, {}
    best = {"score": -math.inf, "epoch": -1, "since": 0}  # held-out score for best.pt and early stopping
    n_div = min(cfg.diversity_prompts, len(eval_items))
    diversity_prompts = [
        p if isinstance(p, str) else p.text()
        for p, _ in (eval_items[j * len(eval_items) // max(1, n_div)] for j in range(n_div))
    ]

    # -- resume ---------------------------------------------------------------------------------------------
    if resume:
        st = read_checkpoint(ckpt_path, STATE_FORMAT)
        saved = TrainConfig(**{**TrainConfig().to_dict(), **st["config"]})
        diff = [k for k, v in saved.to_dict().items() if k not in RESUMABLE_CHANGES and cfg.to_dict()[k] != v]
        if diff:
            raise FdfoError(
                f"--resume: options {diff} differ from the run in {out}; only {RESUMABLE_CHANGES} may change"
            )
        if st.get("world_size", 1) != env.world_size:
            raise FdfoError(
                f"--resume: the run used {st.get('world_size', 1)} processes, this launch has {env.world_size}"
            )
        if st.get("deepspeed_tag"):
            engine.load(out, st["deepspeed_tag"])
        else:
            load_model_state(model, st["model"], f"{ckpt_path} (model)")
        engine.load_state_dict(st["engine"] if "engine" in st else {"optimizer": st["optimizer"]})  # v1 files
        if ema is not None:
            for s, v in zip(ema.shadow, st["ema"]):
                s.copy_(v)
            ema.steps = st.get("ema_steps", 0)
        algo.load_state_dict(st["algorithm"])
        counters.update(st["counters"])
        torch.set_rng_state(st["torch_rng"])
        start_epoch, keep_lines, last_eval = st["epoch"], st["metrics_lines"], st.get("last_eval", {})
        best.update(st.get("best", {}))
        if cfg.epochs < start_epoch:
            raise FdfoError(f"--resume: the run in {out} is at epoch {start_epoch}; --epochs {cfg.epochs} is earlier")
    if env.is_main:
        save_resolved(cfg, out)
    log = MetricsLog(out, cfg.tensorboard and env.is_main, keep_lines, write=env.is_main)

    def checkpoint(epoch: int):
        """DeepSpeed shards first (every rank), then the run state, written atomically by rank 0 and naming the
        shard tag: a run killed at any point resumes from the last state file, never from a partial one."""
        tag = None
        if engine.kind == "deepspeed":
            tag = f"epoch_{epoch:06d}"
            engine.save(out, tag)
            env.barrier()
        elif not _all_finite(model.parameters()):
            raise FdfoError(f"refusing to write a checkpoint from a non-finite model at epoch {epoch}")
        if env.is_main:
            atomic_save(
                {
                    "format": STATE_FORMAT,
                    "version": 2,
                    "config": cfg.to_dict(),
                    "epoch": epoch,
                    "world_size": env.world_size,
                    "deepspeed_tag": tag,
                    "model": None if tag else model_state(model),
                    "model_config": model.describe(),
                    "engine": engine.state_dict(),
                    "ema": None if ema is None else [s.clone() for s in ema.shadow],
                    "ema_steps": 0 if ema is None else ema.steps,
                    "algorithm": algo.state_dict(),
                    "counters": dict(counters),
                    "torch_rng": torch.get_rng_state(),
                    "metrics_lines": log.lines,
                    "last_eval": last_eval,
                    "best": dict(best),
                },
                ckpt_path,
            )
            if tag:
                engine.prune(out, keep=tag)
        if getattr(model, "lora", False):
            with engine.gathered():  # a collective under ZeRO-3: every rank enters, rank 0 writes
                if env.is_main:
                    export_lora_atomic(model, out / "lora")
        env.barrier()

    def run_eval(epoch: int) -> dict:
        """Held-out evaluation (+ diversity); keeps best.pt when the held-out score improves (early stopping)."""
        if ema is not None:
            ema.swap()
        model.eval()
        mine = eval_items[env.shard_uneven(len(eval_items))]
        with engine.gathered():
            res = evaluate(  # sampled and decoded sample_batch at a time, like the rollouts
                model,
                mine,
                eval_reward,
                cfg.eval_num_steps,
                cfg.shift,
                cfg.cfg_scale,
                cfg.sample_batch,
                impl=cfg.impl_or_none,
            )
            diversity = None
            if cfg.diversity_prompts:
                diversity = sample_diversity(
                    model, diversity_prompts, cfg.diversity_samples, cfg.seed, cfg.eval_num_steps, cfg.shift,
                    cfg.cfg_scale, impl=cfg.impl_or_none,
                )  # fmt: skip
        res = gather_eval(res, env)
        summary = {f"eval/{k}": v for k, v in res.summary().items()}
        if diversity is not None:
            summary["eval/diversity"] = diversity
        score = summary.get("eval/geneval", summary.get("eval/reward"))
        improved = score is not None and score > best["score"]
        if improved:
            best.update(score=score, epoch=epoch, since=0)
            if cfg.keep_best:
                with engine.gathered():
                    save_best(model, epoch, score)
        elif epoch > 0:
            best["since"] += 1
        model.train()
        if ema is not None:
            ema.swap()
        if env.is_main:
            save_grid(
                res.images,
                out / "grids" / f"eval_{epoch:05d}.png",
                ncol=cfg.eval_per_category if cfg.eval_prompts == "heldout" else 8,
                correct=res.scores.get("geneval"),
                scale=4 if world else 1,
            )
        log.write(
            {"kind": "eval", "epoch": epoch, **{k: v for k, v in counters.items()}, **summary,
             "best_epoch": best["epoch"]},
            counters["reward_queries"],
        )  # fmt: skip
        return summary

    def save_best(model, epoch: int, score: float):
        """best.pt: the evaluated weights (the EMA when on) of the best held-out score so far; a LoRA run also
        writes best_lora/. A toy model's best.pt is a plain model checkpoint (load_toy_model, fdfo-demo)."""
        state = model_state(model)
        if not env.is_main:
            return
        meta = {"epoch": epoch, "score": score, "metric": "geneval" if world else "reward", "run": str(out)}
        if world:
            save_toy_model(model, out / "best.pt", meta)
        else:
            atomic_save({"format": "fdfo_fast.best", "model": state, "model_config": model.describe(), **meta},
                        out / "best.pt")  # fmt: skip
        if getattr(model, "lora", False):
            export_lora_atomic(model, out / "best_lora")

    bar = _progress(cfg, start_epoch, env.is_main)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        # -- evaluation & checkpoint at the epoch boundary ---------------------------------------------------
        # (a resumed run already evaluated this boundary before writing the checkpoint it resumes from)
        due = epoch == 0 or (cfg.eval_every and epoch % cfg.eval_every == 0)
        if due and not (resume and epoch == start_epoch):
            last_eval = run_eval(epoch)
        if cfg.early_stop_patience and best["since"] >= cfg.early_stop_patience:
            log.write({"kind": "early_stop", "epoch": epoch, "best_epoch": best["epoch"], "best": best["score"]},
                      counters["reward_queries"])  # fmt: skip
            checkpoint(epoch)
            break
        if epoch > start_epoch and epoch % cfg.save_every == 0:
            checkpoint(epoch)
        t0 = time.perf_counter()
        # Every rank draws the same global batch and item shuffle from (seed, epoch) and takes its shard.
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, epoch))

        # -- sample & score ---------------------------------------------------------------------------------
        ctx.reward.begin_epoch(epoch)  # the human term labels this epoch's pairs
        model.eval()
        with engine.gathered():
            rollout = algo.rollout(ctx, epoch, gen)
        model.train()
        counters["reward_queries"] += int(env.sum(algo.reward_queries(rollout)))
        counters["sample_passes"] += int(env.sum(len(rollout.prompts))) * cfg.num_steps * cfg_factor
        record = {"kind": "train", "epoch": epoch + 1, "impl": impl_used}
        record.update({f"reward/{k}": float(env.cat_from_all(v.float()).mean()) for k, v in rollout.rewards.items()})
        record.update({k: env.sum(v) / env.world_size for k, v in rollout.stats.items()})
        finite = bool(torch.isfinite(rollout.rewards["reward"]).all() and torch.isfinite(rollout.advantages).all())
        if not env.all_true(finite):
            counters["skipped_epochs_nonfinite"] += 1
            record["skipped"] = "non-finite rewards or advantages"
        else:
            # -- loss & backward & step ---------------------------------------------------------------------
            step_stats: list[dict[str, float]] = []  # this rank's sums per optimiser step (merged over ranks below)
            losses, norms = [], []
            for step_i, (chunk, global_len) in enumerate(
                split_items_global(rollout.items, len(rollout.prompts), env, cfg.opt_steps_per_epoch, gen)
            ):
                engine.zero_grad()
                work = active_items(rollout, chunk)
                batches = list(work.split(cfg.micro_batch)) if len(work) else []
                # ZeRO shards gather weights and reduce gradients inside forward/backward: every rank must run the
                # same number of passes, so ranks with fewer items run zero-weighted passes on one of theirs.
                n_passes = int(env.max(len(batches))) if engine.kind == "deepspeed" else len(batches)
                loss_val, step_totals = 0.0, {}
                for j in range(n_passes):
                    real = j < len(batches)
                    mb = batches[j] if real else rollout.items[:1]
                    loss_sum, stats = algo.loss(ctx, rollout, mb, first_step=step_i == 0)
                    engine.backward(loss_sum / global_len * (1.0 if real else 0.0), boundary=j == n_passes - 1)
                    if real:
                        loss_val += float(loss_sum.detach()) / global_len
                        step_totals = merge_stats(step_totals, stats)
                step_stats.append(step_totals)
                counters["train_passes"] += int(env.sum(len(work))) * cfg_factor
                loss_val = env.sum(loss_val)
                norm, stepped = engine.step(math.isfinite(loss_val))
                if not stepped:
                    counters["skipped_steps_nonfinite"] += 1
                    continue
                # -- EMA ------------------------------------------------------------------------------------
                if ema is not None:
                    ema.update()
                losses.append(loss_val)
                norms.append(norm)
            record["loss"] = sum(losses) / max(1, len(losses))
            record["grad_norm"] = sum(norms) / max(1, len(norms))
            # one collective for all loss statistics: per step, merge the ranks; then merge the steps
            per_rank = env.all_gather_objects(step_stats)
            merged_steps = [functools.reduce(merge_stats, (r[j] for r in per_rank), {}) for j in range(len(step_stats))]
            totals = functools.reduce(merge_stats, merged_steps, {})
            n = totals.pop("n", 0)
            for k, v in totals.items():
                if k.endswith("_sum"):
                    record[f"{algo.name}/{k[:-4]}_mean"] = v / max(1, n)
                    record[f"{algo.name}/{k[:-4]}_mean_per_step"] = [
                        st[k] / max(1, st["n"]) for st in merged_steps if k in st
                    ]
                elif k.endswith("_max"):
                    record[f"{algo.name}/{k}"] = v
                    if v > 1e-4:  # θ = θ_ref on an epoch's first step: ρ (or the PPO ratio) must be 1
                        warnings.warn(
                            f"epoch {epoch + 1}: {k} = {v:.3g} on the first step (expected 0): the "
                            "training forward does not reproduce the sampling forward",
                            stacklevel=1,
                        )
                else:
                    record[f"{algo.name}/{k}_frac"] = v / max(1, n)
            record[f"{algo.name}/active_items_frac"] = n / max(1, env.sum(len(rollout.items)))
        counters["wall_time"] += time.perf_counter() - t0
        record.update(counters)
        log.write(record, counters["reward_queries"])
        bar.update(record, last_eval)

    # -- final evaluation & checkpoint ------------------------------------------------------------------------
    else:  # (skipped after an early stop: that epoch's evaluation and checkpoint are the last)
        if start_epoch < cfg.epochs or not last_eval:
            last_eval = run_eval(cfg.epochs)
        checkpoint(cfg.epochs)
    bar.close(last_eval)
    log.close()
    ctx.reward.close()
    return last_eval


class _progress:
    """tqdm over epochs with reward and held-out accuracy (a plain line per epoch when tqdm is off)."""

    def __init__(self, cfg: TrainConfig, start: int, main: bool = True):
        self.bar = None
        if cfg.progress and main:
            from tqdm import tqdm

            self.bar = tqdm(
                total=cfg.epochs, initial=start, desc=cfg.algorithm, unit="epoch", file=sys.stderr, dynamic_ncols=True
            )

    def update(self, record: dict, last_eval: dict):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{record.get('reward/reward', float('nan')):.3f}",
                heldout=f"{last_eval.get('eval/geneval', last_eval.get('eval/reward', float('nan'))):.3f}",
            )

    def close(self, last_eval: dict):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdfo-train", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named preset (options below override it)")
    parser.add_argument("--config", help="YAML file of options (applied after the preset)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint.pt")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the LOCAL_RANK environment variable
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_dataclass_args(parser, TrainConfig)
    return parser


@cli_entry
def main(argv=None):
    ns = build_parser().parse_args(argv)
    overrides = overrides_from_args(ns, TrainConfig)
    base = None
    if ns.resume:  # continue with the saved options; flags given now override them (then checked in train())
        saved = Path(overrides.get("out", TrainConfig.out)) / "config.json"
        if not saved.is_file():
            raise FdfoError(f"--resume: {saved} does not exist (is --out the run folder?)")
        base = json.loads(saved.read_text())
    cfg = make_config(ns.preset, ns.config, overrides, base=base)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(cfg.to_dict(), indent=1))
    if ns.dry_run:
        return
    summary = train(cfg, resume=ns.resume)
    keys = [k for k in summary if k.startswith("eval/geneval")] or ["eval/reward"]
    print("final held-out: " + "  ".join(f"{k[5:]} {summary[k]:.3f}" for k in keys if k in summary))


if __name__ == "__main__":
    main()
