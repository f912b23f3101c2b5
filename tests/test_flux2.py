"""The FLUX.2 adapter against diffusers' own Flux2Pipeline, on a tiny random-weight pipeline built offline
(tests/tiny_flux2.py) and loaded through the real loading code.

The expected values come from diffusers: the pipeline's scheduler after its own __call__ (σ grid), the tensors its
loop hands the transformer (timesteps, guidance, position ids), its `output_type="latent"` result and its decoding,
its `load_lora_weights`, and peft's `PeftModel.from_pretrained`. Sampling tolerances are the pipeline's own rounding
spread, measured as in tests/test_generate.py (every step's latents moved by one fp32 unit, random signs)."""

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
    _train_and_keep_model,
    _train_cfg,
    assert_only_the_lora_moved,
)
from test_generate import _pipeline_latents  # noqa: E402
from tiny_flux2 import build_tiny_flux2  # noqa: E402

from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.models.flux2 import (  # noqa: E402
    Flux2FlowModel,
    latent_position_ids,
    pack_tokens,
    text_position_ids,
    unpack_tokens,
    unpatchify,
)
from fdfo_fast.sampling import Sampler  # noqa: E402

PROMPTS = ["a red cube", "two cats"]
# diffusers examples/dreambooth/train_dreambooth_lora_flux2.py: its default target_modules (no --lora_layers)
FLUX2_RECIPE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"] + [
    "to_qkv_mlp_proj",
    *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)],
]


TEXT_LENGTH = 64  # the training tests' prompt length: the tiny tokenizer's system message takes 27 tokens


def _matching(transformer, targets):
    """The targets peft's own matching finds a module for."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n, _ in transformer.named_modules() if n]
    return [t for t in targets if any(check_target_module_exists(LoraConfig(target_modules=[t]), n) for n in names)]


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return str(build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2")))


@pytest.fixture(scope="module")
def model(flux2_dir):
    """fp32, 32 px, the pipeline's default text length and guidance."""
    return Flux2FlowModel.from_pretrained(flux2_dir, dtype=torch.float32, resolution=32).eval()


class _Stop(Exception):
    pass


def _pipeline_grid(pipe, steps, size, prompt_embeds):
    """pipe.scheduler.sigmas right after the pipeline's own __call__ set them (stopped at its first transformer
    call: the grid is all that is read)."""

    def stop(module, args, kwargs):
        raise _Stop

    hook = pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        pipe(prompt_embeds=prompt_embeds, num_inference_steps=steps, height=size, width=size, output_type="latent")
    except _Stop:
        pass
    finally:
        hook.remove()
    return pipe.scheduler.sigmas.clone()


def test_sigma_grid_is_the_pipelines(model):
    """Both branches of compute_empirical_mu (≤ 4300 image tokens: interpolated in the step count; above: linear
    in the token count only) and 1 to 50 steps."""
    embeds = model.encode_prompts(["a cat"])["embeds"]
    for size, steps in ((32, 1), (32, 4), (64, 50), (1088, 28)):
        sized = Flux2FlowModel(model.pipe, size, model.max_sequence_length)
        ours = sized.sigma_schedule(steps)
        theirs = _pipeline_grid(model.pipe, steps, size, embeds)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), (size, steps, ours, theirs)
    # the grids differ by resolution (mu depends on the image token count)
    assert not torch.equal(Flux2FlowModel(model.pipe, 64, 512).sigma_schedule(4), model.sigma_schedule(4))


def test_packing_and_ids_are_the_pipelines():
    from diffusers import Flux2Pipeline

    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(pack_tokens(x), Flux2Pipeline._pack_latents(x))
    ids = latent_position_ids(2, 3, 5, "cpu")
    assert ids.dtype == torch.int64 and torch.equal(ids, Flux2Pipeline._prepare_latent_ids(x))
    assert torch.equal(unpack_tokens(pack_tokens(x), (8, 3, 5)), x)
    assert torch.equal(Flux2Pipeline._unpack_latents_with_ids(pack_tokens(x), ids), x)
    text = torch.randn(2, 7, 4)
    assert torch.equal(text_position_ids(2, 7, "cpu"), Flux2Pipeline._prepare_text_ids(text))
    z = torch.randn(2, 4, 6, 10)
    assert torch.equal(unpatchify(Flux2Pipeline._patchify_latents(z)), z)
    assert torch.equal(unpatchify(x), Flux2Pipeline._unpatchify_latents(x))


def test_latent_shape_and_size_errors(model):
    # the pipeline's latents at 32 px: in_channels = 4 · 4 VAE channels, 32 / (2 · vae_scale 2) cells
    assert model.latent_shape == (model.pipe.transformer.config.in_channels, 8, 8)
    with pytest.raises(FdfoError, match="resolution 34 must be a multiple of 4"):
        Flux2FlowModel(model.pipe, 34, 512)


def test_euler_sampling_equals_the_pipeline_with_its_defaults(model):
    """Our Euler sampler on our σ grid = Flux2Pipeline(prompts, latents=x1) with its defaults (guidance 4.0, text
    length 512, its own grid and mu); the pipeline takes x1 in our unpacked layout and packs it itself."""
    steps = 3
    x1 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(7))
    ours = Sampler("euler", model.sigma_schedule(steps)).run(model, x1, model.encode_prompts(PROMPTS)).x0
    theirs, spread = _pipeline_latents(model.pipe, PROMPTS, x1, steps, height=32, width=32)
    assert torch.equal(model.pipe.scheduler.sigmas, model.sigma_schedule(steps))
    err = (pack_tokens(ours) - theirs).abs().max().item()
    print(f"flux2 sampling: |ours - pipeline| {err:.3g}, pipeline rounding spread {spread:.3g}")
    assert err <= 2 * spread, (err, spread)
    # the prompt matters at this tolerance (different prompts give different samples)
    other = Sampler("euler", model.sigma_schedule(steps)).run(model, x1, model.encode_prompts(PROMPTS[::-1])).x0
    assert (other - ours).abs().max().item() > 100 * spread


def test_decode_is_the_pipelines(model):
    """The pipeline decodes our latents (swapped in for its last step's result): batch-norm de-normalisation,
    unpatchify, VAE decode, (x/2 + 0.5) clamped to [0, 1]."""
    x0 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))

    def swap(pipe, i, t, kwargs):
        return {"latents": pack_tokens(x0)}

    embeds = model.encode_prompts(PROMPTS)["embeds"]  # the prompts do not matter here: skip the text encoder
    theirs = model.pipe(prompt_embeds=embeds, num_inference_steps=1, height=32, width=32, output_type="pt",
                        callback_on_step_end=swap).images  # fmt: skip
    ours = model.decode(x0)
    assert ours.shape == (2, 3, 32, 32)
    assert torch.equal((ours / 2 + 0.5).clamp(0, 1), theirs)


def test_the_transformer_gets_the_pipelines_inputs(flux2_dir):
    """bf16 weights: the timestep, guidance and position ids our sampler hands the transformer are the very tensors
    (values and dtype) Flux2Pipeline's loop hands it: t.to(latents dtype)/1000, fp32 guidance 4.0, int64 ids."""
    model = Flux2FlowModel.from_pretrained(
        flux2_dir, dtype=torch.bfloat16, resolution=32, max_sequence_length=TEXT_LENGTH
    ).eval()
    seen = []
    keys = ("timestep", "guidance", "img_ids", "txt_ids")
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append({k: kwargs[k].detach().clone() for k in keys}), with_kwargs=True
    )
    steps = 4
    x1 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(9))
    model.pipe(prompt=PROMPTS, num_inference_steps=steps, latents=x1.to(torch.bfloat16), height=32, width=32,
               max_sequence_length=TEXT_LENGTH, output_type="latent")  # fmt: skip
    theirs, seen[:] = list(seen), []
    Sampler("euler", model.sigma_schedule(steps)).run(model, x1, model.encode_prompts(PROMPTS))
    hook.remove()
    assert len(seen) == len(theirs) == steps
    for ours, ref in zip(seen, theirs, strict=True):
        for k in keys:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), (k, ours[k], ref[k])
    assert theirs[0]["guidance"][0].item() == 4.0


def test_lora_training_changes_only_lora_and_exports(flux2_dir, tmp_path, monkeypatch):
    """One FDFO LoRA epoch through train(): only the LoRA factors move, the default targets are the FLUX.2 recipe's
    list as peft applies it, and RUN/lora loads at full strength with Flux2Pipeline.load_lora_weights and with
    PeftModel.from_pretrained (the same velocity and image as the trained model, exactly)."""
    cfg = _train_cfg(tmp_path, "flux2", flux2_dir, "fdfo", epochs=1, max_sequence_length=TEXT_LENGTH,
                     flux_guidance=Flux2FlowModel.default_guidance, diversity_prompts=0)  # fmt: skip
    model, summary = _train_and_keep_model(cfg, monkeypatch)
    assert "eval/reward" in summary
    base = Flux2FlowModel.from_pretrained(
        flux2_dir, dtype=torch.float32, resolution=32, max_sequence_length=TEXT_LENGTH
    )
    assert_only_the_lora_moved(base.transformer, model)

    reference = Flux2FlowModel.from_pretrained(flux2_dir, dtype=torch.float32, resolution=32).transformer
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=FLUX2_RECIPE_TARGETS), reference)
    adapted = _adapted(model.transformer)
    assert adapted == _adapted(reference)
    # the double block's image-stream attention, both single blocks' fused projection and attention output; not the
    # text stream's projections nor the double block's MLPs
    names = adapted[0]
    assert "single_transformer_blocks.1.attn.to_out" in names and "transformer_blocks.0.attn.to_out.0" in names
    assert not any(part in n for n in names for part in ("add_q_proj", "to_add_out", ".ff.", ".ff_context."))
    # the export's adapter_config lists the recipe targets that name a module of this 2-single-block transformer (all
    # of them on FLUX.2-dev's 48): peft's own folder for those targets is the reference
    monkeypatch.setitem(RECIPE_TARGETS, "flux2", _matching(reference, FLUX2_RECIPE_TARGETS))
    _check_exported_lora(model.eval(), Flux2FlowModel, flux2_dir, tmp_path / "run" / "lora", "flux2", tmp_path,
                         require_effect=True)  # fmt: skip

    # --init-lora RUN/lora starts a run from the export, from the PEFT folder and from the diffusers file alone
    # (read by Flux2Pipeline.lora_state_dict / load_lora_weights)
    import shutil
    from types import SimpleNamespace

    only_diffusers = tmp_path / "diffusers_only"
    only_diffusers.mkdir()
    shutil.copy(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors", only_diffusers)
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(5))
    cond = model.encode_prompts(["a cat"])
    with torch.no_grad():
        v_trained = model(x, torch.tensor([0.6]), cond)
    for folder in (tmp_path / "run" / "lora", only_diffusers):
        started = Flux2FlowModel.from_pretrained(flux2_dir, dtype=torch.float32, resolution=32).eval()
        started.setup_finetune(SimpleNamespace(finetune="lora", lora_rank=4, lora_alpha=8.0, lora_targets="auto",
                                               gradient_checkpointing=False, init_lora=str(folder)))  # fmt: skip
        with torch.no_grad():
            assert torch.equal(started(x, torch.tensor([0.6]), cond), v_trained), folder.name


def test_gradient_checkpointing_gives_the_same_gradients(flux2_dir):
    """--gradient-checkpointing: the transformer's blocks run again in the backward pass (diffusers'
    _gradient_checkpointing_func), and the LoRA gradients are those of the plain backward."""
    from types import SimpleNamespace

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        m = Flux2FlowModel.from_pretrained(
            flux2_dir, dtype=torch.float32, resolution=32, max_sequence_length=TEXT_LENGTH
        )
        m.setup_finetune(SimpleNamespace(finetune="lora", lora_rank=4, lora_alpha=8.0, lora_targets="auto",
                                         gradient_checkpointing=checkpointing))  # fmt: skip
        m.train()
        with torch.no_grad():  # non-zero B factors, so every factor gets a gradient
            for n, p in m.transformer.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        calls = []
        # a pre-hook: torch's non-reentrant recomputation stops once it has what backward needs (no forward hook)
        m.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(1))
        v = m(x, torch.tensor([0.7, 0.3]), m.encode_prompts(PROMPTS))
        v.square().mean().backward()
        assert m.transformer.gradient_checkpointing is checkpointing
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert plain.keys() == checkpointed.keys() and all(g.abs().max() > 0 for g in plain.values())
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=0, atol=0, msg=n)


def test_config_and_errors(flux2_dir, tmp_path):
    from fdfo_fast.config import make_config

    with pytest.raises(FdfoError, match="--cfg-scale must be 1 for flux2"):
        make_config(overrides=dict(model="flux2", model_path=flux2_dir, cfg_scale=2.0))
    with pytest.raises(FdfoError, match="holds a Flux2Pipeline, expected a FluxPipeline"):
        from fdfo_fast.models.diffusers_flow import FluxFlowModel

        FluxFlowModel.from_pretrained(flux2_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FdfoError, match="no model_index.json"):
        Flux2FlowModel.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FdfoError, match="cannot load a Flux2Pipeline from someone/not-cached"):
        Flux2FlowModel.from_pretrained("someone/not-cached")
    assert Flux2FlowModel.display_name == "FLUX.2" and Flux2FlowModel.guidance_distilled


class _ProcessorLike:
    """FLUX.2-dev's tokenizer is a PixtralProcessor: no len(), its text tokenizer as `.tokenizer`, and the chat
    template applied by the processor (transformers cannot build the real one without torchvision)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def test_a_processor_tokenizer_loads(flux2_dir, monkeypatch):
    """The loader accepts a pipeline whose tokenizer is a processor (diffusers_flow._load_pipeline's len() check
    raises TypeError on one today) and prompts encode through it as through the tokenizer."""
    import diffusers

    real = diffusers.Flux2Pipeline.from_pretrained

    def load(*args, **kwargs):
        pipe = real(*args, **kwargs)
        object.__setattr__(pipe, "tokenizer", _ProcessorLike(pipe.tokenizer))  # not a registered component
        return pipe

    monkeypatch.setattr(diffusers.Flux2Pipeline, "from_pretrained", load)
    model = Flux2FlowModel.from_pretrained(flux2_dir, dtype=torch.float32, resolution=32, max_sequence_length=64)
    assert isinstance(model.pipe.tokenizer, _ProcessorLike)
    monkeypatch.undo()
    plain = Flux2FlowModel.from_pretrained(flux2_dir, dtype=torch.float32, resolution=32, max_sequence_length=64)
    assert torch.equal(model.encode_prompts(PROMPTS)["embeds"], plain.encode_prompts(PROMPTS)["embeds"])
