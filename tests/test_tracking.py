"""What a run shows and keeps while it trains (issue 20, items 1–3), read back with the trackers' own readers:

- TensorBoard through its EventAccumulator, wandb (WANDB_MODE=offline) through the run file wandb writes
  (tests/wandb_log.py reads its record log with wandb's own protobuf classes): the same scalars as metrics.jsonl at
  x = reward queries, the held-out grid pages and the rollout panel as images with their captions; a resumed run
  continues the same wandb run and TensorBoard drops the events a killed run wrote after its checkpoint;
- the pages and panels: bounded whatever the image size, the rollout panel shows FDFO's pairs with both rewards and
  the pair's advantage as the rollout holds them;
- progress: per-phase bars on a terminal, nothing with --progress false, the final held-out score on the last line;
- a tracker that cannot start is one error line before any model is loaded; the old `tensorboard` switch still works.
"""

import glob
import json
import sys

import pytest
import torch
from PIL import Image

from fdfo_fast.config import TrainConfig, make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.train import train

TINY = dict(
    num_steps=3, pairs_per_epoch=4, eval_per_category=1, eval_num_steps=2, opt_steps_per_epoch=1,
    diversity_prompts=0, progress=False, epochs=2, eval_every=1, rollout_images_every=1, rollout_images=3,
)  # fmt: skip


def _records(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _numbers(rec):
    return {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _wandb_records(out):
    import wandb_log

    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    return files, [list(wandb_log.records(f)) for f in files]


def _history(records):
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def test_tensorboard_and_offline_wandb_log_the_same_scalars_and_the_images(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = make_config("toy-fdfo", overrides=dict(
        out=str(out), log_with="tensorboard,wandb", wandb_project="proj", wandb_run_name="name", wandb_tags="a,b",
        **TINY,
    ))  # fmt: skip
    train(cfg)
    records = _records(out)
    assert [r["kind"] for r in records] == ["eval", "train", "eval", "train", "eval"]

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for rec in records:  # every number of every record, at its reward-query count
        for k, v in _numbers(rec).items():
            events = {e.step: e.value for e in acc.Scalars(k)}
            assert events[rec["reward_queries"]] == pytest.approx(v, rel=1e-6, abs=1e-30), k  # TB stores float32
    assert "rollouts" in tags["images"] and "eval/grid" in tags["images"]
    for tag, png in (("rollouts", "rollouts/epoch_00002.png"), ("eval/grid", "grids/eval_00002/page_00.png")):
        steps = [e.step for e in acc.Images(tag)]
        img = acc.Images(tag)[-1]
        assert (img.width, img.height) == Image.open(out / png).size
        assert steps == sorted(steps) and steps[-1] == records[-1]["reward_queries"]
    assert {"rollouts/caption/text_summary", "eval/grid/caption/text_summary"} <= set(tags["tensors"])  # add_text

    files, (wb,) = _wandb_records(out)
    assert len(files) == 1
    run = next(r.run for r in wb if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("proj", "name")
    assert set(run.tags) == {"a", "b", "fdfo", "toy"}
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["churn"] == cfg.fdfo.churn and config["pairs_per_epoch"] == 4
    history = _history(wb)
    scalar_rows = [h for h in history if not any(k.startswith(("rollouts/", "eval/grid/")) for k in h)]
    assert len(scalar_rows) == len(records)
    for rec, row in zip(records, scalar_rows):
        assert {k: row[k] for k in _numbers(rec)} == _numbers(rec)
    image_rows = [h for h in history if any(k.startswith(("rollouts/", "eval/grid/")) for k in h)]
    kinds = [next(k.split("/")[0] for k in h if k.endswith("/_type")) for h in image_rows]
    assert kinds.count("rollouts") == 2 and kinds.count("eval") == 3
    captions = [h["eval/grid/captions"] for h in image_rows if "eval/grid/captions" in h]
    assert captions[0] == ["held-out, epoch 0, page 1 of 1"]
    media = out / "wandb" / files[0].split("/")[-2] / "files"
    for h in image_rows:
        tag = "rollouts" if "rollouts/_type" in h else "eval/grid"
        for path in h[f"{tag}/filenames"]:
            assert (media / path).is_file()


def test_a_resume_continues_the_wandb_run_and_tensorboard_drops_a_killed_runs_events(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    over = dict(out=str(out), log_with="tensorboard,wandb", **{**TINY, "epochs": 1})
    train(make_config("toy-fdfo", overrides=over))
    done = _records(out)[-1]["reward_queries"]
    w = SummaryWriter(str(out / "tensorboard"))  # what a run killed after that checkpoint had written
    w.add_scalar("reward/reward", 123.0, done + 8)
    w.close()
    train(make_config("toy-fdfo", overrides={**over, "epochs": 2}), resume=True)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    values = {e.step: e.value for e in acc.Scalars("reward/reward")}
    assert 123.0 not in values.values()
    assert sorted(values) == [r["reward_queries"] for r in _records(out) if r["kind"] == "train"]
    # TensorBoard's reader also drops out-of-order steps on its own; readers of the raw events (tbparse, pandas
    # exports) need the resumed writer's purge marker: a SessionLog START at the first step after the checkpoint
    newest = max((out / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    starts = [e.step for e in EventFileLoader(str(newest)).Load() if e.session_log.status == SessionLog.START]
    assert starts == [done + 1]
    files, runs = _wandb_records(out)
    ids = {next(r.run.run_id for r in recs if r.WhichOneof("record_type") == "run") for recs in runs}
    assert len(files) == 2 and len(ids) == 1  # two sessions of one wandb run


def test_rollout_panel_shows_pairs_with_both_rewards_and_the_advantage(tmp_path):
    from fdfo_fast.builder import build_run
    from fdfo_fast.metrics import rollout_panel

    run = build_run(make_config("toy-fdfo", overrides=dict(out=str(tmp_path), log_with="none", **TINY)))
    try:
        rollout = run.algorithm.rollout(run.ctx, 0, torch.Generator().manual_seed(0))
        pages, rows, captions = rollout_panel(run.ctx, run.algorithm, rollout, 3)
    finally:
        run.close()
    a, r = rollout.advantages, rollout.rewards["reward"]
    assert len(rows) == 6 and all(rows[j + 1] == rows[j] + 1 and rows[j] % 2 == 0 for j in range(0, 6, 2))
    biggest = int(a.abs().argmax()) // 2 * 2  # the pair with the largest |advantage| is always shown
    assert biggest in rows
    for i, cap in zip(rows, captions):
        assert cap.startswith(f"{'AB'[i % 2]}: R {float(r[i]):.3f} · adv {float(a[i]):+.3f}"), cap
        assert f"alignment {float(rollout.rewards['alignment'][i]):.3f}" in cap
    assert float(a[rows[0]]) == pytest.approx((float(r[rows[0]]) - float(r[rows[1]])) / 2)
    ((page, _),) = pages
    assert page.size[0] == 2 * (128 + 8)  # two 32-px images enlarged to 128 px cells


def test_pages_of_large_images_are_bounded(tmp_path):
    from fdfo_fast.viz import MAX_CELL_PX, captioned_pages, fit_images

    images = torch.rand(13, 3, 1024, 1024) * 2 - 1
    captions = [f"prompt {i}\nreward 0.5 · pickscore 21.3" for i in range(13)]
    pages = captioned_pages(images, captions, ncol=4, rows_per_page=2)
    assert len(pages) == 2  # 4 rows of 4 (the last one short), 2 rows per page
    for p in pages:  # a caption of 2 lines of 12-px text (15 px a line) under each 256-px cell
        assert p.size == (4 * (MAX_CELL_PX + 8), 2 * (MAX_CELL_PX + 8 + 2 * 15 + 4))
    assert fit_images(images[:2], 128).shape == (2, 3, 128, 128)
    small = torch.zeros(2, 3, 32, 32)
    assert fit_images(small, 128) is small


def test_progress_bars_per_phase_on_a_terminal_and_none_when_off(tmp_path, capsys, monkeypatch):
    cfg = make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "off"), log_with="none", **TINY))
    train(cfg)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    over = {**TINY, "progress": True}
    summary = train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "on"), log_with="none", **over)))
    err = capsys.readouterr().err
    for phase in ("loading the toy model", "sampling", "scoring", "training", "evaluation", "fdfo"):
        assert f"{phase}:" in err, phase
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"heldout={summary['eval/geneval']:.3f}" in last  # refreshed after the final evaluation


def test_a_tracker_that_cannot_start_is_one_error_before_any_model_loads(tmp_path, monkeypatch):
    import fdfo_fast.builder as builder

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(builder, "load_model", lambda mc: pytest.fail("the model was loaded first"))
    cfg = make_config("toy-fdfo", overrides=dict(out=str(tmp_path), log_with="wandb", **TINY))
    with pytest.raises(FdfoError, match=r"--log-with wandb: wandb is not installed \(pip install -e '\.\[wandb\]'"):
        train(cfg)
    with pytest.raises(FdfoError, match="--log-with must be a comma-separated list of tensorboard, wandb"):
        make_config(overrides=dict(log_with="tensorboard,mlflow"))


def test_the_tensorboard_switch_of_older_runs_and_commands_still_works():
    assert make_config(overrides=dict(tensorboard=False)).logging.log_with == "none"
    assert make_config(overrides=dict(tensorboard=False, log_with="tensorboard,wandb")).logging.log_with == "wandb"
    assert make_config(overrides=dict(tensorboard=True, log_with="none")).logging.log_with == "tensorboard"
    old = {**TrainConfig().to_dict(), "tensorboard": False}  # a checkpoint written before --log-with
    del old["log_with"]
    assert TrainConfig.from_flat(old).logging.log_with == "none"
