"""`fdfo-eval`: a base model against a trained one on one prompt set, image for image with the same seeds.

    fdfo-eval --run runs/toy-fdfo --out cmp/                                    # toy: the run vs the shipped base
    fdfo-eval --run runs/sd35m-fdfo --checkpoint best.pt --diversity-model /models/dinov2-small --out cmp/
    fdfo-eval --model sd3 --model-path /models/sd3.5m --lora runs/x/lora --reward pickscore:1 \\
              --reward-models pickscore=/models/PickScore_v1 --prompts prompts.txt --out cmp/

Both models sample every (prompt j, image i) from the same seed, derive_seed(seed, 5, j, i), with the evaluation's
deterministic sampler (Euler ODE, CFG with the empty prompt: fdfo_fast.evaluation.evaluate), so the two images of
one (j, i) start from the same noise and the scores can be compared pairwise.

Scores: every term of --reward (default: the run's training terms, never `human`; the toy model adds the shapes
world's `geneval` accuracy) — per model the mean ± standard error (sd/√n over the images, sd with n − 1), and the
paired difference trained − base (per image, same prompt and seed) with its standard error. Diversity: per prompt
the mean pairwise distance between its images, then mean ± se over prompts (and the paired difference):
`diversity_cosine` = 1 − cosine similarity of image embeddings from --diversity-model (a CLIP or DINOv2 folder),
or `diversity_rms` = the RMS pixel distance in [-1, 1] (the toy model's 32 px images as they are; real models'
area-downsampled to 64 px) when no embedding model is given. It needs --images-per-prompt >= 2.

Writes OUT/eval.json (settings, per-model scores, differences, diversity, every image's seed and scores),
OUT/eval.md (a table: term | base | trained | Δ ± se) and OUT/grid_000.png, grid_001.png, …: per prompt a row of
base images next to the trained ones (same seed in the same column; toy tiles framed green / red by `geneval`), at
most --grid-prompts prompts per page, real models' tiles downsampled to 256 px.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, option, overrides_from_args, replace_checked
from fdfo_fast.errors import FdfoError, cli_entry
from fdfo_fast.generate import SamplingOptions

SEED_STREAM = 5  # derive_seed(seed, SEED_STREAM, prompt index, image index): apart from the training and eval streams
RMS_SIZE = 64  # real models' images are area-downsampled to this before the RMS distance (as the run's diversity)
CELL_MAX = 256  # grid tiles of real models are downsampled to at most this many pixels
CELL_MIN = 96  # smaller images (the toy model's 32 px) are upscaled by an integer factor to at least this
CAPTION_CHARS = 160


@dataclass(frozen=True)
class CompareConfig(SamplingOptions):
    out: str = option("eval", "output folder (eval.json, eval.md, grid_000.png, …)")
    run: str = option("", "the trained model: a training run folder (its model, options and weights)")
    checkpoint: str = option("checkpoint.pt", "with --run: the state file to load (checkpoint.pt, or best.pt)")
    lora: str = option("", "the trained model: a diffusers LoRA folder on a diffusers --model and its --model-path")
    base: str = option("", "the base model ('' = the run's base): toy a checkpoint file, else a pipeline folder")
    model: str = option("", "toy | sd3 | flux | flux2 | qwen_image | wan ('' = the run's)")
    model_path: str = option("", "diffusers models: the diffusers pipeline folder (or hub id) the LoRA / run sits on")
    prompt: tuple[str, ...] = option((), "one or more prompts (instead of --prompts)")
    prompts: str = option(
        "auto", "auto (the run's eval prompts: 'heldout' for toy, 'geneval-coco:test' for the others) | 'heldout' | "
        "'geneval-coco:test' | a prompt file",
    )  # fmt: skip
    per_category: int = option(4, "with 'heldout' or a named set: prompts per category")
    images_per_prompt: int = option(4, "images per prompt and model (diversity needs >= 2)")
    seed: int = option(0, "seed of the comparison: image i of prompt j uses derive_seed(seed, 5, j, i)")
    reward: str = option("", "reward terms to score, e.g. 'alignment:1,quality:1' ('' = the run's, never human)")
    reward_models: str = option("", "network rewards, e.g. 'pickscore=PATH' ('' = the run's)")
    reward_dtype: str = option("", "network rewards' weights: fp32 | bf16 | fp16 ('' = the run's)")
    reward_plugin: str = option(
        "", "your own reward terms, 'module:factory' ('' = the run's; fdfo_fast.rewards.plugins)"
    )
    diversity_model: str = option(
        "", "a local CLIP or DINOv2 folder: diversity as the image embeddings' cosine distance"
    )
    batch: int = option(8, "images per model call (sampled, decoded and scored a batch at a time)")
    grid_prompts: int = option(8, "prompts (rows) per grid page")
    grid_images: int = option(4, "images per prompt and model shown in the grid")


# ---------------------------------------------------------------------------------------------------------------
# What is compared
# ---------------------------------------------------------------------------------------------------------------
def trained_generate_config(cfg: CompareConfig):
    """The GenerateConfig that loads the trained model (a run's weights, or a LoRA on a pipeline)."""
    from fdfo_fast.generate import GenerateConfig

    if not cfg.run and not cfg.lora:
        raise FdfoError("give the trained model: --run RUN (a training run folder) or --lora DIR (a diffusers model's)")
    if cfg.run and cfg.lora:
        raise FdfoError("give either --run RUN or --lora DIR (on a diffusers --model and its --model-path), not both")
    if cfg.run and not Path(cfg.run).is_dir():
        raise FdfoError(f"--run {cfg.run} does not exist (expected a training run folder)")
    if cfg.lora and not Path(cfg.lora).is_dir():
        raise FdfoError(f"--lora {cfg.lora} is not a folder (expected a diffusers LoRA export, e.g. RUN/lora)")
    if cfg.run and not (Path(cfg.run) / cfg.checkpoint).is_file():
        raise FdfoError(f"--run {cfg.run}: {cfg.checkpoint} does not exist (--checkpoint checkpoint.pt | best.pt)")
    return GenerateConfig(
        run=cfg.run, checkpoint=cfg.checkpoint, lora=cfg.lora, model=cfg.model, model_path=cfg.model_path,
        num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale, shift=cfg.shift, resolution=cfg.resolution,
        max_sequence_length=cfg.max_sequence_length, dtype=cfg.dtype, device=cfg.device,
    )  # fmt: skip


def base_model_config(cfg: CompareConfig, run_cfg):
    """The base model's ModelConfig: the trained model's own (resolution, dtype, T5 length, FLUX guidance), with
    --base as its checkpoint (toy) or pipeline (diffusers models)."""
    mc = run_cfg.model
    if not cfg.base:
        return mc
    if mc.model == "toy":
        if not Path(cfg.base).is_file():
            raise FdfoError(f"--base {cfg.base}: no such toy checkpoint file")
        return dataclasses.replace(mc, base_checkpoint=cfg.base)
    return dataclasses.replace(mc, model_path=cfg.base)


def compare_prompts(cfg: CompareConfig, run_cfg, kind: str) -> list[str]:
    """The prompts: --prompt texts, or --prompts (auto = the run's eval prompts; heldout; a named set; a file)."""
    from fdfo_fast.prompts import load_eval_items

    if cfg.prompt:
        return list(cfg.prompt)
    spec = cfg.prompts
    if spec == "auto":  # TrainConfig resolves its own 'auto' by the model kind
        spec = run_cfg.eval.eval_prompts
    if spec == "heldout" and kind != "toy":
        raise FdfoError("--prompts heldout is the shapes world's split (toy model); use geneval-coco:test or a file")
    items = load_eval_items(spec, cfg.per_category, cfg.seed)
    # a category with fewer prompts than --per-category repeats them there: each prompt once here
    return list(dict.fromkeys(p if isinstance(p, str) else p.text() for p, _ in items))


def compare_metadata(cfg: CompareConfig, run_cfg, kind: str, prompts: list[str]) -> dict[str, dict]:
    """prompt -> metadata for the rewards that read it (fdfo_fast.prompts.prompt_metadata); --prompt texts carry
    none beyond what the shapes world's grammar gives them."""
    from fdfo_fast.prompts import prompt_metadata
    from fdfo_fast.world.grammar import parse_prompt

    if cfg.prompt:
        return {p: parse_prompt(p).geneval_metadata() if kind == "toy" else {} for p in prompts}
    spec = run_cfg.eval.eval_prompts if cfg.prompts == "auto" else cfg.prompts
    return prompt_metadata(spec, world_grammar=kind == "toy")


def check_world_prompts(prompts: list[str]) -> None:
    """The toy model's `geneval` parses every prompt with the shapes world's grammar: refuse a bad one before
    anything is sampled."""
    from fdfo_fast.world.grammar import parse_prompt

    for j, text in enumerate(prompts):
        try:
            parse_prompt(text)
        except FdfoError as err:
            raise FdfoError(f"prompt {j} ({text!r}): {err}") from None


def compare_seeds(seed: int, num_prompts: int, per_prompt: int) -> list[int]:
    """Prompt-major: entry j·per_prompt + i is image i of prompt j (the same list for both models)."""
    from fdfo_fast.sampling import derive_seed

    return [derive_seed(seed, SEED_STREAM, j, i) for j in range(num_prompts) for i in range(per_prompt)]


def build_reward(cfg: CompareConfig, run_cfg, kind: str, device: torch.device):
    """The scoring CompositeReward: --reward or the run's terms without `human`; toy adds `geneval`."""
    from fdfo_fast.rewards import REWARD_TERMS, TOY_WORLD_TERMS, CompositeReward, parse_weights

    spec = cfg.reward or (run_cfg.rewards.reward if cfg.run else "")
    if not spec:
        raise FdfoError("give --reward TERMS (e.g. 'pickscore:1' with --reward-models): without --run there are no "
                        "training terms to score with")  # fmt: skip
    models_spec = cfg.reward_models or (run_cfg.rewards.reward_models if cfg.run else "")
    dtype = cfg.reward_dtype or run_cfg.rewards.reward_dtype
    models = []
    if models_spec:
        from fdfo_fast.rewards.hf_models import load_reward_models

        models = load_reward_models(models_spec, device=device, dtype=dtype)
    plugins = cfg.reward_plugin or (run_cfg.rewards.reward_plugin if cfg.run else "")
    from fdfo_fast.builder import load_reward_plugins
    from fdfo_fast.config import RewardConfig

    rc = RewardConfig(reward=spec, reward_plugin=plugins, reward_dtype=dtype or "fp32")
    models += load_reward_plugins(rc, models, device)
    weights = parse_weights(spec, {"human": None, **REWARD_TERMS, **{n: m for m in models for n in m.names}})
    if "human" in weights:
        if cfg.reward:
            raise FdfoError("--reward human: nobody labels evaluation images; score with the other terms")
        del weights["human"]
    if kind == "toy":
        weights.setdefault("geneval", 0.0)
    else:
        world = sorted(set(weights) & TOY_WORLD_TERMS)
        if world:
            raise FdfoError(f"reward term(s) {', '.join(world)} parse the shapes world's prompts (toy model only)")
    if not weights:
        raise FdfoError("the run's reward has no term but human; give --reward TERMS to score with")
    return CompositeReward(weights, models=[m for m in models if "human" not in m.names])


# ---------------------------------------------------------------------------------------------------------------
# Diversity: an image embedding model
# ---------------------------------------------------------------------------------------------------------------
class ImageEmbedder:
    """Image embeddings from a local transformers folder: CLIP (CLIPModel.get_image_features of a whole CLIP, or
    `image_embeds` of a CLIPVisionModelWithProjection folder) or any other vision model (DINOv2: its pooled CLS,
    `pooler_output`), each image preprocessed by the folder's own image processor (AutoImageProcessor) from its
    8-bit RGB form."""

    def __init__(self, path: str, device: torch.device):
        if not Path(path).is_dir():
            raise FdfoError(f"--diversity-model {path} is not a folder (a local CLIP or DINOv2 model)")
        try:
            import transformers
        except ImportError:
            raise FdfoError("--diversity-model needs transformers: pip install -e '.[diffusers]'") from None
        self.path, self.device = path, device
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            self.processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.kind = config.model_type
            if config.model_type == "clip":  # a whole CLIP (its projection size is in the top-level config)
                self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True)
            elif config.model_type == "clip_vision_model":
                self.model = transformers.CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
            else:
                self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FdfoError(f"--diversity-model {path} does not load as a CLIP or DINOv2 model ({why})") from None
        self.model.to(device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, D] float32 embeddings on the CPU."""
        from fdfo_fast.rewards.base import to_uint8_hwc

        pixels = self.processor(images=list(to_uint8_hwc(images)), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        if self.kind == "clip":
            out = self.model.get_image_features(pixel_values=pixels)
            return (out if torch.is_tensor(out) else out.pooler_output).float().cpu()  # transformers 4 | 5
        out = self.model(pixel_values=pixels)
        emb = getattr(out, "image_embeds", None)
        if emb is None:
            emb = getattr(out, "pooler_output", None)
        if emb is None:
            emb = out.last_hidden_state[:, 0]
        return emb.float().cpu()


def pairwise_diversity(features: torch.Tensor, metric: str) -> torch.Tensor:
    """[P, n, D] features of P prompts' n images -> [P]: each prompt's mean pairwise distance (cosine: 1 − cos of
    embeddings; rms: the RMS of the pixel difference)."""
    p, n, d = features.shape
    if metric == "cosine":
        unit = torch.nn.functional.normalize(features.double(), dim=-1)
        dist = 1 - unit @ unit.transpose(1, 2)
    else:
        dist = torch.cdist(features.double(), features.double()) / d**0.5
    iu = torch.triu_indices(n, n, 1)
    return dist[:, iu[0], iu[1]].mean(-1).float()


# ---------------------------------------------------------------------------------------------------------------
# Sampling and scoring one model
# ---------------------------------------------------------------------------------------------------------------
def tile_size(side: int) -> int:
    """The grid tile side for images of `side` px: small ones upscaled by an integer factor, large ones cut down."""
    if side >= CELL_MAX:
        return CELL_MAX
    return side * max(1, math.ceil(CELL_MIN / side))


def to_tiles(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, S, S, 3] tiles (nearest upscaling; Lanczos downsampling)."""
    from PIL import Image

    from fdfo_fast.rewards.base import to_uint8_hwc

    arr = to_uint8_hwc(images)
    side = tile_size(max(arr.shape[1:3]))
    if side == arr.shape[1] == arr.shape[2]:
        return arr
    resample = Image.NEAREST if side > arr.shape[1] else Image.LANCZOS
    return np.stack([np.asarray(Image.fromarray(a).resize((side, side), resample)) for a in arr])


@torch.no_grad()
def sample_and_score(model, prompts, seeds, per_prompt, reward, settings, embedder, grid_images, batch) -> dict:
    """Every (prompt, seed) through `evaluate` a batch at a time (memory stays bounded): the scores [N] per term,
    the diversity features [N, D] and the first `grid_images` tiles of every prompt."""
    from fdfo_fast.evaluation import evaluate

    texts = [p for p in prompts for _ in range(per_prompt)]
    scores: dict[str, list[torch.Tensor]] = {}
    features, tiles = [], []
    for lo in range(0, len(texts), batch):
        hi = min(lo + batch, len(texts))
        res = evaluate(model, list(zip(texts[lo:hi], seeds[lo:hi], strict=True)), reward, settings["num_steps"],
                       settings["shift"], settings["cfg_scale"], batch_size=batch, impl=settings["impl"])  # fmt: skip
        for name, value in res.scores.items():
            scores.setdefault(name, []).append(value.float().cpu())
        if per_prompt >= 2:
            if embedder is not None:
                features.append(embedder(res.images))
            else:
                img = res.images
                if img.shape[-1] > RMS_SIZE:
                    img = torch.nn.functional.interpolate(img, size=(RMS_SIZE, RMS_SIZE), mode="area")
                features.append(img.flatten(1))
        shown = [k - lo for k in range(lo, hi) if (k % per_prompt) < grid_images]
        if shown:
            tiles.append(to_tiles(res.images[shown]))
    out = {"scores": {k: torch.cat(v) for k, v in scores.items()}, "tiles": np.concatenate(tiles)}
    out["features"] = torch.cat(features) if features else None
    return out


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def mean_se(values: torch.Tensor) -> dict:
    """{"mean", "se", "n"}: se = sd/√n with the sample sd (n − 1); None for n = 1."""
    x = values.double()
    n = x.numel()
    se = float(x.std(correction=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": float(x.mean()), "se": se, "n": n}


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------
def compare(cfg: CompareConfig) -> dict:
    """Sample and score both models; returns the eval.json dict plus "tiles" / "correct" for the grid."""
    from fdfo_fast.builder import resolve_device
    from fdfo_fast.generate import _run_config, load_generator_model
    from fdfo_fast.models.base import load_model

    if cfg.images_per_prompt < 1 or cfg.batch < 1 or cfg.per_category < 1:
        raise FdfoError("--images-per-prompt, --per-category and --batch must be >= 1")
    if cfg.grid_prompts < 1 or cfg.grid_images < 1:
        raise FdfoError("--grid-prompts and --grid-images must be >= 1")
    gen_cfg = trained_generate_config(cfg)
    run_cfg = _run_config(gen_cfg)  # the checks of every input before a model loads
    kind = run_cfg.model.model
    if kind == "toy" and not cfg.run:
        raise FdfoError("the toy model's trained weights come from a run: give --run RUN")
    if cfg.lora and kind == "toy":
        raise FdfoError("--lora applies to the diffusers models (the toy model has no LoRA)")
    base_mc = base_model_config(cfg, run_cfg)
    prompts = compare_prompts(cfg, run_cfg, kind)
    if kind == "toy":
        check_world_prompts(prompts)
    device = resolve_device(cfg.device)
    n = cfg.images_per_prompt
    seeds = compare_seeds(cfg.seed, len(prompts), n)
    steps = cfg.num_steps or (run_cfg.eval.eval_num_steps if cfg.run else 20 if kind == "toy" else 40)
    w = run_cfg.sampling.cfg_scale
    from fdfo_fast.models.base import MODEL_KINDS

    if MODEL_KINDS[kind].makes_videos:  # its diversity embedder and pages are per image; training evaluates videos
        raise FdfoError(f"fdfo-eval compares image models; --model {kind} makes videos (the training run's held-out "
                        "evaluation scores them, and fdfo-generate writes them)")  # fmt: skip
    if MODEL_KINDS[kind].guidance_distilled and w != 1.0:
        raise FdfoError(f"--cfg-scale: {kind} is guidance-distilled (no CFG); its guidance is the run's flux_guidance")
    settings = {"num_steps": steps, "cfg_scale": w, "shift": run_cfg.sampling.shift, "impl": run_cfg.run.impl_or_none}
    embedder = ImageEmbedder(cfg.diversity_model, device) if cfg.diversity_model else None
    reward = build_reward(cfg, run_cfg, kind, device)
    if reward.wants_metadata:  # a plugin reads prompt fields: the prompt source's (or the world grammar's) records
        reward.prompt_metadata = compare_metadata(cfg, run_cfg, kind, prompts)
    metric = "cosine" if embedder is not None else "rms"
    grid_images = min(cfg.grid_images, n)

    loaders = {
        "base": lambda: load_model(base_mc).to(device).eval(),
        "trained": lambda: load_generator_model(gen_cfg, device)[0],
    }
    results = {}
    try:
        for name, load in loaders.items():  # one model at a time: the first is freed before the second loads
            model = load()
            if name == "base":
                described = model.describe()  # resolution, path (the trained model's are the same)
            results[name] = sample_and_score(model, prompts, seeds, n, reward, settings, embedder, grid_images,
                                             cfg.batch)  # fmt: skip
            del model
            release_memory()
    finally:
        reward.close()

    base, trained = results["base"]["scores"], results["trained"]["scores"]
    terms = [t for t in base if t in trained]
    base_name = base_mc.model_path if kind != "toy" else base_mc.base_checkpoint or "the shipped toy base model"
    report = {
        "settings": {
            "base": base_name,
            "trained": {"run": cfg.run, "checkpoint": cfg.checkpoint if cfg.run else "", "lora": cfg.lora},
            "model": kind,
            "model_description": described,
            "prompts_spec": list(cfg.prompt) or cfg.prompts,
            "num_prompts": len(prompts),
            "images_per_prompt": n,
            "seed": cfg.seed,
            "seed_rule": f"derive_seed({cfg.seed}, {SEED_STREAM}, prompt index, image index)",
            "reward": dict(reward.weights),
            "reward_models": cfg.reward_models or run_cfg.rewards.reward_models,
            "num_steps": steps,
            "cfg_scale": w,
            "shift": settings["shift"],
            "sigmas_from": "the model's schedule",
            "se": "sd/sqrt(n), sample sd (n - 1); differences paired per (prompt, seed)",
        },
        "prompts": prompts,
        "scores": {m: {t: mean_se(results[m]["scores"][t]) for t in terms} for m in ("base", "trained")},
        "differences": {t: mean_se(trained[t] - base[t]) for t in terms},
    }
    name = f"diversity_{metric}"
    div = {"metric": name, "computed": n >= 2}
    if metric == "cosine":
        div["how"] = f"1 - cosine similarity of {embedder.kind} image embeddings ({cfg.diversity_model})"
    elif kind == "toy":
        div["how"] = "RMS pixel distance in [-1, 1] of the toy model's 32 px images (no embedding model)"
    else:
        div["how"] = f"RMS pixel distance in [-1, 1] at <= {RMS_SIZE} px, area-downsampled (no --diversity-model)"
    div["how"] += ", mean over each prompt's image pairs"
    if n >= 2:
        per_prompt = {m: pairwise_diversity(results[m]["features"].view(len(prompts), n, -1), metric)
                      for m in ("base", "trained")}  # fmt: skip
        div.update({m: mean_se(per_prompt[m]) for m in per_prompt})
        div["difference"] = mean_se(per_prompt["trained"] - per_prompt["base"])
        div["per_prompt"] = {m: per_prompt[m].tolist() for m in per_prompt}
    else:
        div["why_not"] = f"needs >= 2 images per prompt (--images-per-prompt {n})"
    report["diversity"] = div
    report["images"] = [
        {"prompt": k // n, "image": k % n, "seed": s,
         **{m: {t: float(results[m]["scores"][t][k]) for t in terms} for m in ("base", "trained")}}
        for k, s in enumerate(seeds)
    ]  # fmt: skip
    shown = [k for k in range(len(seeds)) if k % n < grid_images]
    correct = {m: (results[m]["scores"]["geneval"][shown] if "geneval" in terms else None) for m in results}
    return {"report": report, "tiles": {m: results[m]["tiles"] for m in results}, "correct": correct,
            "grid_images": grid_images}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
def _fmt(stat: dict | None, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    mean = f"{stat['mean']:+.4f}" if signed else f"{stat['mean']:.4f}"
    return mean if stat["se"] is None else f"{mean} ± {stat['se']:.4f}"


def markdown(report: dict) -> str:
    s, div = report["settings"], report["diversity"]
    trained = s["trained"]["lora"] or f"{s['trained']['run']} ({s['trained']['checkpoint']})"
    lines = [
        "# fdfo-eval: base vs trained",
        "",
        f"- base: {s['base']}",
        f"- trained: {trained}",
        f"- {s['num_prompts']} prompts × {s['images_per_prompt']} images, the same seeds for both "
        f"({s['seed_rule']}); {s['num_steps']} Euler steps, CFG {s['cfg_scale']}, shift {s['shift'] or 'model'}",
        "- mean ± standard error (sd/√n over images); Δ = trained − base, paired per (prompt, seed)",
        "",
        "| term | base | trained | Δ (± se) |",
        "|---|---|---|---|",
    ]
    for t, d in report["differences"].items():
        b, tr = report["scores"]["base"][t], report["scores"]["trained"][t]
        lines.append(f"| {t} | {_fmt(b)} | {_fmt(tr)} | {_fmt(d, signed=True)} |")
    if div["computed"]:
        lines.append(f"| {div['metric']} | {_fmt(div['base'])} | {_fmt(div['trained'])} | "
                     f"{_fmt(div['difference'], signed=True)} |")  # fmt: skip
        lines += ["", f"{div['metric']}: {div['how']}; mean ± se over prompts."]
    else:
        lines += ["", f"{div['metric']}: not computed — {div['why_not']}."]
    return "\n".join(lines) + "\n"


def grid_pages(tiles: dict, correct: dict, prompts: list[str], per_row: int, rows_per_page: int):
    """PIL pages: a header (base | trained), then per prompt its caption and a row of base tiles next to the
    trained ones (same seed in the same column); toy tiles framed green / red by geneval."""
    from PIL import Image, ImageDraw, ImageFont

    from fdfo_fast.viz import BAD, GOOD

    font = ImageFont.load_default(size=13)  # Pillow's own font (a bitmap one where FreeType is missing)
    side = tiles["base"].shape[1]
    pad, gap, cap_h, head_h = 3, 24, 18, 22
    cell = side + 2 * pad
    block = per_row * cell
    width = 2 * block + gap
    pages = []
    for first in range(0, len(prompts), rows_per_page):
        rows = range(first, min(first + rows_per_page, len(prompts)))
        page = Image.new("RGB", (width, head_h + len(rows) * (cap_h + cell)), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        for label, x0 in (("base", 0), ("trained", block + gap)):
            draw.text((x0 + block / 2, head_h / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
        draw.line([(block + gap / 2, 0), (block + gap / 2, page.height)], fill=(180, 180, 180), width=1)
        for r, j in enumerate(rows):
            y = head_h + r * (cap_h + cell)
            text = f"{j}: {prompts[j]}"[:CAPTION_CHARS]
            while draw.textlength(text, font=font) > width - 8 and len(text) > 4:
                text = text[:-4] + "..."
            draw.text((4, y + 2), text, fill=(0, 0, 0), font=font)
            for m, x0 in (("base", 0), ("trained", block + gap)):
                for c in range(per_row):
                    k = j * per_row + c
                    x, yy = x0 + c * cell, y + cap_h
                    if correct[m] is not None:
                        draw.rectangle([x, yy, x + cell - 1, yy + cell - 1], fill=GOOD if correct[m][k] else BAD)
                    page.paste(Image.fromarray(tiles[m][k]), (x + pad, yy + pad))
        pages.append(page)
    return pages


def make_out_folder(cfg: CompareConfig) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FdfoError(f"--out {out} cannot be created ({err})") from None
    return out


def write_outputs(cfg: CompareConfig, result: dict) -> list[Path]:
    """eval.json, eval.md and the grid pages (stale pages of an earlier, longer comparison removed)."""
    from fdfo_fast.checkpoint import _atomic_write, atomic_write_text

    out = make_out_folder(cfg)
    report = result["report"]
    atomic_write_text(out / "eval.json", json.dumps(report, indent=1))
    atomic_write_text(out / "eval.md", markdown(report))
    pages = grid_pages(result["tiles"], result["correct"], report["prompts"], result["grid_images"],
                       cfg.grid_prompts)  # fmt: skip
    paths = []
    for i, page in enumerate(pages):
        paths.append(out / f"grid_{i:03d}.png")
        _atomic_write(paths[-1], lambda f, page=page: page.save(f, format="PNG"))  # temp file, fsync, rename
    for stale in out.glob("grid_*.png"):
        if stale not in paths and stale.stem[5:].isdigit():
            stale.unlink()
    return [out / "eval.json", out / "eval.md", *paths]


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="fdfo-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, CompareConfig)
    cfg = replace_checked(CompareConfig(), overrides_from_args(parser.parse_args(argv), CompareConfig))
    make_out_folder(cfg)  # a bad --out is refused before anything is sampled
    result = compare(cfg)
    paths = write_outputs(cfg, result)
    print(markdown(result["report"]), end="")
    print(f"wrote {', '.join(str(p) for p in paths[:2])} and {len(paths) - 2} grid page(s) to {cfg.out}")


if __name__ == "__main__":
    main()
