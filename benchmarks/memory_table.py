"""Weight memory of the presets' models and of the README's reward models, from parameter counts (docs/memory.md).

Every network is built from its published config with the real class (diffusers SD3Transformer2DModel,
FluxTransformer2DModel, AutoencoderKL; transformers CLIPTextModel(WithProjection), T5EncoderModel, CLIPModel,
Qwen2_5_VLForConditionalGeneration; the project's AestheticHead) on the meta device: no weights, no download, a few
seconds on a CPU. Its parameters are counted (`count_parameters`: each tensor once, tied embeddings once), and
bytes = parameters x 4 (fp32) or x 2 (bf16 / fp16). The LoRA adapter is counted from the transformer's own modules:
every nn.Linear that the preset's targets select the way peft selects them (the trainer's own matching) adds
r·(d_in + d_out) parameters; trained in fp32 with AdamW, each costs 4 (weight) + 4 (gradient) + 8 (two moments)
bytes. Activations (sampling, the VAE decode, the training passes with gradient checkpointing) depend on resolution,
batch and attention backend and are NOT included: measure them (benchmarks/epoch_profile.py, sd35m_shape.py).

    python benchmarks/memory_table.py            # the markdown tables of docs/memory.md
    python benchmarks/memory_table.py --json     # the counts as JSON
"""

from __future__ import annotations

import argparse
import json
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
    return {
        "SD3.5-Medium": {
            "transformer": _meta(lambda: diffusers.SD3Transformer2DModel(**SD35M_CONFIG)),
            "vae": _meta(vae),
            "text_encoder (CLIP-L)": _meta(lambda: clip_text(CLIP_L_TEXT, True)),
            "text_encoder_2 (CLIP-G)": _meta(lambda: clip_text(CLIP_G_TEXT, True)),
            "text_encoder_3 (T5-XXL)": _meta(t5),
        },
        "FLUX.1-dev": {
            "transformer": _meta(lambda: diffusers.FluxTransformer2DModel(**FLUX_DEV_CONFIG)),
            "vae": _meta(vae),
            "text_encoder (CLIP-L)": _meta(lambda: clip_text(CLIP_L_TEXT, False)),
            "text_encoder_2 (T5-XXL)": _meta(t5),
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
        model = "SD3.5-Medium" if p["model"] == "sd3" else "FLUX.1-dev"
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON instead of the tables")
    args = parser.parse_args(argv)
    c = counts()
    print(json.dumps(c, indent=1) if args.json else markdown(c))


if __name__ == "__main__":
    main()
