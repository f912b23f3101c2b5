"""The flow-model interface the samplers and the training loop use, and the registry of model kinds.

Every model predicts the rectified-flow velocity v = ε − x₀ at x_σ = (1 − σ)·x₀ + σ·ε (SD3's convention) and
owns what differs between kinds: its conditioning, its σ grid, what it trains (full / LoRA), what a checkpoint
keeps of it, its frozen reference and its attention backend. The trainer asks the model, never its type.

`MODEL_KINDS` maps `--model` to the class; it is filled by `fdfo_fast/models/__init__.py`, which Python runs
before any module of this package is imported from outside, so it is always complete where it is read.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from fdfo_fast.config import ATTENTION_BACKENDS
from fdfo_fast.errors import FdfoError


def choose_attention_backend(choice: str, on_cuda: bool) -> str:
    """--attention auto|sdpa|flash|xformers -> the backend to use: auto = flash-attn when installed and on CUDA,
    else PyTorch SDPA; an explicit choice that cannot run here raises."""
    from fdfo_fast.backends import package_version

    usable = {
        "sdpa": (True, ""),
        "flash": (package_version("flash_attn") is not None and on_cuda, "needs flash-attn and a CUDA device"),
        "xformers": (package_version("xformers") is not None and on_cuda, "needs xformers and a CUDA device"),
    }
    if choice == "auto":
        return "flash" if usable["flash"][0] else "sdpa"
    if choice not in usable:
        raise FdfoError(f"--attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {choice!r}")
    if not usable[choice][0]:
        raise FdfoError(f"--attention {choice} {usable[choice][1]}")
    return choice


class FlowModel(torch.nn.Module, abc.ABC):
    """A text-conditional flow model: v_θ(x_σ, σ, c) on samples of `latent_shape` ([C, H, W]).

    `mc` (load, setup_finetune) is any object with the model fields of a TrainConfig: model, model_path,
    base_checkpoint, dtype, resolution, max_sequence_length, flux_guidance; finetune, lora_rank, lora_alpha,
    lora_targets, gradient_checkpointing."""

    kind: ClassVar[str]  # the --model name (MODEL_KINDS)
    has_world_metric: ClassVar[bool] = False  # the shapes world's GenEval-style accuracy applies (the toy model)
    # What differs between model families, read by the config, the samplers and the CLIs (never the model's type):
    guidance_distilled: ClassVar[bool] = False  # guidance is a model input (FLUX): --cfg-scale must be 1
    negative_prompt: ClassVar[str] = ""  # the prompt of classifier-free guidance's unconditional branch
    linear_guidance: ClassVar[bool] = True  # CFG is v_u + w·(v_c − v_u) (fused into the sampler step), else its own
    pipeline_max_sequence_length: ClassVar[int] = 256  # the text length the model's pipeline defaults to
    lora_recipe_targets: ClassVar[tuple[str, ...]] = ()  # --lora-targets auto: the community recipe's modules
    makes_videos: ClassVar[bool] = False  # latents [C, F, H, W], decoded to videos [B, 3, F, H, W] (is_video)
    frames_per_latent_frame: ClassVar[int] = 1  # a video VAE's temporal compression k: --num-frames = k·n + 1
    latent_shape: tuple[int, ...]  # one sample as the samplers walk it: [C, H, W], or [C, F, H, W] for video

    @property
    def is_video(self) -> bool:
        """Samples have a time axis ([C, F, H, W] latents; `decode` returns [B, 3, F, H, W] videos)."""
        return len(self.latent_shape) == 4

    @classmethod
    @abc.abstractmethod
    def load(cls, mc) -> FlowModel:
        """The base model the config names."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict:
        """Prompts ("" = unconditional) -> conditioning dict, every tensor batch-first."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """x [B, *latent_shape], σ [B] or a scalar, cond from encode_prompts -> the velocity [B, *latent_shape]."""

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Final samples -> images [B, 3, H, W] (videos [B, 3, F, H, W]) in [-1, 1]."""

    def encode_negative(self, n: int) -> dict:
        """The unconditional branch of classifier-free guidance for `n` samples: the model's negative prompt."""
        return self.encode_prompts([self.negative_prompt] * n)

    def combine_guidance(self, v_c: torch.Tensor, v_u: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in fp32: v_u + w·(v_c − v_u) (Ho & Salimans, arXiv:2207.12598). A model whose
        pipeline combines differently sets `linear_guidance = False` and overrides this (the samplers then call it
        instead of fusing the linear combine into the step kernel)."""
        return v_u.float() + cfg_scale * (v_c.float() - v_u.float())

    @abc.abstractmethod
    def sigma_schedule(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The σ grid (fp32 [T + 1], 1 -> 0) this model samples with; `shift` None = the model's own."""

    @abc.abstractmethod
    def setup_finetune(self, mc) -> list[torch.nn.Parameter]:
        """Freeze what is not trained (mc.finetune full | lora, ...); return the trainable parameters. A LoRA init
        draws from torch's global generator: the caller seeds it."""

    @abc.abstractmethod
    def trainable_state_dict(self) -> dict:
        """What a checkpoint keeps of the model."""

    @abc.abstractmethod
    def load_trainable_state_dict(self, state: dict, where: str) -> None:
        """Load what `trainable_state_dict` returned; one clear FdfoError naming `where` on a mismatch."""

    @abc.abstractmethod
    def reference_model(self) -> FlowModel:
        """The frozen base policy (after setup_finetune): requires_grad False, eval mode."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """A JSON-able description (kept as a checkpoint's model_config)."""

    def save_weights(self, path, meta: dict) -> None:
        """A model-only checkpoint of the trained weights (best.pt): the trainable state with this model's
        description and `meta` (epoch, score, ...), written atomically."""
        from fdfo_fast.checkpoint import atomic_save

        atomic_save({"format": "fdfo_fast.best", "model": self.trainable_state_dict(), "model_config": self.describe(),
                     **meta}, path)  # fmt: skip

    @property
    def lora(self) -> bool:
        """Whether the trained weights are a LoRA adapter (export_lora writes it)."""
        return False

    def export_lora(self, directory):
        raise FdfoError(f"export_lora: the {self.kind} model has no LoRA adapter")

    @property
    def export_name(self) -> str | None:
        """The run folder's export of the trained weights for other tools ("lora", "transformer"), or None."""
        return None

    def export_weights(self, directory):
        """Write that export into `directory` (RunCheckpoint: save, save_best, snapshots)."""
        raise FdfoError(f"the {self.kind} model has no export beside its checkpoint")

    def offloadable_modules(self) -> dict[str, torch.nn.Module]:
        """The frozen networks the training passes never call (they serve sampling and evaluation only), by name:
        what --offload-frozen may move off the training device for those passes (fdfo_fast.placement). None here
        (the toy model is one small network)."""
        return {}

    def lora_summary(self) -> dict:
        """The trained LoRA's rank, alpha and targets ({} = no LoRA)."""
        return {}

    def set_attention_backend(self, choice: str) -> str:
        """--attention auto|sdpa|flash|xformers -> the backend chosen and set (an unusable choice raises)."""
        chosen = choose_attention_backend(choice, next(self.parameters()).is_cuda)
        self._apply_attention_backend(chosen)
        return chosen

    def _apply_attention_backend(self, chosen: str) -> None:
        """Models whose attention is PyTorch SDPA only (the toy model)."""
        if chosen != "sdpa":
            raise FdfoError(f"--attention {chosen}: the {self.kind} model supports sdpa only")


MODEL_KINDS: dict[str, type[FlowModel]] = {}  # --model name -> class; filled by fdfo_fast/models/__init__


def load_model(mc) -> FlowModel:
    """The base model of `mc.model` (the shipped toy model or --base-checkpoint, or a diffusers family)."""
    cls = MODEL_KINDS.get(mc.model)
    if cls is None:
        raise FdfoError(f"--model must be one of {', '.join(MODEL_KINDS)}, got {mc.model!r}")
    return cls.load(mc)
