"""SD3 / FLUX adapters on tiny random-weight pipelines built offline and loaded through the real loading code:
velocities and sampling agree with diffusers' own pipelines, FDFO / Flow-GRPO train LoRA factors only on the modules
the recipes' target lists select (as peft applies them), the exported LoRA loads at full strength with both
diffusers' `load_lora_weights` and peft's `PeftModel.from_pretrained`, and bad paths / types / missing extras give one
clear error."""

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from tiny_diffusers import build_tiny_sd35  # noqa: E402

import fdfo_fast.builder as builder  # noqa: E402
import fdfo_fast.train as train_mod  # noqa: E402
from fdfo_fast.config import PRESETS, make_config  # noqa: E402
from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.models import MODEL_KINDS  # noqa: E402
from fdfo_fast.models.diffusers_flow import FluxFlowModel, SD3FlowModel, pack_latents, unpack_latents  # noqa: E402
from fdfo_fast.sampling import Sampler, sample_euler, sigma_schedule  # noqa: E402


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory):
    return str(build_tiny_sd35(tmp_path_factory.mktemp("tiny_sd35")))


def _load(cls, path, **kw):
    return cls.from_pretrained(path, dtype=torch.float32, resolution=32, max_sequence_length=16, **kw).eval()


def _ft(mode, rank, alpha, targets=None):
    """The fine-tuning fields of a config, as setup_finetune reads them (targets None = the recipe, "auto")."""
    spec = ",".join(targets) if targets else "auto"
    return SimpleNamespace(
        finetune=mode, lora_rank=rank, lora_alpha=alpha, lora_targets=spec, gradient_checkpointing=False
    )


def test_pack_unpack_match_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(x), (4, 6, 10)), x)


# Sampling against StableDiffusion3Pipeline / FluxPipeline with their default grids: tests/test_generate.py.


def test_prompt_embeddings_are_cached(sd3_dir, monkeypatch):
    model = _load(SD3FlowModel, sd3_dir)
    calls = []
    real = model._encode_uncached
    monkeypatch.setattr(model, "_encode_uncached", lambda ps: calls.append(list(ps)) or real(ps))
    a = model.encode_prompts(["x", "y", "x"])
    b = model.encode_prompts(["y", "x"])
    assert calls == [["x", "y"]]
    torch.testing.assert_close(a["embeds"][2], b["embeds"][1])


def _train_cfg(tmp_path, model, path, algorithm, **kw):
    common = dict(
        model=model,
        model_path=path,
        algorithm=algorithm,
        out=str(tmp_path / "run"),
        resolution=32,
        dtype="fp32",
        max_sequence_length=16,
        finetune="lora",
        lora_rank=4,
        lora_alpha=8.0,  # r != α: an export that lost α would load at r/α strength
        num_steps=3,
        epochs=2,
        eval_every=0,
        eval_per_category=1,
        eval_num_steps=2,
        save_every=1,
        reward="quality:1,jpeg_incompressibility:0.05",  # prompt-free rewards that score any image
        lr=1e-2,
        progress=False,
        log_with="none",
        device="cpu",
    )
    if algorithm == "fdfo":
        common.update(pairs_per_epoch=2, churn=0.05)
    else:
        common.update(prompts_per_epoch=1, group_size=3)
    common.update(kw)
    return make_config(overrides=common)


def _train_and_keep_model(cfg, monkeypatch):
    """Run train() and return the model object it trained (to compare its weights with the base)."""
    held = {}
    real = builder.load_model

    def load(c):
        held["model"] = real(c)
        return held["model"]

    monkeypatch.setattr(builder, "load_model", load)
    summary = train_mod.train(cfg)
    return held["model"], summary


# The recipes' LoRA target_modules, copied from Flow-GRPO (yifan123/flow_grpo scripts/train_sd3.py, r 32 / α 64, and
# scripts/train_flux.py, r 64 / α 128); the FDFO reference code trains SD3.5 with the same attention list.
RECIPE_TARGETS = {
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
             "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}  # fmt: skip


def assert_only_the_lora_moved(base_transformer, model) -> dict:
    """After training: the LoRA factors are the only trainable parameters, training moved them (B starts at 0), and
    every base weight equals `base_transformer`'s (a freshly loaded base); returns the LoRA parameters by name."""
    trained = dict(model.transformer.named_parameters())
    lora = {n: p for n, p in trained.items() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)
    for name, p in base_transformer.named_parameters():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        q = trained.get(name, trained.get(peft_name))
        assert q is not None and torch.equal(p, q), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    return lora


def _adapted(transformer):
    """(names of the modules holding a LoRA, number of LoRA parameters)."""
    names = sorted(n for n, m in transformer.named_modules() if hasattr(m, "lora_A"))
    return names, sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)


def _fresh(cls, path):
    """The adapter over a pipeline diffusers loads anew from the base folder (no LoRA)."""
    import diffusers

    pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(path, local_files_only=True)
    pipe.transformer.eval()
    return cls(pipe, 32, 16)


def _outputs(model, x, cond):
    """One velocity and a 3-step Euler sample decoded to an image."""
    with torch.no_grad():
        v = model(x, torch.tensor([0.6]), cond)
        x0 = sample_euler(model, Sampler("euler", sigma_schedule(3)), cond, None, [7], model.latent_shape).x0
        return v, model.decode(x0)


def _check_exported_lora(model, cls, path, folder, kind, tmp_path, require_effect):
    """`folder` loads into a fresh pipeline from the base folder at full strength with (a) diffusers'
    `pipe.load_lora_weights(folder)` and (b) peft's `PeftModel.from_pretrained(transformer, folder)`: the same
    weights, scaling and ops as `model`, so velocity and image are equal, not merely close. Its PEFT files are what
    peft's own `save_pretrained` writes for the same adapter. Without α in the metadata (the export before the
    fix) diffusers loads α = r, exactly `model` with its LoRA scaled by r/α, which differs from `model`."""
    from peft import PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    r, alpha = model.transformer.peft_config["default"].r, model.transformer.peft_config["default"].lora_alpha
    assert r != alpha  # otherwise the α check below shows nothing
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(["a cat"])
    v_trained, img_trained = _outputs(model, x, cond)
    v_base, img_base = _outputs(_fresh(cls, path), x, cond)
    assert not require_effect or not torch.equal(v_base, v_trained)  # the LoRA changes the output

    diffusers_loaded = _fresh(cls, path)
    diffusers_loaded.pipe.load_lora_weights(str(folder))
    v, img = _outputs(diffusers_loaded, x, cond)
    assert torch.equal(v, v_trained) and torch.equal(img, img_trained)

    peft_loaded = _fresh(cls, path)
    PeftModel.from_pretrained(peft_loaded.transformer, str(folder))  # injects into the transformer in place
    v, img = _outputs(peft_loaded, x, cond)
    assert torch.equal(v, v_trained) and torch.equal(img, img_trained)

    # peft's own folder for the same adapter (recipe targets, r, α) holding the same factors
    ref = get_peft_model(
        _fresh(cls, path).transformer,
        LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=RECIPE_TARGETS[kind]),
    )
    own = dict(model.transformer.named_parameters())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(own[n.removeprefix("base_model.model.")])
    ref.save_pretrained(str(tmp_path / "peft_reference"))
    reference = tmp_path / "peft_reference"
    ours, theirs = load_file(folder / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = lambda d: json.loads((d / "adapter_config.json").read_text())
    unordered = lambda c: {**c, "target_modules": sorted(c["target_modules"])}  # a set in peft: any order
    assert unordered(config(folder)) == unordered(config(reference))

    # before the fix: the same factors saved without the adapter metadata
    saved = load_file(folder / "pytorch_lora_weights.safetensors")
    layers = {k.removeprefix("transformer."): v for k, v in saved.items()}
    type(model.pipe).save_lora_weights(str(tmp_path / "no_metadata"), transformer_lora_layers=layers)
    half = _fresh(cls, path)
    half.pipe.load_lora_weights(str(tmp_path / "no_metadata"))
    v_half, img_half = _outputs(half, x, cond)
    layers_of = [m for m in model.transformer.modules() if isinstance(m, LoraLayer)]
    for m in layers_of:
        m.set_scale("default", r / alpha)
    v_scaled, img_scaled = _outputs(model, x, cond)
    for m in layers_of:
        m.set_scale("default", 1.0)
    assert torch.equal(v_half, v_scaled) and torch.equal(img_half, img_scaled)
    assert not require_effect or not torch.equal(v_half, v_trained)
    diff = lambda a, b: f"{(a - b).abs().max():.3g}"
    print(f"{folder.name}: |v_lora - v_base| {diff(v_trained, v_base)}, at half strength |v| {diff(v_half, v_trained)}"
          f" |image| {diff(img_half, img_trained)}")  # fmt: skip


@pytest.mark.parametrize(
    "kind, algorithm, extra",
    [("sd3", "fdfo", {"velocity_penalty": 0.1}), ("sd3", "flow_grpo", {"kl_beta": 0.01, "cfg_scale": 2.0}),
     ("flux", "fdfo", {}), ("sd3", "diffusion_nft", {"nft_kl_beta": 0.01, "old_decay_rate": 0.2})],
)  # fmt: skip
def test_lora_training_changes_only_lora_and_exports(kind, algorithm, extra, sd3_dir, flux_dir, tmp_path, monkeypatch):
    path = sd3_dir if kind == "sd3" else flux_dir
    cls = SD3FlowModel if kind == "sd3" else FluxFlowModel
    base = _load(cls, path)
    model, summary = _train_and_keep_model(_train_cfg(tmp_path, kind, path, algorithm, **extra), monkeypatch)
    assert "eval/reward" in summary and "eval/geneval" not in summary

    lora = assert_only_the_lora_moved(base.transformer, model)

    run = tmp_path / "run"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state["model"]) == {f"transformer.{n}" for n in lora} and state["model_config"]["lora"] is True
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")

    # the default targets are the recipe's list as peft applies it, and RUN/lora loads at full strength both ways
    ref = _load(cls, path).transformer
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=RECIPE_TARGETS[kind]), ref)
    assert _adapted(model.transformer) == _adapted(ref)
    _check_exported_lora(model.eval(), cls, path, run / "lora", kind, tmp_path, require_effect=True)

    # best_lora/ (the best held-out epoch) gets the same export: it loads to exactly the weights best.pt holds
    best = _load(cls, path)
    best.setup_finetune(_ft("lora", 4, 8.0))
    best.load_trainable_state_dict(torch.load(run / "best.pt", weights_only=True)["model"], "best.pt")
    _check_exported_lora(best, cls, path, run / "best_lora", kind, tmp_path, require_effect=False)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_lora_reference_model_is_the_base_transformer(kind, sd3_dir, flux_dir, tmp_path):
    """The reference the training loop builds (make_context, velocity penalty on) is the base model with the
    adapters off: with non-zero LoRA B factors its velocity equals a fresh load of the base pipeline's, the LoRA
    model's differs, and the adapters are back on after the reference call."""
    path, cls = (sd3_dir, SD3FlowModel) if kind == "sd3" else (flux_dir, FluxFlowModel)
    cfg = _train_cfg(tmp_path, kind, path, "fdfo", velocity_penalty=0.1)
    model = builder.load_model(cfg.model).eval()
    ctx, _, params = builder.make_context(cfg, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, *model.latent_shape, generator=gen)
    sigma = torch.tensor([0.7, 0.3])
    cond = model.encode_prompts(["a cat", "a red dog"])
    with torch.no_grad():
        v_lora = model(x, sigma, cond)
        v_ref = ctx.reference(x, sigma, cond)
        v_lora_after = model(x, sigma, cond)
        v_base = _load(cls, path)(x, sigma, cond)
    assert torch.equal(v_ref, v_base)  # the disabled peft layers call the base layers: the same ops
    rel = float((v_lora - v_base).abs().max()) / float(v_base.abs().max())
    print(f"{kind}: LoRA moves the velocity by {rel:.3g} of its max")
    assert rel > 1e-2  # measured 0.9 (sd3), 1.1 (flux): the LoRA does act
    assert torch.equal(v_lora_after, v_lora)
    assert not any(p.requires_grad for p in ctx.reference.parameters())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad) and params


@pytest.mark.parametrize("kind", ["sd35", "flux"])
def test_lora_targets_are_the_recipes_as_peft_applies_them(kind, sd35_dir, flux_dir):
    """Default targets = peft given the recipe's list: on SD3.5's dual-attention (MMDiT-X) blocks the second
    self-attention `attn2` stays frozen (the bare names of the previous default adapt it). An explicit list is
    matched as peft matches target_modules (suffixes; names that match nothing are dropped)."""
    path, cls, recipe = (sd35_dir, SD3FlowModel, "sd3") if kind == "sd35" else (flux_dir, FluxFlowModel, "flux")

    def peft_reference(targets):
        transformer = _load(cls, path).transformer
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets)), transformer)
        return _adapted(transformer)

    def ours(targets=None):
        model = _load(cls, path)
        model.setup_finetune(_ft("lora", 4, 8.0, targets))
        return _adapted(model.transformer)

    recipe_set = peft_reference(RECIPE_TARGETS[recipe])
    assert ours() == ours(("auto",)) == recipe_set  # None / --lora-targets auto: the model's recipe
    bare = peft_reference([t.removeprefix("attn.") for t in RECIPE_TARGETS[recipe]])
    if kind == "sd35":
        attn2 = [n for n, _ in _load(cls, path).transformer.named_modules() if ".attn2." in n]
        assert attn2 and not any(".attn2." in n for n in recipe_set[0])
        assert [n for n in bare[0] if ".attn2." in n] == ["transformer_blocks.0.attn2." + p for p in
                                                          ("to_k", "to_out.0", "to_q", "to_v")]  # fmt: skip
    print(f"{kind}: recipe {len(recipe_set[0])} modules / {recipe_set[1]} params, bare {len(bare[0])} / {bare[1]}")
    explicit = ("to_q", "ff.net.2", "no_such_proj")  # peft adapts what matches and ignores the rest
    assert ours(explicit) == peft_reference(explicit)


def test_resume_continues_an_sd3_lora_run(sd3_dir, tmp_path):
    train_mod.train(_train_cfg(tmp_path, "sd3", sd3_dir, "fdfo", epochs=1))
    train_mod.train(_train_cfg(tmp_path, "sd3", sd3_dir, "fdfo", epochs=2), resume=True)
    once = tmp_path / "once"
    train_mod.train(_train_cfg(once, "sd3", sd3_dir, "fdfo", epochs=2))
    read = lambda d: [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rs: [r["loss"] for r in rs if r["kind"] == "train"]
    assert losses(read(tmp_path)) == pytest.approx(losses(read(once)), rel=1e-5)


def test_full_finetune_trains_the_transformer(sd3_dir, tmp_path, monkeypatch):
    cfg = _train_cfg(tmp_path, "sd3", sd3_dir, "fdfo", finetune="full", epochs=1, velocity_penalty=0.1, lr=1e-3)
    model, _ = _train_and_keep_model(cfg, monkeypatch)
    base = _load(SD3FlowModel, sd3_dir)
    changed = [
        n
        for n, p in model.transformer.named_parameters()
        if not torch.equal(p, dict(base.transformer.named_parameters())[n])
    ]
    assert changed
    with pytest.raises(FdfoError, match="no LoRA to export"):
        model.export_lora(tmp_path / "x")


def test_bad_models_give_one_clear_error(sd3_dir, flux_dir, tmp_path, monkeypatch):
    with pytest.raises(FdfoError, match="does not exist or is not a folder"):
        SD3FlowModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FdfoError, match="no model_index.json"):
        SD3FlowModel.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FdfoError, match="holds a FluxPipeline, expected a StableDiffusion3Pipeline"):
        SD3FlowModel.from_pretrained(flux_dir)
    with pytest.raises(FdfoError, match="cannot load a StableDiffusion3Pipeline from someone/not-cached"):
        SD3FlowModel.from_pretrained("someone/not-cached")
    with pytest.raises(FdfoError, match="--model-path is required"):
        make_config(overrides=dict(model="sd3"))
    with pytest.raises(FdfoError, match="--cfg-scale must be 1 for flux"):
        make_config(overrides=dict(model="flux", model_path=flux_dir, cfg_scale=2.0))
    with pytest.raises(FdfoError, match="--finetune must be 'full' for the toy model"):
        make_config(overrides=dict(finetune="lora"))
    model = _load(SD3FlowModel, sd3_dir)
    with pytest.raises(FdfoError, match="match no module"):
        model.setup_finetune(_ft("lora", 4, 4.0, ("no_such_proj",)))
    with pytest.raises(FdfoError, match="--lora-targets norm1: Target module AdaLayerNormZero"):  # not a Linear
        _load(SD3FlowModel, sd3_dir).setup_finetune(_ft("lora", 4, 4.0, ("norm1",)))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed
    with pytest.raises(FdfoError, match=r"pip install -e '\.\[diffusers\]' in the fdfo_fast checkout"):
        SD3FlowModel.from_pretrained(sd3_dir)


REAL_PRESETS = [name for name, values in PRESETS.items() if values.get("model", "toy") != "toy"]


def test_every_model_family_has_a_preset():
    assert {PRESETS[name]["model"] for name in REAL_PRESETS} == set(MODEL_KINDS) - {"toy"}


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_real_model_presets_resolve_and_their_reward_specs_parse(preset, capsys):
    """The presets validate as they are (a GPU user runs them unchanged); their reward-model strings parse, and
    offline the first hub id fails with one clear line instead of a traceback."""
    from fdfo_fast.rewards.hf_models import load_reward_models

    cfg = make_config(preset)
    assert cfg.model.model in MODEL_KINDS and cfg.model.finetune == "lora" and cfg.model.lora_rank in (32, 64)
    assert cfg.run.prompts == "geneval-coco:train" and cfg.model.gradient_checkpointing
    train_mod.main(["--preset", preset, "--dry-run"])
    assert f'"model": "{cfg.model.model}"' in capsys.readouterr().out
    with pytest.raises(FdfoError, match="cannot load"):
        load_reward_models(cfg.rewards.reward_models)
