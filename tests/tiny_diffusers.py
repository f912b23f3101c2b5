"""Tiny random-weight SD3 and FLUX pipelines built from configs with the real diffusers/transformers classes
(no files, no hub), saved with `save_pretrained` so tests load them through the project's real loading code."""

from __future__ import annotations

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_tokenizer():
    """A 514-token byte-level CLIP tokenizer (no merges) built without files."""
    from transformers import CLIPTokenizer

    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=77)


def _clip_text_encoder(tok, hidden=32, projection=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tok),
        projection_dim=projection,
        max_position_embeddings=77,
    )
    return CLIPTextModelWithProjection(cfg), CLIPTextModel(cfg)


def _t5(d_model=64):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = T5TokenizerFast(extra_ids=0)
    enc = T5EncoderModel(
        T5Config(vocab_size=32, d_model=d_model, d_ff=64, d_kv=8, num_heads=4, num_layers=1, decoder_start_token_id=0)
    )
    return tok, enc


def _vae(latent_channels=4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_sd3(directory, seed: int = 0, dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None):
    """StableDiffusion3Pipeline: 2-layer MMDiT, 2 CLIP text encoders + T5, 2-level VAE (latent 4×16×16 at 32 px).
    `dual_attention_layers` / `qk_norm` give SD3.5-Medium's MMDiT-X blocks (a second image self-attention `attn2`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    te1, te2 = _clip_text_encoder(tok)[0], _clip_text_encoder(tok)[0]
    t5_tok, te3 = _t5()
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(),
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        text_encoder_3=te3,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(directory)
    return directory


def build_tiny_sd35(directory, seed: int = 0):
    """The tiny SD3 pipeline in SD3.5-Medium's layout: block 0 a dual-attention (MMDiT-X) block, RMS qk-norm."""
    return build_tiny_sd3(directory, seed, dual_attention_layers=(0,), qk_norm="rms_norm")


def build_tiny_sd35_large(directory, seed: int = 0):
    """The tiny SD3 pipeline in SD3.5-Large's layout: MMDiT blocks only (no MMDiT-X `attn2`), RMS qk-norm
    (diffusers scripts/convert_sd3_to_diffusers.py derives both for the 8B checkpoint)."""
    return build_tiny_sd3(directory, seed, qk_norm="rms_norm")


# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (FLUX.2-dev's conversion script loads the same)
FLUX1_DEV_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def build_tiny_flux(directory, seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: 1 double + 1 single block, CLIP + T5 text encoders, VAE with 4 latent channels (16 packed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    clip = _clip_text_encoder(tok)[1]
    t5_tok, t5 = _t5(d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        transformer=transformer,
        # FLUX.1-dev's scheduler config: resolution-dependent dynamic shifting (mu from the image token count)
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER),
        vae=_vae(),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
    )
    pipe.save_pretrained(directory)
    return directory
