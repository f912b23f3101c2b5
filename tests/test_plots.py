"""fdfo-plot on real runs (toy FDFO, toy Flow-GRPO, a tiny SD3 LoRA run): panels, lines and their data, the x-axes,
the PNG, and one clear error for each bad input."""

import fnmatch
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from fdfo_fast.config import make_config
from fdfo_fast.plots import main, plot_runs, reward_curve
from fdfo_fast.train import train

# A few epochs of the shipped toy model, two held-out evaluations after the first one (~1 s a run on a free core).
TOY = dict(
    epochs=4,
    eval_every=2,
    reward="alignment:1,quality:1",
    num_steps=4,
    pairs_per_epoch=4,
    prompts_per_epoch=2,
    group_size=4,
    eval_per_category=1,
    eval_num_steps=4,
    opt_steps_per_epoch=2,
    diversity_prompts=0,
    progress=False,
    tensorboard=False,
)


@pytest.fixture(scope="session")
def toy_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_toy_runs")
    for algorithm, extra in (("fdfo", {}), ("flow_grpo", {"kl_beta": 0.1})):
        train(make_config(overrides=dict(algorithm=algorithm, out=str(root / algorithm), **TOY, **extra)))
    return [root / "fdfo", root / "flow_grpo"]


@pytest.fixture(scope="session")
def sd3_run(sd3_dir, tmp_path_factory):
    """A 3-epoch FDFO LoRA run of the tiny SD3 pipeline (tests/test_diffusers_models.py's settings), evaluated every
    epoch with the diversity measure on: the keys a real-model run logs (~2 s)."""
    out = tmp_path_factory.mktemp("plot_sd3_run") / "sd3_fdfo"
    cfg = make_config(
        overrides=dict(
            model="sd3", model_path=sd3_dir, algorithm="fdfo", out=str(out), resolution=32, dtype="fp32",
            max_sequence_length=16, finetune="lora", lora_rank=4, num_steps=3, epochs=3, eval_every=1,
            eval_per_category=1, eval_num_steps=2, save_every=3, reward="quality:1,jpeg_incompressibility:0.05",
            lr=1e-2, pairs_per_epoch=2, churn=0.05, progress=False, tensorboard=False, device="cpu",
        )
    )  # fmt: skip
    train(cfg)
    return out


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _panels(fig):
    """{key: axes}: every panel's y-label is the key it draws."""
    return {ax.get_ylabel(): ax for ax in fig.axes}


def _assert_lines_are_the_records(ax, key, runs, labels, x="reward_queries", scale=1.0):
    """One line per run (a run folder, or its records) that logged `key`, labelled by the run, its points the
    records' (x, key) values."""
    runs = [run if isinstance(run, list) else _records(run) for run in runs]
    holding = [(recs, label) for recs, label in zip(runs, labels) if any(key in r for r in recs)]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == [label for _, label in holding], key
    for ln, (recs, _) in zip(lines, holding):
        recs = [r for r in recs if key in r]
        assert list(ln.get_xdata()) == [r[x] / scale for r in recs], key
        assert list(ln.get_ydata()) == [r[key] for r in recs], key


def test_two_toy_runs_share_one_figure_one_line_per_run(toy_runs):
    fig = plot_runs(toy_runs)
    panels = _panels(fig)
    assert list(panels) == [
        "reward/reward", "reward/alignment", "reward/quality",  # the reward has two terms: each has a panel
        "eval/geneval",  # the toy world's held-out score
        "fdfo/rho_dev_mean", "fdfo/rho_beyond_eps_frac", "fdfo/mean_abs_advantage", "fdfo/pairs_with_reward_gap",
        "flow_grpo/kl_mean", "flow_grpo/clipped_frac", "flow_grpo/ratio_dev_mean",
    ]  # fmt: skip
    for key, ax in panels.items():
        _assert_lines_are_the_records(ax, key, toy_runs, ["fdfo", "flow_grpo"])
        assert ax.get_xlabel() == "reward queries"
    assert len(panels["reward/reward"].get_lines()) == 2 and len(panels["flow_grpo/kl_mean"].get_lines()) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fdfo", "flow_grpo"]


def test_x_axis_in_wall_time_or_epochs(toy_runs, tmp_path):
    fig = plot_runs(toy_runs, x="wall_time")
    ax = _panels(fig)["reward/reward"]
    assert ax.get_xlabel() == "wall time (s)"  # these runs last under a second
    _assert_lines_are_the_records(ax, "reward/reward", toy_runs, ["fdfo", "flow_grpo"], x="wall_time")
    fig = plot_runs(toy_runs, x="epoch")
    for key, ax in _panels(fig).items():
        _assert_lines_are_the_records(ax, key, toy_runs, ["fdfo", "flow_grpo"], x="epoch")
    # a run of minutes is shown in minutes, one of hours in hours: the same records, their clock rescaled
    recs = _records(toy_runs[0])
    for longest, unit, per_unit in ((600.0, "min", 60.0), (3 * 3600.0, "h", 3600.0)):
        slow = tmp_path / unit
        slow.mkdir()
        factor = longest / max(r["wall_time"] for r in recs)
        scaled = [{**r, "wall_time": r["wall_time"] * factor} for r in recs]
        (slow / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scaled))
        ax = _panels(plot_runs([slow], x="wall_time"))["reward/reward"]
        assert ax.get_xlabel() == f"wall time ({unit})"
        _assert_lines_are_the_records(ax, "reward/reward", [scaled], [unit], x="wall_time", scale=per_unit)


def test_a_real_model_run_shows_its_reward_terms_evaluation_and_diversity(sd3_run, tmp_path):
    fig = plot_runs([sd3_run])
    panels = _panels(fig)
    # jpeg_compressibility is logged beside jpeg_incompressibility but is no term of this reward: no panel
    assert list(panels) == [
        "reward/reward", "reward/quality", "reward/jpeg_incompressibility",
        "eval/reward", "eval/quality", "eval/jpeg_incompressibility", "eval/diversity",
        "fdfo/rho_dev_mean", "fdfo/rho_beyond_eps_frac", "fdfo/mean_abs_advantage", "fdfo/pairs_with_reward_gap",
    ]  # fmt: skip
    for key, ax in panels.items():
        _assert_lines_are_the_records(ax, key, [sd3_run], ["sd3_fdfo"])
    # the demo's figure crashed on this run (KeyError 'eval/geneval'): it draws the reward and the held-out reward
    out = reward_curve(sd3_run / "metrics.jsonl", tmp_path / "curve.png", "sd3")
    assert Image.open(out).size[0] > 0


def test_the_cli_writes_the_png_atomically_and_metrics_pick_the_panels(toy_runs, tmp_path):
    out = tmp_path / "figs" / "runs.png"
    args = [*map(str, toy_runs), "--metrics", "flow_grpo/*", "reward/reward", "--labels", "A", "B", "--x", "epoch"]
    main([*args, "--out", str(out)])
    main([*args, "--out", str(out)])  # replaces its own earlier figure
    assert [p.name for p in out.parent.iterdir()] == ["runs.png"]  # no temp file left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file written here (mkstemp's would be 0600)
    fig = plot_runs(toy_runs, x="epoch", metrics=["flow_grpo/*", "reward/reward"], labels=["A", "B"])
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (round(fig.get_figwidth() * 100), round(fig.get_figheight() * 100))
    grpo = _records(toy_runs[1])
    scalar_grpo_keys = [
        k for k in dict.fromkeys(k for r in grpo for k in r)
        if fnmatch.fnmatch(k, "flow_grpo/*") and isinstance(next(r[k] for r in grpo if k in r), float)
    ]  # fmt: skip
    panels = _panels(fig)
    assert list(panels) == [*scalar_grpo_keys, "reward/reward"] and "flow_grpo/kl_mean" in panels
    for key, ax in panels.items():
        _assert_lines_are_the_records(ax, key, toy_runs, ["A", "B"], x="epoch")


def test_a_torn_last_line_is_skipped_with_a_warning(toy_runs, tmp_path):
    run = tmp_path / "killed"
    run.mkdir()
    text = (toy_runs[0] / "metrics.jsonl").read_text()
    lines = text.splitlines()
    (run / "metrics.jsonl").write_text(text + lines[1][:40])  # killed while writing a record
    with pytest.warns(UserWarning, match=rf"line {len(lines) + 1} is incomplete"):
        fig = plot_runs([run])
    for key, ax in _panels(fig).items():  # the complete records, all of them
        _assert_lines_are_the_records(ax, key, [_records(toy_runs[0])], ["killed"])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such run folder or metrics file"),
        ("folder", "no metrics.jsonl in this folder"),
        ("empty", "holds no record"),
        ("garbage", "line 2 is not JSON"),
        ("not_object", "line 1 is not a JSON object"),
    ],
)
def test_a_bad_run_is_one_error_line_naming_it(case, message, toy_runs, tmp_path, capsys):
    good = (toy_runs[0] / "metrics.jsonl").read_text().splitlines()
    bad = {
        "missing": tmp_path / "nope",
        "folder": tmp_path / "not_a_run",
        "empty": _write(tmp_path / "empty" / "metrics.jsonl", "\n"),
        "garbage": _write(tmp_path / "g" / "metrics.jsonl", "\n".join([good[0], "garbage", *good[1:]]) + "\n"),
        "not_object": _write(tmp_path / "o.jsonl", "[1, 2]\n"),
    }[case]
    if case == "folder":
        bad.mkdir()
    out = tmp_path / "fig.png"
    with pytest.raises(SystemExit) as exc:
        main([str(toy_runs[0]), str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(bad) in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--x", "steps"], "--x must be one of reward_queries, wall_time, epoch"),
        (["--labels", "one"], "--labels gives 1 names for 2 runs"),
        (["--metrics", "nothing/*"], "matches no logged quantity"),
    ],
)
def test_bad_options_are_one_error_line(args, message, toy_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*map(str, toy_runs), "--out", str(tmp_path / "fig.png"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_the_module_runs_as_a_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fdfo_fast.plots", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'nope'}: no such run folder or metrics file\n"
