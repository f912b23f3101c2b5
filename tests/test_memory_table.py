"""benchmarks/memory_table.py (docs/memory.md): its parameter counts on the meta device are the counts of the real,
loaded models, its LoRA count is what peft adds, and a published size comes out."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_table  # noqa: E402

from fdfo_fast.config import ModelConfig  # noqa: E402
from fdfo_fast.models.diffusers_flow import SD3FlowModel  # noqa: E402


def test_meta_counts_and_lora_count_match_the_loaded_model_and_peft(sd3_dir):
    """The tiny SD3 pipeline (tests/tiny_diffusers.py) loaded with weights: the script's meta-device count of each
    component equals the loaded one's, and its LoRA count (r·(d_in + d_out) over the targets it matches) equals the
    parameters peft adds when the trainer sets up that LoRA."""
    import diffusers

    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32, max_sequence_length=16)
    for name, module in {"transformer": model.transformer, "vae": model.vae, **model.offloadable_modules()}.items():
        loaded = sum(p.numel() for p in module.parameters())
        cls = type(module)
        with torch.device("meta"):
            meta = cls.from_config(module.config) if isinstance(module, diffusers.ModelMixin) else cls(module.config)
        assert memory_table.count_parameters(meta) == loaded > 0, name
        assert all(p.is_meta for p in meta.parameters())
    with torch.device("meta"):
        meta_transformer = type(model.transformer).from_config(model.transformer.config)
    modules, lora = memory_table.lora_parameters(meta_transformer, SD3FlowModel.lora_recipe_targets, rank=4)
    before = sum(p.numel() for p in model.transformer.parameters())
    model.setup_finetune(ModelConfig(model="sd3", finetune="lora", lora_rank=4, lora_alpha=8.0))
    added = {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}
    assert (
        sum(p.numel() for p in added.values())
        == lora
        == sum(p.numel() for p in model.transformer.parameters()) - before
        and modules == len({n.split(".lora_")[0] for n in added}) > 0
    )


def test_flux_dev_counts_the_published_twelve_billion():
    """FLUX.1-dev's transformer from its published config: "a 12 billion parameter rectified flow transformer"
    (black-forest-labs/FLUX.1-dev model card); the count is 11.90 B."""
    import diffusers

    with torch.device("meta"):
        flux = diffusers.FluxTransformer2DModel(**memory_table.FLUX_DEV_CONFIG)
    assert 11.85e9 < memory_table.count_parameters(flux) < 12.0e9


@pytest.mark.parametrize(
    "name, cls, config, low, high",
    [  # the publishers' sizes: "8.1 billion parameters" (SD3.5-Large), "20B MMDiT" (Qwen-Image), "32 billion
        # parameter" (FLUX.2-dev), Wan2.1 "1.3B" / "14B", Mistral-Small-3.x-"24B"; Wan's "1.3B" counts 1.42 B
        ("SD3.5-Large", "SD3Transformer2DModel", "SD35L_CONFIG", 8.0e9, 8.15e9),
        ("Qwen-Image", "QwenImageTransformer2DModel", "QWEN_IMAGE_CONFIG", 20.0e9, 20.6e9),
        ("FLUX.2-dev", "Flux2Transformer2DModel", "FLUX2_DEV_CONFIG", 32.0e9, 32.5e9),
        ("Wan2.1-T2V-1.3B", "WanTransformer3DModel", "WAN21_1_3B_CONFIG", 1.3e9, 1.45e9),
        ("Wan2.1-T2V-14B", "WanTransformer3DModel", "WAN21_14B_CONFIG", 14.0e9, 14.5e9),
    ],
)
def test_new_transformers_count_their_published_sizes(name, cls, config, low, high):
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls)(**getattr(memory_table, config))
    n = memory_table.count_parameters(model)
    assert low < n < high and memory_table.build_components()[name]["transformer"].config == model.config


def test_mistral_small_text_encoder_counts_twenty_four_billion():
    import transformers as tf

    with torch.device("meta"):
        model = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(**memory_table.MISTRAL_SMALL_3_24B))
    assert 23.8e9 < memory_table.count_parameters(model) < 24.2e9


# Tiny instances of the five transformer classes with their forward inputs: (model, ARCH key, inputs, S_img, S_txt).
# Image and text lengths differ (and from 1) so a module assigned to the wrong stream changes the FLOP count.
def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _tiny_sd3():
    import diffusers

    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    )  # fmt: skip
    inputs = dict(hidden_states=_rand(1, 4, 8, 12), encoder_hidden_states=_rand(1, 7, 24),
                  pooled_projections=_rand(1, 12), timestep=torch.ones(1))  # fmt: skip
    return m, ("sd3", "stabilityai/stable-diffusion-3.5-large"), inputs, 4 * 6, 7


def _tiny_flux():
    import diffusers

    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    inputs = dict(hidden_states=_rand(1, 20, 8), encoder_hidden_states=_rand(1, 7, 24), pooled_projections=_rand(1, 12),
                  timestep=torch.ones(1), img_ids=torch.zeros(20, 3), txt_ids=torch.zeros(7, 3),
                  guidance=torch.ones(1))  # fmt: skip
    return m, ("flux", "black-forest-labs/FLUX.1-dev"), inputs, 20, 7


def _tiny_qwen_image():
    import diffusers

    m = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    inputs = dict(hidden_states=_rand(1, 20, 16), encoder_hidden_states=_rand(1, 7, 24),
                  encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long), timestep=torch.ones(1),
                  img_shapes=[(1, 4, 5)])  # fmt: skip
    return m, ("qwen_image", "Qwen/Qwen-Image"), inputs, 20, 7


def _tiny_flux2():
    import diffusers

    m = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    )  # fmt: skip
    a = torch.arange
    img_ids = torch.cartesian_prod(a(1), a(4), a(5), a(1))[None]  # (t, h, w, l) as Flux2Pipeline builds them
    txt_ids = torch.cartesian_prod(a(1), a(1), a(1), a(7))[None]
    inputs = dict(hidden_states=_rand(1, 20, 8), encoder_hidden_states=_rand(1, 7, 24), img_ids=img_ids,
                  txt_ids=txt_ids, timestep=torch.ones(1), guidance=torch.ones(1))  # fmt: skip
    return m, ("flux2", "black-forest-labs/FLUX.2-dev"), inputs, 20, 7


def _tiny_wan():
    import diffusers

    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    inputs = dict(hidden_states=_rand(1, 4, 3, 8, 10), encoder_hidden_states=_rand(1, 7, 24), timestep=torch.ones(1))
    return m, ("wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers"), inputs, 3 * 4 * 5, 7


TINY = [_tiny_sd3, _tiny_flux, _tiny_qwen_image, _tiny_flux2, _tiny_wan]


@pytest.mark.parametrize("build", TINY, ids=lambda f: f.__name__[6:])
def test_call_flop_formula_equals_counted_matmul_flops(build):
    """The formula for one transformer call (2·Σ weights x the tokens each sees + 4·d·(L_joint·S² + L_img·S_img² +
    L_cross·S_img·S_txt)) equals, to the FLOP, what torch's FlopCounterMode counts in a real forward of a tiny instance:
    every matmul, patchify convolution and attention product (math SDPA, so QKᵀ and PV show up as bmm). Both leave out
    the same things: norms, softmax, activations, RoPE, modulation arithmetic and biases (elementwise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, key, inputs, s_img, s_txt = build()
    arch = memory_table.ARCH[key]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**inputs)
    config = dict(model.config)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    weights = memory_table.stream_weights(model, arch)
    formula = memory_table.call_flops(weights, memory_table.attention_layers(config, arch), d, s_img, s_txt)
    assert weights["img"] and weights["txt"] and weights["vec"]
    assert counter.get_total_flops() == formula["total"] and formula["attention"] > 0


@pytest.mark.parametrize("build", TINY, ids=lambda f: f.__name__[6:])
def test_meta_count_and_lora_formula_match_the_real_class_and_peft(build):
    """A tiny instance of each class: the meta-device count equals the real module's, and the LoRA count
    r·(d_in + d_out) over the kind's targets (its registered recipe, else the fallback the table uses) equals the
    parameters peft adds."""
    from peft import LoraConfig

    model, (kind, path), _, _, _ = build()
    with torch.device("meta"):
        meta = type(model).from_config(model.config)
    assert memory_table.count_parameters(meta) == sum(p.numel() for p in model.parameters())
    targets, _ = memory_table._lora_targets(kind, {"lora_targets": "auto"})
    modules, lora = memory_table.lora_parameters(meta, targets, rank=4)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    added = {n: p.numel() for n, p in model.named_parameters() if "lora_" in n}
    assert sum(added.values()) == lora > 0 and modules == len({n.split(".lora_")[0] for n in added})


def test_estimates_have_a_row_for_every_real_preset_and_follow_the_preset():
    """One row per preset whose model is not the toy; the numbers move with the preset's options as the formulas
    say (a constructed preset: FDFO on SD3.5-Large and on Wan2.1-14B)."""
    from fdfo_fast.config import PRESETS

    real = [n for n, p in PRESETS.items() if p.get("model", "toy") != "toy"]
    rows = memory_table.estimates(sketches=False)
    assert [r["preset"] for r in rows] == real and {"sd35m-fdfo", "flux-fdfo"} <= set(real)
    md = memory_table.estimates_markdown(rows)
    assert all(f"| {n} |" in md for n in real)

    sd35m = {r["preset"]: r for r in rows}["sd35m-fdfo"]
    # SD3.5-M at 512² with 77 + 128 text tokens: 1.92 TFLOP linear + 0.31 attention (epoch_profile.py counts the same)
    assert (sd35m["image_tokens"], sd35m["text_tokens"]) == (1024, 205)
    assert abs(sd35m["call_tflop"]["linear"] - 1.92) < 0.005 and abs(sd35m["call_tflop"]["attention"] - 0.31) < 0.005

    base = dict(PRESETS["sd35m-fdfo"], model_path="stabilityai/stable-diffusion-3.5-large")
    e = memory_table.estimate(base, "sd35l")
    assert e["model"] == "SD3.5-Large" and e["arch_exact"] and e["sampling_rows"] == 864 * 40 == e["training_rows"]
    f = e["call_tflop"]
    per_row = f["total"] * 2 + f["linear"] + 2 * f["attention"]  # fwd + recompute + LoRA backward
    assert abs(e["epoch_pflop"]["training"] - 864 * 40 * per_row / 1e3) < 1e-6 * e["epoch_pflop"]["training"]
    cfg = memory_table.estimate(dict(base, cfg_scale=4.5, steps_per_sample=10), "sd35l-cfg")
    assert cfg["sampling_rows"] == 2 * 864 * 40 and cfg["training_rows"] == 2 * 864 * 10
    off = memory_table.estimate(dict(base, offload_frozen=True), "sd35l-offload")
    frozen = sum(e["gpu_bytes"][k] for k in ("text encoders", "VAE", "rewards"))
    assert off["training_peak_bytes"] == e["training_peak_bytes"] - frozen

    wan = dict(PRESETS["flux-fdfo"], model="wan", model_path="Wan-AI/Wan2.1-T2V-14B-Diffusers", resolution=480,
               width=832, num_frames=81, max_sequence_length=0)  # fmt: skip
    w = memory_table.estimate(wan, "wan14")
    # 21 latent frames x (480/16) x (832/16) tokens; the text (512 UMT5 tokens) only as cross-attention K/V
    assert (w["model"], w["image_tokens"], w["text_tokens"]) == ("Wan2.1-T2V-14B", 21 * 30 * 52, 512)
    assert w["attention_layers"] == {"joint": 0, "img": 40, "cross": 40} and w["hidden"] == 5120


def test_docs_memory_holds_the_tables_the_script_prints():
    """docs/memory.md's tables are the script's output for the current presets (after changing a preset's models,
    LoRA rank, reward dtypes or batch options, or adding one: `python benchmarks/memory_table.py --write-doc`)."""
    doc = memory_table.DOC.read_text()
    assert memory_table.doc_block(doc, "counts") == memory_table.markdown(memory_table.counts())
    assert memory_table.doc_block(doc, "estimates") == memory_table.estimates_markdown(memory_table.estimates())
