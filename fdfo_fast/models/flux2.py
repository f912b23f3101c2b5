"""FLUX.2 (diffusers' `Flux2Pipeline`: `Flux2Transformer2DModel`, `AutoencoderKLFlux2`, a Mistral3 text encoder)
behind the flow-model interface the samplers and the trainer use.

Every detail follows `diffusers/pipelines/flux2/pipeline_flux2.py` (Flux2Pipeline):
- prompts: the pipeline's own `encode_prompt` (its system message and chat template, padding to a fixed
  `max_sequence_length`, the hidden states of text-encoder layers 10, 20 and 30 stacked per token), cached per prompt;
- latents: our unpacked sample space is the pipeline's own latents before packing to tokens: the VAE latents
  patchified 2×2 and normalised by the VAE's batch-norm statistics, [4·C_vae, H/(2s), W/(2s)] ([128, H/16, W/16]
  for FLUX.2-dev); `forward` flattens them to tokens and builds the 4-D (t, h, w, l) position ids as
  `_pack_latents` / `_prepare_latent_ids` / `_prepare_text_ids` do; `decode` undoes the batch norm, unpatchifies and
  decodes as `__call__` does after its loop;
- σ grid: the sigmas linspace(1, 1/T, T) and the empirical `mu` (`compute_empirical_mu(image_seq_len, T)`) that
  `__call__` hands `retrieve_timesteps`; the transformer gets the pipeline's timestep ((σ·1000) in the latents' dtype
  / 1000) and its guidance (an fp32 tensor of the guidance scale, passed whether or not the transformer embeds it);
- guidance-distilled: no CFG, the guidance scale is a model input (Flux2Pipeline's default 4.0).
"""

from __future__ import annotations

import torch

from fdfo_fast.models.diffusers_flow import GuidanceDistilledFlowModel, check_image_size

# diffusers examples/dreambooth/train_dreambooth_lora_flux2.py, the default `target_modules` without --lora_layers:
# the double blocks' image-stream attention (to_q/k/v, to_out.0; the text stream's add_*_proj stay frozen) and the
# single blocks' fused QKV+MLP input projection plus their attention output `single_transformer_blocks.{i}.attn.to_out`
# for FLUX.2-dev's 48 single blocks (named one by one: a bare "attn.to_out" would also name the double blocks'
# ModuleList, which peft cannot adapt).
FLUX2_DEV_SINGLE_BLOCKS = 48
FLUX2_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj") + tuple(
    f"single_transformer_blocks.{i}.attn.to_out" for i in range(FLUX2_DEV_SINGLE_BLOCKS)
)


def pack_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the token sequence [B, H·W, C] (Flux2Pipeline._pack_latents: one token per latent cell)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_tokens(tokens: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `pack_tokens` (what Flux2Pipeline._unpack_latents_with_ids does for its row-major ids)."""
    c, h, w = shape
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], c, h, w)


def latent_position_ids(batch: int, height: int, width: int, device) -> torch.Tensor:
    """(t, h, w, l) = (0, row, col, 0) per token, row-major, int64 [B, H·W, 4] (Flux2Pipeline._prepare_latent_ids)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], 1).unsqueeze(0).expand(batch, -1, -1)


def text_position_ids(batch: int, length: int, device) -> torch.Tensor:
    """(0, 0, 0, l) per text token, int64 [B, L, 4] (Flux2Pipeline._prepare_text_ids without t_coord)."""
    positions = torch.arange(length, device=device)
    zeros = torch.zeros_like(positions)
    return torch.stack([zeros, zeros, zeros, positions], 1).unsqueeze(0).expand(batch, -1, -1)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """[B, 4C, H, W] -> [B, C, 2H, 2W]: the inverse of the pipeline's 2×2 patchify (Flux2Pipeline._unpatchify_latents:
    channel 4c + 2i + j holds pixel (2h + i, 2w + j) of VAE channel c)."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


class Flux2FlowModel(GuidanceDistilledFlowModel):
    """FLUX.2 [dev] (guidance-distilled: the guidance scale is a model input, there is no CFG)."""

    kind = "flux2"
    pipeline_class = "Flux2Pipeline"
    display_name = "FLUX.2"
    pipeline_max_sequence_length = 512  # Flux2Pipeline.__call__(max_sequence_length=512)
    lora_recipe_targets = FLUX2_LORA_TARGETS
    text_encoder_out_layers = (10, 20, 30)  # Flux2Pipeline.__call__ / encode_prompt default hidden-state layers
    default_guidance = 4.0  # Flux2Pipeline.__call__(guidance_scale=4.0)

    # -- latents -----------------------------------------------------------------------------------------
    def _latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The pipeline's latents before packing: [4·C_vae, H/(2s), W/(2s)] (Flux2Pipeline.prepare_latents, with
        num_latents_channels = transformer in_channels // 4); sizes must be multiples of 2s (its check_inputs
        would otherwise round them down)."""
        cell = 2 * self.vae_scale
        check_image_size(height, width, cell)
        return (self.transformer.config.in_channels // 4 * 4, height // cell, width // cell)

    # -- conditioning ------------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"embeds": embeds}  # the text ids depend only on the (fixed) length: built in forward

    # -- the σ grid ---------------------------------------------------------------------------------------
    def _scheduler_kwargs(self, scheduler, num_steps: int) -> dict:
        """Flux2Pipeline.__call__: sigmas linspace(1, 1/T, T) (none with use_flow_sigmas) and its empirical `mu`
        from the image token count and the step count (compute_empirical_mu, from BFL's flux2 sampling.py)."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        seq_len = self.latent_shape[1] * self.latent_shape[2]
        return {"sigmas": sigmas, "mu": compute_empirical_mu(image_seq_len=seq_len, num_steps=num_steps)}

    # -- the velocity -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        embeds = cond["embeds"].to(self.dtype)
        out = self.transformer(
            hidden_states=pack_tokens(x.to(self.dtype)),
            # Flux2Pipeline passes t.to(latents dtype) / 1000 with the scheduler's t = σ·1000 (fp32); its latents
            # have the prompt embeddings' dtype, the pipeline's (= the transformer's) dtype
            timestep=(sigma.float() * 1000).to(self.dtype) / 1000,
            # torch.full([1], guidance_scale, dtype=float32).expand(B), passed even without guidance embeddings
            guidance=torch.full((b,), self.guidance, device=x.device, dtype=torch.float32),
            encoder_hidden_states=embeds,
            txt_ids=text_position_ids(b, embeds.shape[1], x.device),
            img_ids=latent_position_ids(b, h, w, x.device),
            return_dict=False,
        )[0]
        return unpack_tokens(out, (c, h, w))

    # -- decode ------------------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (fp32), as Flux2Pipeline.__call__ decodes after its loop: z·√(var + eps) +
        mean with the VAE's batch-norm running statistics, unpatchify 2×2, VAE decode."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(x0.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(x0.device, torch.float32) + self.vae.config.batch_norm_eps)
        z = unpatchify(x0.float() * std + mean)
        with torch.no_grad():
            images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return images.float().clamp(-1, 1)
