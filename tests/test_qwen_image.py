"""The Qwen-Image adapter on a tiny random-weight QwenImagePipeline built offline (tests/tiny_qwen_image.py) and loaded
through the real loading code. Every expected value comes from diffusers: `QwenImagePipeline.__call__` with its
defaults (its scheduler, σ grid, timesteps, prompt encoding, true CFG and decode), its `load_lora_weights`, and peft.
Tolerances are the pipeline's own rounding spread, measured as in tests/test_generate.py."""

import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from test_diffusers_models import (  # noqa: E402
    RECIPE_TARGETS,
    _adapted,
    _check_exported_lora,
    _ft,
    _train_and_keep_model,
    _train_cfg,
    assert_only_the_lora_moved,
)
from test_generate import U32, _pipeline_latents  # noqa: E402

from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.models.diffusers_flow import pack_latents, unpack_latents  # noqa: E402
from fdfo_fast.models.qwen_image import QwenImageFlowModel  # noqa: E402
from fdfo_fast.sampling import Sampler, guided_velocity  # noqa: E402

PROMPTS = ["a red cube", "two cats sitting on a green mat"]  # different token counts: padding and masks matter
# diffusers examples/dreambooth/train_dreambooth_lora_qwen_image.py, its target_modules without --lora_layers
DREAMBOOTH_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def qwen_dir(qwen_image_dir):
    return qwen_image_dir  # tests/conftest.py: built once per session (tests/test_real_model_numerics.py uses it too)


def _load(path, dtype=torch.float32, **kw):
    return QwenImageFlowModel.from_pretrained(path, dtype=dtype, resolution=32, **kw).eval()


def _interrupt_after_first_step(pipe, i, t, kwargs):
    """callback_on_step_end: the rest of the loop is skipped (diffusers' `interrupt`); the grid is already set."""
    pipe._interrupt = True
    return {}


def _size(model):
    """The pixel size the pipeline must be given (its default is 1024 px whatever the transformer)."""
    return dict(height=model.resolution, width=model.width)


def test_sigma_grid_and_timesteps_are_the_pipelines(qwen_dir):
    """σ grid = the scheduler's sigmas after QwenImagePipeline.__call__ (its sigmas and resolution-dependent mu,
    Qwen-Image's exponential shift with the last σ stretched to 0.02); with bf16 weights the transformer receives
    the very timestep tensors (values and dtype) the pipeline hands it."""
    grids = []
    for width in (32, 64):  # 16 and 32 image tokens: mu moves with the token count
        model = _load(qwen_dir, width=width)
        grids.append(model.sigma_schedule(3))
        for steps in (1, 2, 3, 50):
            model.pipe(PROMPTS[:1], num_inference_steps=steps, output_type="latent", **_size(model),
                       callback_on_step_end=_interrupt_after_first_step)  # fmt: skip
            if steps == 1:  # shift_terminal's stretch divides 0 by 0: the pipeline's own 1-step grid is NaN
                assert model.pipe.scheduler.sigmas[0].isnan()
                with pytest.raises(FdfoError, match="no finite σ grid for 1 step"):
                    model.sigma_schedule(steps)
                continue
            assert torch.equal(model.sigma_schedule(steps), model.pipe.scheduler.sigmas), (width, steps)
        assert model.sigma_schedule(50)[-2].item() == pytest.approx(0.02)  # shift_terminal
    assert not torch.equal(*grids)

    model = _load(qwen_dir, dtype=torch.bfloat16)
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"].detach().clone()), with_kwargs=True
    )
    steps = 4
    x1 = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(9))
    model.pipe(PROMPTS[:1], num_inference_steps=steps, latents=pack_latents(x1).to(torch.bfloat16),
               output_type="latent", **_size(model))  # fmt: skip
    theirs, seen[:] = list(seen), []
    Sampler("euler", model.sigma_schedule(steps)).run(model, x1, model.encode_prompts(PROMPTS[:1]))
    hook.remove()
    assert len(seen) == len(theirs) == steps
    for ours, ref in zip(seen, theirs, strict=True):
        assert ours.dtype == ref.dtype == torch.bfloat16 and torch.equal(ours, ref), (ours, ref)


def test_padded_embeddings_change_the_velocity_by_rounding_only(qwen_dir):
    """Every prompt's embedding is the pipeline's own (encode_prompt) padded with zeros to max_sequence_length, with
    its mask; the transformer's output with the padding masked equals the pipeline's unpadded call within twice the
    spread one rounding unit on the input latents causes."""
    model = _load(qwen_dir)
    cond = model.encode_prompts(PROMPTS)
    embeds, mask = model.pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=model.max_sequence_length)
    n = embeds.shape[1]
    assert cond["embeds"].shape == (2, model.max_sequence_length, embeds.shape[2]) and cond["mask"].shape == (2, 512)
    assert torch.equal(cond["mask"][:, :n], mask) and not cond["mask"][:, n:].any() and mask.sum(1).tolist()[0] < n
    assert torch.equal(cond["embeds"][:, :n], embeds) and not cond["embeds"][:, n:].any()

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, *model.latent_shape, generator=gen)
    sigma = torch.tensor([0.8, 0.4])
    img_shapes = [[(1, model.latent_shape[1] // 2, model.latent_shape[2] // 2)]] * 2

    def pipeline_velocity(lat):  # as QwenImagePipeline.__call__ calls the transformer (fp32 here)
        out = model.transformer(hidden_states=pack_latents(lat), timestep=sigma * 1000 / 1000,
                                encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, img_shapes=img_shapes,
                                return_dict=False)[0]  # fmt: skip
        return unpack_latents(out, model.latent_shape)

    with torch.no_grad():
        ref = pipeline_velocity(x)
        spread = max(
            (pipeline_velocity(x + x.abs() * U32 * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)) - ref)
            .abs()
            .max()
            .item()
            for _ in range(2)
        )
        err = (model(x, sigma, cond) - ref).abs().max().item()
    print(
        f"padding {n} -> {model.max_sequence_length} tokens: |v - v_pipeline| {err:.3g}, rounding spread {spread:.3g}"
    )
    assert 0 < spread and err <= 2 * spread, (err, spread)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_euler_sampling_equals_the_pipeline(qwen_dir, cfg_scale):
    """Deterministic Euler sampling = QwenImagePipeline with its defaults (true_cfg_scale 4.0 with the recipes'
    negative prompt " ", or no negative prompt = no CFG), the same start latents packed; the decoded image is the
    pipeline's own decode of those latents (output_type "pt" is (image + 1) / 2)."""
    steps = 3
    model = _load(qwen_dir, max_sequence_length=64)  # > every prompt here: the pipeline's 512 truncates nothing either
    x1 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(7))
    uncond = model.encode_negative(2) if cfg_scale != 1.0 else None
    sampler = Sampler("euler", model.sigma_schedule(steps), cfg_scale=cfg_scale)
    ours = sampler.run(model, x1, model.encode_prompts(PROMPTS), uncond).x0
    guidance = dict(negative_prompt=model.negative_prompt, true_cfg_scale=cfg_scale) if cfg_scale != 1.0 else {}
    theirs, spread = _pipeline_latents(model.pipe, PROMPTS, pack_latents(x1), steps, **_size(model), **guidance)
    err = (pack_latents(ours) - theirs).abs().max().item()
    print(f"cfg {cfg_scale}: |x0 - x0_pipeline| {err:.3g}, rounding spread {spread:.3g}")
    assert err <= 2 * spread, (err, spread)
    images = model.pipe(PROMPTS, num_inference_steps=steps, latents=pack_latents(x1), output_type="pt",
                        **_size(model), **guidance).images  # fmt: skip
    assert torch.equal(model.decode(unpack_latents(theirs, model.latent_shape)) * 0.5 + 0.5, images)


def test_fdfo_lora_epoch_trains_the_recipe_targets_and_exports(qwen_dir, tmp_path, monkeypatch):
    """One FDFO LoRA epoch with true CFG through train(): only LoRA factors move, on the dreambooth recipe's modules
    as peft applies them, and RUN/lora loads into a fresh pipeline with QwenImagePipeline.load_lora_weights and
    with PeftModel.from_pretrained to exactly the trained model's velocity and image (r != α)."""
    monkeypatch.setitem(RECIPE_TARGETS, "qwen_image", DREAMBOOTH_TARGETS)
    cfg = _train_cfg(tmp_path, "qwen_image", qwen_dir, "fdfo", epochs=1, max_sequence_length=32, cfg_scale=4.0)
    model, summary = _train_and_keep_model(cfg, monkeypatch)
    assert "eval/reward" in summary

    assert_only_the_lora_moved(_load(qwen_dir).transformer, model)

    reference = _load(qwen_dir).transformer
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=DREAMBOOTH_TARGETS), reference)
    assert _adapted(model.transformer) == _adapted(reference)
    names = _adapted(model.transformer)[0]
    assert names and all(".attn." in n for n in names)  # the image stream's attention projections only
    _check_exported_lora(model.eval(), QwenImageFlowModel, qwen_dir, tmp_path / "run" / "lora", "qwen_image",
                         tmp_path, require_effect=True)  # fmt: skip


def test_gradient_checkpointing_gives_the_same_gradients(qwen_dir):
    """One backward of the true-CFG velocity through LoRA factors: with gradient checkpointing the blocks run again
    in the backward (counted) and the loss and every gradient are the same as without."""
    results = []
    for checkpointing in (False, True):
        model = _load(qwen_dir)
        torch.manual_seed(0)
        ft = _ft("lora", 4, 8.0)
        ft.gradient_checkpointing = checkpointing
        params = model.setup_finetune(ft)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for n, p in model.transformer.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        calls = []
        hook = model.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda *a, calls=calls: calls.append(1)
        )
        model.train()
        x = torch.randn(2, *model.latent_shape, generator=gen)
        v = guided_velocity(model, x, torch.tensor([0.7, 0.3]), model.encode_prompts(PROMPTS),
                            model.encode_negative(2), 4.0)  # fmt: skip
        loss = v.square().mean()
        loss.backward()
        hook.remove()
        assert model.transformer.gradient_checkpointing is checkpointing
        results.append((loss.detach(), [p.grad.clone() for p in params], len(calls)))
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results
    assert calls_off == 1 and calls_on == 2  # recomputed in the backward
    assert torch.equal(loss_on, loss_off)
    assert len(grads_on) == len(grads_off) and all(torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))


def test_registered_and_loaded_through_the_config(qwen_dir):
    """--model qwen_image: the registry entry, and load_model with the config's fields (text length 0 = 512)."""
    import inspect

    from fdfo_fast.config import make_config
    from fdfo_fast.models.base import MODEL_KINDS, load_model

    assert MODEL_KINDS["qwen_image"] is QwenImageFlowModel and not inspect.isabstract(QwenImageFlowModel)
    cfg = make_config(overrides=dict(model="qwen_image", model_path=qwen_dir, dtype="fp32", resolution=32,
                                     cfg_scale=4.0, reward="quality:1"))  # fmt: skip
    model = load_model(cfg.model)
    assert type(model) is QwenImageFlowModel and model.max_sequence_length == 512 and model.latent_shape == (4, 8, 8)


def test_bad_sizes_give_one_clear_error(qwen_dir):
    with pytest.raises(FdfoError, match="resolution 36 must be a multiple of 8 for this VAE"):
        QwenImageFlowModel.from_pretrained(qwen_dir, dtype=torch.float32, resolution=36)
    with pytest.raises(FdfoError, match="max_sequence_length must be <= 1024"):
        QwenImageFlowModel.from_pretrained(qwen_dir, dtype=torch.float32, resolution=32, max_sequence_length=2048)
    with pytest.raises(FdfoError, match="holds a QwenImagePipeline, expected a StableDiffusion3Pipeline"):
        from fdfo_fast.models.diffusers_flow import SD3FlowModel

        SD3FlowModel.from_pretrained(qwen_dir)
