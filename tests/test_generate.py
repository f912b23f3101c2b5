"""`fdfo-generate` and the adapters' σ grid against the diffusers pipelines called with their defaults.

The expected values come from diffusers itself: `StableDiffusion3Pipeline` / `FluxPipeline` with no sigmas passed
(their own scheduler and timestep handling), the same start latents, `output_type="latent"`. The tolerance is the
pipeline's own sensitivity to fp32 rounding, measured: the pipeline is run again with its latents moved by one
rounding unit (random signs) after every step (`callback_on_step_end`), and our latents must lie within twice the
largest deviation of those runs (style rule 7: err ≤ 2 · the reference's own error).
"""

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from fdfo_fast.generate import GenerateConfig, generate, main  # noqa: E402
from fdfo_fast.models.diffusers_flow import FluxFlowModel, SD3FlowModel, pack_latents, unpack_latents  # noqa: E402

U32 = 2.0**-24


def _perturbing_callback(seed):
    gen = torch.Generator().manual_seed(seed)

    def callback(pipe, i, t, kwargs):
        lat = kwargs["latents"]
        sign = torch.randint(0, 2, lat.shape, generator=gen).to(lat) * 2 - 1
        return {"latents": lat + lat.abs() * U32 * sign}

    return callback


def _pipeline_latents(pipe, prompts, latents, steps, **kw):
    """The pipeline with its defaults, and its own rounding spread (two runs with every step's latents perturbed).
    The prompts go by name (Flux2Pipeline's first argument is `image`); a video pipeline's output is `.frames`."""

    def run(**extra):
        out = pipe(prompt=prompts, num_inference_steps=steps, latents=latents, output_type="latent", **kw, **extra)
        return out.frames if hasattr(out, "frames") else out.images

    ref = run()
    spread = max(
        (run(callback_on_step_end=_perturbing_callback(s), callback_on_step_end_tensor_inputs=["latents"]) - ref)
        .abs()
        .max()
        .item()
        for s in (0, 1)
    )
    assert spread > 0  # the last step's perturbation alone moves the output
    return ref, spread


def test_sd3_grid_is_the_pipelines(sd3_dir):
    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32)
    for steps in (1, 4, 40):
        model.pipe.scheduler.set_timesteps(steps)  # what StableDiffusion3Pipeline.__call__ does (no mu, no sigmas)
        assert torch.equal(model.sigma_schedule(steps), model.pipe.scheduler.sigmas)
    assert 0.0089 < model.sigma_schedule(40)[-2] < 0.009  # shift 3: the last nonzero σ (docs/method.md §1.1)


@pytest.fixture(scope="module")
def sd35_large_dir(tmp_path_factory):
    from tiny_diffusers import build_tiny_sd35_large

    return str(build_tiny_sd35_large(tmp_path_factory.mktemp("tiny_sd35_large")))


@pytest.mark.parametrize("layout", ["sd3", "sd35-large"])
def test_generate_sd3_equals_the_pipeline_with_its_defaults(layout, sd3_dir, sd35_large_dir, tmp_path):
    """The CLI as a user runs it: base model, two prompts, CFG 4.5, given start noise; vs the plain pipeline. Both
    SD3's layout and SD3.5-Large's (RMS qk-norm; the sd35l-fdfo preset's model)."""
    sd3_dir = sd3_dir if layout == "sd3" else sd35_large_dir
    steps, w = 4, 4.5
    prompts = ["a red cube", "two cats"]
    x1 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    torch.save(x1, tmp_path / "x1.pt")
    out = tmp_path / "gen"
    main(["--model", "sd3", "--model-path", sd3_dir, "--dtype", "fp32", "--resolution", "32",
          "--prompt", *prompts, "--num-steps", str(steps), "--cfg-scale", str(w), "--latents", str(tmp_path / "x1.pt"),
          "--save-latents", "true", "--out", str(out), "--device", "cpu"])  # fmt: skip
    ours = torch.load(out / "latents.pt", weights_only=True)["x0"]
    meta = json.loads((out / "generated.json").read_text())
    assert [r["prompt"] for r in meta["images"]] == prompts and (out / "000.png").is_file()
    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32)
    theirs, spread = _pipeline_latents(model.pipe, prompts, x1, steps, guidance_scale=w)
    assert meta["sigmas"] == model.pipe.scheduler.sigmas.tolist()  # the grid the pipeline just used
    err = (ours - theirs).abs().max().item()
    assert err <= 2 * spread, (err, spread)


def test_generate_flux_equals_the_pipeline_with_its_defaults(flux_dir):
    """FLUX.1-dev's dynamic shifting (mu from the token count), its timestep handling and T5 length 512; the
    default start noise (the SD3 test covers --latents)."""
    steps = 3
    prompts = ["a red cube", "two cats"]
    result = generate(GenerateConfig(model="flux", model_path=flux_dir, dtype="fp32", resolution=32,
                                     prompt=tuple(prompts), num_steps=steps, device="cpu"))  # fmt: skip
    model = FluxFlowModel.from_pretrained(flux_dir, dtype=torch.float32, resolution=32)
    assert result["x0"].shape == (2, *model.latent_shape)
    # FluxPipeline's default size is 1024 px whatever the transformer (SD3's follows its sample_size): pass it
    theirs, spread = _pipeline_latents(model.pipe, prompts, pack_latents(result["x1"]), steps, height=32, width=32)
    assert result["settings"]["sigmas"] == model.pipe.scheduler.sigmas.tolist()
    err = (pack_latents(result["x0"]) - theirs).abs().max().item()
    assert err <= 2 * spread, (err, spread)
    assert torch.equal(unpack_latents(pack_latents(result["x0"]), model.latent_shape), result["x0"])


def test_generate_errors_are_one_line(sd3_dir, tmp_path, capsys):
    bad = tmp_path / "x1.pt"
    torch.save(torch.zeros(3, 4, 16, 16), bad)
    cases = [
        ([], "give --prompt"),
        (["--prompt", "a", "--run", str(tmp_path / "none")], "does not exist"),
        (
            [
                "--prompt",
                "a",
                "--model",
                "sd3",
                "--model-path",
                sd3_dir,
                "--dtype",
                "fp32",
                "--resolution",
                "32",
                "--latents",
                str(bad),
            ],
            "expected a tensor of shape (1, 4, 16, 16)",
        ),  # fmt: skip
        (["--prompt", "a", "--lora", str(tmp_path)], "--lora applies to the diffusers models"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_lora_runs_images_come_back_from_plain_diffusers(sd3_dir, tmp_path):
    """The README's recipe: `fdfo-generate --run RUN` = a fresh pipeline + `load_lora_weights(RUN/lora)` called with
    the run's steps, CFG and T5 length (r ≠ α, so an export that lost α would load at half strength)."""
    from diffusers import StableDiffusion3Pipeline

    from fdfo_fast.config import make_config
    from fdfo_fast.train import train

    run = tmp_path / "run"
    train(make_config(None, overrides=dict(
        model="sd3", model_path=sd3_dir, dtype="fp32", resolution=32, max_sequence_length=16, finetune="lora",
        lora_rank=4, lora_alpha=8.0, num_steps=3, epochs=1, pairs_per_epoch=2, churn=0.05, lr=1e-2, eval_every=0,
        eval_per_category=1, eval_num_steps=3, cfg_scale=2.0, reward="quality:1,jpeg_incompressibility:0.05",
        progress=False, log_with="none", device="cpu", diversity_prompts=0, out=str(run),
    )))  # fmt: skip
    prompts = ["a red cube", "two cats"]
    result = generate(GenerateConfig(run=str(run), prompt=tuple(prompts), device="cpu"))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    pipe.load_lora_weights(str(run / "lora"))
    theirs, spread = _pipeline_latents(pipe, prompts, result["x1"], 3, guidance_scale=2.0, max_sequence_length=16)
    err = (result["x0"] - theirs).abs().max().item()
    assert err <= 2 * spread, (err, spread)
    base = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    untrained, _ = _pipeline_latents(base, prompts, result["x1"], 3, guidance_scale=2.0, max_sequence_length=16)
    assert (untrained - theirs).abs().max().item() > 100 * spread  # the LoRA matters at this tolerance


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_transformer_gets_the_pipelines_timesteps(kind, sd3_dir, flux_dir):
    """bf16 weights: the timesteps our sampler hands the transformer are the very tensors (values and dtype) the
    diffusers pipeline hands it — SD3 the fp32 scheduler timesteps (a bf16 copy was off by up to 2 units), FLUX
    the pipeline's (σ·1000 in the latents' dtype)/1000."""
    from fdfo_fast.sampling import Sampler

    cls, path = (SD3FlowModel, sd3_dir) if kind == "sd3" else (FluxFlowModel, flux_dir)
    model = cls.from_pretrained(path, dtype=torch.bfloat16, resolution=32).eval()
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"].detach().clone()), with_kwargs=True
    )
    steps, prompts = 4, ["a red cube"]
    x1 = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(9))
    extra = dict(height=32, width=32) if kind == "flux" else dict(guidance_scale=1.0)
    lat = pack_latents(x1) if kind == "flux" else x1
    model.pipe(prompts, num_inference_steps=steps, latents=lat.to(torch.bfloat16), output_type="latent", **extra)
    theirs, seen[:] = list(seen), []
    Sampler("euler", model.sigma_schedule(steps)).run(model, x1, model.encode_prompts(prompts))
    hook.remove()
    assert len(seen) == len(theirs) == steps
    for ours, ref in zip(seen, theirs, strict=True):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), (ours, ref)
