"""SD3 / FLUX adapters on tiny random-weight pipelines built offline and loaded through the real loading code:
velocities and sampling agree with diffusers' own pipelines, FDFO / Flow-GRPO train LoRA factors only, the exported
LoRA loads into a diffusers pipeline, and bad paths / types / missing extras give one clear error."""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_diffusers import build_tiny_flux, build_tiny_sd3  # noqa: E402

import fdfo_fast.train as train_mod  # noqa: E402
from fdfo_fast.config import make_config  # noqa: E402
from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.models.diffusers_flow import FluxFlowModel, SD3FlowModel, pack_latents, unpack_latents  # noqa: E402
from fdfo_fast.sampling import sample_euler, sigma_schedule, start_noise  # noqa: E402


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return str(build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return str(build_tiny_flux(tmp_path_factory.mktemp("tiny_flux")))


def _load(cls, path, **kw):
    return cls.from_pretrained(path, dtype=torch.float32, resolution=32, max_sequence_length=16, **kw).eval()


def test_pack_unpack_match_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(x), (4, 6, 10)), x)


def test_sd3_sampling_matches_the_diffusers_pipeline(sd3_dir):
    """Our Euler sampler + CFG through the adapter = StableDiffusion3Pipeline with the same σ's and start latents."""
    model = _load(SD3FlowModel, sd3_dir)
    prompts, seeds, steps, w = ["a red cube", "two cats"], [3, 4], 4, 2.0
    x1 = start_noise(seeds, model.latent_shape)
    ours = sample_euler(
        model,
        model.encode_prompts(prompts),
        model.encode_prompts([""] * 2),
        seeds,
        model.latent_shape,
        sigma_schedule(steps, shift=3.0),
        cfg_scale=w,
    ).x0
    # the pipeline's scheduler applies shift 3 to the σ's it is given: pass the unshifted linspace
    theirs = model.pipe(
        prompts,
        num_inference_steps=steps,
        sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist(),
        guidance_scale=w,
        latents=x1,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    images = model.decode(ours)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1


def test_flux_sampling_matches_the_diffusers_pipeline(flux_dir):
    model = _load(FluxFlowModel, flux_dir, guidance=3.5)
    prompts, seeds, steps = ["a red cube", "two cats"], [5, 6], 3
    x1 = start_noise(seeds, model.latent_shape)
    ours = sample_euler(model, model.encode_prompts(prompts), None, seeds, model.latent_shape, sigma_schedule(steps)).x0
    theirs = model.pipe(
        prompts,
        num_inference_steps=steps,
        sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist(),
        guidance_scale=3.5,
        latents=pack_latents(x1),
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(pack_latents(ours), theirs, atol=1e-4, rtol=1e-4)


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
        lora_alpha=4.0,
        num_steps=3,
        epochs=2,
        eval_every=0,
        eval_per_category=1,
        eval_num_steps=2,
        save_every=1,
        reward="quality:1,jpeg_incompressibility:0.05",  # prompt-free rewards that score any image
        lr=1e-2,
        progress=False,
        tensorboard=False,
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
    real = train_mod.load_model

    def load(c):
        held["model"] = real(c)
        return held["model"]

    monkeypatch.setattr(train_mod, "load_model", load)
    summary = train_mod.train(cfg)
    return held["model"], summary


@pytest.mark.parametrize(
    "kind, algorithm, extra",
    [("sd3", "fdfo", {"velocity_penalty": 0.1}), ("sd3", "flow_grpo", {"kl_beta": 0.01, "cfg_scale": 2.0}),
     ("flux", "fdfo", {})],
)  # fmt: skip
def test_lora_training_changes_only_lora_and_exports(kind, algorithm, extra, sd3_dir, flux_dir, tmp_path, monkeypatch):
    path = sd3_dir if kind == "sd3" else flux_dir
    cls = SD3FlowModel if kind == "sd3" else FluxFlowModel
    base = _load(cls, path)
    model, summary = _train_and_keep_model(_train_cfg(tmp_path, kind, path, algorithm, **extra), monkeypatch)
    assert "eval/reward" in summary and "eval/geneval" not in summary

    trained = dict(model.transformer.named_parameters())
    lora = {n: p for n, p in trained.items() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0: training moved it
    for name, p in base.transformer.named_parameters():  # every base weight is untouched
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        q = trained.get(name, trained.get(peft_name))
        assert q is not None and torch.equal(p, q), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    run = tmp_path / "run"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state["model"]) == {f"transformer.{n}" for n in lora} and state["model_config"]["lora"] is True
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")

    # the exported LoRA loads into a plain diffusers pipeline and changes its output
    import diffusers

    pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(path, local_files_only=True)
    pipe.transformer.eval()
    x = torch.randn(1, *model.latent_shape)
    cond = model.encode_prompts(["a cat"])
    with torch.no_grad():
        fresh = cls(pipe, 32, 16)
        v_base = fresh(x, torch.tensor([0.6]), cond)
        pipe.load_lora_weights(str(run / "lora"))
        v_lora = fresh(x, torch.tensor([0.6]), cond)
        v_trained = model.eval()(x, torch.tensor([0.6]), cond)
    assert not torch.allclose(v_base, v_lora)
    torch.testing.assert_close(v_lora, v_trained, atol=1e-5, rtol=1e-4)


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
        model.setup_finetune("lora", 4, 4.0, ("no_such_proj",))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed
    with pytest.raises(FdfoError, match=r"pip install 'fdfo_fast\[diffusers\]'"):
        SD3FlowModel.from_pretrained(sd3_dir)


@pytest.mark.parametrize("preset", ["sd35m-fdfo", "sd35m-flow-grpo", "flux-fdfo"])
def test_real_model_presets_resolve_and_their_reward_specs_parse(preset, capsys):
    """The presets validate as they are (a GPU user runs them unchanged); their reward-model strings parse, and
    offline the first hub id fails with one clear line instead of a traceback."""
    from fdfo_fast.rewards.hf_models import load_reward_models

    cfg = make_config(preset)
    assert cfg.model in ("sd3", "flux") and cfg.finetune == "lora" and cfg.lora_rank == 32
    train_mod.main(["--preset", preset, "--dry-run"])
    assert f'"model": "{cfg.model}"' in capsys.readouterr().out
    with pytest.raises(FdfoError, match="cannot load"):
        load_reward_models(cfg.reward_models)
