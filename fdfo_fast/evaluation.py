"""Held-out evaluation: sample prompts with the deterministic ODE sampler, score them, report accuracy per category."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from fdfo_fast.metrics import Progress
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.sampling import Sampler, derive_seed, sample_euler
from fdfo_fast.viz import BAD, GOOD, captioned_pages, fit_images, save_grid, save_page, still
from fdfo_fast.world.grammar import CATEGORIES, PromptSpec

_log = logging.getLogger("fdfo_fast")
OVERVIEW_CELLS = 64  # a real model's overview grid: its first 64 items (every item is on the captioned pages)
MAX_TRACKER_PAGES = 4  # captioned pages sent to the trackers per evaluation (the files hold all)


@dataclass
class EvalResult:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    prompts: list[str]
    categories: list[str]
    seeds: list[int]
    scores: dict[str, torch.Tensor]  # name -> [N]

    def accuracy(self) -> float:
        """GenEval-style accuracy (shapes world only)."""
        return float(self.scores["geneval"].mean())

    def per_category(self, key: str = "geneval") -> dict[str, float]:
        if key not in self.scores:
            return {}
        out = {}
        for cat in CATEGORIES:
            idx = [i for i, c in enumerate(self.categories) if c == cat]
            if idx:
                out[cat] = float(self.scores[key][idx].mean())
        return out

    def summary(self) -> dict[str, float]:
        s = {k: float(v.mean()) for k, v in self.scores.items()}
        s.update({f"geneval/{c}": a for c, a in self.per_category().items()})
        return s


@torch.no_grad()
def evaluate(
    model,
    items: list[tuple[PromptSpec | str, int]],
    reward: CompositeReward | None = None,
    num_steps: int = 20,
    shift: float = 0.0,
    cfg_scale: float = 1.0,
    batch_size: int = 128,
    impl: str | None = None,
    progress=None,
    overlap_scoring: bool = True,
) -> EvalResult:
    """Sample every (prompt, seed) item with the Euler ODE sampler, decode and score it (with `overlap_scoring`
    each batch's images on a worker thread while the next batch samples: the same scores, fdfo_fast.scoring).

    A prompt is a world `PromptSpec` (categorised) or plain text (category "prompts", e.g. a diffusers model's).
    """
    from fdfo_fast.scoring import ChunkScorer

    reward = reward or CompositeReward("alignment:1")
    shape = model.latent_shape
    sampler = Sampler("euler", model.sigma_schedule(num_steps, shift or None), cfg_scale=cfg_scale, impl=impl)
    texts = [p if isinstance(p, str) else p.text() for p, _ in items]
    scorer = ChunkScorer(reward, texts, overlap=overlap_scoring)
    try:
        with (progress or Progress(False)).phase("evaluation", total=len(items), unit="img") as bar:
            for i in range(0, len(items), batch_size):
                chunk = texts[i : i + batch_size]
                cond = model.encode_prompts(chunk)
                uncond = model.encode_negative(len(chunk)) if cfg_scale != 1.0 else None
                seeds = [s for _, s in items[i : i + batch_size]]
                traj = sample_euler(model, sampler, cond, uncond, seeds, shape)
                scorer.add(model.decode(traj.x0).float().clamp(-1, 1).cpu())
                bar.update(len(chunk))
        scores = scorer.result()
    finally:
        scorer.close()
    (images,) = scorer.images  # every batch's images, joined once by `result`
    categories = ["prompts" if isinstance(p, str) else p.category for p, _ in items]
    return EvalResult(images, texts, categories, [s for _, s in items], scores)


@torch.no_grad()
def sample_diversity(
    model,
    prompts: list[str],
    samples: int,
    seed: int,
    num_steps: int = 20,
    shift: float = 0.0,
    cfg_scale: float = 1.0,
    impl: str | None = None,
    size: int = 64,
    batch_size: int = 0,
) -> float:
    """Mean over prompts of the mean pairwise RMS distance between `samples` images of the same prompt.

    Images in [-1, 1] (real models' decodes area-downsampled to `size` px first, so the number does not grow with
    resolution). RL post-training tends to collapse the samples of a prompt; this tracks how fast. Sampled and
    decoded `batch_size` samples at a time (0 = all at once), each chunk's small images kept on the host.
    """
    import torch.nn.functional as F

    texts = [p for p in prompts for _ in range(samples)]
    seeds = [derive_seed(seed, 3, j, i) for j in range(len(prompts)) for i in range(samples)]
    sampler = Sampler("euler", model.sigma_schedule(num_steps, shift or None), cfg_scale=cfg_scale, impl=impl)
    chunk = batch_size or len(texts)
    parts = []
    for i in range(0, len(texts), chunk):
        cond = model.encode_prompts(texts[i : i + chunk])
        uncond = model.encode_negative(len(texts[i : i + chunk])) if cfg_scale != 1.0 else None
        x0 = sample_euler(model, sampler, cond, uncond, seeds[i : i + chunk], model.latent_shape).x0
        images = model.decode(x0).float().clamp(-1, 1)
        if images.shape[-1] > size:  # (a video's frames each: area pooling over pixels, not time)
            images = F.interpolate(images, size=(*images.shape[2:-2], size, size), mode="area")
        parts.append(images.cpu())
    flat = torch.cat(parts).flatten(1).view(len(prompts), samples, -1)
    d = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # [P, n, n] RMS distances
    iu = torch.triu_indices(samples, samples, 1)
    return float(d[:, iu[0], iu[1]].mean())


def gather_eval(res: EvalResult, env) -> EvalResult:
    """Every rank evaluated a shard of the held-out items: reassemble them in order on every rank."""
    if not env.enabled:
        return res
    parts = env.all_gather_objects((res.images, res.prompts, res.categories, res.seeds, res.scores))
    return EvalResult(
        torch.cat([p[0] for p in parts]),
        [x for p in parts for x in p[1]],
        [x for p in parts for x in p[2]],
        [x for p in parts for x in p[3]],
        {k: torch.cat([p[4][k] for p in parts]) for k in parts[0][4]},
    )


class RunEvaluator:
    """A training run's held-out evaluation at the epoch boundaries: the evaluated weights (the EMA when on)
    sample the fixed items and the diversity prompts, every rank its shard; the summary is logged, the grid saved,
    and best.pt kept whenever the held-out score improves (the run's early-stopping counter follows it)."""

    def __init__(self, run, items: list, reward: CompositeReward):
        # `run` is the built run (fdfo_fast.builder.Run): config, model, engine, env, checkpoint, log, progress
        self.run, self.items, self.reward = run, items, reward
        ev = run.cfg.eval
        n_div = min(ev.diversity_prompts, len(items))
        self.diversity_prompts = [
            p if isinstance(p, str) else p.text()
            for p, _ in (items[j * len(items) // max(1, n_div)] for j in range(n_div))
        ]

    def __call__(self, epoch: int) -> dict:
        run = self.run
        cfg, model, env, engine, progress = run.cfg, run.model, run.env, run.engine, run.progress
        ev, sm = cfg.eval, cfg.sampling
        with engine.evaluation_weights():
            model.eval()
            mine = self.items[env.shard_uneven(len(self.items))]
            with engine.gathered():
                res = evaluate(  # sampled and decoded sample_batch at a time, like the rollouts
                    model, mine, self.reward, ev.eval_num_steps, sm.shift, sm.cfg_scale, sm.sample_batch,
                    impl=cfg.run.impl_or_none, progress=run.bar, overlap_scoring=cfg.rewards.overlap_scoring,
                )  # fmt: skip
                diversity = None
                if ev.diversity_prompts:
                    diversity = sample_diversity(
                        model, self.diversity_prompts, ev.diversity_samples, cfg.run.seed, ev.eval_num_steps,
                        sm.shift, sm.cfg_scale, impl=cfg.run.impl_or_none, batch_size=sm.sample_batch,
                    )  # fmt: skip
            res = gather_eval(res, env)
            summary = {f"eval/{k}": v for k, v in res.summary().items()}
            if diversity is not None:
                summary["eval/diversity"] = diversity
            score = summary.get("eval/geneval", summary.get("eval/reward"))
            best = progress.best
            if score is not None and not math.isfinite(score):  # e.g. the remote term's servers were unavailable
                _log.warning("held-out score at epoch %d is %s: not a candidate for the best checkpoint", epoch, score)
            elif score is not None and score > best["score"]:
                best.update(score=score, epoch=epoch, since=0)
                if ev.keep_best:
                    run.checkpoint.save_best(epoch, score, "geneval" if model.has_world_metric else "reward", summary)
            elif epoch > 0:
                best["since"] += 1
            model.train()
        counters = progress.counters
        if env.is_main:
            pages = self.save_grids(res, epoch)
            run.log.images("eval/grid", pages[:MAX_TRACKER_PAGES], counters["reward_queries"])
        run.log.write(
            {"kind": "eval", "epoch": epoch, **counters, **summary, "best_epoch": best["epoch"]},
            counters["reward_queries"],
        )
        progress.last_eval = summary
        return summary

    def save_grids(self, res: EvalResult, epoch: int) -> list:
        """grids/eval_<epoch>.png, an overview (the toy world's every item, green/red = correct; a real model's first
        OVERVIEW_CELLS at ≤ 128 px), and grids/eval_<epoch>/page_<k>.png, every item with its prompt and each
        reward term under it, on bounded pages; returns the pages as (image, caption)."""
        run, ev = self.run, self.run.cfg.eval
        toy = run.model.has_world_metric
        correct = res.scores.get("geneval")
        overview = res.images if toy else fit_images(res.images[:OVERVIEW_CELLS], 128)
        save_grid(
            overview, run.out / "grids" / f"eval_{epoch:05d}.png",
            ncol=ev.eval_per_category if ev.eval_prompts == "heldout" else 8,
            correct=correct if toy else None, scale=4 if toy else 1,
        )  # fmt: skip
        keys = ["reward", *(k for k in res.scores if k != "reward")]
        captions = [
            res.prompts[i] + "\n" + " · ".join(f"{k} {float(res.scores[k][i]):.3f}" for k in keys)
            for i in range(len(res.prompts))
        ]
        borders = None if correct is None else [GOOD if bool(c) else BAD for c in correct]
        pages = captioned_pages(res.images, captions, ncol=8, rows_per_page=6, borders=borders)
        folder = run.out / "grids" / f"eval_{epoch:05d}"
        out = []
        for k, page in enumerate(pages):
            save_page(page, folder / f"page_{k:02d}.png")  # a video model's: page_<k>.gif
            out.append((still(page), f"held-out, epoch {epoch}, page {k + 1} of {len(pages)}"))
        return out
