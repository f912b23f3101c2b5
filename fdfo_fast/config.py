"""Typed training configuration by section: run, model, rewards, human labels, sampling, FDFO, SDE policy
(Flow-GRPO / DDPO), optimisation, evaluation, logging. Each field carries its help text, its choices or bounds; each
component receives its own section. Option names are unique across sections, so the command line, YAML files,
presets and the saved config.json stay flat (`--churn`, `churn: 0.05`) while code reads `cfg.fdfo.churn`.

The hand-written argparse builder (fdfo_fast.cli_args) is kept rather than tyro or transformers' HfArgumentParser:
tyro would rename every flag to its section path (`--fdfo.churn`), breaking the presets' and users' flat commands,
and HfArgumentParser does not nest dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from fdfo_fast.coco_prompts import NAMED_SETS as NAMED_PROMPT_SETS
from fdfo_fast.coco_prompts import is_named_set
from fdfo_fast.errors import FdfoError

# Choice lists, each defined once: the algorithms' and model kinds' registries (read when a config is validated,
# so importing the config imports neither), and the lists below.


def _algorithm_names() -> tuple[str, ...]:
    from fdfo_fast.algorithms import ALGORITHMS

    return tuple(ALGORITHMS)


def _model_kinds() -> tuple[str, ...]:
    from fdfo_fast.models.base import MODEL_KINDS

    return tuple(MODEL_KINDS)


OPTIMIZERS = ("adamw", "adamw8bit")
# weight dtypes (--dtype, --reward-dtype): short name -> torch's name (fdfo_fast.models, fdfo_fast.rewards.hf_models)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_NAMES = tuple(DTYPES)


def reward_term_names(spec: str) -> list[str]:
    """The term names of a --reward spec, 'alignment:1,quality:0.1' -> ['alignment', 'quality'], read before any
    term is known (plugins and the remote term define theirs); fdfo_fast.rewards.parse_weights checks them."""
    return [p.partition(":")[0].strip() for p in spec.split(",") if p.strip()]


def torch_dtype(name: str):
    """--dtype bf16 | fp16 | fp32 -> the torch dtype (FdfoError on anything else)."""
    import torch

    if name not in DTYPES:
        raise FdfoError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


IMPLS = ("auto", "ref", "triton")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "xformers")  # fdfo_fast.models.base.choose_attention_backend


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: a larger value overflows in the fp32 ops


def _quoted(value, limit: int = 80) -> str:
    """repr(value) for an error message, cut to `limit` characters (a hostile value never floods the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(text: str) -> float | None:
    """A reward term's weight as `parse_weights` reads it ('' = 1), or None when it is not a number."""
    try:
        return float(text) if text else 1.0
    except ValueError:
        return None


def _f(default, help: str, *, choices: tuple | None = None, ge=None, gt=None, lt=None, le=None, why: str = ""):
    """A field with its help text and the rule `validate` checks: one of `choices`, or within the bounds
    (`why` replaces the generated message)."""
    return field(default=default, metadata=dict(help=help, choices=choices, ge=ge, gt=gt, lt=lt, le=le, why=why))


def _rule_error(meta: dict, value) -> str | None:
    """The message for a field whose value breaks its metadata rule, or None."""
    if meta.get("choices") is not None:
        c = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        return None if value in c else meta["why"] or f"must be {', '.join(c[:-1])} or {c[-1]}"
    ge, gt, lt, le = meta.get("ge"), meta.get("gt"), meta.get("lt"), meta.get("le")
    ok = (ge is None or value >= ge) and (gt is None or value > gt) and (lt is None or value < lt)
    if ok and (le is None or value <= le):
        return None
    if meta["why"]:
        return meta["why"]
    low, high = (ge, "[") if ge is not None else (gt, "("), (lt, ")") if lt is not None else (le, "]")
    if low[0] is not None and high[0] is not None:
        return f"must be in {low[1]}{low[0]}, {high[0]}{high[1]}"
    if gt == 0:
        return "must be a positive number"
    if low[0] is not None:
        return f"must be {'>=' if ge is not None else '>'} {low[0]}"
    return f"must be {'<' if lt is not None else '<='} {high[0]}"


@dataclass(frozen=True)
class RunConfig:
    """What the run is: algorithm, folder, seed, length, training prompts, where and how it computes."""

    algorithm: str = _f("fdfo", "fdfo | flow_grpo | ddpo | diffusion_nft", choices=_algorithm_names)
    out: str = _f("runs/train", "run folder (config, metrics.jsonl, TensorBoard, grids, checkpoint.pt)")
    seed: int = _f(0, "all randomness derives from (seed, rank, epoch)")
    epochs: int = _f(60, "training epochs", ge=1)
    prompts: str = _f(
        "auto",
        "auto ('train' for the toy model, 'geneval-coco:train' for the others) | 'train' (the shapes world's training "
        "split) | 'geneval-coco:train' / 'geneval-coco:test' (GenEval-style COCO prompts) | a prompt file (one per "
        'line, or .jsonl with a "prompt" field)',
    )
    threads: int = _f(0, "torch CPU threads (0 = torch default)", ge=0)
    impl: str = _f("auto", "fused ops: auto (Triton on CUDA, reference elsewhere) | ref | triton", choices=IMPLS)
    device: str = _f("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    cuda_graph: str = _f(
        "auto", "sampling under CUDA graphs: auto (on CUDA without ZeRO-3) | on | off", choices=("auto", "on", "off")
    )
    save_every: int = _f(10, "checkpoint every N epochs (and at the end)", ge=1)
    keep_last: int = _f(
        0,
        "diffusers models: also keep the exported LoRA (or transformer) of the last N saves under "
        "RUN/lora_snapshots/epoch_NNNNN (transformer_snapshots/ for --finetune full); 0 = only the latest (RUN/lora)",
        ge=0,
    )
    collective_timeout: float = _f(
        600.0,
        "torchrun / deepspeed: seconds a rank waits for the others at a collective before the run stops with an "
        "error naming the rank and the phase (a frozen or lost rank); above the longest phase between collectives",
        gt=0,
    )

    @property
    def impl_or_none(self) -> str | None:
        """`impl` as the ops take it (None = auto)."""
        return None if self.impl == "auto" else self.impl


@dataclass(frozen=True)
class ModelConfig:
    """The flow model: the toy model, or a diffusers family (SD3, FLUX.1, FLUX.2, Qwen-Image, Wan2.1), and what of
    it is trained."""

    model: str = _f("toy", "toy | sd3 | flux | flux2 | qwen_image | wan", choices=_model_kinds)
    base_checkpoint: str = _f("", "base model checkpoint ('' = the shipped toy base model)")
    model_path: str = _f("", "diffusers models: a local diffusers pipeline folder or a hub id")
    resolution: int = _f(512, "diffusers models: image height = width in pixels (with --width: the height)", ge=1)
    width: int = _f(0, "diffusers models: image width in pixels (0 = --resolution, square)", ge=0)
    num_frames: int = _f(0, "video models: frames per sample, 4k + 1 (0 = the model's default)", ge=0)
    dtype: str = _f(
        "bf16", "diffusers models: weight dtype bf16 | fp16 | fp32 (the sampler state is fp32)", choices=DTYPE_NAMES
    )
    max_sequence_length: int = _f(
        0, "diffusers models: prompt tokens of the text encoder (0 = the pipeline's default: sd3 256, flux 512)", ge=0
    )
    flux_guidance: float = _f(
        0.0, "flux / flux2: the distilled guidance scale fed to the model (no CFG); 0 = the pipeline's: 3.5 / 4.0", ge=0
    )
    attention: str = _f(
        "auto",
        "diffusers models' attention: auto (flash-attn on CUDA if installed, else sdpa) | sdpa | flash | xformers",
        choices=ATTENTION_BACKENDS,
    )
    finetune: str = _f(
        "full", "full | lora (diffusers models; the toy model is always fully fine-tuned)", choices=("full", "lora")
    )
    lora_rank: int = _f(32, "--finetune lora: rank r", ge=1)
    lora_alpha: float = _f(64.0, "--finetune lora: alpha", gt=0)
    lora_targets: str = _f(
        "auto",
        "--finetune lora: comma-separated peft target_modules (module-name suffixes, e.g. attn.to_q,attn.to_k); "
        "auto = the model family's community recipe (README's model table; e.g. sd3: the joint attention's attn.* "
        "projections as Flow-GRPO, not SD3.5's attn2; flux: those plus the double blocks' ff / ff_context MLPs)",
    )
    gradient_checkpointing: bool = _f(False, "diffusers models: recompute transformer activations in the backward")
    # A model option beside gradient_checkpointing, the other memory switch of the training passes: it frees the
    # training GPU of the model's own frozen parts (text encoders, VAE) even without any reward model.
    offload_frozen: bool = _f(
        False,
        "diffusers models: during the training passes, move the text encoders, the VAE (not under ZeRO-3, which "
        "shards it) and the reward models that sit on the training GPU to the CPU, and back before sampling / "
        "evaluation (their weights' memory, docs/memory.md, for two host-device copies per epoch); no-op on CPU runs",
    )
    init_lora: str = _f(
        "",
        "--finetune lora: start from this LoRA folder (diffusers pytorch_lora_weights.safetensors or a PEFT adapter); "
        "its rank, alpha and targets are used (a --lora-rank / --lora-alpha / --lora-targets other than the default "
        "must agree with them)",
    )


@dataclass(frozen=True)
class RewardConfig:
    """The trained reward: weighted terms, and the network reward models some terms need."""

    reward: str = _f("alignment:1", "weighted reward terms, e.g. 'alignment:1,quality:0.1'")
    reward_models: str = _f("", "network rewards, e.g. 'pickscore=PATH' (see fdfo_fast.rewards.hf_models)")
    reward_dtype: str = _f(
        "fp32",
        "network rewards' weights: fp32 | bf16 | fp16 (an entry's ';dtype=' overrides it)",
        choices=("fp32", "bf16", "fp16"),
    )
    reward_device: str = _f(
        "",
        "device of the network rewards: '' = the run's device | cpu | cuda | cuda:N (an entry's ';device=' overrides "
        "it); inputs are moved there, scores come back on the CPU",
    )
    reward_plugin: str = _f(
        "",
        "your own reward terms: 'module:factory' or 'path/file.py:factory' (comma-separated, ';key=value' options "
        "to the factory); see fdfo_fast.rewards.plugins",
    )
    overlap_scoring: bool = _f(
        True,
        "score each sampled chunk's images on a worker thread while the next chunk samples (the same rewards, bit "
        "for bit, as scoring after sampling; fdfo_fast.scoring)",
    )
    # the `remote` term (fdfo_fast.rewards.remote): batches scored by fdfo-reward-server(s)
    reward_servers: str = _f(
        "", "--reward remote / remote.TERM: reward server URLs, comma-separated (requests go round-robin), e.g. "
        "http://127.0.0.1:8700",
    )  # fmt: skip
    remote_token: str = _f("", "remote term: the servers' --token ('' = none, loopback servers only)")
    remote_timeout: float = _f(
        120.0, "remote term: seconds a request may wait for a server (connect, and each read or write)", gt=0
    )
    remote_retries: int = _f(
        3, "remote term: retries of a failed request (backoff 0.5 s, 1 s, 2 s, ... capped at 8 s; each on the next "
        "server)", ge=0,
    )  # fmt: skip
    remote_encoding: str = _f(
        "raw", "remote term: how images travel: raw (uint8 bytes; fastest on loopback and fast links, "
        "benchmarks/reward_transport.py) | png (lossless, smaller on slow links)", choices=("raw", "png"),
    )  # fmt: skip
    remote_on_failure: str = _f(
        "stop", "remote term, when the retries are spent: stop (the run stops with an error) | skip (the epoch is "
        "skipped and counted as skipped_epochs_reward_unavailable; evaluation terms are NaN)",
        choices=("stop", "skip"),
    )  # fmt: skip


@dataclass(frozen=True)
class HumanConfig:
    """Human preference labels (--reward human:1, FDFO only): the labelling page and what it is shown."""

    human_fraction: float = _f(
        1.0, "fraction of each epoch's pairs shown to the human (the rest: --human-auto-label)", gt=0, le=1
    )
    human_auto_label: str = _f("", "reward terms whose preference labels the pairs not shown, e.g. 'alignment:1'")
    human_host: str = _f("127.0.0.1", "address of the labelling page (anything but loopback requires a URL token)")
    human_port: int = _f(
        8765, "port of the labelling page (0 = any free port)", ge=0, lt=65536,
        why="must be a port number (0 = any free port)",
    )  # fmt: skip
    human_token: str = _f("", "token the page URL must carry ('' = a random one per run, printed with the URL)")
    human_timeout: float = _f(
        0.0, "seconds to wait for an epoch's labels before stopping with an error (0 = forever)", ge=0
    )


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled (training); the held-out evaluation shares the CFG scale and the batch size."""

    num_steps: int = _f(10, "sampling steps while training", ge=1)
    shift: float = _f(0.0, "time shift of the σ grid; 0 = the model's own (its scheduler config; 1.0 for toy)", ge=0)
    cfg_scale: float = _f(1.0, "classifier-free guidance scale (training and evaluation)", ge=1)
    sample_batch: int = _f(256, "samples per model call while sampling", ge=1)


@dataclass(frozen=True)
class FDFOConfig:
    """FDFO (arXiv 2603.12893; docs/method.md §1): paired churn rollouts, finite-difference direction, SPO loss."""

    pairs_per_epoch: int = _f(32, "FDFO: paired rollouts per epoch (2 reward queries each)", ge=1)
    churn: float = _f(0.02, "FDFO: churn strength γ of the paired sampler (paper 0.0025)", ge=0)
    trust_eps: float = _f(0.03, "FDFO: SPO trust-region ε (optimum at ρ = 1 ± ε)", gt=0)
    velocity_penalty: float = _f(0.0, "FDFO: λ of the velocity penalty toward the frozen base model", ge=0)
    steps_per_sample: int = _f(
        0, "FDFO: train on k random steps of each sample's T per epoch (0 = all, the paper)", ge=0
    )


@dataclass(frozen=True)
class SDEPolicyConfig:
    """Flow-GRPO / DDPO (docs/method.md §2, §3): SDE rollouts as Gaussian per-step policies, PPO clip."""

    prompts_per_epoch: int = _f(8, "Flow-GRPO: groups per epoch; DDPO: distinct prompt draws per epoch", ge=1)
    group_size: int = _f(8, "Flow-GRPO: images per prompt (G); DDPO: images per drawn prompt", ge=1)
    noise_level: float = _f(0.7, "SDE noise level a of g = a·√(t/(1 − t))", gt=0)
    clip_range: float = _f(1e-4, "PPO ratio clip c", gt=0)
    adv_clip: float = _f(5.0, "advantages are clipped to ±adv_clip", gt=0)
    kl_beta: float = _f(0.0, "Flow-GRPO: β of the KL to the frozen base model", ge=0)
    train_timestep_fraction: float = _f(
        1.0, "Flow-GRPO/DDPO: train on k = ⌊f·T⌋ of each trajectory's T steps (the references' int(T·f))", gt=0, le=1
    )
    timestep_selection: str = _f(
        "random",
        "Flow-GRPO/DDPO: which k steps: random (a fresh subset per sample and epoch, as DDPO) | first (steps "
        "0 … k − 1, as Flow-GRPO's reference)",
        choices=("random", "first"),
    )
    grpo_std: str = _f(
        "group",
        "Flow-GRPO advantage scale: group ((R − group mean)/(group std + 1e-4)) | global (the reference: mean per "
        "prompt text, std of the whole batch + 1e-4)",
        choices=("group", "global"),
    )
    sde_window: int = _f(
        0,
        "Flow-GRPO/DDPO: SDE noise and training on a window of k consecutive steps only, ODE elsewhere "
        "(Flow-GRPO-Fast, MixGRPO; 0 = SDE on every step)",
        ge=0,
    )
    sde_window_range: int = _f(
        0, "--sde-window: the window lies within steps 0 … range − 1 (0 = all T steps; range = k: a fixed window)", ge=0
    )
    sde_window_mode: str = _f(
        "random",
        "--sde-window: random (a uniform start within the range, drawn per epoch, as Flow-GRPO-Fast) | sliding "
        "(moves one step later every --sde-window-every epochs and wraps, as MixGRPO)",
        choices=("random", "sliding"),
    )
    sde_window_every: int = _f(25, "--sde-window-mode sliding: epochs per one-step move (MixGRPO: 25)", ge=1)
    stat_buffer: int = _f(16, "DDPO: per-prompt reward buffer size", ge=1)
    stat_min_count: int = _f(
        16, "DDPO: below this many rewards a prompt uses the batch's statistics (ddpo-pytorch: 16)", ge=0
    )


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT (arXiv 2509.16117; docs/method.md §3b): forward-process training between implicit positive and
    negative policies around a slowly updated sampling policy. Groups, advantage clip and trained-step fraction are
    the `sde` section's --prompts-per-epoch, --group-size, --adv-clip and --train-timestep-fraction."""

    nft_beta: float = _f(1.0, "DiffusionNFT: β of the implicit policies v± around the sampling policy", gt=0)
    nft_kl_beta: float = _f(1e-4, "DiffusionNFT: weight of the velocity MSE to the frozen base model", ge=0)
    old_decay_rate: float = _f(
        1e-3, "DiffusionNFT: the sampling policy's soft-update decay grows by this per optimiser step", ge=0
    )
    old_decay_max: float = _f(0.5, "DiffusionNFT: the decay's ceiling (0 = the sampling policy is the trained one)",
                              ge=0, lt=1)  # fmt: skip
    old_decay_flat: int = _f(0, "DiffusionNFT: optimiser steps with decay 0 before it starts growing", ge=0)


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser engine: AdamW (or 8-bit AdamW, or DeepSpeed ZeRO around it), steps per epoch, EMA."""

    ds_config: str = _f("", "DeepSpeed JSON config (ZeRO-2/3, e.g. ds_z3.json); '' = plain PyTorch optimiser")
    optimizer: str = _f("adamw", "adamw | adamw8bit (bitsandbytes)", choices=OPTIMIZERS)
    opt_steps_per_epoch: int = _f(4, "optimiser steps per epoch (the epoch's items are shuffled and split)", ge=1)
    micro_batch: int = _f(256, "items per forward/backward (gradient accumulation inside a step)", ge=1)
    lr: float = _f(3e-5, "AdamW learning rate", gt=0, le=1)
    beta1: float = _f(0.9, "AdamW β1", ge=0, lt=1)
    beta2: float = _f(0.999, "AdamW β2", ge=0, lt=1)
    weight_decay: float = _f(1e-4, "AdamW weight decay", ge=0)
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)", ge=0)
    ema_decay: float = _f(0.0, "EMA of the trained weights (0 = off); evaluation uses the EMA when on", ge=0, lt=1)
    ema_every: int = _f(1, "update the EMA every N optimiser steps (Flow-GRPO's PickScore recipe: 8)", ge=1)


@dataclass(frozen=True)
class EvalConfig:
    """The held-out evaluation (always at epoch 0 and at the end), diversity, best checkpoint, early stopping."""

    eval_prompts: str = _f(
        "auto",
        "auto ('heldout' for the toy model, 'geneval-coco:test' for the others) | 'heldout' (the shapes world's "
        "held-out split) | 'geneval-coco:test' / 'geneval-coco:train' | a prompt file (as --prompts)",
    )
    eval_every: int = _f(
        10, "held-out evaluation every N epochs (always at epoch 0 and at the end; 0 = only those)", ge=0
    )
    eval_per_category: int = _f(32, "held-out items per GenEval category", ge=1)
    eval_num_steps: int = _f(20, "Euler ODE steps for evaluation", ge=1)
    diversity_prompts: int = _f(
        8, "diversity: held-out prompts sampled several times at each evaluation (0 = off)", ge=0
    )
    diversity_samples: int = _f(4, "diversity: samples per prompt (mean pairwise RMS distance between them)")
    keep_best: bool = _f(True, "write best.pt (and best_lora/) whenever the held-out score improves")
    early_stop_patience: int = _f(0, "stop after N evaluations without a held-out improvement (0 = never)", ge=0)


TRACKERS = ("tensorboard", "wandb")


def with_legacy_options_replaced(values: dict) -> dict:
    """Options an older fdfo_fast wrote (saved runs, YAML files, commands) in today's terms: `tensorboard: BOOL`
    became a tracker of --log-with."""
    if "tensorboard" not in values:
        return values
    values = dict(values)
    on = values.pop("tensorboard")
    on = on if isinstance(on, bool) else str(on).lower() in ("1", "true", "yes", "on")
    others = [n for n in tracker_names(str(values.get("log_with", "tensorboard"))) if n != "tensorboard"]
    values["log_with"] = ",".join((["tensorboard"] if on else []) + others) or "none"
    return values


def tracker_names(spec: str) -> tuple[str, ...]:
    """--log-with 'tensorboard,wandb' -> the trackers, in order ('' or 'none' = metrics.jsonl only)."""
    names = tuple(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip() and p.strip() != "none"))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise FdfoError(f"--log-with names unknown tracker {unknown[0]!r} (known: {', '.join(TRACKERS)}, none)")
    return names


@dataclass(frozen=True)
class LoggingConfig:
    """What a run shows while it trains: trackers (TensorBoard, wandb; rank 0 only), the images they get, the
    progress bars. metrics.jsonl is always written."""

    log_with: str = _f(
        "tensorboard",
        "trackers beside metrics.jsonl, comma-separated: tensorboard, wandb (pip install -e '.[wandb]'); none = only "
        "metrics.jsonl. wandb honours WANDB_MODE=offline and its other environment variables",
    )
    wandb_project: str = _f("fdfo_fast", "wandb: project name")
    wandb_run_name: str = _f("", "wandb: run name ('' = the run folder's name)")
    wandb_tags: str = _f("", "wandb: comma-separated tags (the algorithm and model are always added)")
    rollout_images_every: int = _f(
        10, "log a panel of this epoch's rollouts (FDFO: pairs with both rewards and the advantage) every N epochs "
        "(0 = never; epoch 1 is always included when on)", ge=0,
    )  # fmt: skip
    rollout_images: int = _f(4, "rollout panel: pairs (FDFO) or groups / samples (Flow-GRPO / DDPO) shown", ge=1)
    progress: bool = _f(True, "show progress bars (epochs; and per phase: loading, sampling, scoring, training, eval)")


SECTIONS = {
    "run": RunConfig,
    "model": ModelConfig,
    "rewards": RewardConfig,
    "human": HumanConfig,
    "sampling": SamplingConfig,
    "fdfo": FDFOConfig,
    "sde": SDEPolicyConfig,
    "nft": NFTConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
}
# option name -> its section (names are unique across sections)
OPTION_SECTION = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
assert len(OPTION_SECTION) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()), "option names must be unique"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, by section. An epoch = sample & score a batch of rollouts, then a few
    optimiser steps."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    human: HumanConfig = field(default_factory=HumanConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fdfo: FDFOConfig = field(default_factory=FDFOConfig)
    sde: SDEPolicyConfig = field(default_factory=SDEPolicyConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        # 'auto' prompt sets follow the model: the shapes world's splits, or GenEval-style COCO prompts for the others
        toy = self.model.model == "toy"
        if self.run.prompts == "auto":
            object.__setattr__(
                self, "run", dataclasses.replace(self.run, prompts="train" if toy else "geneval-coco:train")
            )
        if self.eval.eval_prompts == "auto":
            new = "heldout" if toy else "geneval-coco:test"
            object.__setattr__(self, "eval", dataclasses.replace(self.eval, eval_prompts=new))

    @classmethod
    def from_flat(cls, values: dict) -> TrainConfig:
        """From flat option names (config.json, YAML, presets, the command line), values already typed."""
        values = with_legacy_options_replaced(values)
        unknown = sorted(set(values) - set(OPTION_SECTION))
        if unknown:
            raise FdfoError(f"unknown option(s) {unknown}; see --help")
        parts: dict[str, dict] = {s: {} for s in SECTIONS}
        for k, v in values.items():
            parts[OPTION_SECTION[k]][k] = v
        return cls(**{s: SECTIONS[s](**kw) for s, kw in parts.items()})

    def to_dict(self) -> dict:
        """Flat option name -> value (what config.json / config.yaml hold and --config reloads)."""
        return {k: v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    def validate(self) -> TrainConfig:
        """Raise FdfoError naming the first bad option: each field's own rule (its metadata), then the rules that
        involve several options."""

        def bad(name, why):
            raise FdfoError(f"--{name.replace('_', '-')} {why}, got {_quoted(self.to_dict()[name])}")

        for s in SECTIONS:
            section = getattr(self, s)
            for f in dataclasses.fields(section):
                v = getattr(section, f.name)
                if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
                    bad(f.name, "must be a finite number (within float32's range)")
                why = _rule_error(f.metadata, v)
                if why:
                    bad(f.name, why)
        run, m, rw, hu, sm, fd, sde, nft, opt, ev, lg = (getattr(self, s) for s in SECTIONS)
        algo = run.algorithm
        if not run.out.strip():
            bad("out", "must name the run folder")
        weights = [_number(p.partition(":")[2].strip()) for p in rw.reward.split(",") if p.strip()]
        if any(w is None or not math.isfinite(w) for w in weights):
            bad("reward", "needs a finite number as every term's weight (name:weight)")
        if weights and all(w == 0 for w in weights):
            bad("reward", "gives every term weight 0: the trained reward would be constant")
        if m.model == "toy" and m.finetune != "full":
            bad("finetune", "must be 'full' for the toy model (LoRA is for the diffusers models)")
        if m.model != "toy" and not m.model_path:
            bad("model_path", f"is required for --model {m.model} (a local pipeline folder or a hub id)")
        if m.model == "toy" and m.model_path:
            bad("model_path", "applies to the diffusers models; the toy model loads --base-checkpoint")
        from fdfo_fast.models.base import MODEL_KINDS

        family = MODEL_KINDS[m.model]
        if family.guidance_distilled and sm.cfg_scale != 1.0:
            bad("cfg_scale", f"must be 1 for {m.model} (guidance-distilled: set --flux-guidance instead)")
        from fdfo_fast.rewards import VIDEO_TERMS

        video_terms = [t for t in reward_term_names(rw.reward) if t in VIDEO_TERMS]
        if video_terms and not family.makes_videos:
            bad("reward", f"uses {video_terms[0]!r}, which scores videos: --model {m.model} makes images")
        if family.makes_videos and "human" in reward_term_names(rw.reward):
            bad("reward", f"uses 'human': the labelling page shows images, --model {m.model} makes videos")
        if m.num_frames and not family.makes_videos:
            bad("num_frames", f"applies to video models; --model {m.model} makes images")
        k = family.frames_per_latent_frame
        if m.num_frames and family.makes_videos and m.num_frames % k != 1 % k:
            bad("num_frames", f"must be {k}k + 1 for --model {m.model} (e.g. {4 * k + 1}, {8 * k + 1})")
        if m.width and m.model == "toy":
            bad("width", "applies to the diffusers models; the toy model's images are square")
        if not (run.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", run.device)):
            bad("device", "must be auto, cpu, cuda or cuda:N")
        if opt.ds_config and not Path(opt.ds_config).is_file():
            bad("ds_config", "must be an existing DeepSpeed JSON file")
        from fdfo_fast.rewards.remote import names_remote_term, parse_server_urls

        if names_remote_term(rw.reward):
            if not rw.reward_servers.strip():
                bad("reward_servers", "is required when --reward names the remote term")
            parse_server_urls(rw.reward_servers)
        human = "human" in reward_term_names(rw.reward)
        if human and algo != "fdfo":
            bad("reward", "uses 'human', which labels FDFO's pairs: it needs --algorithm fdfo")
        if human and hu.human_fraction < 1 and not hu.human_auto_label:
            bad("human_auto_label", "is required when --human-fraction < 1 (it labels the pairs not shown)")
        if ev.diversity_prompts and ev.diversity_samples < 2:
            bad("diversity_samples", "must be >= 2 (distances between samples of one prompt)")
        if fd.steps_per_sample and algo != "fdfo":
            bad("steps_per_sample", "applies to fdfo (Flow-GRPO / DDPO use --train-timestep-fraction)")
        # The toy model knows only the shapes world's prompts; the others must never train or evaluate on them.
        for name, spec, toy_split, real in (
            ("prompts", run.prompts, "train", "train"),
            ("eval_prompts", ev.eval_prompts, "heldout", "test"),
        ):
            if spec == toy_split:
                if m.model != "toy":
                    bad(name, f"is the toy shapes world's split: --model {m.model} needs real prompts "
                              f"('geneval-coco:{real}' or a prompt file)")  # fmt: skip
            elif is_named_set(spec):
                if spec not in NAMED_PROMPT_SETS:
                    bad(name, f"names an unknown prompt set (known: {', '.join(NAMED_PROMPT_SETS)})")
                if m.model == "toy":
                    bad(name, f"is a prompt set for the diffusers models: the toy model knows only the shapes world "
                              f"('{toy_split}' or a file of its prompts)")  # fmt: skip
            elif not Path(spec).is_file():
                sets = " / ".join(map(repr, NAMED_PROMPT_SETS))
                bad(name, f"must be '{toy_split}' (toy model), {sets} (diffusers models) or an existing prompt file")
        if m.model != "toy":  # terms that parse the shapes world's grammar cannot score a real image
            from fdfo_fast.rewards import TOY_WORLD_TERMS

            for name, spec in (("reward", rw.reward), ("human_auto_label", hu.human_auto_label)):
                toy_terms = [t for t in reward_term_names(spec) if t in TOY_WORLD_TERMS]
                if toy_terms:
                    bad(name, f"uses reward term {toy_terms[0]!r}, which scores the toy shapes world: "
                              f"--model {m.model} needs model rewards, e.g. 'pickscore:1' with "
                              "--reward-models pickscore=...")  # fmt: skip
        if m.init_lora and m.finetune != "lora":
            bad("init_lora", "needs --finetune lora (and a diffusers model)")
        if m.init_lora and not Path(m.init_lora).is_dir():
            bad("init_lora", "must be an existing LoRA folder")
        if not [t for t in m.lora_targets.split(",") if t.strip()]:
            bad("lora_targets", "must name at least one module")
        if algo == "fdfo" and fd.churn == 0:
            bad("churn", "must be > 0 for fdfo (with γ = 0 both branches of a pair are identical)")
        if sde.group_size < 2 and algo in ("flow_grpo", "diffusion_nft"):
            bad("group_size", "must be >= 2 for group-relative advantages")
        if algo == "diffusion_nft" and sm.cfg_scale != 1.0:
            bad("cfg_scale", "must be 1 for diffusion_nft (it samples and trains CFG-free, as its reference code)")
        if sde.sde_window:
            T = sm.num_steps
            if algo not in ("flow_grpo", "ddpo"):
                bad("sde_window", f"applies to flow_grpo / ddpo (not {algo})")
            if sde.sde_window_range and not sde.sde_window <= sde.sde_window_range <= T:
                bad("sde_window_range", f"must lie between --sde-window ({sde.sde_window}) and --num-steps ({T})")
            if sde.sde_window > T:
                bad("sde_window", f"must be <= --num-steps ({T})")
            if sde.train_timestep_fraction != 1.0:
                bad("train_timestep_fraction", "must be 1 with --sde-window (the window's steps are the trained ones)")
        elif sde.sde_window_range:
            bad("sde_window_range", "needs --sde-window k > 0")
        if sde.kl_beta and algo != "flow_grpo":
            bad("kl_beta", f"only applies to flow_grpo (not {algo})")
        if fd.velocity_penalty and algo != "fdfo":
            bad("velocity_penalty", f"only applies to fdfo (not {algo})")
        if sde.stat_min_count > sde.stat_buffer:
            bad("stat_min_count", f"must be <= --stat-buffer ({sde.stat_buffer}) or per-prompt statistics never apply")
        if algo != "fdfo" and int(sde.train_timestep_fraction * sm.num_steps) < 1:
            bad("train_timestep_fraction", f"trains int(f·T) steps: none of --num-steps {sm.num_steps}")
        if sde.timestep_selection != "random" and algo == "fdfo":
            bad("timestep_selection", "applies to flow_grpo / ddpo (fdfo uses --steps-per-sample)")
        if sde.grpo_std != "group" and algo != "flow_grpo":
            bad("grpo_std", f"only applies to flow_grpo (not {algo})")
        if opt.ema_every != 1 and opt.ema_decay == 0:
            bad("ema_every", "needs an EMA: set --ema-decay > 0")
        if any(n.strip() not in (*TRACKERS, "none", "") for n in lg.log_with.split(",")):
            bad("log_with", f"must be a comma-separated list of {', '.join(TRACKERS)} (or none)")
        if m.base_checkpoint and not Path(m.base_checkpoint).is_file():
            bad("base_checkpoint", "must be an existing checkpoint file")
        return self


# The paper's rewards (docs/method.md §1.4): PickScore (its CLIP-H processor lives in the LAION repo) and a VLM yes/no.
PICKSCORE = "pickscore=yuvalkirstain/PickScore_v1;processor=laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VLM_QUESTION = 'question=Does this image match the caption "{prompt}"? Answer Yes or No.'

# Shared parts of the presets below.
_TOY_FDFO = dict(algorithm="fdfo", epochs=150, lr=3e-5, churn=0.05, pairs_per_epoch=32, num_steps=10)
# Real models: 512², LoRA r 32 / α 64 on the attention projections, gradient checkpointing. The σ grid is the model's
# own scheduler's (shift 0 = its config: 3.0 for SD3.5-Medium; FLUX's dynamic shifting), as in the reference code.
# GenEval-style COCO prompts for training and evaluation (fdfo_fast.coco_prompts).
_REAL = dict(
    resolution=512, finetune="lora", lora_rank=32, lora_alpha=64.0, gradient_checkpointing=True,
    prompts="geneval-coco:train", eval_prompts="geneval-coco:test",
)  # fmt: skip
_PICKSCORE_REWARD = dict(reward="pickscore:1", reward_models=PICKSCORE)
# The paper's FDFO schedule (docs/method.md §1.4): churn 0.0025, 432 pairs per epoch in 4 AdamW steps at lr 3e-5.
_PAPER_FDFO = dict(
    _REAL, algorithm="fdfo", churn=0.0025, pairs_per_epoch=432, opt_steps_per_epoch=4, lr=3e-5, epochs=100,
    eval_every=10, save_every=5,
)  # fmt: skip

# Flow-GRPO's reference training (flow_grpo config/grpo.py, scripts/train_sd3.py): the first int(0.99·T) steps of
# each trajectory, advantages normalised by the batch std with groups pooled by prompt text.
_GRPO_REFERENCE = dict(train_timestep_fraction=0.99, timestep_selection="first", grpo_std="global")

# What Flow-GRPO's and DiffusionNFT's published SD3.5-Medium PickScore recipes share (flow_grpo config/grpo.py
# `pickscore_sd3`, NVlabs/DiffusionNFT config/nft.py `sd3_pickscore`): 48 prompts x G = 24 per epoch, 10 sampling
# steps for training and 40 for evaluation, LoRA lr 3e-4, T5 prompts of 128 tokens; our batch sizes and cadence.
_SD35M_GROUP_RECIPE = dict(
    _REAL, model="sd3", model_path="stabilityai/stable-diffusion-3.5-medium", num_steps=10, prompts_per_epoch=48,
    group_size=24, max_sequence_length=128, lr=3e-4, **_PICKSCORE_REWARD, sample_batch=16, micro_batch=8,
    epochs=1000, eval_num_steps=40, save_every=10,
)  # fmt: skip

# What the two Wan2.1 text-to-video presets share (the reasons beside them in PRESETS): 832 × 480, 33 frames.
_WAN21_480P_FDFO = dict(
    _PAPER_FDFO, model="wan", resolution=480, width=832, num_frames=33, num_steps=20, eval_num_steps=50,
    cfg_scale=5.0, reward="pickscore:1,temporal_consistency:1", reward_models=PICKSCORE, micro_batch=1,
    eval_per_category=2,
)  # fmt: skip

# Named presets: overrides on top of the dataclass defaults.
PRESETS: dict[str, dict] = {
    # Toy presets: 64 reward queries per epoch for every method, 10 sampling steps, 150 epochs (9,600 queries);
    # learning rates and FDFO's churn were tuned with the same budget of 3 runs per method (benchmarks/RESULTS.md).
    # FDFO: 32 pairs per epoch, every step of every sample trained, 4 optimiser steps; churn 0.05 (> the paper's
    # 0.0025: the alignment reward is discontinuous and larger churn gives more pairs with R_A != R_B).
    "toy-fdfo": dict(_TOY_FDFO),
    # The same with 3 of the 10 steps of each sample trained per epoch: in the options study (RESULTS.md, 3 seeds)
    # it reached the 60 % target with the same reward queries and a third of the forward+backward passes.
    "toy-fdfo-fast": dict(_TOY_FDFO, steps_per_sample=3),
    # Flow-GRPO: 8 prompts x G = 8 SDE samples, KL off (as for PickScore), and the reference code's choices: the
    # first ⌊0.99·10⌋ = 9 steps of each trajectory trained, advantages = (R − prompt mean)/(batch std + 1e-4), the
    # unconditional pass detached under CFG. (Before issue 15 it trained a random 60 % of the steps with per-group
    # std; benchmarks/RESULTS.md's Flow-GRPO rows were measured that way.) No EMA, as in every toy preset: the held-out
    # evaluation scores the trained weights themselves for all three methods.
    "toy-flow-grpo": dict(
        algorithm="flow_grpo",
        epochs=150,
        lr=1e-4,
        prompts_per_epoch=8,
        group_size=8,
        num_steps=10,
        **_GRPO_REFERENCE,
    ),
    # DDPO-IS: 16 prompt draws x 4 SDE samples, per-prompt running statistics (own statistics from 16 rewards, the
    # defaults = ddpo-pytorch's config/base.py buffer_size 16 / min_count 16), every step trained, no KL.
    "toy-ddpo": dict(algorithm="ddpo", epochs=150, lr=3e-5, prompts_per_epoch=16, group_size=4, num_steps=10),
    # Flow-GRPO-Fast: the same, with SDE noise and training on a 2-step window drawn per epoch within the first 5
    # steps, ODE elsewhere: 2 of the 10 steps trained (a fifth of the passes of all steps).
    "toy-flow-grpo-fast": dict(
        algorithm="flow_grpo",
        epochs=150,
        lr=1e-4,
        prompts_per_epoch=8,
        group_size=8,
        num_steps=10,
        grpo_std="global",
        sde_window=2,
        sde_window_range=5,
    ),  # fmt: skip
    # DiffusionNFT: 8 prompts x G = 8 deterministic ODE samples, CFG-free; ⌊0.99·10⌋ = 9 random steps of each
    # sample trained on forward-noised points; β 1, the sampling policy's decay min(1e-3·n, 0.5) (the public code's
    # GenEval / PickScore settings, config/nft.py); no EMA, as every toy preset. KL off: at the public 1e-4 it
    # weighs ~4e-7 against a policy term of ~1.8 on the toy (measured), yet costs a base-model forward per item.
    "toy-diffusion-nft": dict(
        algorithm="diffusion_nft",
        epochs=150,
        lr=1e-4,
        prompts_per_epoch=8,
        group_size=8,
        num_steps=10,
        train_timestep_fraction=0.99,
        nft_kl_beta=0.0,
    ),  # fmt: skip
    # -- real models (need a GPU and the weights; docs/method.md §1.4 and §2) ---------------------------------------
    # FDFO on SD3.5-Medium as in the paper: 40 steps, bf16 with fp32 latent updates, CFG 1, reward
    # PickScore + 0.1·VLM, the VLM term in the paper's form 100·sigmoid(logit Yes − logit No) ∈ [0, 100];
    "sd35m-fdfo": dict(
        _PAPER_FDFO,
        model="sd3",
        model_path="stabilityai/stable-diffusion-3.5-medium",
        num_steps=40,
        cfg_scale=1.0,
        reward="pickscore:1,vlm_yes:0.1",
        # the 7B VLM in bf16 (~15 GB per rank instead of ~30 GB in fp32); PickScore stays fp32
        reward_models=PICKSCORE + ",vlm_yes=Qwen/Qwen2.5-VL-7B-Instruct;micro_batch=8;dtype=bf16;" + VLM_QUESTION,
        sample_batch=16,
        micro_batch=8,
        eval_num_steps=40,
        max_sequence_length=128,  # T5 prompt length 128 (docs/method.md §1.4; Flow-GRPO's train_sd3.py also uses 128)
    ),
    # Flow-GRPO on SD3.5-Medium as its reference PickScore recipe (yifan123/flow_grpo config/grpo.py `pickscore_sd3`
    # on config/base.py; scripts/train_sd3.py): 10 SDE steps (noise 0.7) for training, 40 ODE steps for evaluation;
    # 48 prompts x G = 24 per epoch (32 GPUs x 9 samples x 4 batches / 24) in 2 optimiser steps (4 batches,
    # gradient accumulation 2, 1 inner epoch); the first int(10·0.99) = 9 steps trained; advantages with the batch's
    # std (global_std); CFG 4.5 with the unconditional pass detached; LoRA r 32 / α 64, lr 3e-4, clip 1e-4, KL β
    # 0.01; EMA 0.9 updated every 8 optimiser steps, evaluated; T5 prompts of 128 tokens. Deliberate differences:
    # bf16 weights (the reference runs fp16 mixed precision; bf16 as in the FDFO presets); the reference's EMA
    # also warms its decay up as min((1 + n)/(10 + n), 0.9) and, being stepped once per training batch, moves twice
    # at each 8th step (flow_grpo/ema.py): here a plain 0.9 every 8th step; evaluation/checkpoint cadence is ours.
    "sd35m-flow-grpo": dict(
        _SD35M_GROUP_RECIPE,
        algorithm="flow_grpo",
        opt_steps_per_epoch=2,
        **_GRPO_REFERENCE,
        ema_decay=0.9,
        ema_every=8,
        noise_level=0.7,
        clip_range=1e-4,
        kl_beta=0.01,
        cfg_scale=4.5,
        eval_every=50,
    ),
    # DiffusionNFT on SD3.5-Medium as its public PickScore recipe (NVlabs/DiffusionNFT config/nft.py `sd3_pickscore`
    # on config/base.py; scripts/train_nft_sd3.py): 10 deterministic steps CFG-free for the rollouts, 40 for
    # evaluation; 48 prompts x G = 24 per epoch in 1 optimiser step; ⌊0.99·10⌋ = 9 of the 10 σ per sample trained;
    # β 1, KL 1e-4, advantages clipped to ±5 (mean per prompt, batch std); the sampling policy soft-updated with
    # decay min(1e-3·n, 0.5); LoRA r 32 / α 64, lr 3e-4, EMA 0.9 every step, evaluated; T5 prompts of 128 tokens.
    # Deliberate differences: bf16 weights (the reference: fp16 mixed precision), the Euler sampler (the reference
    # uses a 2nd-order DPM solver; DiffusionNFT trains on forward-noised points, so any sampler is valid), and
    # the sampling policy is a copy of the trained LoRA tensors rather than a second peft adapter (the same weights).
    "sd35m-diffusion-nft": dict(
        _SD35M_GROUP_RECIPE,
        algorithm="diffusion_nft",
        cfg_scale=1.0,
        opt_steps_per_epoch=1,
        train_timestep_fraction=0.99,
        timestep_selection="random",
        adv_clip=5.0,
        nft_beta=1.0,
        nft_kl_beta=1e-4,
        old_decay_rate=1e-3,
        old_decay_max=0.5,
        ema_decay=0.9,
        ema_every=1,
        eval_every=10,
    ),
    # FDFO on FLUX.1-dev: the same recipe; guidance-distilled (flux_guidance 3.5, no CFG), 28 steps.
    "flux-fdfo": dict(
        _PAPER_FDFO,
        model="flux",
        model_path="black-forest-labs/FLUX.1-dev",
        num_steps=28,
        flux_guidance=3.5,
        max_sequence_length=512,
        **_PICKSCORE_REWARD,
        sample_batch=8,
        micro_batch=4,
        eval_num_steps=28,
    ),
    # The paper's FDFO schedule (432 pairs, 4 AdamW steps at lr 3e-5, churn 0.0025, LoRA r 32 / α 64 on the
    # recipes' targets) on the other families, each sampled as its pipeline samples by default (steps, guidance,
    # native resolution) unless a public RL recipe for it does otherwise; PickScore as the reward (per frame for
    # video). Not run here (no GPU): docs/memory.md gives each one's memory and time per epoch before any download.
    # SD3.5-Large (8.1B, the sd3 adapter): its model card's sampling, 28 steps at CFG 3.5, 1024².
    "sd35l-fdfo": dict(
        _PAPER_FDFO,
        model="sd3",
        model_path="stabilityai/stable-diffusion-3.5-large",
        resolution=1024,
        num_steps=28,
        cfg_scale=3.5,
        eval_num_steps=28,
        **_PICKSCORE_REWARD,
        sample_batch=8,
        micro_batch=2,
    ),  # fmt: skip
    # Qwen-Image (20B MMDiT, Qwen2.5-VL-7B text encoder): true CFG 4 with the negative prompt " " (the pipeline's
    # norm-preserving combine), Flow-GRPO's Qwen-Image PickScore sampling (10 steps for training, 50 for evaluation,
    # 512²), LoRA r 64 / α 128 as verl's Flow-GRPO Qwen-Image example on diffusers' dreambooth targets.
    "qwen-image-fdfo": dict(
        _PAPER_FDFO,
        model="qwen_image",
        model_path="Qwen/Qwen-Image",
        num_steps=10,
        eval_num_steps=50,
        cfg_scale=4.0,
        lora_rank=64,
        lora_alpha=128.0,
        **_PICKSCORE_REWARD,
        sample_batch=4,
        micro_batch=2,
    ),  # fmt: skip
    # FLUX.2-dev (32B, Mistral-Small-3.2-24B text encoder; guidance-distilled): Flux2Pipeline's guidance 4 and 512
    # text tokens, at flux-fdfo's 512² and 28 steps (its 1024² / 50 steps would cost ~35 GPU-hours per epoch,
    # docs/memory.md); the text encoder is offloaded while training (its prompt embeddings are cached).
    "flux2-fdfo": dict(
        _PAPER_FDFO,
        model="flux2",
        model_path="black-forest-labs/FLUX.2-dev",
        num_steps=28,
        eval_num_steps=28,
        flux_guidance=4.0,
        offload_frozen=True,
        **_PICKSCORE_REWARD,
        sample_batch=4,
        micro_batch=1,
    ),
    # Wan2.1 text-to-video at 480p (832 × 480): the RL video recipes' shorter clips and fewer steps (FastVideo's Wan
    # GRPO: 33 frames, 20 steps; CFG 5 and flow shift 3 as WanPipeline's 480p defaults), 50 evaluation steps; LoRA
    # on DiffSynth-Studio's Wan targets (both attentions' q, k, v, o and the FFN). Reward: PickScore on every frame
    # (averaged per video) + the temporal-consistency term (fdfo_fast/rewards/video.py; weight not tuned).
    # The first FDFO for video: 96 pairs per epoch (a 33-frame clip is 14,040 latent tokens).
    "wan21-1.3b-fdfo": dict(
        _WAN21_480P_FDFO, model_path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pairs_per_epoch=96, sample_batch=4
    ),
    "wan21-14b-fdfo": dict(
        _WAN21_480P_FDFO, model_path="Wan-AI/Wan2.1-T2V-14B-Diffusers", pairs_per_epoch=48, sample_batch=2
    ),  # fmt: skip
}


def _coerce(name: str, value, typ):
    if typ is bool and isinstance(value, str):
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if typ is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if typ is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise FdfoError(f"option {name!r} must be of type {typ.__name__}, got {_quoted(value)}")


def make_config(
    preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None, base: dict | None = None
) -> TrainConfig:
    """defaults <- `base` (a resumed run's saved config) <- preset <- YAML file <- CLI overrides; validated."""
    values: dict = dict(base or {})
    if preset:
        if preset not in PRESETS:
            raise FdfoError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if yaml_path:
        values.update(load_yaml(yaml_path))
    values.update(overrides or {})
    values = with_legacy_options_replaced(values)
    unknown = sorted(set(values) - set(OPTION_SECTION))
    if unknown:
        raise FdfoError(f"unknown option(s) {unknown}; see --help")
    types = {f.name: f.type for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    pytypes = {"int": int, "float": float, "str": str, "bool": bool}
    return TrainConfig.from_flat({k: _coerce(k, v, pytypes[types[k]]) for k, v in values.items()}).validate()


def load_json_object(path: str | Path, what: str) -> dict:
    """A JSON file holding one object (a run's config.json, a DeepSpeed config), or FdfoError naming `what` and the
    file: missing, not JSON, or not an object."""
    p = Path(path)
    if not p.is_file():
        raise FdfoError(f"{what} {path} does not exist")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FdfoError(f"{what} {path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise FdfoError(f"{what} {path} must hold a JSON object")
    return obj


MAX_YAML_BYTES = 1 << 20  # a config is a few kB; a larger file is a mistake or an attack


def _make_no_alias_loader():
    """yaml.SafeLoader without anchors/aliases: a few hundred bytes of nested aliases expand to gigabytes."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(
                    f"aliases (*{event.anchor}) are not allowed in a config file (line {event.start_mark.line + 1})"
                )
            return super().compose_node(parent, index)

    return Loader


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FdfoError(f"config file {path} does not exist")
    try:
        raw = p.read_bytes()
        if len(raw) > MAX_YAML_BYTES:
            raise FdfoError(f"config file {path} is {len(raw)} bytes; a config is at most {MAX_YAML_BYTES}")
        data = yaml.load(raw.decode("utf-8"), Loader=_make_no_alias_loader())
    except UnicodeDecodeError as err:
        raise FdfoError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise FdfoError(f"config file {path} cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise FdfoError(f"config file {path} is not valid YAML: {str(err).splitlines()[0][:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FdfoError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def save_resolved(cfg: TrainConfig, out: Path) -> None:
    """The resolved config, as YAML (re-loadable with --config) and JSON, each replaced atomically (a resume reads
    its config from checkpoint.pt, so these are for people and --config)."""
    import yaml

    from fdfo_fast.checkpoint import atomic_write_text

    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
