"""A tiny random-weight Wan2.1 text-to-video pipeline built with the real diffusers / transformers classes (no files,
no hub) and saved with `save_pretrained`, so tests load it through the project's real loading code.

Shapes at 32×32 px and 5 frames: the VAE (3 spatial downsamples, 2 temporal, as Wan2.1's) gives 4-channel latents
[4, 2, 4, 4]; the transformer's (1, 2, 2) patches make 2·2·2 = 8 video tokens. The VAE's latents_mean / latents_std
are not 0 / 1, so a decode that skipped the pipeline's denormalisation would show.
"""

from __future__ import annotations

import torch
from tiny_diffusers import _t5

Z_DIM = 4
LATENTS_MEAN = [-0.7571, 0.1075, 0.9653, -0.1517]  # four of Wan2.1's 16 (AutoencoderKLWan's defaults)
LATENTS_STD = [2.8184, 2.6558, 1.7708, 2.6052]


def _umt5(d_model=32):
    """The tiny T5 tokenizer of tiny_diffusers with a 1-layer UMT5 encoder (WanPipeline's text encoder class)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tok, _ = _t5()
    enc = UMT5EncoderModel(
        UMT5Config(vocab_size=32, d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=1, decoder_start_token_id=0)
    )
    return tok, enc


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=4,
        z_dim=Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def unipc_scheduler(flow_shift: float = 3.0):
    """The scheduler the hub's Wan2.1-T2V-*-Diffusers repos ship (scheduler/scheduler_config.json): UniPC with flow
    sigmas and flow prediction, flow_shift 3.0 (the pipeline docs: 3.0 for 480p, 5.0 for 720p)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )


def euler_scheduler(shift: float = 3.0):
    """The Euler integrator on the flow-shifted grid (WanPipeline's type-hinted default scheduler class)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def build_tiny_wan(directory, seed: int = 0, scheduler: str = "unipc"):
    """WanPipeline (Wan2.1 T2V: one transformer, no boundary_ratio / expand_timesteps) with `scheduler` "unipc" (the
    hub's) or "euler"."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    tok, enc = _umt5()
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=enc,
        vae=_wan_vae(),
        scheduler=unipc_scheduler() if scheduler == "unipc" else euler_scheduler(),
        transformer=_wan_transformer(),
    )
    pipe.save_pretrained(directory)
    return directory
