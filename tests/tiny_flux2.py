"""A tiny random-weight Flux2Pipeline (FLUX.2-dev's layout) built from configs with the real diffusers/transformers
classes and no files from the hub, saved with `save_pretrained` so tests load it through the project's real loading
code.

The text encoder is a Mistral3ForConditionalGeneration with 30 decoder layers of width 16, so the pipeline's default
`text_encoder_out_layers` (10, 20, 30) exist and the pipeline can be called with its defaults; the processor is a
byte-level BPE tokenizer (every prompt distinct) with a Mistral-style chat template (system prompt + user turn, as the
pipeline's `format_input` builds them)."""

from __future__ import annotations

import torch
from tiny_diffusers import FLUX1_DEV_SCHEDULER

# Mistral's special tokens at the ids the diffusers Flux2 pipeline test uses (image 1, bos 2, eos 3, pad 4)
SPECIAL_TOKENS = ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                  "[/SYSTEM_PROMPT]", "[IMG_BREAK]", "[IMG_END]"]  # fmt: skip
# Mistral-Small-3.x's turn markers for the text-only turns Flux2Pipeline's format_input writes (content = a list of
# {"type": "text"} parts)
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}"
)
TEXT_LAYERS = 30  # Flux2Pipeline's default text_encoder_out_layers are (10, 20, 30)
TEXT_HIDDEN = 16


def mistral_tokenizer():
    """A byte-level BPE tokenizer (any prompt tokenizes, bytes as the fallback) whose merges are learnt on the
    pipeline's system message, so that message takes 27 tokens as with the real tokenizer rather than ~170 bytes and
    short text lengths still leave room for the prompt; with the chat template.

    FLUX.2-dev's `tokenizer` is a PixtralProcessor, which transformers refuses to build without torchvision (not a
    dependency here); the pipeline calls only its `apply_chat_template(..., padding="max_length", truncation=True)`,
    which a tokenizer with a chat template answers the same way for text-only conversations."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator([SYSTEM_MESSAGE], trainer=trainer)  # deterministic (a single text)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[5:] + SPECIAL_TOKENS[1:2], model_max_length=4096,
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mistral3_text_encoder(vocab_size: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": vocab_size, "hidden_size": TEXT_HIDDEN, "intermediate_size": 24,
            "max_position_embeddings": 1024, "num_attention_heads": 2, "num_hidden_layers": TEXT_LAYERS,
            "num_key_value_heads": 1, "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e9, "sliding_window": None,
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 4,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 24, "image_size": 30, "patch_size": 6, "num_channels": 3, "head_dim": 8,
        },
        image_token_index=1,
        vision_feature_layer=-1,
        spatial_merge_size=1,
    )  # fmt: skip
    return Mistral3ForConditionalGeneration(config)


def build_tiny_flux2(directory, seed: int = 0, guidance_embeds: bool = True):
    """Flux2Pipeline: 1 double + 2 single blocks (width 32), a 2-level AutoencoderKLFlux2 with 4 latent channels
    (patchified 2×2: 16 channels, 16×8×8 = 64 image tokens at 32 px) with non-trivial batch-norm statistics, and
    FLUX.2-dev's scheduler config (FLUX.1-dev's: dynamic shifting)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = mistral_tokenizer()
    text_encoder = _mistral3_text_encoder(len(tokenizer))
    latent_channels = 4
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # the VAE's latents patchified 2×2 (Flux2Pipeline._patchify_latents)
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,  # three hidden-state layers stacked per token
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # non-trivial batch-norm statistics, so decoding that skipped the de-normalisation would show
    gen = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=gen))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
    pipe = Flux2Pipeline(
        transformer=transformer,
        # FLUX.2-dev ships FLUX.1-dev's scheduler config (diffusers scripts/convert_flux2_to_diffusers.py loads it)
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(directory)
    return directory
