"""A tiny random-weight QwenImagePipeline built from configs with the real diffusers/transformers classes (no files,
no hub), saved with `save_pretrained` so tests load it through the project's real loading code."""

from __future__ import annotations

import re

import torch
from tiny_diffusers import bytes_to_unicode

# QwenImagePipeline.__init__'s prompt_template_encode: the system part and the user turn's opening
TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
# Qwen-Image's scheduler/scheduler_config.json (Qwen/Qwen-Image on the hub): exponential dynamic shifting with the
# last σ stretched to 0.02
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


def qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer with the chat-template tokens and whole-word merges for the words of the
    pipeline's system prompt, so that the template's system part is 34 tokens as with the real tokenizer
    (QwenImagePipeline drops `prompt_template_encode_start_idx` = 34 leading tokens); other words stay bytes."""
    from transformers import Qwen2Tokenizer

    to_unicode = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(to_unicode.values())}
    merges = []
    for word in dict.fromkeys(re.findall(r" ?[A-Za-z]+", re.sub(r"<\|\w+\|>", "", TEMPLATE_PREFIX))):
        symbols = "".join(to_unicode[b] for b in word.encode())
        for k in range(2, len(symbols) + 1):
            left, right = symbols[: k - 1], symbols[k - 1]
            if symbols[:k] not in vocab:
                vocab[symbols[:k]] = len(vocab)
                merges.append((left, right))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _text_encoder(tok, hidden: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            bos_token_id=None,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            # Qwen2.5-VL's multimodal RoPE: the sections split head_dim / 2 = 4 over (time, height, width)
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[0],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(directory, seed: int = 0):
    """QwenImagePipeline: 2-block transformer, 2-layer Qwen2.5-VL text encoder, VAE with 4 latent channels and 4×
    spatial compression (latent 4×8×8 at 32 px, 16 image tokens after 2×2 packing), non-trivial latents_mean/std."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    z_dim = 4
    gen = torch.Generator().manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=(0.5 * torch.randn(z_dim, generator=gen)).tolist(),
        latents_std=(1.0 + torch.rand(z_dim, generator=gen)).tolist(),
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=_text_encoder(tok),
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return directory
