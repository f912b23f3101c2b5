"""The refactor's seams, each against what it promises (README "Layout", the modules' docstrings):

- config: eleven sections, flat option names unique across them, presets round-trip through the flat dict and through
  the saved config.json / config.yaml, every field's own rule (choices, bounds) rejects its wrong side with one
  message built from the field's metadata, and `fdfo-train --help` lists every option once, grouped by section;
- algorithms.base: LossStats.merge is the statistics of the union, draw_step_items' three selections (rank 1 of a
  2-rank DistEnv, which needs no process group: sharding is arithmetic), sample_in_chunks joins chunks in order;
- metrics: summarise_loss_stats turns per-step sums / counts / maxima into means / fractions / maxima;
- run_state: checkpoint.pt's format and version, the resume refusals and the resumable changes;
- engine: evaluation_weights swaps the EMA in and back, the EMA moves only on a step taken;
- backends: a train record names what the fused ops ran;
- models: load_model goes through MODEL_KINDS, and the trainer never asks a model for its type.
Every expected value is stated here from the definition, never by calling the same code twice."""

import dataclasses
import json
import re
import shutil
import typing
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_loop_guards import TINY as LOOP_TINY

from fdfo_fast.algorithms import ALGORITHMS
from fdfo_fast.algorithms.base import LossStats, RunContext, draw_step_items
from fdfo_fast.config import (
    OPTION_SECTION,
    PRESETS,
    SECTIONS,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    make_config,
    save_resolved,
)
from fdfo_fast.distributed import DistEnv
from fdfo_fast.engine import PlainEngine
from fdfo_fast.errors import FdfoError
from fdfo_fast.metrics import summarise_loss_stats
from fdfo_fast.models.base import MODEL_KINDS, load_model
from fdfo_fast.run_state import STATE_VERSION, check_run_folder
from fdfo_fast.sampling import Trajectory
from fdfo_fast.train import build_parser, train

REPO = Path(__file__).resolve().parents[1]

# The tiny toy run of tests/test_loop_guards.py (3 sampling steps, 2 FDFO pairs or 1 prompt x 4, one epoch), on
# the CPU with the reference ops.
TINY = dict(LOOP_TINY, device="cpu", impl="ref")

# The sections the README names, in its order.
SECTION_NAMES = ["run", "model", "rewards", "human", "sampling", "fdfo", "sde", "nft", "optim", "eval", "logging"]


def _tiny(out, **kw):
    return make_config(overrides={**TINY, "out": str(out), **kw})


def _train_records(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _dash(name):
    return "--" + name.replace("_", "-")


def _all_fields():
    """(section class, field, its Python type) of every option."""
    out = []
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        out += [(cls, f, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. config
# ---------------------------------------------------------------------------------------------------------------
def test_config_has_the_eleven_sections_and_option_names_unique_across_them():
    assert list(SECTIONS) == SECTION_NAMES
    assert [f.name for f in dataclasses.fields(TrainConfig)] == SECTION_NAMES
    assert [f.default_factory for f in dataclasses.fields(TrainConfig)] == list(SECTIONS.values())
    names = [f.name for _, f, _ in _all_fields()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"option names used by more than one section: {dupes}"
    assert list(OPTION_SECTION) == names
    for s, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert OPTION_SECTION[f.name] == s, f"{f.name} is a field of {s} but OPTION_SECTION says otherwise"


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_every_preset_round_trips_through_the_flat_dict_and_the_saved_config(preset, tmp_path):
    cfg = make_config(preset)
    flat = cfg.to_dict()
    assert list(flat) == list(OPTION_SECTION)  # flat = every option once, by section
    for k, v in flat.items():
        assert getattr(getattr(cfg, OPTION_SECTION[k]), k) == v
    assert TrainConfig.from_flat(flat) == cfg
    for k, v in (PRESETS[preset] if preset else {}).items():
        assert flat[k] == v, f"preset {preset}: {k} is {flat[k]!r}, the preset says {v!r}"
    save_resolved(cfg, tmp_path)
    base = json.loads((tmp_path / "config.json").read_text())
    assert make_config(base=base) == cfg  # what --resume reloads
    assert make_config(yaml_path=str(tmp_path / "config.yaml")) == cfg  # what --config reloads


def _choice_message(name, choices, value):
    # "--<name> must be a, b or c, got 'x'"
    return f"{_dash(name)} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"


def test_every_choice_field_rejects_a_value_outside_its_choices():
    fields = [(f, t) for _, f, t in _all_fields() if f.metadata.get("choices") is not None]
    assert len(fields) >= 10  # the sections declare their choices in metadata
    registries = {"algorithm": tuple(ALGORITHMS), "model": tuple(MODEL_KINDS)}
    for f, typ in fields:
        assert typ is str, f"{f.name}: a choice field that is not a string"
        c = f.metadata["choices"]
        choices = tuple(c() if callable(c) else c)
        if f.name in registries:  # read from the registries, not a copy of their names
            assert choices == registries[f.name]
        bad = "x"
        assert bad not in choices
        with pytest.raises(FdfoError) as err:
            make_config(overrides={f.name: bad})
        assert str(err.value) == _choice_message(f.name, choices, bad)
        for ok in choices:  # each listed choice passes the field's own rule (a later cross-option rule may object)
            try:
                make_config(overrides={f.name: ok})
            except FdfoError as e:
                assert not str(e).startswith(f"{_dash(f.name)} must be {', '.join(choices[:-1])} or"), str(e)


def _bound_message(meta):
    """The message of a field's bounds, by rule: `why` when given; ge & lt -> "must be in [ge, lt)"; gt & le ->
    "must be in (gt, le]"; gt = 0 alone -> "must be a positive number"; ge alone -> "must be >= ge"."""
    if meta["why"]:
        return meta["why"]
    b = {k: meta[k] for k in ("ge", "gt", "lt", "le") if meta.get(k) is not None}
    if set(b) == {"ge", "lt"}:
        return f"must be in [{b['ge']}, {b['lt']})"
    if set(b) == {"gt", "le"}:
        return f"must be in ({b['gt']}, {b['le']}]"
    if b == {"gt": 0}:
        return "must be a positive number"
    if set(b) == {"ge"}:
        return f"must be >= {b['ge']}"
    pytest.fail(f"bounds {b} have no stated message rule")


def _wrong_sides(meta, typ):
    """One value beyond each bound: below ge, at gt, at lt, above le."""
    step = 1 if typ is int else 0.5
    out = []
    if meta.get("ge") is not None:
        out.append(typ(meta["ge"] - step))
    if meta.get("gt") is not None:
        out.append(typ(meta["gt"]))
    if meta.get("lt") is not None:
        out.append(typ(meta["lt"]))
    if meta.get("le") is not None:
        out.append(typ(meta["le"] + step))
    return out


def test_every_bounded_field_rejects_the_wrong_side_of_each_bound_naming_the_option():
    bounds = ("ge", "gt", "lt", "le")
    bounded = [(f, t) for _, f, t in _all_fields() if any(f.metadata.get(k) is not None for k in bounds)]
    assert len(bounded) >= 40
    for f, typ in bounded:
        assert typ in (int, float), f"{f.name}: a bounded field that is not a number"
        why = _bound_message(f.metadata)
        for value in _wrong_sides(f.metadata, typ):
            with pytest.raises(FdfoError) as err:
                make_config(overrides={f.name: value})
            assert str(err.value) == f"{_dash(f.name)} {why}, got {value!r}"
        for k in ("ge", "le"):  # the closed bounds themselves pass the field's own rule
            if f.metadata.get(k) is not None:
                try:
                    make_config(overrides={f.name: typ(f.metadata[k])})
                except FdfoError as e:
                    assert not str(e).startswith(f"{_dash(f.name)} {why},"), str(e)


def test_help_lists_every_option_once_grouped_by_section(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = build_parser().format_help()
    usage, _, body = text.partition("\n\n")
    groups: dict[str, list[str]] = {}
    current = None
    for line in body.splitlines():
        heading = re.fullmatch(r"(\w+):", line)
        if heading:
            current = heading.group(1)
            groups[current] = []
        elif current is not None:
            opt = re.match(r"  (--[\w-]+)", line)
            if opt:
                groups[current].append(opt.group(1))
    assert list(groups) == ["options", *SECTION_NAMES]
    assert groups["options"] == ["--preset", "--config", "--resume", "--dry-run"]
    for s, cls in SECTIONS.items():
        assert groups[s] == [_dash(f.name) for f in dataclasses.fields(cls)], f"--help group {s!r}"
    listed = [o for s in SECTION_NAMES for o in groups[s]]
    assert len(listed) == len(set(listed)) == len(OPTION_SECTION)
    assert re.findall(r"\[(--[\w-]+)", usage) == ["--preset", "--config", "--resume", "--dry-run", *listed]


# ---------------------------------------------------------------------------------------------------------------
# 2. algorithms.base
# ---------------------------------------------------------------------------------------------------------------
def test_loss_stats_merge_is_the_statistics_of_the_union():
    a = LossStats(3, sums={"loss": 1.5, "dev": 0.25}, counts={"clip": 1.0}, maxima={"first": 0.5, "other": 0.0})
    b = LossStats(5, sums={"loss": 2.0}, counts={"clip": 2.0, "beyond": 4.0}, maxima={"first": 0.125, "new": 0.75})
    a0, b0 = dataclasses.replace(a, sums=dict(a.sums)), dataclasses.replace(b, sums=dict(b.sums))
    expected = LossStats(
        8,
        sums={"loss": 3.5, "dev": 0.25},
        counts={"clip": 3.0, "beyond": 4.0},
        maxima={"first": 0.5, "other": 0.0, "new": 0.75},
    )
    assert a.merge(b) == expected
    assert b.merge(a) == expected
    assert (a, b) == (a0, b0)  # the operands are not modified
    assert LossStats().merge(a) == a
    assert a.merge(LossStats()) == a
    assert LossStats().merge(LossStats()) == LossStats()


def test_draw_step_items_all_and_first():
    env = DistEnv()
    g = torch.Generator().manual_seed(0)
    items = draw_step_items(3, 4, 4, "all", g, env, 3)
    assert items.tolist() == [[i, k] for i in range(3) for k in range(4)]  # sample-major
    items = draw_step_items(3, 4, 2, "first", g, env, 3)
    assert items.tolist() == [[i, k] for i in range(3) for k in range(2)]
    # rank 1 of 2: local sample indices, the same steps
    items = draw_step_items(2, 4, 2, "first", g, DistEnv(rank=1, world_size=2), 4)
    assert items.tolist() == [[i, k] for i in range(2) for k in range(2)]


def test_draw_step_items_random_is_a_per_sample_randperm_of_the_global_batch_sharded():
    """DistEnv(rank=1, world_size=2) without a process group (DistEnv.shard is arithmetic): this rank's samples
    are global samples 2, 3 of 4; each draws torch.randperm(T)[:k] in global order from the shared generator."""
    T, k, n_global, n_local = 5, 3, 4, 2
    g = torch.Generator().manual_seed(123)
    items = draw_step_items(n_local, T, k, "random", g, DistEnv(rank=1, world_size=2), n_global)
    ref = torch.Generator().manual_seed(123)
    perms = [torch.randperm(T, generator=ref)[:k].tolist() for _ in range(n_global)]
    assert items.tolist() == [[i, s] for i in range(n_local) for s in perms[2 + i]]
    for i in range(n_local):  # a k-subset without repeats
        steps = items[items[:, 0] == i, 1].tolist()
        assert len(steps) == k == len(set(steps)) and set(steps) <= set(range(T))
    # the shared generator advanced by exactly the global batch's draws, on every rank alike
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))
    # the union over ranks (sample indices offset by rank) is the single-process draw
    r0 = draw_step_items(n_local, T, k, "random", torch.Generator().manual_seed(123), DistEnv(0, 2), n_global)
    one = draw_step_items(n_global, T, k, "random", torch.Generator().manual_seed(123), DistEnv(), n_global)
    assert torch.cat([r0, items + torch.tensor([n_local, 0])]).tolist() == one.tolist()
    assert one.tolist() == [[i, s] for i in range(n_global) for s in perms[i]]


def _tagged_sample(calls):
    """A fake `sample(cond, uncond, seeds)`: a 2-step trajectory whose values are the seeds themselves."""

    def sample(cond, uncond, seeds):
        calls.append((cond["row"].tolist(), None if uncond is None else uncond["row"].tolist(), list(seeds)))
        s = torch.tensor(seeds, dtype=torch.float32)
        return Trajectory(
            sigmas=torch.tensor([1.0, 0.5, 0.0]),
            x0=s.view(-1, 1, 1, 1),
            states=torch.stack([s, s + 0.5]).view(2, -1, 1, 1, 1),
            velocities=torch.stack([-s, s]).view(2, -1, 1, 1, 1),
            log_probs=torch.stack([s, -s]),
        )

    return sample


def test_sample_in_chunks_joins_the_chunks_in_order():
    ctx = RunContext(model=None, reference=None, reward=None, prompt_pool={}, sigmas=torch.tensor([1.0, 0.5, 0.0]))
    seeds = [10, 20, 30, 40, 50]
    cond, uncond = {"row": torch.arange(5)}, {"row": torch.arange(5) + 100}
    calls = []
    traj = ctx.sample_in_chunks(_tagged_sample(calls), cond, uncond, seeds, chunk=2)
    assert calls == [([0, 1], [100, 101], [10, 20]), ([2, 3], [102, 103], [30, 40]), ([4], [104], [50])]
    s = torch.tensor(seeds, dtype=torch.float32)
    assert torch.equal(traj.x0.flatten(), s)
    assert torch.equal(traj.states.flatten(1), torch.stack([s, s + 0.5]))
    assert torch.equal(traj.velocities.flatten(1), torch.stack([-s, s]))
    assert torch.equal(traj.log_probs, torch.stack([s, -s]))
    assert torch.equal(traj.sigmas, torch.tensor([1.0, 0.5, 0.0]))
    calls.clear()  # no CFG: the unconditional branch stays None; one chunk covers everything
    traj = ctx.sample_in_chunks(_tagged_sample(calls), cond, None, seeds, chunk=8)
    assert calls == [([0, 1, 2, 3, 4], None, seeds)]
    assert torch.equal(traj.x0.flatten(), s)


# ---------------------------------------------------------------------------------------------------------------
# 3. metrics
# ---------------------------------------------------------------------------------------------------------------
def test_summarise_loss_stats_means_fractions_maxima_and_active_share():
    steps = [
        LossStats(4, sums={"loss": 2.0, "dev": 0.5}, counts={"clip": 1.0}, maxima={"dev_first_max": 0.0}),
        LossStats(4, sums={"loss": 1.0}, counts={"clip": 3.0}, maxima={}),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a maximum of 0 does not warn
        rec = summarise_loss_stats("algo", steps, DistEnv(), n_items=16, epoch=1)
    assert rec == {
        "algo/loss_mean": 3.0 / 8,  # total sum / total items
        "algo/loss_mean_per_step": [2.0 / 4, 1.0 / 4],
        "algo/dev_mean": 0.5 / 8,
        "algo/dev_mean_per_step": [0.5 / 4],  # only the steps that report it
        "algo/clip_frac": 4.0 / 8,
        "algo/dev_first_max": 0.0,
        "algo/active_items_frac": 8 / 16,  # items that needed a pass / the epoch's items
    }
    steps[0].maxima["dev_first_max"] = 2e-4  # > 1e-4: the training forward does not reproduce the sampling one
    with pytest.warns(UserWarning, match=r"epoch 3: dev_first_max = 0\.0002"):
        rec = summarise_loss_stats("algo", steps, DistEnv(), n_items=16, epoch=3)
    assert rec["algo/dev_first_max"] == 2e-4


# ---------------------------------------------------------------------------------------------------------------
# 4. run_state, 6. backends (a tiny toy run shared by the module)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fdfo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arch") / "fdfo"
    train(_tiny(out))
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_checkpoint_carries_format_and_version(fdfo_run):
    st = torch.load(fdfo_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert st["format"] == "fdfo_fast.train_state"
    assert st["version"] == STATE_VERSION
    assert st["epoch"] == 1


def test_resume_refuses_another_state_version(fdfo_run, tmp_path):
    out = _copy(fdfo_run, tmp_path)
    st = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    st["version"] = STATE_VERSION + 1
    torch.save(st, out / "checkpoint.pt")
    with pytest.raises(FdfoError) as err:
        train(_tiny(out, epochs=2), resume=True)
    msg = str(err.value)
    assert f"state version {STATE_VERSION + 1}" in msg and f"reads version {STATE_VERSION}" in msg, msg


def test_resume_refuses_another_format(fdfo_run, tmp_path):
    out = _copy(fdfo_run, tmp_path)
    st = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    st["format"] = "fdfo_fast.best"
    torch.save(st, out / "checkpoint.pt")
    with pytest.raises(FdfoError, match="'fdfo_fast.best', expected 'fdfo_fast.train_state'"):
        train(_tiny(out, epochs=2), resume=True)


def test_resume_refuses_a_changed_option_that_is_not_resumable(fdfo_run, tmp_path):
    out = _copy(fdfo_run, tmp_path)
    with pytest.raises(FdfoError) as err:
        train(_tiny(out, epochs=2, lr=1e-3), resume=True)
    assert "options ['lr'] differ" in str(err.value), str(err.value)


def test_resume_with_only_resumable_changes_continues(fdfo_run, tmp_path):
    out = _copy(fdfo_run, tmp_path)
    train(_tiny(out, epochs=2), resume=True)  # epochs and out changed: both resumable
    assert [r["epoch"] for r in _train_records(out)] == [1, 2]
    st = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert st["epoch"] == 2 and st["version"] == STATE_VERSION


def test_a_new_run_never_overwrites_one_and_a_resume_needs_one(fdfo_run, tmp_path):
    check_run_folder(fdfo_run, resume=True)  # a run to resume: fine
    check_run_folder(tmp_path / "empty", resume=False)  # a fresh folder: fine
    with pytest.raises(FdfoError, match="already holds a run"):
        check_run_folder(fdfo_run, resume=False)
    with pytest.raises(FdfoError, match="does not exist"):
        check_run_folder(tmp_path / "empty", resume=True)
    before = (fdfo_run / "checkpoint.pt").read_bytes()
    with pytest.raises(FdfoError, match="already holds a run"):
        train(_tiny(fdfo_run))
    assert (fdfo_run / "checkpoint.pt").read_bytes() == before


def test_train_records_name_the_backends_that_ran(fdfo_run, tmp_path):
    (rec,) = _train_records(fdfo_run)
    assert rec["fdfo/active_items_frac"] > 0  # the epoch trained on items: the FDFO loss ran
    assert rec["backends"] == {"sampler_step": "ref", "fd_loss": "ref"}
    train(_tiny(tmp_path / "grpo", algorithm="flow_grpo"))
    (rec,) = _train_records(tmp_path / "grpo")
    assert rec["flow_grpo/active_items_frac"] > 0
    assert rec["backends"] == {"sampler_step": "ref"}  # Flow-GRPO never calls the FDFO loss


# ---------------------------------------------------------------------------------------------------------------
# 5. engine
# ---------------------------------------------------------------------------------------------------------------
def _engine(ema_decay):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    return PlainEngine(model, params, OptimConfig(ema_decay=ema_decay, lr=0.1), DistEnv())


def _step(engine, loss_ok=True, grad=1.0):
    for p in engine.params:
        p.grad = torch.full_like(p, grad)
    return engine.step(loss_ok)


def _snap(tensors):
    return [t.detach().clone() for t in tensors]


def test_evaluation_weights_swap_the_ema_in_and_back():
    engine = _engine(0.5)
    _, stepped = _step(engine)
    assert stepped
    trained, shadow = _snap(engine.params), _snap(engine.ema.shadow)
    assert not all(torch.equal(a, b) for a, b in zip(trained, shadow))  # the EMA lags: the swap is visible
    with engine.evaluation_weights():
        assert all(torch.equal(p, s) for p, s in zip(engine.params, shadow))
    assert all(torch.equal(p, t) for p, t in zip(engine.params, trained))
    assert all(torch.equal(s, t) for s, t in zip(engine.ema.shadow, shadow))
    with pytest.raises(RuntimeError), engine.evaluation_weights():  # swapped back even when evaluation fails
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, t) for p, t in zip(engine.params, trained))


def test_evaluation_weights_without_ema_change_nothing():
    engine = _engine(0.0)
    assert engine.ema is None
    _step(engine)
    trained = _snap(engine.params)
    with engine.evaluation_weights():
        assert all(torch.equal(p, t) for p, t in zip(engine.params, trained))
    assert all(torch.equal(p, t) for p, t in zip(engine.params, trained))


def test_ema_moves_only_on_a_step_taken():
    engine = _engine(0.5)
    assert _step(engine)[1] and engine.ema.steps == 1
    params, shadow = _snap(engine.params), _snap(engine.ema.shadow)
    for kw in (dict(loss_ok=False), dict(grad=float("inf"))):  # a non-finite loss, a non-finite gradient
        _, stepped = _step(engine, **kw)
        assert not stepped, kw
        assert engine.ema.steps == 1, kw
        assert all(torch.equal(s, t) for s, t in zip(engine.ema.shadow, shadow)), kw
        assert all(torch.equal(p, t) for p, t in zip(engine.params, params)), kw
    assert _step(engine)[1] and engine.ema.steps == 2
    assert not all(torch.equal(s, t) for s, t in zip(engine.ema.shadow, shadow))


# ---------------------------------------------------------------------------------------------------------------
# 7. models
# ---------------------------------------------------------------------------------------------------------------
def test_load_model_goes_through_model_kinds(monkeypatch):
    from fdfo_fast import models

    assert MODEL_KINDS == {"toy": models.ToyFlowModel, "sd3": models.SD3FlowModel, "flux": models.FluxFlowModel,
                           "flux2": models.Flux2FlowModel, "qwen_image": models.QwenImageFlowModel,
                           "wan": models.WanFlowModel}  # fmt: skip
    loaded = []

    class Fake:
        @classmethod
        def load(cls, mc):
            loaded.append(mc)
            return "a fake model"

    mc = ModelConfig()
    monkeypatch.setitem(MODEL_KINDS, "toy", Fake)
    assert load_model(mc) == "a fake model" and loaded == [mc]
    monkeypatch.setitem(MODEL_KINDS, "fake", Fake)
    assert load_model(SimpleNamespace(model="fake")) == "a fake model"
    # --model's choices are the registry: a registered kind passes the choice rule (then needs --model-path)
    with pytest.raises(FdfoError, match=r"^--model-path is required for --model fake"):
        make_config(overrides={"model": "fake"})
    with pytest.raises(FdfoError) as err:
        load_model(SimpleNamespace(model="nope"))
    assert str(err.value) == "--model must be one of toy, sd3, flux, flux2, qwen_image, wan, fake, got 'nope'"


TRAINER_MODULES = ["train.py", "builder.py", "run_state.py", "evaluation.py", "algorithms/*.py"]
FORBIDDEN = {
    "probes the model with hasattr / getattr": re.compile(r"\b(hasattr|getattr)\(\s*(\w+\.)*model\b"),
    "branches on the model kind": re.compile(r"\.model\s*[!=]=\s*['\"](toy|sd3|flux)['\"]"),
}


def test_trainer_asks_the_model_never_its_type():
    files = [p for pat in TRAINER_MODULES for p in sorted((REPO / "fdfo_fast").glob(pat))]
    assert len(files) >= 9, files
    found = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for what, rx in FORBIDDEN.items():
                if rx.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n} {what}: {line.strip()}")
    assert not found, (
        "the trainer must go through the FlowModel interface (fdfo_fast/models/base.py), not probe or branch on "
        "the model's type:\n" + "\n".join(found)
    )
