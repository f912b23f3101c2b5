"""Generate images with a base model, a trained run, or an exported LoRA — the same deterministic sampler the
evaluation uses (Euler ODE on the model's own σ grid, CFG with the empty prompt), so its output can be compared
with the diffusers pipeline directly.

    fdfo-generate --run runs/sd35m-fdfo --prompt "a photo of a cat" --out gen/         # a training run's weights
    fdfo-generate --model sd3 --model-path /models/sd3.5m --lora runs/x/lora --prompts prompts.txt --out gen/
    fdfo-generate --prompt "a red circle" --out gen/                                    # the shipped toy base model
    fdfo-generate --run RUN --prompt "..." --latents x1.pt --save-latents true --out gen/

Writes OUT/000.png, 001.png, … (a video model: 000.gif, …) and OUT/generated.json (prompt, seed, settings per
image); with --save-latents, OUT/latents.pt holds {"x1": start noise, "x0": final latents} ([N, C, H, W], a video
model's [N, C, F, H, W]: the unpacked latent layout, fp32).
--latents FILE starts from given noise: a tensor [N, *latent shape] (torch.save) — the same tensor passed as
`StableDiffusion3Pipeline(...)(latents=x1, num_inference_steps=T, guidance_scale=w, output_type="latent")` (FLUX:
`latents=FluxPipeline._pack_latents(x1, ...)`) gives the same latents to fp32 rounding.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, option, overrides_from_args, replace_checked
from fdfo_fast.errors import FdfoError, cli_entry


@dataclass(frozen=True)
class SamplingOptions:
    """How fdfo-generate and fdfo-eval sample: each option 0 / '' / -1 takes the run's value (or the model's
    default without a run)."""

    num_steps: int = option(0, "sampling steps (0 = the run's eval_num_steps, else 40, or 20 for toy)")
    cfg_scale: float = option(0.0, "classifier-free guidance scale (0 = the run's, else 1.0; FLUX has none)")
    shift: float = option(-1.0, "time shift of the σ grid (-1 = the run's; 0 = the model's own)")
    resolution: int = option(0, "diffusers models: pixels (0 = the run's, else 512)")
    max_sequence_length: int = option(0, "diffusers models: prompt tokens (0 = the run's, else the pipeline's default)")
    dtype: str = option("", "diffusers models: bf16 | fp16 | fp32 ('' = the run's, else bf16)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")


@dataclass(frozen=True)
class GenerateConfig(SamplingOptions):
    out: str = option("generated", "output folder (PNG images, generated.json, latents.pt with --save-latents)")
    run: str = option("", "a training run folder: its model, options and latest weights (checkpoint.pt)")
    checkpoint: str = option("checkpoint.pt", "with --run: the state file to load (checkpoint.pt, or best.pt)")
    model: str = option("", "toy | sd3 | flux | flux2 | qwen_image | wan ('' = the run's, else toy)")
    model_path: str = option("", "diffusers models: a local diffusers pipeline folder or a hub id")
    base_checkpoint: str = option("", "toy: a base model checkpoint ('' = the shipped toy base model)")
    lora: str = option("", "diffusers models: a diffusers LoRA folder (RUN/lora), loaded with pipe.load_lora_weights")
    prompt: tuple[str, ...] = option((), "one or more prompts")
    prompts: str = option("", "a text file with one prompt per line ('#' comments)")
    images_per_prompt: int = option(1, "images per prompt (seeds seed, seed + 1, …)")
    seed: int = option(0, "seed of the first image; image i uses seed + i")
    latents: str = option("", "start noise: a torch.save'd tensor [N, *latent shape] (N = number of images)")
    save_latents: bool = option(False, "also write OUT/latents.pt (start noise and final latents)")
    batch: int = option(8, "images per model call")
    width: int = option(0, "diffusers models: width in pixels (0 = the run's, else --resolution: square)")
    num_frames: int = option(0, "video models: frames per sample, 4k + 1 (0 = the run's, else the pipeline's)")


def _run_config(cfg: GenerateConfig):
    """The TrainConfig the images come from: the run's saved options, or a plain model with these settings.

    Only the model-side fields matter here (model, path, resolution, dtype, T5 length, σ grid, CFG): the training
    fields (prompts, rewards) are not validated, so a run whose training options would be refused today still
    generates."""
    from fdfo_fast.config import DTYPE_NAMES, OPTION_SECTION, TrainConfig, load_json_object

    if cfg.run:
        base = load_json_object(Path(cfg.run) / "config.json", f"--run {cfg.run}: the run's config")
        if cfg.model and cfg.model != base.get("model"):
            raise FdfoError(f"--model {cfg.model}: the run {cfg.run} trained a {base.get('model')} model")
        flat = {k: v for k, v in base.items() if k in OPTION_SECTION}
    else:
        flat = {"model": cfg.model or "toy", "base_checkpoint": cfg.base_checkpoint}
    for name, value, unset in (
        ("model_path", cfg.model_path, ""),
        ("resolution", cfg.resolution, 0),
        ("width", cfg.width, 0),
        ("num_frames", cfg.num_frames, 0),
        ("max_sequence_length", cfg.max_sequence_length, 0),
        ("dtype", cfg.dtype, ""),
        ("cfg_scale", cfg.cfg_scale, 0.0),
        ("shift", cfg.shift, -1.0),
    ):
        if value != unset:
            flat[name] = value
    run_cfg = TrainConfig.from_flat(flat)
    m, sm = run_cfg.model, run_cfg.sampling
    from fdfo_fast.models.base import MODEL_KINDS

    if m.model not in MODEL_KINDS:
        raise FdfoError(f"--model must be one of {', '.join(MODEL_KINDS)}, got {m.model!r}")
    if m.model != "toy" and not m.model_path:
        raise FdfoError(f"--model {m.model} needs --model-path (a diffusers pipeline folder or a hub id)")
    if m.dtype not in DTYPE_NAMES:
        raise FdfoError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {m.dtype!r}")
    if m.resolution < 1 or m.max_sequence_length < 0 or sm.shift < 0 or not sm.cfg_scale > 0:
        raise FdfoError("--resolution must be >= 1, --max-sequence-length >= 0, --shift >= 0, --cfg-scale > 0")
    return run_cfg


def load_generator_model(cfg: GenerateConfig, device: torch.device):
    """(model, run config): the base model, with the run's trained weights or a diffusers LoRA on top."""
    from fdfo_fast.checkpoint import read_checkpoint
    from fdfo_fast.models.base import load_model
    from fdfo_fast.run_state import STATE_FORMAT

    run_cfg = _run_config(cfg)
    if cfg.lora and run_cfg.model.model == "toy":
        raise FdfoError("--lora applies to the diffusers models (the toy model has no LoRA)")
    model = load_model(run_cfg.model)
    if cfg.run:
        path = Path(cfg.run) / cfg.checkpoint
        state = read_checkpoint(path)
        if state.get("format") == STATE_FORMAT:  # a training state: the trainable weights (or the toy model)
            if state.get("model") is None:
                raise FdfoError(f"{path} holds DeepSpeed-sharded weights; export them first (or use best.pt / lora/)")
            model.setup_finetune(run_cfg.model)  # the trained adapter's layout (its init is overwritten)
            model.load_trainable_state_dict(state["model"], str(path))
        elif model.kind != "toy":  # best.pt of a diffusers model's run: the trainable state dict
            model.setup_finetune(run_cfg.model)
            model.load_trainable_state_dict(state.get("model", state), str(path))
        else:  # best.pt of a toy run is a plain toy checkpoint
            from fdfo_fast.checkpoint import load_toy_model

            model = load_toy_model(path)
    if cfg.lora:
        if not Path(cfg.lora).is_dir():
            raise FdfoError(f"--lora {cfg.lora} is not a folder (expected a diffusers LoRA export, e.g. RUN/lora)")
        try:
            model.pipe.load_lora_weights(cfg.lora)
        except (OSError, ValueError, KeyError) as err:
            raise FdfoError(f"--lora {cfg.lora}: diffusers could not load it ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), run_cfg


def read_prompts(cfg: GenerateConfig) -> list[str]:
    from fdfo_fast.prompts import read_prompt_file

    prompts = list(cfg.prompt) + (list(read_prompt_file(cfg.prompts)) if cfg.prompts else [])
    if not prompts:
        raise FdfoError("give --prompt TEXT (one or more) or --prompts FILE")
    return [p for p in prompts for _ in range(cfg.images_per_prompt)]


@torch.no_grad()
def generate(cfg: GenerateConfig) -> dict:
    """Sample the images; returns {"prompts", "seeds", "x1", "x0", "images" ([-1, 1]), "settings"}."""
    from fdfo_fast.builder import resolve_device
    from fdfo_fast.sampling import Sampler, start_noise

    if cfg.images_per_prompt < 1 or cfg.batch < 1:
        raise FdfoError("--images-per-prompt and --batch must be >= 1")
    device = resolve_device(cfg.device)
    prompts = read_prompts(cfg)
    model, run_cfg = load_generator_model(cfg, device)
    steps = cfg.num_steps or (run_cfg.eval.eval_num_steps if cfg.run else 20 if model.kind == "toy" else 40)
    w = run_cfg.sampling.cfg_scale
    if model.guidance_distilled and w != 1.0:
        raise FdfoError(f"--cfg-scale: {model.kind} is guidance-distilled (no CFG); its guidance is the run's "
                        "flux_guidance")  # fmt: skip
    seeds = [cfg.seed + i for i in range(len(prompts))]
    shape = tuple(model.latent_shape)
    if cfg.latents:
        try:
            x1 = torch.load(cfg.latents, map_location="cpu", weights_only=True)
        except Exception as err:  # missing, truncated or foreign file
            why = f"{type(err).__name__}: {err}"
            raise FdfoError(f"--latents {cfg.latents} cannot be read as a tensor ({why})") from None
        if not torch.is_tensor(x1) or tuple(x1.shape) != (len(prompts), *shape):
            got = tuple(x1.shape) if torch.is_tensor(x1) else type(x1).__name__
            raise FdfoError(f"--latents {cfg.latents}: expected a tensor of shape {(len(prompts), *shape)}, got {got}")
        x1 = x1.float()
    else:
        x1 = start_noise(seeds, shape)
    sigmas = model.sigma_schedule(steps, run_cfg.sampling.shift or None)
    sampler = Sampler("euler", sigmas, cfg_scale=w, impl=run_cfg.run.impl_or_none)
    x0 = torch.empty_like(x1)
    images = []
    for lo in range(0, len(prompts), cfg.batch):
        hi = min(lo + cfg.batch, len(prompts))
        cond = model.encode_prompts(prompts[lo:hi])
        uncond = model.encode_negative(hi - lo) if w != 1.0 else None
        traj = sampler.run(model, x1[lo:hi].to(device), cond, uncond)
        x0[lo:hi] = traj.x0.cpu()
        images.append(model.decode(traj.x0).float().clamp(-1, 1).cpu())
    settings = {"num_steps": steps, "cfg_scale": w, "sigmas": sigmas.tolist(), "model": model.describe()}
    return {"prompts": prompts, "seeds": seeds, "x1": x1, "x0": x0, "images": torch.cat(images), "settings": settings}


def write_outputs(cfg: GenerateConfig, result: dict) -> Path:
    from fdfo_fast.viz import save_image

    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FdfoError(f"--out {out} cannot be created ({err})") from None
    records = []
    for i, (img, prompt, seed) in enumerate(zip(result["images"], result["prompts"], result["seeds"], strict=True)):
        path = save_image(img, out / f"{i:03d}.png")  # a video model's: 000.gif, ...
        records.append({"file": path.name, "prompt": prompt, "seed": seed})
    meta = {"images": records, **result["settings"], "run": cfg.run, "lora": cfg.lora, "latents": cfg.latents}
    (out / "generated.json").write_text(json.dumps(meta, indent=1))
    if cfg.save_latents:
        torch.save({"x1": result["x1"], "x0": result["x0"]}, out / "latents.pt")
    return out


@cli_entry
def main(argv=None):
    parser = ArgumentParser(
        prog="fdfo-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_args(parser, GenerateConfig)
    cfg = replace_checked(GenerateConfig(), overrides_from_args(parser.parse_args(argv), GenerateConfig))
    result = generate(cfg)
    out = write_outputs(cfg, result)
    print(f"wrote {len(result['prompts'])} images to {out} ({result['settings']['num_steps']} steps, "
          f"CFG {result['settings']['cfg_scale']})")  # fmt: skip


if __name__ == "__main__":
    main()
