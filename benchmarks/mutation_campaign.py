"""Mutation campaign (issue 16): do the fast tests catch deliberate bugs?

Each mutation below is one deliberate bug written as an exact text edit of the current code (`old` must occur
exactly once in its file, so the list fails loudly when the code moves on). The script

  1. copies the repository's tracked and untracked-but-not-ignored files (`git ls-files -co --exclude-standard`)
     into a fresh temporary folder, once (one more copy per extra `--jobs` worker); the tests are read from that
     copy, so tests added to the repository after the start are not seen by this run;
  2. makes that copy the code that gets imported (see `SITECUSTOMIZE`) and checks it;
  3. runs the targeted tests of the selected mutations on the unmutated copy (the baseline): a test that fails
     there is reported as a "baseline failure" and deselected from the mutation runs;
  4. applies each mutation in turn to the copy (never to the repository), runs its targeted tests with `-x` under
     a timeout, records the first failing test, and restores the file;
  5. prints `bug | caught by (first failing test) | seconds` and `N of M caught`; exits 1 if a bug was not caught,
     2 if the harness itself is broken (a sanity mutation was not caught, or the copy is not what gets imported).

It is slow (each mutation runs a few tests for up to a couple of minutes) and is not part of `make test`:

    .venv/bin/python benchmarks/mutation_campaign.py                      # every mutation
    .venv/bin/python benchmarks/mutation_campaign.py --list               # ids, files, targeted tests
    .venv/bin/python benchmarks/mutation_campaign.py --only ema-lerp-inverted,ddpo-no-adv-clip --keep

Ids marked `*` in the table are extras beyond the issue's list; `sanity-*` mutations break imports and must always
be caught (they prove that the copy, not the repository, is what the tests import).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Queue

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"

# ---------------------------------------------------------------------------------------------------------------
# Making the copy importable
# ---------------------------------------------------------------------------------------------------------------
# The venv holds an editable install whose finder (__editable___fdfo_fast_0_1_0_finder.py) maps `fdfo_fast` to
# REPO/fdfo_fast and `fdfo_fast.kernels` to REPO/kernels; it sits at the END of sys.meta_path. A sitecustomize on
# PYTHONPATH (site imports it after the .pth files, in every interpreter, subprocesses of the tests included)
# puts a finder at the FRONT of sys.meta_path with the same two mappings into the copy. Submodules then resolve
# through the packages' __path__, i.e. inside the copy. Nothing in the copy or the venv is changed.
SITECUSTOMIZE = '''\
"""Written by benchmarks/mutation_campaign.py: import fdfo_fast from the mutation copy FDFO_MUTATION_COPY."""
import os
import sys
from importlib.util import spec_from_file_location

_root = os.environ.get("FDFO_MUTATION_COPY")
if _root:
    _PACKAGES = {"fdfo_fast": os.path.join(_root, "fdfo_fast"), "fdfo_fast.kernels": os.path.join(_root, "kernels")}

    class _MutationCopyFinder:
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            folder = _PACKAGES.get(fullname)
            if folder is None:
                return None
            init = os.path.join(folder, "__init__.py")
            return spec_from_file_location(fullname, init, submodule_search_locations=[folder])

    sys.meta_path.insert(0, _MutationCopyFinder)
'''

# A pytest plugin (-p mutation_report): one JSON line per test outcome, so the first failure is read exactly.
REPORT_PLUGIN = '''\
"""Written by benchmarks/mutation_campaign.py: test outcomes as JSON lines in FDFO_MUTATION_REPORT."""
import json
import os


def _write(**record):
    with open(os.environ["FDFO_MUTATION_REPORT"], "a") as f:
        f.write(json.dumps(record) + "\\n")


def pytest_runtest_logreport(report):
    if report.failed or (report.when == "call" and report.outcome in ("passed", "skipped")) or (
        report.when == "setup" and report.skipped
    ):
        _write(nodeid=report.nodeid, when=report.when, outcome=report.outcome, seconds=round(report.duration, 2))


def pytest_collectreport(report):
    if report.failed:
        _write(nodeid=report.nodeid or "<collection>", when="collect", outcome="failed", seconds=0.0)
'''

IMPORT_CHECK = (
    "import fdfo_fast, fdfo_fast.kernels, fdfo_fast.kernels.fd_loss, fdfo_fast.algorithms.fdfo, json; "
    "print(json.dumps([m.__file__ for m in (fdfo_fast, fdfo_fast.kernels, fdfo_fast.kernels.fd_loss, "
    "fdfo_fast.algorithms.fdfo)]))"
)


# ---------------------------------------------------------------------------------------------------------------
# The mutations
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutation:
    id: str
    description: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root, run with -x (files in this order)
    k: str | None = None  # optional -k expression
    extra: bool = False  # beyond the list
    sanity: bool = False  # must always be caught (proves the copy is what gets imported)


def mutation(id, description, file, old, new, tests, **kw) -> Mutation:
    return Mutation(id, description, (Edit(file, old, new),), tuple(tests), **kw)


ALG = "tests/test_algorithms.py"
OPT = "tests/test_options.py"
TRAIN = "tests/test_train.py"
SAMP = "tests/test_sampling.py"
WORLD = "tests/test_world.py"
HUMAN = "tests/test_human.py"
DIST = "tests/test_distributed.py"
DIFF = "tests/test_diffusers_models.py"
NUM = "tests/test_real_model_numerics.py"
K_FD = "tests/kernels/test_fd_loss.py"
K_STEP = "tests/kernels/test_sampler_step.py"
K_LOOP = "tests/kernels/test_sampler_loop.py"
K_TRAIN = "tests/kernels/test_trainer_impl.py"
LOOP = "tests/test_loop_guards.py"
DS_LOOP = f"{LOOP}::test_deepspeed_checkpoint_writes_shards_then_the_state_file_then_prunes"
CFG_LOOP = f"{LOOP}::test_with_cfg_the_first_step_of_every_epoch_reproduces_the_sampling_policy"
FDFO_PY = "fdfo_fast/algorithms/fdfo.py"
BASE_PY = "fdfo_fast/algorithms/base.py"
SDE_PY = "fdfo_fast/algorithms/sde_policy.py"
TRAIN_PY = "fdfo_fast/train.py"
ENGINE_PY = "fdfo_fast/engine.py"
STATE_PY = "fdfo_fast/run_state.py"
ARCH = "tests/test_architecture.py"  # the seams of the issue-17 layout
TRACK = "tests/test_tracking.py"
NFT = "tests/test_diffusion_nft.py"
QWEN, FLUX2, WAN = "tests/test_qwen_image.py", "tests/test_flux2.py", "tests/test_wan.py"
VIDEO = "tests/test_video_outputs.py"
WINDOW = "tests/test_sde_window.py"
NFT_PY = "fdfo_fast/algorithms/diffusion_nft.py"

# One mutation per paragraph reads better than one argument per line:
# fmt: off
MUTATIONS: list[Mutation] = [
    # -- sanity: must be caught, or the tests are not importing the copy --------------------------------------
    mutation(
        "sanity-kernel-syntax", "syntax error in a kernel module (kernels/ is imported as fdfo_fast.kernels)",
        "kernels/fd_loss.py", "from fdfo_fast.backends import resolve\n",
        "from fdfo_fast.backends import resolve )\n", [f"{K_FD}::test_rho_is_exactly_one_at_the_reference"],
        sanity=True,
    ),
    mutation(
        "sanity-package-syntax", "syntax error in fdfo_fast/algorithms/fdfo.py",
        FDFO_PY, "class FDFO(Algorithm):\n", "class FDFO(Algorithm):)\n",
        [f"{ALG}::test_fd_direction_hand_example"], sanity=True,
    ),
    # -- FDFO -------------------------------------------------------------------------------------------------
    mutation(
        "fdfo-adv-negated", "FDFO: the advantage is negated in the loss (trains toward the worse branch)",
        FDFO_PY, "rollout.advantages[i].to(v_theta.device),", "(-rollout.advantages[i]).to(v_theta.device),",
        [ALG, K_FD, f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter[fdfo]"],
    ),
    mutation(
        "fdfo-active-gt0", "FDFO: active = a > 0 instead of a != 0 (skips every negative-advantage branch)",
        FDFO_PY, "active = a != 0 if", "active = a > 0 if",
        [ALG, f"{OPT}::test_step_subsampling_trains_k_of_t_steps_per_sample",
         f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter[fdfo]"],
    ),
    mutation(
        "fdfo-no-eps-in-direction", "FDFO: the +1e-6 dropped from d = δ / (mean δ² + 1e-6)",
        FDFO_PY, "(delta.ndim - 1)) + 1e-6)", "(delta.ndim - 1)))",
        [ALG, f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter[fdfo]"],
    ),
    mutation(
        "fdfo-trust-eps-0.3", "FDFO: default trust-region ε 0.03 -> 0.3",
        "fdfo_fast/config.py", "trust_eps: float = _f(0.03,", "trust_eps: float = _f(0.3,",
        [ALG, OPT, f"{TRAIN}::test_presets_resolve_and_bad_values_are_one_clear_error"],
    ),
    mutation(
        "fdfo-subsample-first-k", "FDFO --steps-per-sample k: always the first k steps instead of a random k "
        "(FDFO.finish asks draw_step_items for \"first\")",
        FDFO_PY, '"random" if random_subset else "all"', '"first" if random_subset else "all"',
        [OPT, ALG],
    ),
    mutation(
        "fdfo-start-churn-only", "paired sampler: start churn only (every later step is a plain Euler step)",
        "fdfo_fast/sampling.py", 'mode = "euler" if kind == "euler" or (kind == "churn" and k == T - 1) else kind',
        'mode = "euler" if kind in ("euler", "churn") else kind',
        [SAMP, f"{ALG}::test_fdfo_rollout_pairs_and_rho_is_one_on_first_step", K_LOOP],
    ),
    # -- DDPO -------------------------------------------------------------------------------------------------
    mutation(
        "ddpo-min-count-le", "DDPO tracker: per-prompt statistics need > min_count rewards (< became <=)",
        "fdfo_fast/algorithms/ddpo.py", "if len(buf) < self.min_count:", "if len(buf) <= self.min_count:",
        [ALG, f"{OPT}::test_flow_grpo_and_ddpo_presets_follow_their_reference_configs"],
    ),
    mutation(
        "ddpo-always-batch-stats", "DDPO tracker: always the batch statistics (per-prompt buffers never used)",
        "fdfo_fast/algorithms/ddpo.py", "if len(buf) < self.min_count:", "if True:",
        [ALG],
    ),
    mutation(
        "ddpo-no-adv-clip", "DDPO: the ±adv_clip (5) advantage clip removed",
        "fdfo_fast/algorithms/ddpo.py",
        "return self.tracker.update(prompts, rewards).clamp(-self.cfg.adv_clip, self.cfg.adv_clip)",
        "return self.tracker.update(prompts, rewards)",
        [ALG],
    ),
    # -- Flow-GRPO --------------------------------------------------------------------------------------------
    mutation(
        "grpo-timestep-fraction-ignored", "Flow-GRPO / DDPO (SDEPolicyGradient.finish): the timestep fraction "
        "ignored (train all T steps)",
        SDE_PY, "k_train = int(cfg.train_timestep_fraction * T)", "k_train = T",
        [f"{ALG}::test_timestep_selection_first_and_random"],
    ),
    # -- training loop ----------------------------------------------------------------------------------------
    mutation(
        "train-first-microbatch-only", "training loop: only the first micro-batch of each step is trained",
        TRAIN_PY, "for j in range(n_passes):", "for j in range(min(n_passes, 1)):",
        [f"{LOOP}::test_every_micro_batch_of_a_step_contributes_to_its_gradient",
         f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter", OPT],
    ),
    Mutation(
        "train-cat-wrong-dim", "Trajectory.cat: trajectories of several sampling chunks joined on the step dim (0)",
        (Edit("fdfo_fast/sampling.py",
              'states=join("states", 1),\n            velocities=join("velocities", 1),\n'
              '            log_probs=join("log_probs", 1),',
              'states=join("states", 0),\n            velocities=join("velocities", 0),\n'
              '            log_probs=join("log_probs", 0),'),),
        (f"{SAMP}::test_trajectory_cat_joins_the_sample_dimension",
         f"{LOOP}::test_a_rollout_sampled_in_chunks_is_the_one_chunk_rollout",
         f"{NUM}::test_rollouts_decode_in_sample_batch_chunks",
         f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter"),
    ),
    mutation(
        "ema-lerp-inverted", "EMA: lerp weight inverted (moves by decay instead of 1 − decay)",
        ENGINE_PY, "s.lerp_(p, 1 - self.decay)", "s.lerp_(p, self.decay)",
        [f"{LOOP}::test_ema_update_is_decay_times_old_plus_one_minus_decay_times_new",
         f"{LOOP}::test_the_checkpointed_ema_follows_the_optimiser_steps",
         f"{OPT}::test_ema_every_n_steps_resumes_and_is_what_evaluation_scores",
         f"{TRAIN}::test_resume_matches_an_uninterrupted_run_exactly[fdfo-extra0]"],
    ),
    mutation(
        "grad-clip-disabled", "PlainEngine.step: gradient clipping disabled",
        ENGINE_PY, "clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf", "clip = math.inf",
        [f"{LOOP}::test_a_step_clips_the_gradient_before_adamw_and_logs_the_norm_before_clipping",
         f"{DIST}::test_shipped_deepspeed_configs_load", f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter",
         OPT],
    ),
    mutation(
        "nonfinite-grad-stepped", "PlainEngine.step: a step with a non-finite gradient norm is not skipped",
        ENGINE_PY, "if not self.env.all_true(loss_ok and math.isfinite(norm)):", "if not self.env.all_true(loss_ok):",
        [f"{LOOP}::test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights_and_optimiser",
         f"{TRAIN}::test_non_finite_rewards_skip_the_epoch_and_never_reach_the_checkpoint",
         f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter"],
    ),
    mutation(
        "nonfinite-ckpt-guard-removed", "PlainEngine.prepare_checkpoint: the non-finite-model guard removed",
        ENGINE_PY, "if not _all_finite(self.model.parameters()):", "if False:",
        [f"{LOOP}::test_a_non_finite_model_never_reaches_the_checkpoint",
         f"{TRAIN}::test_non_finite_rewards_skip_the_epoch_and_never_reach_the_checkpoint",
         f"{TRAIN}::test_resume_drops_metrics_written_after_the_checkpoint"],
    ),
    # -- classifier-free guidance -------------------------------------------------------------------------------
    mutation(
        "cfg-dropped-in-training", "policy_velocity: the training velocity drops CFG (conditional only)",
        BASE_PY, "return guided_velocity(model, x, sigma, cond, uncond, cfg_scale)",
        "return guided_velocity(model, x, sigma, cond, None, cfg_scale)",
        [f"{ALG}::test_cfg_training_gradient_matches_the_reference_code", CFG_LOOP, NUM],
    ),
    mutation(
        "cfg-uncond-is-prompt", "policy_velocity: the prompt (cond) used as the unconditional input in training",
        BASE_PY, "return guided_velocity(model, x, sigma, cond, uncond, cfg_scale)",
        "return guided_velocity(model, x, sigma, cond, cond, cfg_scale)",
        [f"{ALG}::test_cfg_training_gradient_matches_the_reference_code", CFG_LOOP, NUM],
    ),
    # -- real models ------------------------------------------------------------------------------------------
    mutation(
        "lora-ref-adapters-on", "LoRA reference model keeps its adapters on (adapters_disabled does nothing)",
        "fdfo_fast/models/diffusers_flow.py",
        "self.transformer.disable_adapters()\n        try:\n            yield\n        finally:\n"
        "            self.transformer.enable_adapters()",
        "yield",
        [f"{DIFF}::test_the_lora_reference_model_is_the_base_transformer",
         f"{DIFF}::test_lora_training_changes_only_lora_and_exports"],
    ),
    # -- DeepSpeed checkpoints --------------------------------------------------------------------------------
    Mutation(  # the tag is the one prepare_checkpoint will write (epoch_NNNNNN); the shards come after prune
        "ds-state-before-shards", "RunCheckpoint.save: checkpoint.pt (naming the tag) written before the DeepSpeed "
        "shards (engine.prepare_checkpoint called last)",
        (Edit(STATE_PY,
              "        tag = self.engine.prepare_checkpoint(self.out, epoch)  # DeepSpeed: every rank writes its shard "
              "first\n",
              "        from fdfo_fast.engine import PlainEngine\n\n"
              "        sharded = type(self.engine).prepare_checkpoint is not PlainEngine.prepare_checkpoint\n"
              "        tag = f\"epoch_{epoch:06d}\" if sharded else self.engine.prepare_checkpoint(self.out, epoch)\n"),
         Edit(STATE_PY,
              "            self.engine.prune(self.out, keep=tag)\n        self.env.barrier()",
              "            self.engine.prune(self.out, keep=tag)\n        if sharded:\n"
              "            self.engine.prepare_checkpoint(self.out, epoch)\n        self.env.barrier()")),
        (DS_LOOP, f"{DIST}::test_deepspeed_resume_never_reads_an_unreferenced_shard_folder",
         f"{DIST}::test_deepspeed_zero3_two_ranks_match_one_process_and_resume"),
    ),
    Mutation(
        "ds-prune-before-state", "RunCheckpoint.save: old DeepSpeed tags pruned before the new state file is "
        "written",
        (Edit(STATE_PY, "            self.engine.prune(self.out, keep=tag)\n", ""),
         Edit(STATE_PY, "        if self.env.is_main:\n            self._write(\n",
              "        if self.env.is_main:\n            self.engine.prune(self.out, keep=tag)\n"
              "            self._write(\n")),
        (DS_LOOP, f"{DIST}::test_deepspeed_resume_never_reads_an_unreferenced_shard_folder",
         f"{DIST}::test_deepspeed_zero3_two_ranks_match_one_process_and_resume"),
    ),
    # -- kernels ----------------------------------------------------------------------------------------------
    mutation(
        "kernel-logprob-first-chunk", "sampler_step (Triton): SDE log-prob reduced from the first row chunk only, "
        "scaled as if it were all of them",
        "kernels/sampler_step.py", "total = sum_of_partials(LP_PART, b, n_chunks, MAX_CHUNKS)",
        "total = tl.load(LP_PART + b * n_chunks) * n_chunks",
        [K_STEP, K_LOOP, f"{K_TRAIN}::test_flow_grpo_training_ref_vs_triton"],
    ),
    # -- alignment scorer -------------------------------------------------------------------------------------
    mutation(
        "align-margin-0", "alignment scorer: position margin 0 px instead of 2 (at 16 px)",
        "fdfo_fast/rewards/alignment.py", "margin = relation_margin(unit.shape[1])", "margin = 0.0",
        [WORLD, "tests/test_rewards.py"],
    ),
    mutation(
        "align-margin-3", "alignment scorer: position margin 3 px instead of 2 (at 16 px)",
        "fdfo_fast/rewards/alignment.py", "margin = relation_margin(unit.shape[1])",
        "margin = relation_margin(unit.shape[1]) * 1.5",
        [WORLD, "tests/test_rewards.py"],
    ),
    mutation(
        "align-count-at-least", "alignment scorer: counting accepts at least N objects instead of exactly N",
        "fdfo_fast/world/evaluate.py", "max(0.0, 1.0 - abs(n - spec.count) / spec.count)",
        "min(1.0, n / spec.count)",
        [WORLD, "tests/test_rewards.py"],
    ),
    # -- human labels -----------------------------------------------------------------------------------------
    mutation(
        "human-auto-labels-zeroed", "human reward, mixed mode: the auto-labelled pairs get preference 0",
        "fdfo_fast/human.py", "pref = torch.sign(auto[:, 0] - auto[:, 1])", "pref = 0 * torch.sign(auto[:, 0])",
        [f"{HUMAN}::test_mixed_mode_shows_a_subset_and_auto_labels_the_rest", HUMAN],
    ),
    mutation(
        "human-sides-fixed", "human reward: sides never randomised (A always on the left)",
        "fdfo_fast/human.py", 'left = "A" if derive_seed(seeds[2 * p], 5) & 1 == 0 else "B"', 'left = "A"',
        [HUMAN],
    ),
    # -- extras: seams of the issue-17 split (LossStats, draw_step_items, RunCheckpoint.load) -------------------
    mutation(
        "loss-stats-max-summed", "LossStats.merge: maxima summed instead of maxed (the first step's |ρ − 1| "
        "grows with the number of micro-batches and ranks)",
        BASE_PY, "add(self.maxima, other.maxima, max),", "add(self.maxima, other.maxima, float.__add__),",
        [f"{ARCH}::test_loss_stats_merge_is_the_statistics_of_the_union",
         f"{ARCH}::test_summarise_loss_stats_means_fractions_maxima_and_active_share"], extra=True,
    ),
    mutation(
        "step-items-random-is-first-k", "draw_step_items \"random\": always steps 0 … k − 1 (the generator-drawn "
        "per-sample permutation ignored; DDPO and FDFO --steps-per-sample)",
        BASE_PY, "steps = torch.stack([torch.randperm(T, generator=generator)[:k] for _ in range(n_global)])",
        "steps = torch.arange(k).expand(n_global, k)",
        [f"{ALG}::test_timestep_selection_first_and_random",
         f"{OPT}::test_step_subsampling_draws_every_step_with_probability_k_over_t"], extra=True,
    ),
    mutation(
        "resume-options-diff-skipped", "RunCheckpoint.load: the changed-options check skipped (a resume with "
        "options outside RESUMABLE_CHANGES changed is accepted)",
        STATE_PY, "        if diff:\n", "        if False:\n",
        [f"{TRAIN}::test_resume_matches_an_uninterrupted_run_exactly[fdfo-extra0]"], extra=True,
    ),
    # -- extras (beyond the list) ---------------------------------------------------------------------
    mutation(
        "ppo-clip-removed", "Flow-GRPO / DDPO (clipped_policy_loss): the PPO ratio clip removed", SDE_PY,
        "clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)", "clipped = -adv * ratio",
        [ALG], extra=True,
    ),
    mutation(
        "kl-sign-flipped", "Flow-GRPO (SDEPolicyGradient.loss): the KL penalty's sign flipped (rewards moving "
        "away from the base)", SDE_PY, "loss = loss + cfg.kl_beta * kl", "loss = loss - cfg.kl_beta * kl",
        [ALG, f"{TRAIN}::test_a_few_epochs_change_every_trainable_parameter[flow_grpo]"], extra=True,
    ),
    mutation(
        "grpo-uncond-not-detached", "Flow-GRPO: the unconditional CFG pass is not detached in training",
        "fdfo_fast/algorithms/flow_grpo.py", "    detach_uncond = True\n", "    detach_uncond = False\n",
        [f"{ALG}::test_cfg_training_gradient_matches_the_reference_code"], extra=True,
    ),
    mutation(
        "kernel-cfg-scale-ignored", "sampler_step (Triton kernel): the CFG scale ignored (w = 1)",
        "kernels/sampler_step.py", "v = vu + cfg_scale * (v - vu)", "v = vu + (v - vu)",
        [K_STEP, K_LOOP], extra=True,
    ),
    mutation(
        "ref-step-cfg-scale-ignored", "sampler_step_ref (the kernels' reference): the CFG scale ignored",
        "kernels/sampler_step.py", "v_u.float() + cfg_scale * (v_c.float() - v_u.float())", "v_c.float()",
        [K_STEP, SAMP], extra=True,
    ),
    mutation(
        "fd-loss-trust-term-dropped", "fd_loss_ref: the trust-region term (|a|/2ε)(ρ − 1)² dropped",
        "kernels/fd_loss.py",
        "mean(1))\n    a = a.float()\n    loss = -a * rho + (a.abs() / (2 * eps)) * (rho - 1) ** 2\n",
        "mean(1))\n    a = a.float()\n    loss = -a * rho\n",
        [ALG, K_FD], extra=True,
    ),
    mutation(
        "fd-loss-triton-grad-sign", "fd_loss (Triton launcher): the gradient coefficient's sign flipped",
        "kernels/fd_loss.py", "rho * (-2.0 / n_cols) * g_loss",
        "rho * (2.0 / n_cols) * g_loss",
        [K_FD], extra=True,
    ),
    mutation(
        "uncond-is-prompt-everywhere", "RunContext.encode: the unconditional input is the prompt itself "
        "(sampling and training)", BASE_PY, "self.model.encode_negative(len(prompts))",
        "self.model.encode_prompts(prompts)",
        [CFG_LOOP, f"{ALG}::test_cfg_training_gradient_matches_the_reference_code", NUM], extra=True,
    ),
    # -- what a run shows and keeps (issue 20) -------------------------------------------------------------------
    mutation(
        "trackers-drop-int-scalars", "trackers: only float values logged (the counters and every int metric lost)",
        "fdfo_fast/trackers.py", "if isinstance(v, (int, float)) and not isinstance(v, bool)}",
        "if isinstance(v, float)}",
        [f"{TRACK}::test_tensorboard_and_offline_wandb_log_the_same_scalars_and_the_images"], extra=True,
    ),
    mutation(
        "tensorboard-no-purge-on-resume", "TensorBoard: a resumed run keeps the events a killed run wrote after "
        "its checkpoint (no purge_step)", "fdfo_fast/trackers.py",
        "purge = None if resume_step is None else resume_step + 1", "purge = None",
        [f"{TRACK}::test_a_resume_continues_the_wandb_run_and_tensorboard_drops_a_killed_runs_events"], extra=True,
    ),
    mutation(
        "rollout-panel-one-advantage", "rollout panel: both branches captioned with branch A's advantage",
        "fdfo_fast/metrics.py", 'adv {float(adv[i]):+.3f}', 'adv {float(adv[g[0]]):+.3f}',
        [f"{TRACK}::test_rollout_panel_shows_pairs_with_both_rewards_and_the_advantage"], extra=True,
    ),
    mutation(
        "snapshots-keep-the-oldest", "--keep-last: the oldest snapshots kept, the newest removed",
        STATE_PY, "for _, path in snapshots(root)[: -self.cfg.run.keep_last]:",
        "for _, path in snapshots(root)[self.cfg.run.keep_last :]:",
        ["tests/test_exports.py::test_init_lora_run_with_snapshots_resumes_and_writes_model_cards"], extra=True,
    ),
    mutation(
        "nodes-options-unchecked", "several nodes: the ranks' options are never compared (another --seed on one "
        "node trains silently on another batch)", "fdfo_fast/distributed.py",
        "    if not env.enabled:\n        return\n    mine = ", "    if True:\n        return\n    mine = ",
        [f"{DIST}::test_nodes_launched_with_different_options_stop_with_one_line_each"], extra=True,
    ),
    mutation(
        "eval-seeds-unpaired", "fdfo-eval: the trained model sampled from other seeds than the base",
        "fdfo_fast/compare.py", "results[name] = sample_and_score(model, prompts, seeds, n,",
        "results[name] = sample_and_score(model, prompts, seeds if name == 'base' else [x + 1 for x in seeds], n,",
        ["tests/test_compare.py::test_toy_comparison_matches_an_independent_recomputation"], extra=True,
    ),
    # -- rewards at scale (issue 21) -----------------------------------------------------------------------------
    mutation(
        "plugin-nan-passes", "reward plugins: non-finite scores pass the check (a NaN reaches the update)",
        "fdfo_fast/rewards/plugins.py", "bad = (~torch.isfinite(value)).nonzero().flatten().tolist()", "bad = []",
        ["tests/test_plugins.py::test_a_plugin_returning_a_bad_score_is_one_clear_error"], extra=True,
    ),
    mutation(
        "metadata-not-passed", "rewards: a part that wants prompt metadata gets none",
        "fdfo_fast/rewards/__init__.py", 'extras["metadata"] = metadata', 'extras["metadata"] = [{}] * len(prompts)',
        ["tests/test_plugins.py::test_jsonl_prompt_fields_reach_the_reward_as_metadata"], extra=True,
    ),
    mutation(
        "overlap-ignores-blocks", "overlapped scoring: each chunk scored as it comes (micro-batches no longer those "
        "of one call over the batch)", "fdfo_fast/scoring.py",
        "n = available if last else available - (self.scored + available) % self.block", "n = available",
        ["tests/test_scoring.py::test_overlapped_scores_equal_one_call_over_the_batch_bit_for_bit"], extra=True,
    ),
    mutation(
        "remote-requests-unaligned", "remote term: requests split at max_batch, not at the server's blocks",
        "fdfo_fast/rewards/remote.py", "if lo + rows < n and rows > self.block:", "if False:",
        ["tests/test_scoring.py::test_remote_requests_cover_the_servers_micro_batches_so_overlap_stays_exact"],
        extra=True,
    ),
    mutation(
        "remote-skip-scores-zero", "remote term under --remote-on-failure skip: a dead server scores 0 (silently)",
        "fdfo_fast/rewards/remote.py", "return {name: torch.full((n,), math.nan) for name in self.names}",
        "return {name: torch.zeros(n) for name in self.names}",
        ["tests/test_reward_server.py::test_a_killed_server_process_stops_the_run_or_scores_nan_under_skip"],
        extra=True,
    ),
    mutation(
        "server-reads-oversized-body", "reward server: the size limit checked only after reading the body",
        "fdfo_fast/reward_server.py", "if int(length) > app.max_request_bytes:  # before reading a byte of the body",
        "if False:", ["tests/test_reward_server.py::test_an_oversized_body_is_413_before_it_is_read"], extra=True,
    ),
    # -- DiffusionNFT and the SDE window (issue 22) --------------------------------------------------------------
    mutation(
        "nft-r-swapped", "DiffusionNFT: r weights the negative policy and 1 − r the positive one",
        NFT_PY, "policy = (r * positive + (1 - r) * negative) / beta * adv_clip",
        "policy = ((1 - r) * positive + r * negative) / beta * adv_clip", [NFT], extra=True,
    ),
    mutation(
        "nft-no-adaptive-weight", "DiffusionNFT: the adaptive 1/mean|x̂₀ − x₀| weight dropped",
        NFT_PY, "return (err.pow(2) / w).mean(dims)", "return err.pow(2).mean(dims)", [NFT], extra=True,
    ),
    mutation(
        "nft-negative-is-positive", "DiffusionNFT: the implicit negative policy built like the positive one",
        NFT_PY, "negative = weighted_error((1 + beta) * v_old - beta * v_theta)",
        "negative = weighted_error(beta * v_theta + (1 - beta) * v_old)", [NFT], extra=True,
    ),
    mutation(
        "nft-samples-with-trained-weights", "DiffusionNFT: the rollout samples with θ instead of the sampling "
        "policy θ_old", NFT_PY, "        with self.policy_old.swapped():\n            return super().rollout",
        "        with contextlib.nullcontext():\n            return super().rollout", [NFT], extra=True,
    ),
    mutation(
        "nft-soft-update-inverted", "DiffusionNFT: θ_old ← (1 − η)·θ_old + η·θ (the decay applied the wrong way)",
        NFT_PY, "s.mul_(decay).add_(p.detach(), alpha=1 - decay)", "s.mul_(1 - decay).add_(p.detach(), alpha=decay)",
        [NFT], extra=True,
    ),
    mutation(
        "nft-policy-not-resumed", "DiffusionNFT: the sampling policy is not restored on --resume",
        NFT_PY, '        self.policy_old.load_state_dict(state["sampling_policy"])\n', "",
        [f"{TRAIN}::test_resume_matches_an_uninterrupted_run_exactly"], k="diffusion_nft", extra=True,
    ),
    mutation(
        "window-one-step-too-long", "SDE window: noise also on the step after the window",
        "fdfo_fast/sampling.py", "not self.sde_window[0] <= k < self.sde_window[1]",
        "not self.sde_window[0] <= k <= self.sde_window[1]", [WINDOW], extra=True,
    ),
    mutation(
        "window-trains-every-step", "SDE window: every step trained (the deterministic ones too)",
        SDE_PY, "torch.cartesian_prod(torch.arange(B), torch.arange(*window))",
        "torch.cartesian_prod(torch.arange(B), torch.arange(T))", [WINDOW], extra=True,
    ),
    mutation(
        "window-sliding-no-wrap", "SDE window, sliding: the start never wraps around",
        SDE_PY, "start = (epoch // cfg.sde_window_every) % starts", "start = epoch // cfg.sde_window_every",
        [WINDOW], extra=True,
    ),
    # -- model families and video (issue 23) ---------------------------------------------------------------------
    mutation(
        "qwen-cfg-not-rescaled", "Qwen-Image: true CFG as the plain linear combine (no norm rescale)",
        "fdfo_fast/models/qwen_image.py", "return unpack_latents(comb * (cond_norm / comb_norm), shape)",
        "return unpack_latents(comb, shape)", [QWEN], extra=True,
    ),
    mutation(
        "own-guidance-ignored", "the samplers fuse the linear CFG even for a model with its own combine",
        "fdfo_fast/sampling.py", "if v_u is not None and not fuses_linear_guidance(model):", "if False:",
        [QWEN], extra=True,
    ),
    mutation(
        "flux2-no-batch-norm-undo", "FLUX.2: decode skips the VAE batch-norm de-normalisation",
        "fdfo_fast/models/flux2.py", "z = unpatchify(x0.float() * std + mean)", "z = unpatchify(x0.float())",
        [FLUX2], extra=True,
    ),
    mutation(
        "flux2-mu-from-vae-cells", "FLUX.2: the empirical mu from the VAE's cell count, not the token count",
        "fdfo_fast/models/flux2.py", "seq_len = self.latent_shape[1] * self.latent_shape[2]",
        "seq_len = self.latent_shape[1] * self.latent_shape[2] * 4", [FLUX2], extra=True,
    ),
    mutation(
        "wan-float-timesteps-under-unipc", "Wan: fp32 σ·1000 timesteps where UniPC hands the transformer int64",
        "fdfo_fast/models/wan.py", "self._timesteps_are_integers = not probe.timesteps.dtype.is_floating_point",
        "self._timesteps_are_integers = False", [WAN], extra=True,
    ),
    mutation(
        "wan-no-latent-denorm", "Wan: decode without the per-channel latents mean / std",
        "fdfo_fast/models/wan.py", "video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]",
        "video = self.vae.decode(z, return_dict=False)[0]", [WAN], extra=True,
    ),
    mutation(
        "wan-latent-frames-off-by-one", "Wan: (F − 1)/4 latent frames (the first frame's own latent forgotten)",
        "fdfo_fast/models/wan.py", "frames = (self.num_frames - 1) // self.vae_scale_temporal + 1",
        "frames = (self.num_frames - 1) // self.vae_scale_temporal", [WAN], extra=True,
    ),
    mutation(
        "shift-override-ignores-flow-shift", "--shift sets `shift` also on UniPC, which reads `flow_shift`",
        "fdfo_fast/models/diffusers_flow.py", 'key = "flow_shift" if "flow_shift" in scheduler.config else "shift"',
        'key = "shift"', [WAN], extra=True,
    ),
    mutation(
        "sde-guard-exact-one-only", "Flow-GRPO's g guard only at σ == 1 exactly (UniPC's grid starts at 1 − 1e-6)",
        "kernels/sampler_step.py", "t >= 1.0 - SIGMA_ONE_TOLERANCE", "t >= 1.0", [WAN], extra=True,
    ),
    mutation(
        "video-reward-first-frame", "video rewards: a clip scored by its first frame instead of all frames' mean",
        "fdfo_fast/rewards/video.py", "value.view(b, f).mean(1)", "value.view(b, f)[:, 0]", [VIDEO], extra=True,
    ),
    mutation(
        "temporal-first-difference", "temporal consistency from the first temporal difference (penalises motion)",
        "fdfo_fast/rewards/video.py", "second = pooled[:, :, 2:] - 2 * pooled[:, :, 1:-1] + pooled[:, :, :-2]",
        "second = pooled[:, :, 2:] - pooled[:, :, 1:-1]", [VIDEO], extra=True,
    ),
]
# fmt: on


# ---------------------------------------------------------------------------------------------------------------
# Copies, edits, pytest runs
# ---------------------------------------------------------------------------------------------------------------
def copy_repository(dest: Path) -> None:
    """The tracked + untracked-not-ignored files (what `git ls-files -co --exclude-standard` lists) into dest."""
    ls = ["git", "ls-files", "-co", "--exclude-standard", "-z"]
    names = subprocess.run(ls, cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    dest.mkdir(parents=True)
    for name in filter(None, names):
        src = REPO / name
        if src.is_file() and not src.is_symlink():  # (a tracked file deleted in the work tree is skipped)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
        elif src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / name)


def stale_edits(root: Path, mutations: list[Mutation]) -> list[str]:
    """Problems with the edits against the files under root (each `old` must occur exactly once)."""
    problems = []
    for m in mutations:
        texts: dict[str, str] = {}
        for e in m.edits:
            path = root / e.file
            if not path.is_file():
                problems.append(f"{m.id}: {e.file} does not exist")
                continue
            text = texts.setdefault(e.file, path.read_text())
            n = text.count(e.old)
            if n != 1:
                problems.append(f"{m.id}: `old` occurs {n} times in {e.file} (must be once): {e.old[:70]!r}")
            else:
                texts[e.file] = text.replace(e.old, e.new)
    return problems


def apply(root: Path, m: Mutation) -> dict[Path, bytes]:
    """Write the mutation's edits; returns the original bytes of every file touched (for `restore`)."""
    originals: dict[Path, bytes] = {}
    for e in m.edits:
        path = root / e.file
        originals.setdefault(path, path.read_bytes())
        text = path.read_text()
        assert text.count(e.old) == 1, f"{m.id}: stale edit of {e.file}"
        path.write_text(text.replace(e.old, e.new))
    return originals


def restore(originals: dict[Path, bytes]) -> None:
    for path, data in originals.items():
        path.write_bytes(data)
        assert path.read_bytes() == data


def environment(site: Path, copy: Path, report: Path) -> dict[str, str]:
    """os.environ with the sitecustomize first on PYTHONPATH (entries pointing into the repository dropped)."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and REPO not in Path(p).resolve().parents
            and Path(p).resolve() != REPO]  # fmt: skip
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *keep]),
        "FDFO_MUTATION_COPY": str(copy),
        "FDFO_MUTATION_REPORT": str(report),
        "PYTHONDONTWRITEBYTECODE": "1",  # a restored file can never be shadowed by the mutant's bytecode
        "HF_HUB_OFFLINE": "1",
    }


@dataclass
class PytestResult:
    rc: int | None  # None: timed out
    seconds: float
    reports: list[dict] = field(default_factory=list)
    tail: str = ""

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.reports if r["outcome"] == "failed"]

    @property
    def passed(self) -> int:
        return sum(r["outcome"] == "passed" for r in self.reports)


def run_pytest(python: str, site: Path, copy: Path, args: list[str], timeout: float, tag: str) -> PytestResult:
    report = copy.parent / f"report-{copy.name}-{tag}.jsonl"
    report.unlink(missing_ok=True)
    log = copy.parent / f"log-{copy.name}-{tag}.txt"
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutation_report", *args]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        env = environment(site, copy, report)
        proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: torchrun / deepspeed children included
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    reports = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    return PytestResult(rc, seconds, reports, log.read_text()[-3000:])


def dedupe_targets(targets: list[str]) -> list[str]:
    """Keep order; drop a node id when its file (or a parent node id) is also a target."""
    uniq = list(dict.fromkeys(targets))
    return [t for t in uniq if not any(o != t and (t.startswith(o + "::") or t.startswith(o + "[")) for o in uniq)]


def resolve_targets(python: str, site: Path, copy: Path, selected: list[Mutation]) -> tuple[list[Mutation], list[str]]:
    """Drop targeted tests the copy does not have (a test renamed or moved since the list was written), with a
    warning each, instead of letting pytest stop with "not found" (or count that as a catch): a missing file is
    seen directly; a missing node id by one `pytest --collect-only` over all targets."""
    exists = lambda t: (copy / t.split("::")[0]).exists()  # noqa: E731
    targets = dedupe_targets([t for m in selected for t in m.tests if exists(t)])
    missing = {t for m in selected for t in m.tests if not exists(t)}
    if targets:
        proc = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *targets],
                              cwd=copy, env=environment(site, copy, copy.parent / "collect.jsonl"),
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        prefix = "ERROR: not found: "
        for line in proc.stdout.splitlines():
            if line.startswith(prefix):
                missing.add(line[len(prefix) :].strip().removeprefix(str(copy) + os.sep))
    out, warnings = [], []
    for m in selected:
        gone = [t for t in m.tests if t in missing]
        warnings += [f"{m.id}: targeted test {t} not found in the copy: skipped" for t in gone]
        out.append(replace(m, tests=tuple(t for t in m.tests if t not in missing)))
    return out, warnings


def selection_args(m: Mutation) -> list[str]:
    return [*dedupe_targets(list(m.tests)), *(["-k", m.k] if m.k else [])]


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutation ids")
    ap.add_argument("--list", action="store_true", help="list the mutations (and check their edits) and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutations run in parallel, each on its own copy (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (their logs and reports)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per mutation run (default 420)")
    ap.add_argument("--baseline-timeout", type=float, default=3000, help="seconds for the unmutated run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (assume it passes)")
    ap.add_argument("--python", default=str(DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else sys.executable))
    args = ap.parse_args(argv)

    by_id = {m.id: m for m in MUTATIONS}
    assert len(by_id) == len(MUTATIONS), "duplicate mutation ids"
    selected = MUTATIONS
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in wanted if x not in by_id]
        if unknown:
            ap.error(f"unknown mutation id(s) {unknown}; see --list")
        selected = [by_id[x] for x in wanted]

    if args.list:
        problems = stale_edits(REPO, selected)
        problems += [f"{m.id}: targeted {t} does not exist" for m in selected for t in m.tests
                     if not (REPO / t.split("::")[0]).exists()]  # fmt: skip
        for m in selected:
            flag = " (sanity)" if m.sanity else " (extra)" if m.extra else ""
            files = ", ".join(dict.fromkeys(e.file for e in m.edits))
            print(f"{m.id}{flag}: {m.description}\n    edits {files}\n    tests {' '.join(selection_args(m))}")
        print("\n".join(problems) or f"{len(selected)} mutations; every edit applies once, every targeted file exists")
        return 1 if problems else 0

    tmp = Path(tempfile.mkdtemp(prefix="fdfo-mutation-"))
    try:
        return campaign(args, selected, tmp)
    finally:
        if args.keep:
            print(f"kept the copies in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def campaign(args, selected: list[Mutation], tmp: Path) -> int:
    t_start = time.perf_counter()
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (site / "mutation_report.py").write_text(REPORT_PLUGIN)
    copies = [tmp / "copy0"]
    copy_repository(copies[0])
    problems = stale_edits(copies[0], selected)
    if problems:
        print("the mutation list is out of sync with the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    for j in range(1, max(1, args.jobs)):
        copies.append(tmp / f"copy{j}")
        shutil.copytree(copies[0], copies[j], symlinks=True)

    # -- the copy is what gets imported -----------------------------------------------------------------------
    for c in copies:
        proc = subprocess.run([args.python, "-c", IMPORT_CHECK], cwd=tmp, env=environment(site, c, tmp / "x"),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        files = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else []
        if not files or not all(Path(f).resolve().is_relative_to(c.resolve()) for f in files):
            print(f"import check failed: the copy {c} is not what gets imported:\n{proc.stdout}{proc.stderr}",
                  file=sys.stderr)  # fmt: skip
            return 2
    print(f"copy: {copies[0]} ({len(copies)} cop{'y' if len(copies) == 1 else 'ies'}); imports resolve into it "
          f"(sitecustomize finder, {args.python})", flush=True)  # fmt: skip

    # -- the targeted tests that exist in the copy -------------------------------------------------------------
    selected, warnings = resolve_targets(args.python, site, copies[0], selected)
    for w in warnings:
        print("warning: " + w, flush=True)

    # -- baseline: the targeted tests on the unmutated copy ---------------------------------------------------
    deselect: list[str] = []
    baseline_failures: list[str] = []
    if not args.no_baseline:
        groups: dict[str | None, list[str]] = {}
        for m in selected:
            if m.tests:
                groups.setdefault(m.k, []).extend(m.tests)
        for n, (k, tests) in enumerate(groups.items()):
            sel = dedupe_targets(tests) + (["-k", k] if k else [])
            res = run_pytest(args.python, site, copies[0], sel, args.baseline_timeout, f"baseline{n}")
            if res.rc is None or res.rc not in (0, 1):
                print(f"baseline run failed to run (rc {res.rc}; stale test ids?):\n{res.tail}", file=sys.stderr)
                return 2
            for r in res.failures:
                baseline_failures.append(f"{r['nodeid']} ({r['when']})")
                if r["when"] == "collect":
                    deselect += ["--ignore", r["nodeid"].split("::")[0]]
                else:
                    deselect += ["--deselect", r["nodeid"]]
            print(f"baseline: {res.passed} passed, {len(res.failures)} failed in {res.seconds:.0f} s"
                  + (f" {sorted(set(baseline_failures))}" if res.failures else ""), flush=True)  # fmt: skip

    # -- mutations --------------------------------------------------------------------------------------------
    free: Queue = Queue()
    for c in copies:
        free.put(c)

    def run_one(m: Mutation) -> tuple[Mutation, PytestResult]:
        if not m.tests:
            return m, PytestResult(5, 0.0)
        copy = free.get()
        try:
            originals = apply(copy, m)
            try:
                res = run_pytest(args.python, site, copy, ["-x", *selection_args(m), *deselect], args.timeout, m.id)
            finally:
                restore(originals)
        finally:
            free.put(copy)
        print(f"  {m.id}: {verdict(res)} ({res.seconds:.0f} s)", flush=True)
        return m, res

    order = sorted(selected, key=lambda m: not m.sanity)  # sanity first: a broken harness shows at once
    with ThreadPoolExecutor(max_workers=len(copies)) as pool:
        results = dict((m.id, r) for m, r in pool.map(run_one, order))

    # -- report -----------------------------------------------------------------------------------------------
    rows = [(m.id + ("*" if m.extra else ""), verdict(results[m.id]), f"{results[m.id].seconds:.0f}") for m in selected]
    w0, w1 = max(len("bug"), *(len(r[0]) for r in rows)), max(len("caught by (first failing test)"),
                                                              *(len(r[1]) for r in rows))  # fmt: skip
    print(f"\n{'bug':<{w0}} | {'caught by (first failing test)':<{w1}} | seconds")
    print(f"{'-' * w0}-+-{'-' * w1}-+--------")
    for r in rows:
        print(f"{r[0]:<{w0}} | {r[1]:<{w1}} | {r[2]:>7}")
    bugs = [m for m in selected if not m.sanity]
    caught = [m for m in bugs if results[m.id].failures]
    sanity_missed = [m.id for m in selected if m.sanity and not results[m.id].failures]
    print(f"\n{len(caught)} of {len(bugs)} caught ({sum(1 for m in caught if m.extra)} of "
          f"{sum(1 for m in bugs if m.extra)} extras*); wall time {time.perf_counter() - t_start:.0f} s")  # fmt: skip
    if baseline_failures:
        print("baseline failures (fail unmutated; excluded): " + ", ".join(sorted(set(baseline_failures))))
    for m in selected:
        res = results[m.id]
        if not res.failures and res.rc not in (0, None):
            print(f"\n{m.id}: pytest rc {res.rc} without a failing test:\n{res.tail}")
    if sanity_missed:
        print(f"HARNESS BROKEN: sanity mutation(s) {sanity_missed} not caught", file=sys.stderr)
        return 2
    return 0 if len(caught) == len(bugs) else 1


def verdict(res: PytestResult) -> str:
    if res.failures:
        first = res.failures[0]
        return first["nodeid"] + ("" if first["when"] == "call" else f" ({first['when']})")
    if res.rc is None:
        return f"NOT CAUGHT (timed out, {res.passed} passed)"
    if res.rc == 5:
        return "NOT CAUGHT (no tests ran)" if res.seconds else "NOT CAUGHT (none of its tests exist)"
    if res.rc not in (0, 1):
        return f"NOT CAUGHT (pytest rc {res.rc}, {res.passed} passed)"
    return f"NOT CAUGHT ({res.passed} passed)"


if __name__ == "__main__":
    sys.exit(main())
