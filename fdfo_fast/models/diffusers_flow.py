"""Stable Diffusion 3 / 3.5 and FLUX.1 behind the flow-model interface the samplers and the trainer use.

The interface (`fdfo_fast.models.base.FlowModel`, shared with `ToyFlowModel`): `encode_prompts(prompts) -> cond
dict` (batch-first tensors), `forward(x, sigma, cond) -> v` with x_σ = (1 − σ)·x₀ + σ·ε and v = ε − x₀ (SD3's
rectified-flow convention, which diffusers' SD3 and FLUX transformers predict), `decode(x₀) -> images in [-1, 1]`,
`latent_shape`, and `sigma_schedule(T)`: the σ grid the diffusers pipeline samples with (its own scheduler, set as
its __call__ sets it). Sampling therefore runs the same samplers and fused kernels in latent space ([B, C, H, W];
FLUX's 2×2 packing happens inside `forward`), and `forward` hands the transformer the pipeline's own timesteps.

- Prompt embeddings come from the pipeline's own `encode_prompt` once per distinct prompt and are cached on the CPU
  (the text encoders are frozen; FDFO re-uses a prompt's conditioning across its pair and all steps).
- LoRA through peft on the reference recipes' target modules (Flow-GRPO's `attn.*` projections; FLUX also its MLPs)
  or full fine-tuning of the transformer; gradient checkpointing; bf16 weights with the sampler state in fp32.
- The frozen reference model (velocity penalty / KL) of a LoRA run is the same transformer with its adapters
  disabled, so no second copy of the weights exists.
- `export_lora(dir)` writes, with r and α, both the diffusers LoRA format (`pipe.load_lora_weights(dir)`) and a
  PEFT adapter folder (`PeftModel.from_pretrained(transformer, dir)`); `export_transformer(dir)` the fully
  fine-tuned transformer (`save_pretrained`); `--init-lora DIR` starts the LoRA from either format.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from fdfo_fast.config import torch_dtype
from fdfo_fast.errors import FdfoError
from fdfo_fast.models.base import FlowModel

_log = logging.getLogger("fdfo_fast")
# The recipes' LoRA target_modules (peft matches each as a module-name suffix; each model class names its list in
# `lora_recipe_targets`), from Flow-GRPO's scripts/train_sd3.py and scripts/train_flux.py. SD3: the joint attention's
# projections `attn.*` only, so SD3.5's second image self-attention `attn2` (MMDiT-X blocks) stays frozen; FLUX: the
# same plus both MLPs of the double blocks.
_ATTN_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip


def parse_lora_targets(spec: str) -> tuple[str, ...]:
    """--lora-targets "a,b" -> ("a", "b") (blanks dropped); ("auto",) stands for the model's recipe."""
    return tuple(t.strip() for t in spec.split(",") if t.strip())


def _matching_lora_targets(transformer: nn.Module, targets) -> list[str]:
    """The targets that match a module the way peft matches target_modules (peft's own check: the full name or a
    `.`-separated suffix of it); one clear error when none does."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n, _ in transformer.named_modules() if n]
    configs = {t: LoraConfig(target_modules=[t]) for t in dict.fromkeys(targets)}
    found = [t for t, c in configs.items() if any(check_target_module_exists(c, n) for n in names)]
    if not found:
        raise FdfoError(f"--lora-targets {','.join(targets)} match no module of the transformer")
    if len(found) < len(configs):
        unmatched = ",".join(t for t in configs if t not in found)
        _log.warning("--lora-targets: %s match no module of the transformer", unmatched)
    return found


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise FdfoError(
            f"the diffusers model adapters need diffusers and transformers ({err.name} is missing): "
            "pip install -e '.[diffusers]' in the fdfo_fast checkout"
        ) from None


def _load_pipeline(cls_name: str, path: str, dtype: torch.dtype, what: str):
    """`<Pipeline>.from_pretrained` from a local folder (never touching the hub) or a hub id, as one clear error."""
    _require_diffusers()
    import diffusers

    if not hasattr(diffusers, cls_name):  # the newer families (FLUX.2, Qwen-Image, Wan) need a recent diffusers
        raise FdfoError(f"{what}: diffusers {diffusers.__version__} has no {cls_name}; upgrade diffusers "
                        "(tested with 0.42.1)")  # fmt: skip
    local = Path(path).expanduser()
    if not path:
        raise FdfoError(f"{what}: --model-path is empty (a local pipeline folder or a hub id)")
    if (path.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise FdfoError(f"{what}: model path {path} does not exist or is not a folder")
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise FdfoError(f"{what}: {path} is not a diffusers pipeline folder (no model_index.json)")
    if local.is_dir():
        import json

        index = json.loads((local / "model_index.json").read_text())
        if index.get("_class_name") != cls_name:
            raise FdfoError(f"{what}: {path} holds a {index.get('_class_name')}, expected a {cls_name}")
    try:
        pipe = getattr(diffusers, cls_name).from_pretrained(
            str(local) if local.is_dir() else path, dtype=dtype, local_files_only=local.is_dir()
        )
    except Exception as err:  # OSError (offline / missing files), ValueError (wrong components), ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FdfoError(f"{what}: cannot load a {cls_name} from {path}: {msg}") from None
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        tok = getattr(tok, "tokenizer", tok)  # a processor (FLUX.2's PixtralProcessor) holds the text tokenizer
        if tok is not None and len(tok) <= 2:  # offline hub misses can yield a 2-token stand-in instead of raising
            raise FdfoError(f"{what}: {name} from {path} has only {len(tok)} tokens (a failed offline download?)")
    return pipe


class DiffusersFlowModel(FlowModel):
    """What every diffusers family shares: the embedding cache, the scheduler's σ grid, VAE decode, fine-tuning
    setup, reference view, LoRA export."""

    kind = "diffusers"
    pipeline_class = ""  # the diffusers pipeline class the model folder holds
    display_name = "diffusers"  # the family's name in messages

    def __init__(
        self, pipe, resolution: int, max_sequence_length: int, path: str = "", transformer=None, width: int = 0
    ):
        super().__init__()
        self.transformer = pipe.transformer if transformer is None else transformer
        self.vae = pipe.vae
        # The pipeline holds the text encoders and tokenizers; kept out of the module tree (frozen, never trained,
        # never checkpointed) so `parameters()` and `state_dict()` are the transformer's (and the VAE's buffers).
        self._pipe = [pipe]
        for enc in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            m = getattr(pipe, enc, None)
            if m is not None:
                m.requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        self.resolution = resolution
        self.width = width or resolution
        self.max_sequence_length = max_sequence_length
        self.path = path
        self.latent_shape = self._latent_shape(resolution, self.width)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._lora = False

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (a 2-D AutoencoderKL: 2 ** (levels − 1))."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """One sample's latent shape for height × width pixels ([C, H/s, W/s]); both must fill whole 2×2 patches
        of latent cells (the transformers' patch size)."""
        check_image_size(height, width, 2 * self.vae_scale)
        return (int(self.vae.config.latent_channels), height // self.vae_scale, width // self.vae_scale)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: torch.dtype = torch.bfloat16, resolution: int = 512, max_sequence_length: int = 0,
        width: int = 0, **options,
    ) -> DiffusersFlowModel:  # fmt: skip
        """The model over `<pipeline_class>.from_pretrained(path)`; max_sequence_length 0 = the pipeline's default,
        `options` what the family's __init__ takes besides (FLUX's guidance, a video model's frames)."""
        pipe = _load_pipeline(cls.pipeline_class, path, dtype, f"{cls.display_name} model")
        length = max_sequence_length or cls.pipeline_max_sequence_length
        return cls(pipe, resolution, length, path, width=width, **options)

    @classmethod
    def load(cls, mc) -> DiffusersFlowModel:
        """`from_pretrained` with the config's path, dtype, size and text length (and what `_load_options` adds)."""
        return cls.from_pretrained(
            mc.model_path, dtype=torch_dtype(mc.dtype), resolution=mc.resolution,
            max_sequence_length=mc.max_sequence_length, width=getattr(mc, "width", 0), **cls._load_options(mc),
        )  # fmt: skip

    @classmethod
    def _load_options(cls, mc) -> dict:
        return {}

    @property
    def lora(self) -> bool:
        return self._lora

    @property
    def pipe(self):
        return self._pipe[0]

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's weight dtype as diffusers reports it (the pipelines' transformer dtype): it skips the
        parameters a class keeps in fp32 (`_keep_in_fp32_modules`, e.g. Wan's scale_shift_table)."""
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, *args, **kwargs):  # the pipeline's text encoders follow the transformer
        super().to(*args, **kwargs)
        self.pipe.to(self.device)
        return self

    def offloadable_modules(self) -> dict[str, nn.Module]:
        """The pipeline's text encoders (their embeddings are cached on the CPU and the rollout keeps every
        sample's conditioning) and the VAE (it decodes rollouts and evaluation images): the training passes call
        neither."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        encoders = {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}
        return {**encoders, "vae": self.vae}

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to training behaviour (T5 dropout would make runs random)
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "resolution": self.resolution, "width": self.width,
                "lora": self.lora}  # fmt: skip

    # -- conditioning ------------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-prompt embeddings, computed once per distinct prompt and cached on the CPU."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            enc = self._encode_uncached(missing)
            for j, p in enumerate(missing):
                self._cache[p] = {k: v[j].detach().to("cpu") for k, v in enc.items()}
        keys = self._cache[prompts[0]].keys()
        return {k: torch.stack([self._cache[p][k] for p in prompts]).to(self.device) for k in keys}

    # -- the σ grid ---------------------------------------------------------------------------------------
    def sigma_schedule(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The σ grid (fp32 [T + 1], ending in 0) the diffusers pipeline samples with for `num_steps`: its own
        scheduler, set exactly as the pipeline's __call__ sets it (`_scheduler_kwargs`), on a copy so the pipeline's
        state is untouched. `shift` overrides the scheduler config's shift (None: the config's)."""
        return self._set_scheduler(num_steps, shift).sigmas.float().cpu()

    def _set_scheduler(self, num_steps: int, shift: float | None):
        """A copy of the pipeline's scheduler after `retrieve_timesteps` as its __call__ makes it (sigma_schedule)."""
        if num_steps < 1:
            raise FdfoError(f"num_steps must be >= 1, got {num_steps}")
        import copy

        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        scheduler = copy.deepcopy(self.pipe.scheduler)
        if shift is not None:
            if not shift > 0:
                raise FdfoError(f"time shift must be > 0, got {shift}")
            if scheduler.config.get("use_dynamic_shifting", False):  # the shift then comes from mu, never `shift`
                raise FdfoError(f"--shift {shift:g}: the {self.display_name} scheduler shifts dynamically (from the "
                                "image size); leave --shift at 0")  # fmt: skip
            # the name the scheduler reads: FlowMatchEuler's `shift`, UniPC's (Wan's) `flow_shift`
            key = "flow_shift" if "flow_shift" in scheduler.config else "shift"
            scheduler = type(scheduler).from_config(scheduler.config, **{key: float(shift)})
        retrieve_timesteps(scheduler, num_steps, "cpu", **self._scheduler_kwargs(scheduler, num_steps))
        return scheduler

    def _image_seq_len(self) -> int:
        raise NotImplementedError

    def _scheduler_kwargs(self, scheduler, num_steps: int) -> dict:
        raise NotImplementedError

    # -- decode ------------------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (fp32) through the VAE: z / scaling_factor + shift_factor, decode."""
        cfg = self.vae.config
        z = x0 / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.no_grad():
            images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return images.float().clamp(-1, 1)

    # -- fine-tuning -------------------------------------------------------------------------------------
    def setup_finetune(self, mc) -> list[nn.Parameter]:
        """Freeze what is not trained; return the trainable parameters (LoRA factors, or the whole transformer).

        mc.finetune full | lora; mc.lora_rank, mc.lora_alpha; mc.lora_targets: comma-separated peft target_modules
        (module-name suffixes), "auto" = this model's recipe list (`lora_recipe_targets`). Targets that match no
        module are dropped with a warning; none matching is an error. mc.gradient_checkpointing."""
        mode = mc.finetune
        self.requires_grad_(False)
        if mode == "lora":
            try:
                from peft import LoraConfig
            except ImportError:
                raise FdfoError(
                    "--finetune lora needs peft: pip install -e '.[diffusers]' in the fdfo_fast checkout"
                ) from None
            init_lora = getattr(mc, "init_lora", "")
            if init_lora:
                self._load_init_lora(Path(init_lora), mc)
            else:
                lora_targets = parse_lora_targets(mc.lora_targets)
                if lora_targets == ("auto",):
                    lora_targets = self.lora_recipe_targets
                targets = _matching_lora_targets(self.transformer, lora_targets)
                config = LoraConfig(
                    r=mc.lora_rank, lora_alpha=mc.lora_alpha, init_lora_weights="gaussian", target_modules=targets
                )
                try:
                    self.transformer.add_adapter(config)
                except ValueError as err:  # e.g. a target that names a module peft cannot adapt (not a Linear)
                    raise FdfoError(f"--lora-targets {','.join(lora_targets)}: {err}") from None
                self._lora_to_fp32()
            self._lora = True
        elif mode == "full":
            self.transformer.requires_grad_(True)
        else:
            raise FdfoError(f"--finetune must be full or lora, got {mode!r}")
        if mc.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        return [p for p in self.parameters() if p.requires_grad]

    def _lora_to_fp32(self) -> None:
        """LoRA factors train in fp32 even when the frozen base is bf16 (optimizer state and updates need it)."""
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)

    def _load_init_lora(self, directory: Path, mc) -> None:
        """--init-lora: the adapter in `directory` becomes the trained adapter ("default"), with its own rank, alpha
        and targets. A PEFT folder (adapter_config.json + adapter_model.safetensors) is read by peft
        (PeftConfig.from_pretrained, load_peft_weights); otherwise a diffusers file (pytorch_lora_weights.safetensors)
        is loaded by the pipeline's own `load_lora_weights`, which reads its metadata (α; without it diffusers takes
        α = r) and converts the formats diffusers knows. The factors are then copied again into fp32 parameters (the
        loaders round them to the base dtype) and every key must match the model's adapter."""
        what = f"--init-lora {directory}"
        if not directory.is_dir():
            raise FdfoError(f"{what} does not exist or is not a folder")
        try:
            from peft.tuners.lora import LoraLayer
            from peft.utils import load_peft_weights
        except ImportError:
            raise FdfoError("--init-lora needs peft: pip install -e '.[diffusers]' in the fdfo_fast checkout") from None
        if (directory / "adapter_config.json").is_file():
            from peft import LoraConfig, PeftConfig

            fmt = "PEFT"
            try:
                config = PeftConfig.from_pretrained(str(directory))
            except Exception as err:  # json / unknown fields / unknown peft_type
                raise FdfoError(f"{what}: adapter_config.json cannot be read: {_first_line(err)}") from None
            if not isinstance(config, LoraConfig):
                raise FdfoError(f"{what} holds a {config.peft_type} adapter, not a LoRA")
            config.inference_mode = False
            try:
                self.transformer.add_adapter(config)
                state = load_peft_weights(str(directory), device="cpu")
            except Exception as err:  # a target that is not in this transformer, a missing weights file
                raise FdfoError(f"{what} does not match the model: {_first_line(err)}") from None
            state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        elif (directory / "pytorch_lora_weights.safetensors").is_file():
            fmt = "diffusers"
            try:
                out = type(self.pipe).lora_state_dict(str(directory), return_lora_metadata=True)
            except Exception as err:
                raise FdfoError(
                    f"{what}: pytorch_lora_weights.safetensors cannot be read: {_first_line(err)}"
                ) from None
            state = out[0] if isinstance(out, tuple) else out
            other = [k for k in state if not k.startswith("transformer.")]
            if other:
                raise FdfoError(f"{what} holds LoRA weights outside the transformer (e.g. {other[0]}): fdfo_fast "
                                "trains the transformer's only")  # fmt: skip
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            if state and "lora_A" not in next(iter(state)):
                from diffusers.utils import convert_unet_state_dict_to_peft

                state = convert_unet_state_dict_to_peft(state)
            try:  # into the pipeline's transformer: this model's (setup_finetune runs on the policy)
                self.pipe.load_lora_weights(str(directory), adapter_name="default")
            except Exception as err:  # targets that are not in this transformer, shapes of another model
                raise FdfoError(f"{what} does not match the model: {_first_line(err)}") from None
        else:
            raise FdfoError(
                f"{what} holds no LoRA: expected pytorch_lora_weights.safetensors (diffusers) or adapter_config.json + "
                "adapter_model.safetensors (PEFT)"
            )
        self._lora_to_fp32()
        self._copy_lora_state(state, what)
        layers = {n: m for n, m in self.transformer.named_modules() if isinstance(m, LoraLayer)}
        ranks = sorted({m.r["default"] for m in layers.values()})
        alphas = sorted({float(m.lora_alpha["default"]) for m in layers.values()})
        self._check_init_lora_shape(what, mc, ranks, alphas, sorted(layers))
        _log.info("%s (%s format): rank %s, alpha %s on %d modules", what, fmt, "/".join(map(str, ranks)),
                  "/".join(f"{a:g}" for a in alphas), len(layers))  # fmt: skip

    def _copy_lora_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Copy an adapter's factors (keys as peft's get_peft_model_state_dict names them) into the "default"
        adapter; one FdfoError on missing, unexpected or mis-shaped keys."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        own = get_peft_model_state_dict(self.transformer)
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]  # fmt: skip
        if missing or extra or shapes:
            found = (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes))
            parts = [f"{label} {len(keys)} keys (e.g. {keys[0]})" for label, keys in found if keys]
            raise FdfoError(f"{what} does not match the model: " + "; ".join(parts))
        with torch.no_grad():
            set_peft_model_state_dict(self.transformer, state, "default")

    def _check_init_lora_shape(self, what: str, mc, ranks: list, alphas: list, modules: list[str]) -> None:
        """The adapter's rank, alpha and targets are the run's; a --lora-rank / --lora-alpha / --lora-targets set
        away from its default (command line, preset or YAML) is a request, refused when the adapter disagrees."""
        from fdfo_fast.config import ModelConfig

        default = ModelConfig()
        if mc.lora_rank != default.lora_rank and ranks != [mc.lora_rank]:
            raise FdfoError(f"{what} has rank {'/'.join(map(str, ranks))}, not --lora-rank {mc.lora_rank}: drop "
                            "--lora-rank (the adapter's is used) or make it match")  # fmt: skip
        if mc.lora_alpha != default.lora_alpha and alphas != [float(mc.lora_alpha)]:
            have = "/".join(f"{a:g}" for a in alphas)
            raise FdfoError(f"{what} has alpha {have}, not --lora-alpha {mc.lora_alpha:g}: drop --lora-alpha (the "
                            "adapter's is used) or make it match")  # fmt: skip
        if mc.lora_targets != default.lora_targets:
            from peft import LoraConfig
            from peft.tuners.tuners_utils import check_target_module_exists

            targets = parse_lora_targets(mc.lora_targets)
            if targets == ("auto",):
                targets = self.lora_recipe_targets
            config = LoraConfig(target_modules=list(targets))
            from peft.tuners.lora import LoraLayer

            # the modules as they were before the adapter wrapped them (a wrapped Linear keeps its name)
            wanted = sorted(n for n, m in self.transformer.named_modules()
                            if isinstance(m, (nn.Linear, LoraLayer)) and ".base_layer" not in n and ".lora_" not in n
                            and check_target_module_exists(config, n))  # fmt: skip
            if wanted != modules:
                raise FdfoError(f"{what} adapts {len(modules)} modules, --lora-targets {mc.lora_targets} selects "
                                f"{len(wanted)} (not the same set): drop --lora-targets (the adapter's are used) or "
                                "make them match")  # fmt: skip

    def lora_summary(self) -> dict:
        """The trained adapter's shape (rank, alpha, target modules), as peft holds it (for the model card)."""
        if not self.lora:
            return {}
        config = self.transformer.peft_config["default"]
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        patterns = {"rank_pattern": dict(config.rank_pattern or {}), "alpha_pattern": dict(config.alpha_pattern or {})}
        return {"rank": config.r, "alpha": config.lora_alpha, "targets": targets, **patterns}

    @property
    def export_name(self) -> str:
        return "lora" if self.lora else "transformer"

    def export_weights(self, directory: str | Path) -> Path:
        """The trained weights for diffusers: the LoRA (export_lora) or the full transformer (export_transformer)."""
        return self.export_lora(directory) if self.lora else self.export_transformer(directory)

    def export_transformer(self, directory: str | Path) -> Path:
        """The fine-tuned transformer as its own `save_pretrained` writes it (config.json + safetensors shards):
        `SD3Transformer2DModel.from_pretrained(dir)`, or a pipeline built with `transformer=` it. Under ZeRO-3 the
        caller holds the gathered weights (RunCheckpoint, engine.gathered())."""
        if self.lora:
            raise FdfoError("export_transformer: this run trains a LoRA; its export is export_lora")
        directory = Path(directory)
        self.transformer.save_pretrained(str(directory), safe_serialization=True)
        return directory

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise FdfoError(f"{where}: trainable weights do not match (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, v in state.items():
                if own[n].shape != v.shape:
                    raise FdfoError(f"{where}: {n} has shape {tuple(v.shape)}, the model {tuple(own[n].shape)}")
                own[n].copy_(v)

    @contextlib.contextmanager
    def adapters_disabled(self):
        if not self.lora:
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def _init_kwargs(self) -> dict:
        return {"resolution": self.resolution, "max_sequence_length": self.max_sequence_length, "path": self.path,
                "width": self.width}  # fmt: skip

    def reference_model(self) -> FlowModel:
        """The frozen base model: LoRA -> this model with adapters off (no copy); full -> a frozen copy of the
        transformer sharing the pipeline, the VAE and the prompt cache."""
        if self.lora:
            return _AdaptersOff(self).requires_grad_(False).eval()
        import copy

        frozen = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        ref = type(self)(self.pipe, transformer=frozen, **self._init_kwargs())
        ref._cache = self._cache
        return ref.requires_grad_(False).eval()

    def _apply_attention_backend(self, chosen: str) -> None:
        self.transformer.set_attention_backend({"sdpa": "native", "flash": "flash", "xformers": "xformers"}[chosen])

    def export_lora(self, directory: str | Path) -> Path:
        """Write the LoRA into `directory` in both formats the recipes load, each with its r, α and targets:
        - diffusers: `pytorch_lora_weights.safetensors` with the adapter metadata (`pipe.load_lora_weights(dir)`;
          without the metadata diffusers would assume α = r);
        - PEFT: `adapter_config.json` + `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them
          (`PeftModel.from_pretrained(transformer, dir)`, how the FDFO reference code and Flow-GRPO load a LoRA).
        diffusers picks its own file by name, so the two never mix."""
        if not self.lora:
            raise FdfoError("export_lora: this run fine-tunes the full transformer, there is no LoRA to export")
        import copy

        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
        config = self.transformer.peft_config["default"]
        # the metadata diffusers' own ModelMixin.save_lora_adapter writes: the adapter's LoraConfig as a dict
        type(self.pipe).save_lora_weights(
            str(directory), transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
        )
        # PeftModel.save_pretrained's layout: keys under the PeftModel prefix, the config in inference mode with the
        # auto-mapping of a non-transformers base model
        save_file(
            {f"base_model.model.{k}": v for k, v in layers.items()},
            str(directory / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        peft_config = copy.deepcopy(config)
        peft_config.inference_mode = True
        base = type(self.transformer)
        peft_config.save_pretrained(
            str(directory), auto_mapping_dict={"base_model_class": base.__name__, "parent_library": base.__module__}
        )
        return directory


def check_image_size(height: int, width: int, multiple: int) -> None:
    """Both sizes are multiples of `multiple` pixels (whole transformer patches of latent cells): one clear error
    instead of a pipeline that would round them down."""
    for name, px in (("resolution", height), ("width", width)):
        if px % multiple:
            raise FdfoError(f"{name} {px} must be a multiple of {multiple} for this VAE")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _dynamic_shift_mu(scheduler, image_seq_len: int, default_max_shift: float) -> float:
    """The pipelines' `mu` for resolution-dependent shifting: diffusers' calculate_shift on the scheduler config,
    with the pipeline's own fallback max_shift (SD3: 1.16, FLUX: 1.15)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler.config.get
    return calculate_shift(
        image_seq_len,
        get("base_image_seq_len", 256),
        get("max_image_seq_len", 4096),
        get("base_shift", 0.5),
        get("max_shift", default_max_shift),
    )


class _AdaptersOff(FlowModel):
    """Calls a LoRA model with its adapters disabled: the frozen base model without a second copy of the weights.
    It owns no parameters (they belong to the policy), so it has nothing to train, load or checkpoint."""

    def __init__(self, model: DiffusersFlowModel):
        super().__init__()
        self._model = [model]  # not a registered submodule: its parameters belong to the policy
        self.latent_shape = model.latent_shape

    @property
    def kind(self) -> str:
        return self._model[0].kind

    @classmethod
    def load(cls, mc):
        raise FdfoError("the LoRA reference model comes from the policy's reference_model(), it is not loaded")

    def forward(self, x, sigma, cond):
        model = self._model[0]
        with model.adapters_disabled():
            return model(x, sigma, cond)

    def encode_prompts(self, prompts):
        return self._model[0].encode_prompts(prompts)

    def encode_negative(self, n: int):
        return self._model[0].encode_negative(n)

    @property
    def linear_guidance(self) -> bool:
        return self._model[0].linear_guidance

    def combine_guidance(self, v_c, v_u, cfg_scale):
        return self._model[0].combine_guidance(v_c, v_u, cfg_scale)

    def decode(self, x0):
        return self._model[0].decode(x0)

    def sigma_schedule(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        return self._model[0].sigma_schedule(num_steps, shift)

    def _frozen(self, what: str):
        raise FdfoError(f"{what}: the LoRA reference model is frozen (it is the policy with its adapters off)")

    def setup_finetune(self, mc):
        self._frozen("setup_finetune")

    def trainable_state_dict(self):
        self._frozen("trainable_state_dict")

    def load_trainable_state_dict(self, state, where):
        self._frozen("load_trainable_state_dict")

    def reference_model(self):
        return self

    def set_attention_backend(self, choice: str) -> str:  # the policy's transformer is this model's
        return self._model[0].set_attention_backend(choice)

    def describe(self) -> dict:
        return {**self._model[0].describe(), "adapters": "off"}


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5
# ---------------------------------------------------------------------------------------------------------------
class SD3FlowModel(DiffusersFlowModel):
    """SD3 / SD3.5 (MMDiT): CLIP-L + CLIP-G + T5 conditioning, CFG with the empty prompt."""

    kind = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    display_name = "SD3"
    pipeline_max_sequence_length = 256
    lora_recipe_targets = _ATTN_LORA_TARGETS

    def _encode_uncached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def _scheduler_kwargs(self, scheduler, num_steps: int) -> dict:
        """StableDiffusion3Pipeline.__call__: no sigmas; `mu` only with dynamic shifting (SD3.5 has none), from the
        latent token count and the config's base/max shift (the pipeline's fallback max_shift is 1.16)."""
        if not scheduler.config.get("use_dynamic_shifting", None):
            return {}
        p = self.transformer.config.patch_size
        return {"mu": _dynamic_shift_mu(scheduler, (self.latent_shape[1] // p) * (self.latent_shape[2] // p), 1.16)}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return self.transformer(
            hidden_states=x.to(self.dtype),
            # the scheduler's fp32 timesteps σ·1000, as the pipeline and the reference code pass them (a bf16 copy
            # would be off by up to 2 timestep units)
            timestep=sigma.float() * 1000,
            encoder_hidden_states=cond["embeds"].to(self.dtype),
            pooled_projections=cond["pooled"].to(self.dtype),
            return_dict=False,
        )[0]


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1
# ---------------------------------------------------------------------------------------------------------------
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's token sequence [B, (H/2)(W/2), 4C] of 2×2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `pack_latents`."""
    c, h, w = shape
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class GuidanceDistilledFlowModel(DiffusersFlowModel):
    """A guidance-distilled family (FLUX.1, FLUX.2): the guidance scale is a model input (`--flux-guidance`; 0 = the
    pipeline's default), there is no CFG."""

    guidance_distilled = True
    default_guidance: float = 3.5  # the pipeline's default guidance_scale

    def __init__(
        self, pipe, resolution, max_sequence_length, path="", transformer=None, width: int = 0, guidance: float = 0.0
    ):
        super().__init__(pipe, resolution, max_sequence_length, path, transformer, width)
        self.guidance = guidance or self.default_guidance

    def _init_kwargs(self) -> dict:
        return {**super()._init_kwargs(), "guidance": self.guidance}

    @classmethod
    def _load_options(cls, mc) -> dict:
        return {"guidance": mc.flux_guidance}  # the distilled guidance scale fed to the model (0 = the default)

    def describe(self) -> dict:
        return {**super().describe(), "guidance": self.guidance}


class FluxFlowModel(GuidanceDistilledFlowModel):
    """FLUX.1 (guidance-distilled; dev/schnell alike)."""

    kind = "flux"
    pipeline_class = "FluxPipeline"
    display_name = "FLUX"
    default_guidance = 3.5  # FluxPipeline.__call__(guidance_scale=3.5)
    pipeline_max_sequence_length = 512
    lora_recipe_targets = (
        *_ATTN_LORA_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )  # fmt: skip

    def _scheduler_kwargs(self, scheduler, num_steps: int) -> dict:
        """FluxPipeline.__call__: sigmas linspace(1, 1/T, T) (none with use_flow_sigmas) and the resolution-dependent
        `mu` of dynamic shifting from the packed image token count (the pipeline's fallback max_shift is 1.15)."""
        import numpy as np

        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        seq_len = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        return {"sigmas": sigmas, "mu": _dynamic_shift_mu(scheduler, seq_len, 1.15)}

    def _encode_uncached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"embeds": embeds, "pooled": pooled}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        # positional ids: (0, row, col) per image token, zeros per text token (as FluxPipeline builds them)
        rows = torch.arange(h // 2, device=x.device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=x.device).repeat(h // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], 1).to(self.dtype)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=x.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x.to(self.dtype)),
            # FluxPipeline passes timestep.to(latents dtype) / 1000 with timestep = σ·1000 (fp32): the same here
            timestep=(sigma.float() * 1000).to(self.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"].to(self.dtype),
            encoder_hidden_states=cond["embeds"].to(self.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return unpack_latents(out, (c, h, w))
