"""--offload-frozen (fdfo_fast.placement.FrozenOffload): the text encoders, the VAE and the reward models leave the
training device for the training passes and come back before sampling and evaluation, and the run's numbers do
not change. This machine has no second device, so the offload target is a second CPU device name (`cpu:0`, where
`.to` makes real copies) and the moves are read from the modules' and rewards' recorded `.to` calls."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fdfo_fast import placement  # noqa: E402
from fdfo_fast.algorithms.fdfo import FDFO  # noqa: E402
from fdfo_fast.builder import build_run  # noqa: E402
from fdfo_fast.config import make_config  # noqa: E402
from fdfo_fast.models.toy_flow import ToyFlowModel  # noqa: E402
from fdfo_fast.placement import FrozenOffload  # noqa: E402
from fdfo_fast.train import run_loop  # noqa: E402

OFFLOAD_MARKER = torch.device("cpu", 0)  # != torch.device("cpu"); Tensor.to(it) copies


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel with tokenizer and image processor (the clip_score reward's folder)."""
    from tiny_diffusers import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    tiny = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id, **tiny)
    text.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **tiny))
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def _cfg(out, sd3_dir, clip_dir, offload: bool):
    return make_config(overrides=dict(
        model="sd3", model_path=sd3_dir, algorithm="fdfo", out=str(out), resolution=32, dtype="fp32",
        max_sequence_length=16, finetune="lora", lora_rank=4, lora_alpha=8.0, num_steps=2, epochs=2, eval_every=0,
        eval_per_category=1, eval_num_steps=2, save_every=1, pairs_per_epoch=2, churn=0.05, lr=1e-2,
        reward="clip_score:1", reward_models=f"clip_score={clip_dir};micro_batch=4", progress=False, log_with="none",
        device="cpu", offload_frozen=offload,
    ))  # fmt: skip


def _record_moves(run) -> tuple[dict, list]:
    """Make every frozen module's and reward's `.to` record where it sends them; returns ({name: thing}, log)."""
    things = dict(run.model.offloadable_modules())
    things.update({m.names[0]: m for m in run.ctx.reward.models})
    log = []
    for name, thing in things.items():
        real = thing.to
        thing.to = lambda device, real=real, name=name: log.append((name, torch.device(device))) or real(device)
    return things, log


def _where(things: dict, log: list) -> dict:
    """Each frozen thing's device as its last recorded move says (never moved: where it was loaded, the CPU)."""
    last = {name: torch.device("cpu") for name in things}
    last.update(dict(log))
    return last


def _metrics(out) -> list[dict]:
    drop = ("wall_time",)  # the only field that is not a result
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip


def _train_watching(cfg, monkeypatch) -> tuple[dict, list, dict]:
    """Train `cfg`, recording the frozen things' moves and, at every rollout and every training pass, where they
    are: ({name: thing}, the move log, {"sampling" | "training": [({name: device}, the reward's device), ...]})."""
    run = build_run(cfg)
    things, log = _record_moves(run)
    seen = {"training": [], "sampling": []}
    real_loss, real_rollout = FDFO.loss, FDFO.rollout

    def snapshot(phase):
        seen[phase].append((_where(things, log), run.ctx.reward.models[0].device))

    monkeypatch.setattr(FDFO, "loss", lambda self, *a, **k: snapshot("training") or real_loss(self, *a, **k))
    monkeypatch.setattr(FDFO, "rollout", lambda self, *a, **k: snapshot("sampling") or real_rollout(self, *a, **k))
    try:
        run_loop(run)
    finally:
        monkeypatch.undo()
    return things, log, seen


def test_offload_frozen_moves_encoders_vae_and_rewards_for_training_only(sd3_dir, clip_dir, tmp_path, monkeypatch):
    metrics = {}
    for offload in (False, True):
        monkeypatch.setattr(placement, "OFFLOAD_DEVICE", OFFLOAD_MARKER)
        things, log, seen = _train_watching(_cfg(tmp_path / str(offload), sd3_dir, clip_dir, offload), monkeypatch)
        metrics[offload] = _metrics(tmp_path / str(offload))
        home = dict.fromkeys(things, torch.device("cpu"))
        assert seen["sampling"] and seen["training"]
        assert all(where == home and dev == torch.device("cpu") for where, dev in seen["sampling"])
        if offload:
            assert set(things) == {"text_encoder", "text_encoder_2", "text_encoder_3", "vae", "clip_score"}
            assert all(where == dict.fromkeys(things, OFFLOAD_MARKER) and dev == OFFLOAD_MARKER
                       for where, dev in seen["training"])  # fmt: skip
            assert len(log) == 2 * len(things) * 2  # out and back, each of the 2 epochs
        else:
            assert log == [] and all(where == home for where, _ in seen["training"])
    # a move is a move: every logged number (losses, rewards, grad norms, held-out scores) is bit-identical
    assert metrics[True] == metrics[False] and any(r["kind"] == "eval" for r in metrics[True])


def test_offload_is_a_no_op_on_cpu_runs_the_toy_model_and_zero3_shards(sd3_dir, clip_dir, tmp_path, monkeypatch):
    run = build_run(_cfg(tmp_path / "cpu", sd3_dir, clip_dir, offload=True))
    things, log = _record_moves(run)
    with run.offload.training_phase() as moved:  # the real target, the CPU, is where everything already is
        assert moved == []
    assert log == []
    monkeypatch.setattr(placement, "OFFLOAD_DEVICE", OFFLOAD_MARKER)
    for p in run.model.vae.parameters():  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
        p.ds_id = 0
    with run.offload.training_phase() as moved:
        assert "vae" not in moved and "text_encoder_3" in moved
    assert ("vae", OFFLOAD_MARKER) not in log
    with FrozenOffload(ToyFlowModel(), run.ctx.reward.models[:0], enabled=True).training_phase() as moved:
        assert moved == []
    with FrozenOffload(run.model, run.ctx.reward.models, enabled=False).training_phase() as moved:
        assert moved == []
    run.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("option", [["--reward-device", "cuda"], ["--reward-models", "pickscore=/x;device=cuda:1"]])
def test_a_missing_reward_device_stops_the_trainer_before_the_model_loads(option, tmp_path, capsys):
    from fdfo_fast.train import main

    argv = ["--model", "sd3", "--model-path", str(tmp_path / "no_pipeline"), "--reward", "pickscore:1",
            "--reward-models", "pickscore=/x", *option, "--out", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1  # the reward device, not the missing pipeline folder
    assert err[0].startswith("error: ") and "requested but no CUDA device is available" in err[0]
