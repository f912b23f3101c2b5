"""Qwen-Image (diffusers' `QwenImagePipeline`) behind the flow-model interface.

Everything below follows diffusers/pipelines/qwenimage/pipeline_qwenimage.py (`QwenImagePipeline`):
- conditioning: the pipeline's own `encode_prompt` (Qwen2.5-VL's last hidden state of the prompt in its chat
  template, the template's first `prompt_template_encode_start_idx` tokens dropped, each prompt its own length).
  The cache needs per-prompt shapes that do not depend on the prompt, so every embedding is right-padded with zeros
  to `max_sequence_length` and carries its `encoder_hidden_states_mask` (1 = a token, 0 = padding): the transformer
  masks the padding out of the joint attention (QwenDoubleStreamAttnProcessor2_0) and the text RoPE positions of
  the real tokens do not move (QwenEmbedRope takes them from the start of the text), so padding changes the output
  by rounding only (tests/test_qwen_image.py measures it).
- latents: [C, H/s, W/s] with s = 2 ** len(vae.temperal_downsample); the transformer sees them packed in 2×2
  patches (`_pack_latents`, FLUX's layout) with `img_shapes` [(1, H/2, W/2)]; the VAE is a video VAE, so decode
  adds the one-frame axis and undoes the latent normalisation (latents · std + mean) as __call__ does.
- true CFG with the negative prompt: v = comb · ‖v_c‖ / ‖comb‖, comb = v_u + w·(v_c − v_u), the norms per packed
  token (over its 4C channels), so guidance is not the linear combine (`linear_guidance = False`).
- the σ grid: `sigmas = linspace(1, 1/T, T)` and `mu` from the packed image token count, as __call__ passes them
  to `retrieve_timesteps`; the transformer gets the pipeline's timestep (σ·1000 in the latents' dtype) / 1000.
"""

from __future__ import annotations

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.models.diffusers_flow import DiffusersFlowModel, check_image_size, pack_latents, unpack_latents

# diffusers examples/dreambooth/train_dreambooth_lora_qwen_image.py: without --lora_layers the LoRA goes on
# target_modules = ["to_k", "to_q", "to_v", "to_out.0"] (the image stream's attention projections of every block;
# peft matches each as a module-name suffix).
_DREAMBOOTH_QWEN_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class QwenImageFlowModel(DiffusersFlowModel):
    """Qwen-Image: a 60-block MMDiT on Qwen2.5-VL text features, true CFG with a negative prompt."""

    kind = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    display_name = "Qwen-Image"
    # the negative prompt of the public recipes: QwenImagePipeline's docstring ("even an empty negative prompt like
    # " " should enable classifier-free guidance"), diffusers' Qwen-Image docs and Flow-GRPO's Qwen-Image scripts
    # (scripts/train_qwenimage_edit_plus.py: negative_prompt=[" "] * len(prompts))
    negative_prompt = " "
    linear_guidance = False  # the pipeline rescales the combined prediction to the conditional one's norm
    pipeline_max_sequence_length = 512  # QwenImagePipeline.__call__(max_sequence_length=512)
    lora_recipe_targets = _DREAMBOOTH_QWEN_LORA_TARGETS

    def __init__(
        self, pipe, resolution: int, max_sequence_length: int, path: str = "", transformer=None, width: int = 0
    ):
        if max_sequence_length > 1024:  # QwenImagePipeline.check_inputs refuses the same
            raise FdfoError(f"max_sequence_length must be <= 1024 for Qwen-Image, got {max_sequence_length}")
        transformer_config = (pipe.transformer if transformer is None else transformer).config
        if transformer_config.guidance_embeds:
            raise FdfoError("a guidance-distilled Qwen-Image transformer (guidance_embeds) is not supported")
        super().__init__(pipe, resolution, max_sequence_length, path, transformer, width)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: QwenImagePipeline's vae_scale_factor, 2 ** len(vae.temperal_downsample) (this
        VAE's config has no block_out_channels)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    def _latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """[C, H/s, W/s] with C = transformer in_channels / 4 (prepare_latents' num_channels_latents); H and W must
        fill whole 2×2 patches (check_inputs: divisible by vae_scale_factor · 2)."""
        check_image_size(height, width, 2 * self.vae_scale)
        return (int(self.transformer.config.in_channels) // 4, height // self.vae_scale, width // self.vae_scale)

    # -- conditioning ------------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        b, n, _ = embeds.shape
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - n
        return {
            "embeds": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
            "mask": torch.nn.functional.pad(mask.long(), (0, pad)),
        }

    # -- the σ grid ---------------------------------------------------------------------------------------
    def sigma_schedule(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The pipeline's grid (DiffusersFlowModel.sigma_schedule); a grid that is not finite is refused: with
        Qwen-Image's shift_terminal, FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal divides 0 by 0 for a
        single step (σ = [1] -> NaN; the pipeline itself then samples NaN)."""
        sigmas = super().sigma_schedule(num_steps, shift)
        if not torch.isfinite(sigmas).all():
            raise FdfoError(f"the Qwen-Image scheduler gives no finite σ grid for {num_steps} step(s) (use >= 2)")
        return sigmas

    def _scheduler_kwargs(self, scheduler, num_steps: int) -> dict:
        """QwenImagePipeline.__call__: sigmas linspace(1, 1/T, T) and `mu` = calculate_shift(image_seq_len, ...) of
        the packed token count with the scheduler config's base/max values (the pipeline's fallbacks 256, 4096,
        0.5, 1.15), both always passed (the scheduler uses mu only with use_dynamic_shifting)."""
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        get = scheduler.config.get
        image_seq_len = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        mu = calculate_shift(
            image_seq_len,
            get("base_image_seq_len", 256),
            get("max_image_seq_len", 4096),
            get("base_shift", 0.5),
            get("max_shift", 1.15),
        )
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    # -- the velocity ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        out = self.transformer(
            hidden_states=pack_latents(x.to(self.dtype)),
            # QwenImagePipeline: timestep = t.expand(B).to(latents.dtype), passed as timestep / 1000, with t the
            # scheduler's fp32 σ·1000
            timestep=(sigma.float() * 1000).to(self.dtype) / 1000,
            encoder_hidden_states=cond["embeds"].to(self.dtype),
            encoder_hidden_states_mask=cond["mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, (c, h, w))

    def combine_guidance(self, v_c: torch.Tensor, v_u: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """QwenImagePipeline.__call__'s true CFG, in fp32: comb = v_u + w·(v_c − v_u), rescaled per packed token
        (torch.norm over its last dim, the 2×2 patch's 4C channels) to the norm of v_c."""
        shape = tuple(v_c.shape[1:])
        cond, uncond = pack_latents(v_c.float()), pack_latents(v_u.float())
        comb = uncond + cfg_scale * (cond - uncond)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        comb_norm = torch.norm(comb, dim=-1, keepdim=True)
        return unpack_latents(comb * (cond_norm / comb_norm), shape)

    # -- decode ------------------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (fp32) as QwenImagePipeline.__call__ decodes: a 1-frame video
        [B, C, 1, H, W] in the VAE's dtype, latents / (1 / latents_std) + latents_mean, decode, frame 0."""
        cfg = self.vae.config
        z = x0[:, :, None].to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        with torch.no_grad():
            images = self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return images.float().clamp(-1, 1)
