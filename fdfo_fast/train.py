"""RL post-training of a flow model with FDFO, Flow-GRPO or DDPO: one training loop, read top to bottom.

Setup is `fdfo_fast.builder.build_run`; the checkpoint state is `fdfo_fast.run_state`; metrics and the loss
statistics' summary are `fdfo_fast.metrics`; the optimiser (plain or DeepSpeed ZeRO, with the EMA) is
`fdfo_fast.engine`; the algorithms are `fdfo_fast.algorithms`. Runs as one process, or as every rank of a
`torchrun` / `deepspeed` launch (fdfo_fast.distributed); the loop is the same in every case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from fdfo_fast import backends
from fdfo_fast.algorithms.base import LossStats
from fdfo_fast.builder import Run, build_run
from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, overrides_from_args, parse_bool
from fdfo_fast.config import PRESETS, SECTIONS, TrainConfig, make_config
from fdfo_fast.distributed import is_collective_timeout, split_items_global, timeout_error
from fdfo_fast.errors import cli_entry
from fdfo_fast.metrics import rollout_panel, summarise_loss_stats
from fdfo_fast.rewards.remote import remote_failed_batches
from fdfo_fast.run_state import saved_config
from fdfo_fast.sampling import derive_seed
from fdfo_fast.viz import save_page, still


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or continue) a training run; returns the last evaluation summary."""
    run = build_run(cfg, resume)
    try:
        return run_loop(run)
    except RuntimeError as err:  # a frozen or lost rank: one line naming this rank and the phase it waited in
        if run.env.enabled and is_collective_timeout(err):
            raise timeout_error(run.env) from None
        raise


def run_loop(run: Run) -> dict:
    """The epochs of a built run (`builder.build_run`)."""
    cfg = run.cfg
    env, model, algo, ctx, engine, progress = run.env, run.model, run.algorithm, run.ctx, run.engine, run.progress
    counters, start, epochs = progress.counters, progress.epoch, cfg.run.epochs
    cfg_factor = 2 if cfg.sampling.cfg_scale != 1.0 else 1  # model passes per sample or item (CFG: two)
    model.train()
    for epoch in range(start, epochs):
        # -- evaluation & checkpoint at the epoch boundary ---------------------------------------------------
        # (a resumed run already evaluated this boundary before writing the checkpoint it resumes from)
        due = epoch == 0 or (cfg.eval.eval_every and epoch % cfg.eval.eval_every == 0)
        if due and not (run.resumed and epoch == start):
            env.phase = f"the evaluation at epoch {epoch}"
            run.evaluate(epoch)
        if cfg.eval.early_stop_patience and progress.best["since"] >= cfg.eval.early_stop_patience:
            best = progress.best
            run.log.write({"kind": "early_stop", "epoch": epoch, "best_epoch": best["epoch"], "best": best["score"]},
                          counters["reward_queries"])  # fmt: skip
            save_checkpoint(run, epoch)
            break
        if epoch > start and epoch % cfg.run.save_every == 0:
            save_checkpoint(run, epoch)
        t0 = time.perf_counter()
        backends.reset_used_backends()
        # Every rank draws the same global batch and item shuffle from (seed, epoch) and takes its shard.
        gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 0, epoch))

        # -- sample & score ---------------------------------------------------------------------------------
        env.phase = f"epoch {epoch + 1}'s rollout"
        ctx.reward.begin_epoch(epoch)  # the human term labels this epoch's pairs
        model.eval()
        with engine.gathered():
            rollout = algo.rollout(ctx, epoch, gen)
            counters["reward_queries"] += int(env.sum(algo.reward_queries(rollout)))
            show_rollouts(run, rollout, epoch)  # every N epochs, a panel of rank 0's pairs: files and trackers
        model.train()
        counters["sample_passes"] += int(env.sum(len(rollout.prompts))) * cfg.sampling.num_steps * cfg_factor
        record = {"kind": "train", "epoch": epoch + 1}
        record.update({f"reward/{k}": float(env.cat_from_all(v.float()).mean()) for k, v in rollout.rewards.items()})
        record.update({k: env.sum(v) / env.world_size for k, v in rollout.stats.items()})
        finite = bool(torch.isfinite(rollout.rewards["reward"]).all() and torch.isfinite(rollout.advantages).all())
        if not env.all_true(finite):
            # NaN from the remote term because its servers were unavailable (--remote-on-failure skip) is counted
            # apart from a reward that produced non-finite values itself
            if env.sum(remote_failed_batches(ctx.reward)) > 0:
                counters["skipped_epochs_reward_unavailable"] += 1
                record["skipped"] = "reward server unavailable"
            else:
                counters["skipped_epochs_nonfinite"] += 1
                record["skipped"] = "non-finite rewards or advantages"
        else:
            # -- loss & backward & step (the engine also moves the EMA) -------------------------------------------
            env.phase = f"epoch {epoch + 1}'s optimiser steps"
            step_stats: list[LossStats] = []  # this rank's statistics per optimiser step (merged over ranks below)
            losses, norms = [], []
            chunks = split_items_global(rollout.items, len(rollout.prompts), env, cfg.optim.opt_steps_per_epoch, gen)
            # --offload-frozen: the text encoders, VAE and reward models leave the GPU for these passes only
            with run.bar.phase("training", unit="pass") as passes_bar, run.offload.training_phase():
                for step_i, (chunk, global_len) in enumerate(chunks):
                    engine.zero_grad()
                    work = rollout.active_items(chunk)
                    batches = list(work.split(cfg.optim.micro_batch)) if len(work) else []
                    n_passes = engine.passes(len(batches))  # ZeRO: equal on every rank (zero-weighted extra passes)
                    passes_bar.add_total(n_passes)
                    loss_val, step_totals = 0.0, LossStats()
                    for j in range(n_passes):
                        real = j < len(batches)
                        mb = batches[j] if real else rollout.items[:1]
                        loss_sum, stats = algo.loss(ctx, rollout, mb, first_step=step_i == 0)
                        engine.backward(loss_sum / global_len * (1.0 if real else 0.0), boundary=j == n_passes - 1)
                        if real:
                            loss_val += float(loss_sum.detach()) / global_len
                            step_totals = step_totals.merge(stats)
                        passes_bar.update()
                    step_stats.append(step_totals)
                    counters["train_passes"] += int(env.sum(len(work))) * cfg_factor
                    loss_val = env.sum(loss_val)
                    norm, stepped = engine.step(math.isfinite(loss_val))
                    if not stepped:
                        counters["skipped_steps_nonfinite"] += 1
                        continue
                    losses.append(loss_val)
                    norms.append(norm)
            algo.end_epoch(ctx, len(losses))  # DiffusionNFT: the sampling policy's soft update
            record["loss"] = sum(losses) / max(1, len(losses))
            record["grad_norm"] = sum(norms) / max(1, len(norms))
            record.update(summarise_loss_stats(algo.name, step_stats, env, len(rollout.items), epoch + 1))
        record["backends"] = backends.used_backends()  # what the fused ops actually ran this epoch
        counters["wall_time"] += time.perf_counter() - t0
        record.update(counters)
        run.log.write(record, counters["reward_queries"])
        run.bar.update(record, progress.last_eval)

    # -- final evaluation & checkpoint ------------------------------------------------------------------------
    else:  # (skipped after an early stop: that epoch's evaluation and checkpoint are the last)
        env.phase = "the final evaluation"
        if start < epochs or not progress.last_eval:
            run.evaluate(epochs)
            run.bar.show(record if start < epochs else {}, progress.last_eval)  # the final held-out score
        save_checkpoint(run, epochs)
    run.close()
    return progress.last_eval


def show_rollouts(run: Run, rollout, epoch: int) -> None:
    """rollouts/epoch_<N>.png and the trackers' `rollouts` image: a few of this epoch's pairs (or groups) with their
    rewards and advantages, at epoch 1 and every --rollout-images-every epochs. Every rank decodes its own few rows
    (under ZeRO-3 a decode through partitioned weights is a collective), rank 0 writes and logs its own."""
    every = run.cfg.logging.rollout_images_every
    if not (every and (epoch == 0 or (epoch + 1) % every == 0)):
        return
    pages, _, _ = rollout_panel(run.ctx, run.algorithm, rollout, run.cfg.logging.rollout_images)
    if not run.env.is_main:
        return
    for k, (page, _) in enumerate(pages):
        save_page(page, run.out / "rollouts" / f"epoch_{epoch + 1:05d}{f'_{k}' if k else ''}.png")  # video: .gif
    run.log.images("rollouts", [(still(p), c) for p, c in pages], run.progress.counters["reward_queries"])


def save_checkpoint(run: Run, epoch: int) -> None:
    run.env.phase = f"the checkpoint at epoch {epoch}"
    run.progress.epoch = epoch
    run.checkpoint.save(run.progress, run.log.lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fdfo-train", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named preset (options below override it)")
    parser.add_argument("--config", help="YAML file of options (applied after the preset)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint.pt")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the LOCAL_RANK environment variable
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # the switch --log-with replaced: `--tensorboard false` still turns TensorBoard off (TrainConfig.from_flat)
    parser.add_argument("--tensorboard", type=parse_bool, default=None, metavar="BOOL", help=argparse.SUPPRESS)
    for name, section in SECTIONS.items():  # one flat option per field, grouped by section in --help
        add_dataclass_args(parser.add_argument_group(name), section)
    return parser


@cli_entry
def main(argv=None):
    ns = build_parser().parse_args(argv)
    overrides = {k: v for s in SECTIONS.values() for k, v in overrides_from_args(ns, s).items()}
    if ns.tensorboard is not None:
        overrides["tensorboard"] = ns.tensorboard
    base = None
    if ns.resume:  # continue with the options checkpoint.pt holds; flags given now override them (checked in train())
        base = saved_config(Path(overrides.get("out", TrainConfig().run.out)))
    cfg = make_config(ns.preset, ns.config, overrides, base=base)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(cfg.to_dict(), indent=1))
    if ns.dry_run:
        return
    summary = train(cfg, resume=ns.resume)
    keys = [k for k in summary if k.startswith("eval/geneval")] or ["eval/reward"]
    print("final held-out: " + "  ".join(f"{k[5:]} {summary[k]:.3f}" for k in keys if k in summary))


if __name__ == "__main__":
    main()
