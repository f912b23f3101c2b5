"""Weight memory of the presets' models and of the README's reward models from parameter counts, and per preset an
estimate of the training GPU's memory and of the time per epoch from parameter and token counts (docs/memory.md).

Every network is built from its published config with the real class (diffusers SD3Transformer2DModel,
FluxTransformer2DModel, QwenImageTransformer2DModel, Flux2Transformer2DModel, WanTransformer3DModel, AutoencoderKL,
AutoencoderKLQwenImage, AutoencoderKLFlux2, AutoencoderKLWan; transformers CLIPTextModel(WithProjection),
T5EncoderModel, UMT5EncoderModel, CLIPModel, Qwen2_5_VLForConditionalGeneration, Mistral3ForConditionalGeneration; the
project's AestheticHead) on the meta device: no weights, no download, seconds on a CPU. Its parameters are counted
(`count_parameters`: each tensor once, tied embeddings once), and bytes = parameters x 4 (fp32) or x 2 (bf16 / fp16).
The LoRA adapter is counted from the transformer's own modules: every nn.Linear that the preset's targets select the
way peft selects them (the trainer's own matching) adds r·(d_in + d_out) parameters; trained in fp32 with AdamW, each
costs 4 (weight) + 4 (gradient) + 8 (two moments) bytes.

The estimates (`estimate`, one per preset whose model is not the toy): the FLOPs of one transformer call from the
weights each token stream sees and the attention shapes (`call_flops`; equal to torch's FlopCounterMode count on tiny
instances, tests/test_memory_table.py), times the epoch's calls, over an assumed sustained throughput (--peak-tflops x
--mfu); activations of a gradient-checkpointed training micro-batch from the block shapes. Estimates, not
measurements: measure with benchmarks/epoch_profile.py and sd35m_shape.py on a GPU.

    python benchmarks/memory_table.py                  # the markdown tables of docs/memory.md
    python benchmarks/memory_table.py --json           # the counts and estimates as JSON
    python benchmarks/memory_table.py --mfu 0.3 --peak-tflops 312    # e.g. an A100 at 30 %
    python benchmarks/memory_table.py --write-doc      # rewrite docs/memory.md's tables (after a preset changed)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
# after site-packages: the repository's kernels/ folder must not shadow an installed `kernels` package
sys.path.append(str(ROOT))

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW exp_avg + exp_avg_sq (fp32)

# -- published configs (the values each class's __init__ reads; the rest are the classes' defaults) --------------
# stabilityai/stable-diffusion-3.5-medium transformer/config.json: shared with benchmarks/sd35m_shape.py.
from sd35m_shape import SD35M_CONFIG  # noqa: E402

# black-forest-labs/FLUX.1-dev transformer/config.json (FLUX.1-schnell: the same with guidance_embeds false).
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# stabilityai/stable-diffusion-3.5-medium vae/config.json; black-forest-labs/FLUX.1-dev vae/config.json has the same
# architecture (16 latent channels, no quant convs) and differs only in scaling / shift factors.
VAE_16CH_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
# SD3.5 text_encoder/config.json = OpenAI CLIP ViT-L/14's text tower (also FLUX.1's text_encoder, without projection).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   vocab_size=49408, max_position_embeddings=77, projection_dim=768,
                   hidden_act="quick_gelu")  # fmt: skip
# SD3.5 text_encoder_2/config.json = OpenCLIP ViT-bigG/14's text tower.
CLIP_G_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")  # fmt: skip
# SD3.5 text_encoder_3/config.json and FLUX.1 text_encoder_2/config.json = google/t5-v1_1-xxl's encoder.
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)  # fmt: skip
# openai/clip-vit-large-patch14 config.json (clip_score; the LAION aesthetic predictor's CLIP).
CLIP_VIT_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       image_size=224, patch_size=14, hidden_act="quick_gelu"),
    projection_dim=768,
)  # fmt: skip
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json: PickScore_v1 (yuvalkirstain/PickScore_v1) and HPSv2 are
# fine-tuned copies of it.
CLIP_VIT_H14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)  # fmt: skip
# Qwen/Qwen2.5-VL-7B-Instruct config.json (text fields and vision_config).
QWEN25_VL_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=128000, rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu"),
)  # fmt: skip
# stabilityai/stable-diffusion-3.5-large transformer/config.json. diffusers' scripts/convert_sd3_to_diffusers.py
# derives it from the checkpoint: num_layers from the joint_blocks (38), num_attention_heads = num_layers,
# caption_projection_dim = context_embedder rows (38 x 64 = 2432), "sd3.5 8b use [pos_embed_max_size] 192", qk_norm
# rms_norm for SD3.5, dual_attention_layers () (only the 2B Medium has MMDiT-X blocks); several public copies of the
# hub file agree. Its text encoders and 16-channel VAE are SD3.5-Medium's (the same model_index.json classes/configs).
SD35L_CONFIG = dict(
    SD35M_CONFIG, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
    dual_attention_layers=(),
)  # fmt: skip
# Qwen/Qwen-Image transformer/config.json: diffusers QwenImageTransformer2DModel's defaults are this file (60 layers,
# 24 heads x 128 = 3072, joint_attention_dim 3584 = Qwen2.5-VL-7B's hidden size); public copies of the hub file agree.
QWEN_IMAGE_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage; its defaults; public copies of the hub file agree).
QWEN_IMAGE_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True])  # fmt: skip
# black-forest-labs/FLUX.2-dev transformer/config.json: diffusers' scripts/convert_flux2_to_diffusers.py
# get_flux2_transformer_config("flux2-dev") (8 double + 48 single blocks, 48 heads x 128 = 6144, joint_attention_dim
# 15360 = 3 x Mistral's 5120: the pipeline stacks three hidden layers).
FLUX2_DEV_CONFIG = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6,
)  # fmt: skip
# FLUX.2-dev vae/config.json: the conversion script builds `AutoencoderKLFlux2()` with its defaults and loads the
# published flux2-vae.sft into it strict=True, so the defaults are the published shapes (32 latent channels, a 2x2
# patchify after the 8x downsampling: 128 channels per 16 x 16 pixels).
FLUX2_VAE_CONFIG: dict = {}
# mistralai/Mistral-Small-3.2-24B-Instruct-2506 config.json (FLUX.2-dev's text_encoder: the conversion script loads
# Mistral3ForConditionalGeneration from it; the tokenizer from Mistral-Small-3.1-24B-Instruct-2503, same
# architecture), as quoted in full by a public FLUX.2 trainer's source (text 5120 / 32768 / 40 layers / 32 heads, 8 KV
# heads x 128, vocabulary 131072; Pixtral vision tower 1024 / 4096 / 24 layers / 16 heads, patch 14, 1540 px).
MISTRAL_SMALL_3_24B = dict(
    text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                     max_position_embeddings=131072, rope_theta=1000000000.0, tie_word_embeddings=False),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540, num_channels=3),
    spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False, image_token_index=10,
    tie_word_embeddings=False,
)  # fmt: skip
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers transformer/config.json: diffusers'
# scripts/convert_wan_to_diffusers.py get_transformer_config("Wan-T2V-1.3B" / "Wan-T2V-14B").
_WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   added_kv_proj_dim=None)  # fmt: skip
WAN21_1_3B_CONFIG = dict(_WAN_COMMON, num_attention_heads=12, num_layers=30, ffn_dim=8960)
WAN21_14B_CONFIG = dict(_WAN_COMMON, num_attention_heads=40, num_layers=40, ffn_dim=13824)
# Wan2.1 vae/config.json: the conversion script builds `AutoencoderKLWan()` with its defaults (base_dim 96, z_dim 16,
# dim_mult 1,2,4,4, 2 res blocks, temporal downsampling False,True,True) for Wan2.1_VAE.pth: the same for both sizes.
WAN_VAE_CONFIG: dict = {}
# google/umt5-xxl config.json (Wan2.1's text_encoder: the conversion script loads UMT5EncoderModel from it): the
# T5 v1.1 XXL shapes with a 256384-token vocabulary, untied, a relative attention bias in every layer (UMT5).
UMT5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, tie_word_embeddings=False,
)  # fmt: skip


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of `module`, each tensor once (`parameters()` skips tied repeats, e.g. T5's embed_tokens)."""
    return sum(p.numel() for p in module.parameters())


def lora_parameters(transformer: torch.nn.Module, targets, rank: int) -> tuple[int, int]:
    """(adapted modules, LoRA parameters r·(d_in + d_out) summed over them) for the peft targets, matched as the
    trainer matches them (peft's check_target_module_exists on every nn.Linear's name)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=list(targets))
    linears = [m for n, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and check_target_module_exists(config, n)]  # fmt: skip
    return len(linears), sum(rank * (m.in_features + m.out_features) for m in linears)


def _meta(build):
    with torch.device("meta"):
        return build()


@functools.cache
def build_components() -> dict[str, dict[str, torch.nn.Module]]:
    """{model: {component: meta module}} for the presets' pipelines and the reward models."""
    import diffusers
    import transformers as tf

    from fdfo_fast.rewards.hf_models import AestheticHead

    def clip_text(cfg, projection: bool):
        cls = tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel
        return cls(tf.CLIPTextConfig(**cfg))

    t5 = lambda: tf.T5EncoderModel(tf.T5Config(**T5_XXL))  # noqa: E731
    vae = lambda: diffusers.AutoencoderKL(**VAE_16CH_CONFIG)  # noqa: E731
    qwen = dict(QWEN25_VL_7B)
    qwen_cfg = tf.Qwen2_5_VLConfig(text_config={k: v for k, v in qwen.items() if k != "vision_config"},
                                   vision_config=qwen["vision_config"], tie_word_embeddings=False)  # fmt: skip
    sd35m = {
        "transformer": _meta(lambda: diffusers.SD3Transformer2DModel(**SD35M_CONFIG)),
        "vae": _meta(vae),
        "text_encoder (CLIP-L)": _meta(lambda: clip_text(CLIP_L_TEXT, True)),
        "text_encoder_2 (CLIP-G)": _meta(lambda: clip_text(CLIP_G_TEXT, True)),
        "text_encoder_3 (T5-XXL)": _meta(t5),
    }
    return {
        "SD3.5-Medium": sd35m,
        "FLUX.1-dev": {
            "transformer": _meta(lambda: diffusers.FluxTransformer2DModel(**FLUX_DEV_CONFIG)),
            "vae": _meta(vae),
            "text_encoder (CLIP-L)": _meta(lambda: clip_text(CLIP_L_TEXT, False)),
            "text_encoder_2 (T5-XXL)": _meta(t5),
        },
        # the transformer is the only part that differs from SD3.5-Medium (the same modules counted again)
        "SD3.5-Large": {**sd35m, "transformer": _meta(lambda: diffusers.SD3Transformer2DModel(**SD35L_CONFIG))},
        "Qwen-Image": {
            "transformer": _meta(lambda: diffusers.QwenImageTransformer2DModel(**QWEN_IMAGE_CONFIG)),
            "vae": _meta(lambda: diffusers.AutoencoderKLQwenImage(**QWEN_IMAGE_VAE_CONFIG)),
            "text_encoder (Qwen2.5-VL-7B)": _meta(lambda: tf.Qwen2_5_VLForConditionalGeneration(qwen_cfg)),
        },
        "FLUX.2-dev": {
            "transformer": _meta(lambda: diffusers.Flux2Transformer2DModel(**FLUX2_DEV_CONFIG)),
            "vae": _meta(lambda: diffusers.AutoencoderKLFlux2(**FLUX2_VAE_CONFIG)),
            "text_encoder (Mistral-Small-3.2-24B)": _meta(
                lambda: tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(**MISTRAL_SMALL_3_24B))),
        },
        "Wan2.1-T2V-1.3B": {
            "transformer": _meta(lambda: diffusers.WanTransformer3DModel(**WAN21_1_3B_CONFIG)),
            "vae": _meta(lambda: diffusers.AutoencoderKLWan(**WAN_VAE_CONFIG)),
            "text_encoder (UMT5-XXL)": _meta(lambda: tf.UMT5EncoderModel(tf.UMT5Config(**UMT5_XXL))),
        },
        "Wan2.1-T2V-14B": {
            "transformer": _meta(lambda: diffusers.WanTransformer3DModel(**WAN21_14B_CONFIG)),
            "vae": _meta(lambda: diffusers.AutoencoderKLWan(**WAN_VAE_CONFIG)),
            "text_encoder (UMT5-XXL)": _meta(lambda: tf.UMT5EncoderModel(tf.UMT5Config(**UMT5_XXL))),
        },
        "rewards": {
            "clip_score: CLIP ViT-L/14": _meta(lambda: tf.CLIPModel(tf.CLIPConfig(**CLIP_VIT_L14))),
            "aesthetic: CLIP ViT-L/14 + LAION head": _meta(lambda: torch.nn.ModuleList(
                [tf.CLIPModel(tf.CLIPConfig(**CLIP_VIT_L14)), AestheticHead(CLIP_VIT_L14["projection_dim"])])),
            "pickscore / hps: CLIP ViT-H/14": _meta(lambda: tf.CLIPModel(tf.CLIPConfig(**CLIP_VIT_H14))),
            "vlm_yes: Qwen2.5-VL-7B": _meta(lambda: tf.Qwen2_5_VLForConditionalGeneration(qwen_cfg)),
        },
    }  # fmt: skip


REWARD_COMPONENT = {  # reward term -> its row in build_components()["rewards"]
    "clip_score": "clip_score: CLIP ViT-L/14",
    "aesthetic": "aesthetic: CLIP ViT-L/14 + LAION head",
    "pickscore": "pickscore / hps: CLIP ViT-H/14",
    "hps": "pickscore / hps: CLIP ViT-H/14",
    "vlm_yes": "vlm_yes: Qwen2.5-VL-7B",
}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # ';dtype=' takes torch's names too
PRESETS_SHOWN = ("sd35m-fdfo", "sd35m-flow-grpo", "flux-fdfo")


def preset_rewards(values: dict) -> list[tuple[str, str]]:
    """(term, dtype) of a preset's --reward-models, parsed as load_reward_models splits it (';dtype=' per entry,
    else the preset's --reward-dtype, else the default)."""
    from fdfo_fast.config import RewardConfig
    from fdfo_fast.rewards.hf_models import _ENTRY_SPLIT, _OPTION_SPLIT

    default = values.get("reward_dtype", RewardConfig().reward_dtype)
    out = []
    for entry in filter(None, (e.strip() for e in _ENTRY_SPLIT.split(values.get("reward_models", "")))):
        head, *options = _OPTION_SPLIT.split(entry)
        dtype = dict(o.strip().partition("=")[::2] for o in options).get("dtype", default)
        out.append((head.partition("=")[0].strip(), SHORT_DTYPE.get(dtype, dtype)))
    return out


def counts() -> dict:
    """Parameter counts of every component, the presets' LoRA adapters (rank and targets from the preset) and what
    each preset holds on its training GPU (dtypes from the preset)."""
    from fdfo_fast.config import PRESETS, ModelConfig, OptimConfig
    from fdfo_fast.models import MODEL_KINDS

    components = build_components()
    comp = {m: {c: count_parameters(mod) for c, mod in parts.items()} for m, parts in components.items()}
    presets = {}
    for preset in PRESETS_SHOWN:
        p = PRESETS[preset]
        model = arch_for(p["model"], p["model_path"])[0].model
        modules, params = lora_parameters(components[model]["transformer"], MODEL_KINDS[p["model"]].lora_recipe_targets,
                                          p["lora_rank"])  # fmt: skip
        dtype = p.get("dtype", ModelConfig().dtype)
        parts = comp[model]
        gpu = {  # name -> bytes on the training GPU
            f"transformer ({dtype})": parts["transformer"] * BYTES[dtype],
            "LoRA + grad + AdamW (fp32)": params * LORA_BYTES_PER_PARAM,
            f"VAE ({dtype})": parts["vae"] * BYTES[dtype],
            f"text encoders ({dtype})": sum(n for k, n in parts.items() if k.startswith("text_encoder")) * BYTES[dtype],
        }
        if p.get("ema_decay", OptimConfig().ema_decay) > 0:  # the EMA keeps an fp32 copy of the trained weights
            gpu["EMA of the LoRA (fp32)"] = params * 4
        rewards = {f"reward {term} ({rd})": comp["rewards"][REWARD_COMPONENT[term]] for term, rd in preset_rewards(p)}
        gpu.update({k: n * BYTES[k.rsplit("(", 1)[1][:-1]] for k, n in rewards.items()})
        presets[preset] = {"model": model, "lora_rank": p["lora_rank"], "lora_modules": modules, "lora_params": params,
                           "gpu_bytes": gpu, "reward_params": sum(rewards.values())}  # fmt: skip
    return {"components": comp, "presets": presets}


# -- per-preset memory and time per epoch, from parameter counts and token counts (docs/memory.md, "Estimates") ----
@dataclasses.dataclass(frozen=True)
class Arch:
    """What turns a preset's pixels and prompt length into the transformer's tokens, per model (kind, model_path)."""

    model: str  # its row of build_components()
    vae_scale: int  # pixels per latent cell along H and W (every VAE here: 8)
    patch: int  # latent cells per token side: the transformer's patch, or FLUX.2's VAE 2x2 patchify (patch_size 1)
    text_tokens: int  # the pipeline's default max_sequence_length (--max-sequence-length 0)
    clip_tokens: int = 0  # SD3: CLIP-L/G's 77 tokens joined to the T5 tokens in the joint attention
    attention: str = "joint"  # joint: text tokens in every block (MMDiT / FLUX); cross: text only as K/V (Wan)
    temporal: int = 0  # video: frames per latent frame (Wan's VAE: 4, the first frame alone); 0 = images
    frames: int = 0  # video: the pipeline's default num_frames


# Pipelines' defaults: StableDiffusion3Pipeline max_sequence_length 256, FluxPipeline / Flux2Pipeline /
# QwenImagePipeline / WanPipeline 512 (their __call__ signatures), WanPipeline num_frames 81; the vae_scale_factor
# each pipeline computes, 2 ** (len(vae.block_out_channels) - 1) = 8 (Wan: scale_factor_spatial 8, temporal 4).
ARCH = {
    ("sd3", "stabilityai/stable-diffusion-3.5-medium"): Arch("SD3.5-Medium", 8, 2, 256, clip_tokens=77),
    ("sd3", "stabilityai/stable-diffusion-3.5-large"): Arch("SD3.5-Large", 8, 2, 256, clip_tokens=77),
    ("flux", "black-forest-labs/FLUX.1-dev"): Arch("FLUX.1-dev", 8, 2, 512),
    ("qwen_image", "Qwen/Qwen-Image"): Arch("Qwen-Image", 8, 2, 512),
    ("flux2", "black-forest-labs/FLUX.2-dev"): Arch("FLUX.2-dev", 8, 2, 512),
    ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"): Arch(
        "Wan2.1-T2V-1.3B", 8, 2, 512, attention="cross", temporal=4, frames=81
    ),  # fmt: skip
    ("wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers"): Arch(
        "Wan2.1-T2V-14B", 8, 2, 512, attention="cross", temporal=4, frames=81
    ),  # fmt: skip
}
# Module names (diffusers' classes) -> the tokens a Linear / patchify conv sees. `vec`: once per sample (timestep,
# pooled text and AdaLN modulation); `txt`: the text tokens; `all`: the joint sequence (FLUX / FLUX.2 single-stream
# blocks); everything else: the image tokens. Wan's cross-attention projects K and V from the text tokens.
_VEC = re.compile(r"time_text_embed|time_guidance_embed|condition_embedder\.time|norm1(_context)?\.linear|"
                  r"(^|\.)norm\.linear|norm_out|_mod\.|modulation")  # fmt: skip
_TXT = re.compile(r"context_embedder|txt_in|add_[qkv]_proj|to_add_out|ff_context|txt_mlp|condition_embedder\.text")
_CROSS_KV = re.compile(r"attn2\.to_[kv]$")
_ALL = re.compile(r"^single_transformer_blocks\.")
PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (NVIDIA's datasheets; 1979 is with 2:4 sparsity)
MFU = 0.40  # an assumption (large DiT training typically sustains 30-50 % of peak); measure yours: epoch_profile.py


def arch_for(kind: str, model_path: str) -> tuple[Arch, bool]:
    """(the Arch of a preset's model, exact): by (kind, model_path) with the case and a '-Diffusers' suffix ignored,
    else the kind's entry whose size tag (e.g. '14B') the path names, else the kind's first entry (exact False)."""
    norm = lambda p: p.lower().removesuffix("-diffusers").rstrip("/")  # noqa: E731
    same_kind = [(path, a) for (k, path), a in ARCH.items() if k == kind]
    for path, a in same_kind:
        if norm(path) == norm(model_path):
            return a, True
    for _path, a in same_kind:
        if a.model.rsplit("-", 1)[-1].lower() in model_path.lower():
            return a, False
    if not same_kind:
        raise KeyError(f"no architecture for model kind {kind!r}: add it to memory_table.ARCH")
    return same_kind[0][1], False


def stream_of(name: str, arch: Arch) -> str:
    if _VEC.search(name):
        return "vec"
    if _TXT.search(name) or (arch.attention == "cross" and _CROSS_KV.search(name)):
        return "txt"
    return "all" if _ALL.search(name) else "img"


def stream_weights(transformer: torch.nn.Module, arch: Arch) -> dict[str, int]:
    """Weight elements of the transformer's matmuls by the tokens they see: every nn.Linear, and the patchify convs
    (stride = kernel: one matmul of the flattened patch per token, 2·weight FLOPs per token)."""
    out = {"img": 0, "txt": 0, "all": 0, "vec": 0}
    for name, m in transformer.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            out[stream_of(name, arch)] += m.weight.numel()
    return out


def attention_layers(config, arch: Arch) -> dict[str, int]:
    """Attention calls per forward by shape: joint (S x S), image-only (S_img x S_img: SD3.5-M's MMDiT-X attn2,
    Wan's self-attention), cross (S_img x S_txt: Wan)."""
    get = lambda k: config.get(k) or 0  # noqa: E731
    if arch.attention == "cross":
        return {"joint": 0, "img": get("num_layers"), "cross": get("num_layers")}
    return {"joint": get("num_layers") + get("num_single_layers"), "img": len(get("dual_attention_layers") or ()),
            "cross": 0}  # fmt: skip


def call_flops(weights: dict, layers: dict, d: int, s_img: int, s_txt: int) -> dict[str, float]:
    """FLOPs of one transformer forward for one sample (batch row), matmuls only:
    linear = 2·(W_img·S_img + W_txt·S_txt + W_all·(S_img + S_txt) + W_vec),
    attention = 4·d·(L_joint·S² + L_img·S_img² + L_cross·S_img·S_txt)   (QKᵀ and PV, S = S_img + S_txt)."""
    s = s_img + s_txt
    lin = 2 * (weights["img"] * s_img + weights["txt"] * s_txt + weights["all"] * s + weights["vec"])
    attn = 4 * d * (layers["joint"] * s * s + layers["img"] * s_img * s_img + layers["cross"] * s_img * s_txt)
    return {"linear": float(lin), "attention": float(attn), "total": float(lin + attn)}


def preset_values(preset: str | dict) -> dict:
    """A preset's options over the dataclass defaults (flat, as make_config merges them; not validated, so a preset
    of a kind not registered yet still resolves)."""
    from fdfo_fast.config import PRESETS, SECTIONS

    values = {f.name: f.default for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    values.update(PRESETS[preset] if isinstance(preset, str) else preset)
    return values


def _blocks(transformer):
    """(name, block) of the transformer's repeated blocks (diffusers' names in the five classes)."""
    for attr in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        for i, block in enumerate(getattr(transformer, attr, ())):
            yield f"{attr}.{i}", block


def _lora_targets(kind: str, values: dict):
    from fdfo_fast.models import MODEL_KINDS

    if values.get("lora_targets", "auto") not in ("", "auto"):
        return [t.strip() for t in values["lora_targets"].split(",") if t.strip()], True
    if kind in MODEL_KINDS:
        return MODEL_KINDS[kind].lora_recipe_targets, True
    # a kind whose adapter is not registered yet: the attention projections, as SD3's recipe (marked assumed)
    from fdfo_fast.models.diffusers_flow import SD3FlowModel

    return SD3FlowModel.lora_recipe_targets, False


def estimate(preset: str | dict, name: str | None = None, peak_tflops: float = PEAK_TFLOPS, mfu: float = MFU) -> dict:
    """Memory on one training GPU and time per epoch of a preset, from its model's parameter counts and token counts
    (the formulas: docs/memory.md, "Estimates")."""
    v = preset_values(preset)
    kind = v["model"]
    arch, exact = arch_for(kind, v["model_path"])
    parts = build_components()[arch.model]
    tr = parts["transformer"]
    config = dict(tr.config)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    b = BYTES[SHORT_DTYPE.get(v["dtype"], v["dtype"])]

    # tokens: image = (H / vae_scale / patch)·(W / vae_scale / patch) (x latent frames); text = max_sequence_length
    height, width = v["resolution"], v["width"] or v["resolution"]
    frames = v.get("num_frames") or arch.frames
    latent_frames = (frames - 1) // arch.temporal + 1 if arch.temporal else 1
    cell = arch.vae_scale * arch.patch
    s_img = latent_frames * (height // cell) * (width // cell)
    s_txt = (v["max_sequence_length"] or arch.text_tokens) + arch.clip_tokens

    weights, layers = stream_weights(tr, arch), attention_layers(config, arch)
    f = call_flops(weights, layers, d, s_img, s_txt)

    # the epoch's transformer calls, in batch rows (one sample at one step; x 2 with CFG: one batched call)
    algo, T, c = v["algorithm"], v["num_steps"], 2 if v["cfg_scale"] > 1 else 1
    if algo == "fdfo":
        samples = 2 * v["pairs_per_epoch"]
        steps = v["steps_per_sample"] or T
        extra = samples * steps * c if v["velocity_penalty"] > 0 else 0  # v_base of the frozen model per item
    else:
        samples = v["prompts_per_epoch"] * v["group_size"]
        steps = v["sde_window"] or int(v["train_timestep_fraction"] * T)
        if algo == "diffusion_nft":  # v_old per item (CFG-free), and v_base when its KL term is on
            extra = samples * steps * (1 + (v["nft_kl_beta"] > 0))
        else:  # flow_grpo / ddpo: the reference policy's mean per item for the KL
            extra = samples * steps * c if v["kl_beta"] > 0 else 0
    sample_rows, train_rows = samples * T * c, samples * steps * c
    lora = v["finetune"] == "lora"
    gc = bool(v["gradient_checkpointing"])
    # a training row: forward, the recompute (gradient checkpointing), backward = input gradients (1x the linear
    # FLOPs) + weight gradients (1x more, full fine-tuning only: a LoRA'd base has none) + attention's dQ, dK, dV (2x)
    train_per_row = f["total"] * (1 + gc) + f["linear"] * (1 if lora else 2) + 2 * f["attention"]
    flops = {"sampling": sample_rows * f["total"], "training": train_rows * train_per_row,
             "extra forwards": extra * f["total"]}  # fmt: skip
    total_flops = sum(flops.values())
    seconds = total_flops / (peak_tflops * 1e12 * mfu)

    # memory on the training GPU
    n_tr = count_parameters(tr)
    targets, targets_known = _lora_targets(kind, v)
    lora_modules, lora_params = lora_parameters(tr, targets, v["lora_rank"]) if lora else (0, 0)
    text = sum(count_parameters(m) for k, m in parts.items() if k.startswith("text_encoder"))
    vae = count_parameters(parts["vae"])
    rewards = 0
    if not v["reward_device"] or v["reward_device"] in ("cuda", "cuda:0"):
        comp_rewards = build_components()["rewards"]
        rewards = sum(count_parameters(comp_rewards[REWARD_COMPONENT[t]]) * BYTES[rd]
                      for t, rd in preset_rewards(v) if t in REWARD_COMPONENT)  # fmt: skip
    mem = {"transformer": n_tr * b}
    if lora:
        mem["LoRA + grad + AdamW"] = lora_params * LORA_BYTES_PER_PARAM
        mem["LoRA copies (EMA, sampling policy)"] = lora_params * 4 * ((v["ema_decay"] > 0) + (algo == "diffusion_nft"))
    else:  # bf16 gradient + two AdamW moments in the parameter's dtype; the frozen reference copy when needed
        needs_ref = (algo == "fdfo" and v["velocity_penalty"] > 0) or v["kl_beta"] > 0 or (
            algo == "diffusion_nft" and v["nft_kl_beta"] > 0)  # fmt: skip
        mem["grad + AdamW (+ reference copy)"] = n_tr * b * (3 + needs_ref)
    # a video model's VAE is kept in fp32 beside a bf16 transformer (fdfo_fast/models/wan.py, as WanPipeline's docs)
    frozen = {"text encoders": text * b, "VAE": vae * (BYTES["fp32"] if arch.temporal else b), "rewards": rewards}

    # activations of one training micro-batch under gradient checkpointing (rows R = micro_batch x CFG): the kept
    # input of every block (its hidden states: S_img + S_txt tokens for joint blocks, S_img for Wan's), one block's
    # recomputed internals (every matmul's saved input, the rows it sees x its d_in, + q, k, v, the attention output
    # and two norm inputs at 6·d per token) and the gradient flowing back through it (2 x the hidden states).
    rows_of = {"img": s_img, "txt": s_txt, "all": s_img + s_txt, "vec": 1}
    s_kept = s_img + (s_txt if arch.attention == "joint" else 0)
    n_blocks = sum(1 for _ in _blocks(tr))
    linears = [(bn, [(stream_of(f"{bn}.{n}", arch), m) for n, m in blk.named_modules()
                     if isinstance(m, torch.nn.Linear)]) for bn, blk in _blocks(tr)]  # fmt: skip
    block_saved = max(sum(rows_of[st] * m.in_features for st, m in ms) for _, ms in linears) + 6 * d * (s_img + s_txt)
    r = v["micro_batch"] * c
    # without checkpointing every block's internals are kept
    act_train = r * b * ((n_blocks + 2) * s_kept * d + block_saved if gc else n_blocks * block_saved)
    # sampling (no autograd): the residual streams and one block's widest matmul output for sample_batch x CFG rows
    widest = max(rows_of[st] * m.out_features for _, ms in linears for st, m in ms)
    act_sample = v["sample_batch"] * c * b * (2 * (s_img + s_txt) * d + widest)
    offload = bool(v["offload_frozen"])
    train_peak = sum(mem.values()) + (0 if offload else sum(frozen.values())) + act_train
    sample_peak = sum(mem.values()) + sum(frozen.values()) + act_sample
    return {
        "preset": name or (preset if isinstance(preset, str) else "(dict)"), "model": arch.model,
        "arch_exact": exact, "lora_targets_known": targets_known, "algorithm": algo,
        "pixels": f"{height}x{width}" + (f"x{frames}f" if arch.temporal else ""), "image_tokens": s_img,
        "text_tokens": s_txt, "hidden": d, "stream_weights": weights, "attention_layers": layers,
        "call_tflop": {k: x / 1e12 for k, x in f.items()}, "sampling_rows": sample_rows, "training_rows": train_rows,
        "extra_forward_rows": extra, "gradient_checkpointing": gc, "lora": lora, "lora_params": lora_params,
        "lora_modules": lora_modules, "epoch_pflop": {k: x / 1e15 for k, x in flops.items()},
        "epoch_pflop_total": total_flops / 1e15, "peak_tflops": peak_tflops, "mfu": mfu,
        "seconds_per_epoch_one_gpu": seconds, "gpu_bytes": {**mem, **{k: x for k, x in frozen.items()}},
        "offload_frozen": offload, "activation_bytes_training": act_train, "activation_bytes_sampling": act_sample,
        "training_peak_bytes": train_peak, "sampling_peak_bytes": sample_peak,
    }  # fmt: skip


def real_presets() -> list[str]:
    """Every preset whose model is not the toy (new presets are picked up by name, nothing to register here)."""
    from fdfo_fast.config import PRESETS

    return [name for name, p in PRESETS.items() if p.get("model", "toy") != "toy"]


def sketch_presets() -> dict[str, dict]:
    """For each model of ARCH that no real preset uses yet, a stand-in preset: the FDFO recipe of sd35m-fdfo (sd3
    kinds) or flux-fdfo (the others) on that model, at the pipeline's default text length; Wan at its 480p (480 x 832,
    81 frames). Marked as sketches in the table; they disappear once a preset of that model exists."""
    from fdfo_fast.config import PRESETS

    used = {arch_for(p["model"], p["model_path"])[0].model for p in map(PRESETS.get, real_presets())}
    out = {}
    for (kind, path), a in ARCH.items():
        if a.model in used:
            continue
        base = "sd35m-fdfo" if kind == "sd3" else "flux-fdfo"
        values = dict(PRESETS[base], model=kind, model_path=path)
        if kind != "sd3":
            values["max_sequence_length"] = 0
        if a.temporal:
            values.update(resolution=480, width=832, num_frames=a.frames)
        out[f"sketch: {base} on {a.model}"] = values
    return out


def estimates(peak_tflops: float = PEAK_TFLOPS, mfu: float = MFU, sketches: bool = True) -> list[dict]:
    """One estimate per real preset, then (sketches) one per model that has no preset yet."""
    rows = [estimate(p, peak_tflops=peak_tflops, mfu=mfu) for p in real_presets()]
    if sketches:
        rows += [estimate(v, name, peak_tflops, mfu) for name, v in sketch_presets().items()]
    return rows


def estimates_markdown(rows: list[dict]) -> str:
    head = ("| preset | model | algorithm | pixels | tokens img + txt | TFLOP / call | sampling rows | training rows | "
            "PFLOP / epoch | h / epoch, 1 GPU | weights + LoRA state GiB | activations (train) GiB | "
            "training peak GiB | sampling peak GiB |")  # fmt: skip
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in rows:
        held = sum(x for k, x in e["gpu_bytes"].items() if k not in ("text encoders", "VAE", "rewards"))
        mark = "" if e["arch_exact"] and e["lora_targets_known"] else " (assumed)"
        lines.append(
            f"| {e['preset']} | {e['model']}{mark} | {e['algorithm']} | {e['pixels']} | "
            f"{e['image_tokens']} + {e['text_tokens']} | {e['call_tflop']['total']:.2f} | {e['sampling_rows']} | "
            f"{e['training_rows']} | {e['epoch_pflop_total']:.1f} | {e['seconds_per_epoch_one_gpu'] / 3600:.2f} | "
            f"{_gib(held)} | {_gib(e['activation_bytes_training'])} | {_gib(e['training_peak_bytes'])}"
            f"{' (offload)' if e['offload_frozen'] else ''} | {_gib(e['sampling_peak_bytes'])} |"
        )
    p = rows[0] if rows else {"peak_tflops": PEAK_TFLOPS, "mfu": MFU}
    lines.append("")
    lines.append(f"Time at {p['peak_tflops']:g} TFLOP/s peak x {p['mfu']:.0%} MFU; transformer matmuls only (no VAE "
                 f"decode, reward scoring, text encoding, evaluation).")  # fmt: skip
    return "\n".join(lines)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f}"


def markdown(c: dict) -> str:
    lines = ["| model | component | parameters | fp32 GiB | bf16 / fp16 GiB |", "|---|---|---:|---:|---:|"]
    for model, parts in c["components"].items():
        for comp, n in parts.items():
            lines.append(f"| {model} | {comp} | {n / 1e9:.3f} B | {_gib(4 * n)} | {_gib(2 * n)} |")
    presets = c["presets"]
    lines += ["", "| preset | LoRA rank | adapted Linear modules | LoRA parameters | LoRA + grad + AdamW (fp32) GiB |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for preset, p in presets.items():
        lines.append(f"| {preset} | {p['lora_rank']} | {p['lora_modules']} | {p['lora_params'] / 1e6:.2f} M | "
                     f"{_gib(p['lora_params'] * LORA_BYTES_PER_PARAM)} |")  # fmt: skip
    names = list(dict.fromkeys(k for p in presets.values() for k in p["gpu_bytes"]))
    lines += ["", "| weights on the training GPU (GiB) | " + " | ".join(presets) + " |",
              "|---|" + "---:|" * len(presets)]  # fmt: skip
    cell = lambda p, k: _gib(p["gpu_bytes"][k]) if k in p["gpu_bytes"] else "-"  # noqa: E731
    for k in names:
        lines.append(f"| {k} | " + " | ".join(cell(p, k) for p in presets.values()) + " |")

    def row(label, fn, bold=False):
        values = [_gib(fn(p)) for p in presets.values()]
        values = [f"**{v}**" for v in values] if bold else values
        lines.append(f"| {'**' + label + '**' if bold else label} | " + " | ".join(values) + " |")

    total = lambda p: sum(p["gpu_bytes"].values())  # noqa: E731
    frozen = lambda p: sum(v for k, v in p["gpu_bytes"].items() if k.startswith(("VAE", "text", "reward")))  # noqa: E731
    rewards = lambda p: sum(v for k, v in p["gpu_bytes"].items() if k.startswith("reward"))  # noqa: E731
    row("total: sampling, scoring and training", total, bold=True)
    row("--offload-frozen: moved to the CPU for the training passes", frozen)
    row("--offload-frozen: left for the training passes", lambda p: total(p) - frozen(p), bold=True)
    row("--offload-frozen under ZeRO-3 (the VAE is sharded, stays): moved", lambda p: frozen(p) - next(
        v for k, v in p["gpu_bytes"].items() if k.startswith("VAE")))  # fmt: skip
    row("--reward-dtype bf16 (every reward model in bf16) instead: saves", lambda p: rewards(p)
        - 2 * p["reward_params"])  # fmt: skip
    row("--reward-device cuda:1 (the rewards on another GPU): saves", rewards)
    return "\n".join(lines)


DOC = ROOT / "docs" / "memory.md"
MARKERS = {  # the generated blocks of docs/memory.md
    "counts": ("<!-- memory_table.py: begin -->\n", "\n<!-- memory_table.py: end -->"),
    "estimates": ("<!-- memory_table.py estimates: begin -->\n", "\n<!-- memory_table.py estimates: end -->"),
}


def doc_block(doc: str, which: str) -> str:
    begin, end = MARKERS[which]
    return doc[doc.index(begin) + len(begin) : doc.index(end)]


def write_doc(tables: dict[str, str]) -> None:
    """Replace docs/memory.md's generated blocks with `tables` ({"counts": ..., "estimates": ...})."""
    doc = DOC.read_text()
    for which, text in tables.items():
        begin, end = MARKERS[which]
        doc = doc[: doc.index(begin) + len(begin)] + text + doc[doc.index(end) :]
    DOC.write_text(doc)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts and estimates as JSON, not the tables")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                        help="the GPU's dense bf16 peak, TFLOP/s (default: H100 / H200 SXM's 989)")  # fmt: skip
    parser.add_argument("--mfu", type=float, default=MFU, help="assumed sustained fraction of the peak (default 0.4)")
    parser.add_argument(
        "--write-doc", action="store_true", help="also rewrite docs/memory.md's tables (after a preset changed)"
    )
    args = parser.parse_args(argv)
    if not (args.peak_tflops > 0 and 0 < args.mfu <= 1):
        parser.error("--peak-tflops must be > 0 and --mfu in (0, 1]")
    c, e = counts(), estimates(args.peak_tflops, args.mfu)
    print(json.dumps({**c, "estimates": e}, indent=1) if args.json else markdown(c) + "\n\n" + estimates_markdown(e))
    if args.write_doc:
        if (args.peak_tflops, args.mfu) != (PEAK_TFLOPS, MFU):
            parser.error("--write-doc writes the default --peak-tflops / --mfu (the page states them)")
        write_doc({"counts": markdown(c), "estimates": estimates_markdown(e)})


if __name__ == "__main__":
    main()
