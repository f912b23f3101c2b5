"""The Wan2.1 T2V adapter on a tiny random-weight WanPipeline (tests/tiny_wan.py: 5 frames at 32×32 -> latents
[4, 2, 4, 4]) built offline and loaded through the real loading code.

The expected values come from diffusers: the σ grid and the transformer's timesteps are what `WanPipeline.__call__`
itself used (the hub's UniPC config and FlowMatchEuler), deterministic Euler sampling equals the pipeline run with
FlowMatchEulerDiscreteScheduler (its integrator is Euler) within twice the pipeline's own rounding spread
(tests/test_generate.py `_pipeline_latents`), `decode` equals the pipeline's decoded video, and an exported LoRA
loads with `WanPipeline.load_lora_weights` and `PeftModel.from_pretrained` to the very same velocity and video.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_generate import _pipeline_latents  # noqa: E402
from tiny_wan import build_tiny_wan, euler_scheduler, unipc_scheduler  # noqa: E402

from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.models.wan import WanFlowModel  # noqa: E402
from fdfo_fast.sampling import Sampler  # noqa: E402

FRAMES, PX, TEXT_LEN = 5, 32, 16
SIZE = dict(height=PX, width=PX, num_frames=FRAMES, max_sequence_length=TEXT_LEN)
PROMPTS = ["a cat", "two dogs run"]
# DiffSynth-Studio's Wan2.1 LoRA recipe (examples/wanvideo/model_training/lora/Wan2.1-T2V-1.3B.sh,
# --lora_target_modules "q,k,v,o,ffn.0,ffn.2") in diffusers' names: attn1 / attn2 q, k, v, out and the feed-forward
RECIPE_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                  "ffn.net.0.proj", "ffn.net.2"]  # fmt: skip


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return str(build_tiny_wan(tmp_path_factory.mktemp("tiny_wan")))


def _load(path, dtype=torch.float32, scheduler=None):
    model = WanFlowModel.from_pretrained(
        path, dtype=dtype, resolution=PX, max_sequence_length=TEXT_LEN, num_frames=FRAMES
    ).eval()
    if scheduler == "euler":
        model.pipe.scheduler = euler_scheduler()  # FlowMatchEulerDiscreteScheduler(shift=3): the Euler integrator
    model.pipe.set_progress_bar_config(disable=True)
    return model


def _ft(mode="lora", checkpointing=False):
    return SimpleNamespace(
        finetune=mode, lora_rank=4, lora_alpha=8.0, lora_targets="auto", gradient_checkpointing=checkpointing
    )


def _x1(model, n=2, seed=7):
    return torch.randn(n, *model.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_options_and_bad_sizes(wan_dir):
    model = _load(wan_dir)
    assert model.latent_shape == (4, 2, 4, 4) and model.is_video and model.makes_videos
    assert model.describe()["num_frames"] == FRAMES and model.negative_prompt == ""
    assert WanFlowModel.pipeline_max_sequence_length == 512  # WanPipeline.__call__'s max_sequence_length
    # the latent shape the pipeline itself prepares for these sizes (prepare_latents), 81 frames by default, 64 × 32
    pipe = model.pipe
    for frames, w in ((FRAMES, PX), (0, 64)):
        wide = WanFlowModel(pipe, PX, TEXT_LEN, width=w, num_frames=frames)
        ref = pipe.prepare_latents(1, 4, PX, w, frames or 81, torch.float32, "cpu", torch.Generator().manual_seed(0))
        assert (1, *wide.latent_shape) == tuple(ref.shape)
    with pytest.raises(FdfoError, match="--num-frames must be 4k \\+ 1"):
        WanFlowModel(pipe, PX, TEXT_LEN, num_frames=6)
    with pytest.raises(FdfoError, match="width 40 must be a multiple of 16"):
        WanFlowModel(pipe, PX, TEXT_LEN, width=40, num_frames=FRAMES)


def test_prompt_embeddings_are_the_pipelines(wan_dir):
    """encode_prompts = WanPipeline.encode_prompt (UMT5 trimmed to the true length, zero-padded to the text length);
    the negative branch is encode_prompt's default negative prompt."""
    model = _load(wan_dir)
    ours = model.encode_prompts(PROMPTS)["embeds"]
    theirs, negative = model.pipe.encode_prompt(PROMPTS, max_sequence_length=TEXT_LEN, do_classifier_free_guidance=True)
    assert ours.shape == (2, TEXT_LEN, 32) and torch.equal(ours, theirs)
    assert torch.equal(model.encode_negative(2)["embeds"], negative)
    assert (ours[0, 6:] == 0).all() and (ours[0, :6] != 0).any()  # "a cat" is 6 tokens (5 + </s>), then zeros


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sigma_grid_is_the_pipelines(scheduler, wan_dir):
    """After the pipeline's own call its scheduler holds the grid it sampled on: ours is that very tensor (UniPC's
    σ_0 = 1 − 1e-6 included); a shift override uses the scheduler's own option (UniPC's flow_shift)."""
    model = _load(wan_dir, scheduler=scheduler)
    x1 = _x1(model, 1)
    for steps in (1, 4, 10):
        model.pipe(PROMPTS[:1], num_inference_steps=steps, latents=x1, output_type="latent", guidance_scale=1.0, **SIZE)
        assert torch.equal(model.sigma_schedule(steps), model.pipe.scheduler.sigmas), steps
    shifted = unipc_scheduler(flow_shift=5.0) if scheduler == "unipc" else euler_scheduler(shift=5.0)
    shifted.set_timesteps(4)
    assert torch.equal(model.sigma_schedule(4, shift=5.0), shifted.sigmas)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_the_transformer_gets_the_pipelines_timesteps(scheduler, wan_dir):
    """bf16 weights: our sampler hands the transformer the very timestep tensors (values and dtype) WanPipeline
    hands it: UniPC's int64 ⌊σ·1000⌋, FlowMatchEuler's fp32 σ·1000."""
    model = _load(wan_dir, dtype=torch.bfloat16, scheduler=scheduler)
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"].detach().clone()), with_kwargs=True
    )
    steps, x1 = 10, _x1(model, 1)
    model.pipe(PROMPTS[:1], num_inference_steps=steps, latents=x1, output_type="latent", guidance_scale=1.0, **SIZE)
    theirs, seen[:] = list(seen), []
    Sampler("euler", model.sigma_schedule(steps)).run(model, x1, model.encode_prompts(PROMPTS[:1]))
    hook.remove()
    assert len(seen) == len(theirs) == steps
    expected_dtype = torch.int64 if scheduler == "unipc" else torch.float32
    for ours, ref in zip(seen, theirs, strict=True):
        assert ours.dtype == ref.dtype == expected_dtype and torch.equal(ours, ref), (ours, ref)
    for shift in (None, 1.0, 6.0):  # every grid up to 50 steps, at shifts where recomputing ⌊σ·1000⌋ misses by one
        reference = model.pipe.scheduler
        if shift is not None:
            key = "flow_shift" if scheduler == "unipc" else "shift"
            reference = type(reference).from_config(reference.config, **{key: shift})
        for steps in range(1, 51):  # σ (fp32) -> the scheduler's own timesteps
            reference.set_timesteps(steps)
            ours = model._timestep(model.sigma_schedule(steps, shift)[:-1])
            assert torch.equal(ours, reference.timesteps), (shift, steps)


@pytest.mark.parametrize("cfg_scale", [1.0, 5.0])
def test_euler_sampling_and_decode_equal_the_pipeline(cfg_scale, wan_dir):
    """Deterministic Euler sampling = WanPipeline with FlowMatchEulerDiscreteScheduler (an Euler step per σ) from
    the same start latents, within 2× the pipeline's rounding spread, without CFG and with it (5.0 = the pipeline's
    default: the empty negative prompt, the linear combine); `decode` = the pipeline's decoded video (its own
    postprocess_video applied to ours gives its output_type="pt" frames exactly)."""
    model, steps = _load(wan_dir, scheduler="euler"), 3
    x1 = _x1(model)
    uncond = model.encode_negative(2) if cfg_scale != 1 else None
    ours = Sampler("euler", model.sigma_schedule(steps), cfg_scale=cfg_scale).run(
        model, x1, model.encode_prompts(PROMPTS), uncond
    )
    theirs, spread = _pipeline_latents(model.pipe, PROMPTS, x1, steps, guidance_scale=cfg_scale, **SIZE)
    err = (ours.x0 - theirs).abs().max().item()
    print(f"cfg {cfg_scale}: |ours - pipeline| {err:.3g}, pipeline rounding spread {spread:.3g}")
    assert err <= 2 * spread, (err, spread)

    video = model.decode(theirs)
    assert video.shape == (2, 3, FRAMES, PX, PX) and video.dtype == torch.float32 and video.abs().max() <= 1
    frames = model.pipe(PROMPTS, num_inference_steps=steps, latents=x1, output_type="pt", guidance_scale=cfg_scale,
                        **SIZE).frames  # fmt: skip
    assert torch.equal(model.pipe.video_processor.postprocess_video(video, output_type="pt"), frames)


def _adapted(transformer):
    """(names of the modules holding a LoRA, number of LoRA parameters)."""
    names = sorted(n for n, m in transformer.named_modules() if hasattr(m, "lora_A"))
    return names, sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)


def _outputs(model, x, cond):
    """One velocity and a 2-step Euler sample decoded to a video."""
    with torch.no_grad():
        v = model(x, torch.tensor([0.6] * len(x)), cond)
        return v, model.decode(Sampler("euler", model.sigma_schedule(2)).run(model, x, cond).x0)


def test_exported_lora_loads_in_diffusers_and_peft(wan_dir, tmp_path):
    """The default targets are the recipe's list as peft applies it; with non-zero B factors (r ≠ α) the export
    loads into a fresh pipeline with WanPipeline.load_lora_weights and with PeftModel.from_pretrained, each giving
    exactly the trained model's velocity and decoded video."""
    from peft import LoraConfig, inject_adapter_in_model

    model = _load(wan_dir)
    model.setup_finetune(_ft())
    reference = _load(wan_dir).transformer
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=RECIPE_TARGETS), reference)
    names, count = _adapted(model.transformer)
    assert (names, count) == _adapted(reference) and len(names) == 2 * 10  # 2 blocks × 10 linears
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    folder = model.export_lora(tmp_path / "lora")
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    _check_the_export_reproduces(model, folder, wan_dir)


def _check_the_export_reproduces(model, folder, wan_dir):
    """`folder` loaded into a fresh pipeline with WanPipeline.load_lora_weights, and with PeftModel.from_pretrained,
    gives exactly `model`'s velocity and decoded video (which differ from the base's)."""
    from peft import PeftModel

    x, cond = _x1(model, 1), model.encode_prompts(PROMPTS[:1])
    v_trained, video_trained = _outputs(model, x, cond)
    v_base, _ = _outputs(_load(wan_dir), x, cond)
    assert not torch.equal(v_base, v_trained)

    diffusers_loaded = _load(wan_dir)
    diffusers_loaded.pipe.load_lora_weights(str(folder))
    v, video = _outputs(diffusers_loaded, x, cond)
    assert torch.equal(v, v_trained) and torch.equal(video, video_trained)

    peft_loaded = _load(wan_dir)
    PeftModel.from_pretrained(peft_loaded.transformer, str(folder))  # injects into the transformer in place
    v, video = _outputs(peft_loaded, x, cond)
    assert torch.equal(v, v_trained) and torch.equal(video, video_trained)


def test_gradient_checkpointing_gives_the_same_gradients(wan_dir):
    """One backward through the LoRA model with the transformer's gradient checkpointing (its blocks recomputed)
    gives the gradients of the plain backward."""
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA init
        model = _load(wan_dir)
        params = model.setup_finetune(_ft(checkpointing=checkpointing))
        model.train()
        calls = []

        def counted(*args, real=model.transformer._gradient_checkpointing_func, calls=calls, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        model.transformer._gradient_checkpointing_func = counted
        with torch.no_grad():
            for n, p in model.transformer.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        v = model(_x1(model), torch.tensor([0.7, 0.3]), model.encode_prompts(PROMPTS))
        v.square().mean().backward()
        assert model.transformer.gradient_checkpointing == checkpointing and len(calls) == (2 if checkpointing else 0)
        grads[checkpointing] = [p.grad.clone() for p in params]
        assert all(g is not None for g in grads[checkpointing])
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))


def test_one_fdfo_lora_epoch_moves_only_the_lora(wan_dir, tmp_path, monkeypatch):
    """train() with --model wan: one FDFO epoch on 5-frame videos, LoRA rank 4, rewards on frames plus the temporal
    term; every base weight is untouched; the held-out grids and rollout panels are GIFs of the frames, and
    fdfo-generate --run writes each sample as a GIF of all its frames."""
    from PIL import Image
    from test_diffusers_models import _train_and_keep_model, _train_cfg, assert_only_the_lora_moved

    from fdfo_fast.generate import main as generate_main

    cfg = _train_cfg(tmp_path, "wan", wan_dir, "fdfo", num_frames=FRAMES, epochs=1, diversity_prompts=0,
                     reward="quality:1,temporal_consistency:0.5", eval_every=1)  # fmt: skip
    model, summary = _train_and_keep_model(cfg, monkeypatch)
    assert 0 < summary["eval/temporal_consistency"] <= 1 and "eval/quality" in summary
    run = tmp_path / "run"
    for gif in (run / "grids" / "eval_00001.gif", run / "grids" / "eval_00001" / "page_00.gif",
                run / "rollouts" / "epoch_00001.gif"):  # fmt: skip
        with Image.open(gif) as im:
            assert im.n_frames == FRAMES, gif
    generate_main(["--run", str(run), "--prompt", "a cat", "--out", str(tmp_path / "gen"), "--device", "cpu"])
    with Image.open(tmp_path / "gen" / "000.gif") as im:
        assert im.n_frames == FRAMES and im.size == (32, 32)
    assert_only_the_lora_moved(_load(wan_dir).transformer, model)
    _check_the_export_reproduces(model.eval(), run / "lora", wan_dir)  # the run's own export of what it trained


def test_fdfo_on_video_moves_the_held_out_reward_with_the_rewards_sign(wan_dir, tmp_path):
    """The first FDFO on video learns in the direction of its reward: the same 5 epochs on the tiny Wan with the
    palette-quality term weighted +1 or −1 (every frame scored, averaged per clip) raise, respectively lower, the
    held-out quality from the same base value (measured: 0.01214 -> 0.01242 / 0.01180 after 5 epochs at lr 0.1, a
    ~3 % change, many orders above run-to-run rounding)."""
    from test_diffusers_models import _train_cfg

    from fdfo_fast.train import train

    final = {}
    for sign in (1, -1):
        cfg = _train_cfg(tmp_path / str(sign), "wan", wan_dir, "fdfo", num_frames=FRAMES, epochs=5, pairs_per_epoch=8,
                         num_steps=4, eval_num_steps=4, eval_every=5, eval_per_category=2, lr=0.1,
                         reward=f"quality:{sign}", diversity_prompts=0, rollout_images_every=0)  # fmt: skip
        train(cfg)
        evals = [json.loads(x) for x in (tmp_path / str(sign) / "run" / "metrics.jsonl").read_text().splitlines()]
        quality = [r["eval/quality"] for r in evals if r["kind"] == "eval"]
        assert len(quality) == 2
        final[sign] = quality
    assert final[1][0] == final[-1][0]  # the same base model and held-out seeds
    print(f"held-out quality: base {final[1][0]:.5f}, +1 -> {final[1][1]:.5f}, -1 -> {final[-1][1]:.5f}")
    assert final[1][1] > final[1][0] > final[-1][1], final


def test_sde_rollouts_on_unipcs_grid_treat_its_first_sigma_as_one(wan_dir):
    """UniPC's flow grid (the hub's Wan2.1 scheduler) starts at σ = 1 − 1e-6, not 1: Flow-GRPO's g = a·√(t/(1 − t))
    there would be ~700·a and the first SDE step would throw the sample to |x| ~ 1e4 (measured before the guard:
    81,854 from a start of 3.4). That σ is the SDE's t = 1: g uses the largest σ < 1, and the rollout stays at the
    scale of its start noise."""
    from fdfo_fast.kernels.sampler_step import largest_sigma_below_one, sde_std
    from fdfo_fast.sampling import sample_sde

    model = _load(wan_dir)
    sigmas = model.sigma_schedule(4)
    assert 1 - 1e-5 < sigmas[0] < 1  # UniPC's own start
    sigma_max = largest_sigma_below_one(sigmas)
    assert sde_std(float(sigmas[0]), 0.7, sigma_max) == pytest.approx(sde_std(1.0, 0.7, sigma_max), rel=1e-5)
    sampler = Sampler("sde", sigmas, noise_level=0.7, record=True)
    traj = sample_sde(model, sampler, model.encode_prompts(PROMPTS), None, [3, 4], model.latent_shape)
    start = traj.states[0].abs().max()
    assert torch.isfinite(traj.x0).all() and traj.states.abs().max() < 3 * start and traj.x0.abs().max() < 3 * start
