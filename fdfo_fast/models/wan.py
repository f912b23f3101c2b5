"""Wan2.1 text-to-video (diffusers' `WanPipeline`: `WanTransformer3DModel`, `AutoencoderKLWan`, UMT5) behind the
flow-model interface.

Every detail follows `diffusers/pipelines/wan/pipeline_wan.py` (WanPipeline):
- latents [B, z_dim, (F − 1)/4 + 1, H/8, W/8] (`prepare_latents`, the VAE config's scale_factor_temporal / _spatial);
  height and width multiples of 8·2 (the (1, 2, 2) patches, `__call__`'s h_multiple_of), F = 4k + 1;
- prompts through the pipeline's own `encode_prompt` (prompt_clean, UMT5 over max_length tokens, the embeddings cut
  to the true length and zero-padded to max_sequence_length, 512 by default); the unconditional branch of CFG is
  the empty prompt (`encode_prompt`: `negative_prompt or ""`), combined linearly (`noise_uncond + w·(noise_pred −
  noise_uncond)`, guidance_scale 5.0 by default);
- the σ grid: `__call__` calls `scheduler.set_timesteps(num_inference_steps)` with nothing else (no sigmas, no mu);
  the transformer gets that scheduler's timestep `t.expand(B)` as it is: FlowMatchEulerDiscreteScheduler's fp32
  σ·1000, UniPCMultistepScheduler's int64 ⌊σ·1000⌋ (its set_timesteps casts them to int64);
- decode: `latents / (1 / latents_std) + latents_mean` per channel (the VAE config's lists), then `vae.decode`.

The hub's Wan2.1-T2V-*-Diffusers repos ship UniPCMultistepScheduler (flow_prediction, use_flow_sigmas, flow_shift 3.0;
the pipeline docs use 5.0 for 720p). With it the pipeline integrates with UniPC's multistep predictor-corrector on
that σ grid; our samplers take Euler / churn / SDE steps on the same grid (σ_0 = 1 − 1e-6, as UniPC sets it), which
is what the Flow-GRPO Wan recipe does (flow_grpo/diffusers_patch/wan_pipeline_with_logprob.py: `sde_step_with_logprob`
on `UniPCMultistepScheduler.sigmas`, the transformer called with the scheduler's int64 timesteps). With a
FlowMatchEulerDiscreteScheduler config the deterministic Euler sampler is the pipeline's own integrator
(tests/test_wan.py compares them).
"""

from __future__ import annotations

import copy

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.models.diffusers_flow import DiffusersFlowModel

# DiffSynth-Studio's Wan2.1 LoRA recipe (examples/wanvideo/model_training/lora/Wan2.1-T2V-1.3B.sh:
# --lora_target_modules "q,k,v,o,ffn.0,ffn.2", rank 32) in diffusers' module names: the self-attention attn1 and the
# text cross-attention attn2 (q, k, v, out) of every block and both linears of the feed-forward. finetrainers' Wan LoRA
# recipe adapts the same attention projections ("blocks.*(to_q|to_k|to_v|to_out.0)"), without the feed-forward.
WAN_LORA_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)  # fmt: skip

PIPELINE_NUM_FRAMES = 81  # WanPipeline.__call__'s default num_frames (5 s at 16 fps)


class WanFlowModel(DiffusersFlowModel):
    """Wan2.1 T2V (1.3B / 14B): one transformer, UMT5 conditioning, CFG with the empty prompt, videos of
    `num_frames` frames (4k + 1; 0 = the pipeline's 81) at resolution × width pixels (Wan2.1's 480p: 480 × 832)."""

    kind = "wan"
    pipeline_class = "WanPipeline"
    display_name = "Wan2.1"
    negative_prompt = ""  # WanPipeline.encode_prompt: negative_prompt or ""
    pipeline_max_sequence_length = 512  # WanPipeline.__call__'s max_sequence_length
    lora_recipe_targets = WAN_LORA_TARGETS
    makes_videos = True  # latents [z_dim, F', h, w], decoded to videos [B, 3, F, H, W]
    frames_per_latent_frame = 4  # Wan2.1's VAE (scale_factor_temporal): the config checks --num-frames = 4k + 1

    def __init__(
        self, pipe, resolution, max_sequence_length, path="", transformer=None, width: int = 0, num_frames: int = 0
    ):
        # read by _latent_shape, which DiffusersFlowModel.__init__ calls
        self.num_frames = num_frames or PIPELINE_NUM_FRAMES
        temporal = int(pipe.vae.config.scale_factor_temporal)
        if self.num_frames % temporal != 1:  # WanPipeline.__call__ would round it down to 4k + 1 with a warning
            raise FdfoError(f"--num-frames must be {temporal}k + 1 for Wan2.1 (e.g. 33, 49, 81), got {num_frames}")
        super().__init__(pipe, resolution, max_sequence_length, path, transformer, width)
        if pipe.config.get("boundary_ratio") is not None or pipe.config.get("expand_timesteps"):
            raise FdfoError(f"{path or 'the pipeline'} is a Wan2.2 pipeline (two transformers or expanded timesteps); "
                            "--model wan supports Wan2.1 T2V")  # fmt: skip
        # WanPipeline's documented usage loads the VAE in fp32 beside a bf16 transformer (pipeline_wan.py's example:
        # AutoencoderKLWan.from_pretrained(..., torch_dtype=torch.float32)); __call__ then decodes in the VAE's dtype
        if self.vae.dtype != torch.float32:
            self.vae.to(torch.float32)
        self._timestep_scheduler = None  # the scheduler `_integer_timesteps` was worked out for
        self._timesteps_are_integers = False
        self._grid_timesteps: dict[float, int] = {}  # UniPC: grid σ (fp32) -> the scheduler's own timestep
        self._timestep_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def _load_options(cls, mc) -> dict:
        return {"num_frames": mc.num_frames}

    def _init_kwargs(self) -> dict:
        return {**super()._init_kwargs(), "num_frames": self.num_frames}

    def describe(self) -> dict:
        return {**super().describe(), "num_frames": self.num_frames}

    # -- shapes ------------------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: AutoencoderKLWan's scale_factor_spatial (WanPipeline.vae_scale_factor_spatial;
        the VAE has no block_out_channels)."""
        return int(self.vae.config.scale_factor_spatial)

    @property
    def vae_scale_temporal(self) -> int:
        """Frames per latent frame after the first (WanPipeline.vae_scale_factor_temporal)."""
        return int(self.vae.config.scale_factor_temporal)

    def _latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """[z_dim, (F − 1)/4 + 1, H/8, W/8] (WanPipeline.prepare_latents); H and W multiples of 8 · patch (16, as
        __call__'s h_multiple_of / w_multiple_of: it would round them down with a warning)."""
        patch = self.transformer.config.patch_size
        for name, px, p in (("resolution", height, patch[1]), ("width", width, patch[2])):
            if px % (self.vae_scale * p):
                raise FdfoError(f"{name} {px} must be a multiple of {self.vae_scale * p} for Wan2.1")
        frames = (self.num_frames - 1) // self.vae_scale_temporal + 1
        return (int(self.vae.config.z_dim), frames, height // self.vae_scale, width // self.vae_scale)

    # -- conditioning ------------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"embeds": embeds}

    # -- the σ grid ---------------------------------------------------------------------------------------
    def _scheduler_kwargs(self, scheduler, num_steps: int) -> dict:
        """WanPipeline.__call__: `scheduler.set_timesteps(num_inference_steps, device=device)`, nothing else."""
        return {}

    def sigma_schedule(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The pipeline's grid (DiffusersFlowModel); with a scheduler whose timesteps are integers (UniPC) each grid σ's
        timestep is also kept, as the scheduler made it, for `_timestep`."""
        self._integer_timesteps()  # binds the table to the pipeline's current scheduler before it is filled
        scheduler = self._set_scheduler(num_steps, shift)
        sigmas = scheduler.sigmas.float().cpu()
        if not scheduler.timesteps.dtype.is_floating_point:
            for sigma, t in zip(sigmas[: len(scheduler.timesteps)].tolist(), scheduler.timesteps.tolist(), strict=True):
                self._grid_timesteps[sigma] = int(t)
            self._timestep_tables.clear()  # rebuilt (per device) on the next call
        return sigmas

    def reference_model(self):
        """As DiffusersFlowModel's; a full fine-tune's frozen copy shares the grids' timesteps (it is never asked for
        a σ grid itself, and must hand its transformer the policy's timesteps)."""
        ref = super().reference_model()
        if not self.lora:
            ref._grid_timesteps, ref._timestep_tables = self._grid_timesteps, self._timestep_tables
            ref._timestep_scheduler, ref._timesteps_are_integers = (
                self._timestep_scheduler,
                self._timesteps_are_integers,
            )
        return ref

    def _integer_timesteps(self) -> bool:
        """Whether the pipeline's scheduler hands the transformer integer timesteps (UniPC's int64) rather than fp32
        σ·1000 (FlowMatchEuler); worked out once per scheduler object on a copy of it."""
        scheduler = self.pipe.scheduler
        if self._timestep_scheduler is not scheduler:
            probe = copy.deepcopy(scheduler)
            probe.set_timesteps(2, device="cpu")
            self._timesteps_are_integers = not probe.timesteps.dtype.is_floating_point
            self._timestep_scheduler = scheduler
            self._grid_timesteps.clear()
            self._timestep_tables.clear()
        return self._timesteps_are_integers

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ [B] -> the timestep tensor WanPipeline.__call__ passes for it (`t.expand(B)`, t from the scheduler).
        UniPC's are its own int64 timesteps of the grid (its set_timesteps rounds σ·1000 in float64 from σs that our
        fp32 grid only approximates, so recomputing them is off by one at some step counts and shifts): looked up
        with tensor ops (CUDA-graph safe) among the grids `sigma_schedule` made, ⌊σ·1000⌋ for any other σ."""
        scale = float(self.pipe.scheduler.config.num_train_timesteps)
        if not self._integer_timesteps():
            return sigma.float() * scale
        fallback = (sigma.double() * scale).to(torch.int64)
        if not self._grid_timesteps:
            return fallback
        table = self._timestep_tables.get(sigma.device)
        if table is None:
            keys = torch.tensor(list(self._grid_timesteps), dtype=torch.float32)
            values = torch.tensor(list(self._grid_timesteps.values()), dtype=torch.int64)
            table = self._timestep_tables[sigma.device] = (keys.to(sigma.device), values.to(sigma.device))
        keys, values = table
        hit = sigma.float()[:, None] == keys[None, :]  # [B, K]: σ is exactly a grid value
        found = values[hit.int().argmax(1)]
        return torch.where(hit.any(1), found, fallback)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return self.transformer(
            hidden_states=x.to(self.dtype),  # latent_model_input = latents.to(transformer_dtype)
            timestep=self._timestep(sigma),
            encoder_hidden_states=cond["embeds"].to(self.dtype),  # prompt_embeds.to(transformer_dtype)
            return_dict=False,
        )[0]

    # -- decode ------------------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, z_dim, F', h, w] -> videos [B, 3, F, H, W] in [-1, 1] (fp32), as WanPipeline.__call__ decodes:
        latents / (1 / latents_std) + latents_mean per channel, in the VAE's dtype, then `vae.decode`."""
        cfg = self.vae.config
        z = x0.to(self.vae.dtype)
        view = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(view).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(view).to(z.device, z.dtype)
        with torch.no_grad():
            video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]
        return video.float().clamp(-1, 1)
