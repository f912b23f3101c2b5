"""Exports of a run for other tools, on the tiny SD3 pipeline: --init-lora starts from a LoRA exactly as diffusers'
`load_lora_weights` and peft's `PeftModel.from_pretrained` load it, --keep-last keeps per-save LoRA snapshots
(resume included), full fine-tuning exports the transformer as `from_pretrained` loads it (also consolidated from
ZeRO-3 shards), and every export carries a diffusers model card naming the base model and the measured metrics."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import fdfo_fast.builder as builder  # noqa: E402
import fdfo_fast.train as train_mod  # noqa: E402
from fdfo_fast.checkpoint import remove_stale_temp_files  # noqa: E402
from fdfo_fast.config import make_config  # noqa: E402
from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.models.diffusers_flow import FluxFlowModel, SD3FlowModel  # noqa: E402

DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors",)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _load(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32, resolution=32, max_sequence_length=16).eval()


def _fresh_pipe(path, cls="StableDiffusion3Pipeline"):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(path, local_files_only=True)
    pipe.transformer.eval()
    return pipe


def _ft(rank=32, alpha=64.0, targets="auto", init_lora=""):
    """The fine-tuning fields setup_finetune reads (defaults: the config's, i.e. "not given")."""
    return SimpleNamespace(finetune="lora", lora_rank=rank, lora_alpha=alpha, lora_targets=targets,
                           gradient_checkpointing=False, init_lora=init_lora)  # fmt: skip


def _velocity(transformer, model, x, cond):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([600.0]), encoder_hidden_states=cond["embeds"],
                           pooled_projections=cond["pooled"], return_dict=False)[0]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(sd3_dir, tmp_path_factory):
    """A rank-4, α-8 LoRA (r != α: a loader that lost α loads it at half strength) with random non-zero factors on
    two targets only, exported in both formats, and folders holding one format each."""
    root = tmp_path_factory.mktemp("adapter")
    model = _load(SD3FlowModel, sd3_dir)
    model.setup_finetune(_ft(4, 8.0, "attn.to_q,attn.to_v"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.export_lora(root / "both")
    for name, files in (("diffusers", DIFFUSERS_FILES), ("peft", PEFT_FILES)):
        (root / name).mkdir()
        for f in files:
            shutil.copy(root / "both" / f, root / name / f)
    factors = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" in n}
    return SimpleNamespace(root=root, factors=factors)


def test_init_lora_loads_as_diffusers_and_peft_do(sd3_dir, adapter):
    """--init-lora of a diffusers folder gives the transformer output of diffusers' own `pipe.load_lora_weights`,
    of a PEFT folder that of `PeftModel.from_pretrained` (equal, not close: the same weights and ops), with the
    adapter's rank, α and targets (the config's defaults 32 / 64 / auto give way), trainable fp32 factors equal to
    the exported ones, and the reference model is the base transformer (adapters off)."""
    from peft import PeftModel

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    base = _load(SD3FlowModel, sd3_dir)
    cond = base.encode_prompts(["a cat"])
    v_base = _velocity(base.transformer, base, x, cond)
    pipe = _fresh_pipe(sd3_dir)
    pipe.load_lora_weights(str(adapter.root / "diffusers"))
    v_diffusers = _velocity(pipe.transformer, base, x, cond)
    transformer = _fresh_pipe(sd3_dir).transformer
    PeftModel.from_pretrained(transformer, str(adapter.root / "peft"))
    expected = {"diffusers": v_diffusers, "peft": _velocity(transformer, base, x, cond), "both": v_diffusers}
    for name in ("diffusers", "peft", "both"):
        folder = adapter.root / name
        ours = _load(SD3FlowModel, sd3_dir)
        params = ours.setup_finetune(_ft(init_lora=str(folder)))
        v_ours = _velocity(ours.transformer, ours, x, cond)
        assert torch.equal(v_ours, expected[name]), name
        assert not torch.equal(v_ours, v_base)
        lora = {n: p for n, p in ours.transformer.named_parameters() if "lora_" in n}
        assert lora.keys() == adapter.factors.keys() and all(torch.equal(lora[n], adapter.factors[n]) for n in lora)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values()) and len(params) == len(lora)
        assert ours.lora_summary()["rank"] == 4 and ours.lora_summary()["alpha"] == 8.0
        with torch.no_grad():
            v_ref = ours.reference_model()(x, torch.tensor([0.6]), cond)
            assert torch.equal(v_ref, base(x, torch.tensor([0.6]), cond))


def test_init_lora_bad_input_gives_one_clear_error(sd3_dir, flux_dir, adapter, tmp_path):
    both = str(adapter.root / "both")
    cases = [
        (_ft(init_lora=str(tmp_path / "nowhere")), "does not exist or is not a folder"),
        (_ft(init_lora=str(tmp_path)), "holds no LoRA: expected pytorch_lora_weights.safetensors"),
        (_ft(rank=8, init_lora=both), "has rank 4, not --lora-rank 8"),
        (_ft(alpha=16.0, init_lora=both), "has alpha 8, not --lora-alpha 16"),
        (
            _ft(targets="attn.to_q", init_lora=both),
            r"adapts 4 modules, --lora-targets attn.to_q selects 2 \(not the same set\)",
        ),
    ]
    for mc, message in cases:
        with pytest.raises(FdfoError, match=message):
            _load(SD3FlowModel, sd3_dir).setup_finetune(mc)
    _load(SD3FlowModel, sd3_dir).setup_finetune(_ft(4, 8.0, "attn.to_v,attn.to_q", both))  # agreeing: accepted
    # an SD3 adapter on FLUX (other module names / shapes), in either format
    for name in ("diffusers", "peft"):
        with pytest.raises(FdfoError, match="does not match the model"):
            _load(FluxFlowModel, flux_dir).setup_finetune(_ft(init_lora=str(adapter.root / name)))
    # a PEFT folder whose weights lack a module its config names
    from safetensors.torch import load_file, save_file

    cut = tmp_path / "cut"
    shutil.copytree(adapter.root / "peft", cut)
    weights = load_file(cut / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "transformer_blocks.1." not in k}, cut / "adapter_model.safetensors")
    with pytest.raises(FdfoError, match=r"does not match the model: missing 4 keys"):
        _load(SD3FlowModel, sd3_dir).setup_finetune(_ft(init_lora=str(cut)))
    common = dict(model="sd3", model_path=sd3_dir, reward="quality:1")
    with pytest.raises(FdfoError, match="--init-lora needs --finetune lora"):
        make_config(overrides=dict(common, init_lora=both))
    with pytest.raises(FdfoError, match="--init-lora must be an existing LoRA folder"):
        make_config(overrides=dict(common, finetune="lora", init_lora=str(tmp_path / "nowhere")))
    with pytest.raises(FdfoError, match="--keep-last must be >= 0"):
        make_config(overrides=dict(common, keep_last=-1))


def _cfg(out, sd3_dir, **kw):
    common = dict(
        model="sd3", model_path=sd3_dir, out=str(out), resolution=32, dtype="fp32", max_sequence_length=16,
        finetune="lora", lora_rank=4, lora_alpha=8.0, num_steps=3, epochs=2, eval_every=1, eval_per_category=1,
        eval_num_steps=2, diversity_prompts=0, save_every=1, reward="quality:1,jpeg_incompressibility:0.05",
        lr=1e-2, progress=False, tensorboard=False, device="cpu", pairs_per_epoch=2, churn=0.05,
    )  # fmt: skip
    common.update(kw)
    return make_config(overrides=common)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _check_card(folder: Path, base: str, evaluation: dict):
    """README.md names the base model (in the card's metadata too) and the evaluation's measured values."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == base and card.data.library_name == "diffusers"
    assert "fdfo_fast" in card.data.tags
    values = {k: v for k, v in evaluation.items() if k.startswith("eval/")}
    assert values
    for k, v in values.items():
        assert f"| {k.removeprefix('eval/')} | {v:.6g} |" in card.text, (folder, k)


def test_init_lora_run_with_snapshots_resumes_and_writes_model_cards(sd3_dir, adapter, tmp_path):
    """An --init-lora run (the adapter's own targets, not the recipe's) stops after epoch 1 and resumes to 2 with
    the losses of the uninterrupted run; --keep-last 1 leaves the snapshot of epoch 2 only (a stale .tmp and a
    snapshot beyond the checkpoint, as a killed run leaves them, are gone); every export carries a model card with
    the base model and the metrics logged, and diffusers' load_lora_weights still loads the folder."""
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    run, once = tmp_path / "run", tmp_path / "once"
    kw = dict(init_lora=str(adapter.root / "diffusers"), lora_rank=32, lora_alpha=64.0, keep_last=1)
    train_mod.train(_cfg(run, sd3_dir, epochs=1, **kw))
    snaps = run / "lora_snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["epoch_00001"]
    _check_card(snaps / "epoch_00001", sd3_dir, [r for r in _records(run) if r["kind"] == "eval"][-1])
    (snaps / "epoch_00002.tmp").mkdir()  # a copy killed mid-write
    shutil.copytree(snaps / "epoch_00001", snaps / "epoch_00007")  # beyond the checkpoint: never continued
    train_mod.train(_cfg(run, sd3_dir, epochs=2, **kw), resume=True)
    train_mod.train(_cfg(once, sd3_dir, epochs=2, eval_every=0, **kw))
    losses = lambda d: [r["loss"] for r in _records(d) if r["kind"] == "train"]
    assert len(losses(run)) == 2 and losses(run) == pytest.approx(losses(once), rel=1e-5)
    assert sorted(p.name for p in snaps.iterdir()) == ["epoch_00002"]
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    snap = load_file(snaps / "epoch_00002" / "pytorch_lora_weights.safetensors")
    assert lora.keys() == snap.keys() and all(torch.equal(lora[k], snap[k]) for k in lora)
    assert len(lora) == 2 * 2 * 2  # A and B of to_q and to_v in 2 blocks: the adapter's targets
    start = {f"transformer.{k.replace('.default', '')}": v for k, v in adapter.factors.items()}
    assert start.keys() == lora.keys() and any(not torch.equal(lora[k], v) for k, v in start.items())  # trained on

    evals = [r for r in _records(run) if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    _check_card(run / "lora", sd3_dir, evals[-1])
    _check_card(snaps / "epoch_00002", sd3_dir, evals[-1])
    best = max(evals, key=lambda r: r["eval/reward"])
    best_card = ModelCard.load(run / "best_lora" / "README.md")
    assert best_card.data.base_model == sd3_dir and f"| reward | {best['eval/reward']:.6g} |" in best_card.text
    assert f"(epoch {best['epoch']})" in best_card.text
    card = ModelCard.load(run / "lora" / "README.md").text
    assert "rank 4, alpha 8" in card and "starting from the LoRA in" in card
    pipe = _fresh_pipe(sd3_dir)
    pipe.load_lora_weights(str(run / "lora"))  # the README beside the weights changes nothing for diffusers
    assert sum("lora_A" in n for n, _ in pipe.transformer.named_parameters()) == 4


def test_remove_stale_temp_files_clears_export_and_snapshot_leftovers(tmp_path):
    left_by_a_kill = ("lora.tmp", "transformer.old", "best_transformer.tmp", "lora_snapshots/epoch_00004.tmp",
                      "lora_snapshots/epoch_00003.old", "transformer_snapshots/epoch_00001.tmp")  # fmt: skip
    for name in (*left_by_a_kill, "lora_snapshots/epoch_00003", "mine.tmp"):
        (tmp_path / name).mkdir(parents=True)
    remove_stale_temp_files(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["lora_snapshots", "lora_snapshots/epoch_00003", "mine.tmp", "transformer_snapshots"]


def _train_keep_model(cfg, monkeypatch):
    held = {}
    real = builder.load_model
    monkeypatch.setattr(builder, "load_model", lambda c: held.setdefault("model", real(c)))
    train_mod.train(cfg)
    return held["model"]


def test_full_finetune_exports_the_transformer(sd3_dir, tmp_path, monkeypatch):
    """--finetune full writes RUN/transformer (and best_transformer) as `save_pretrained` does: it loads with
    `SD3Transformer2DModel.from_pretrained` to exactly the trained weights and, in a StableDiffusion3Pipeline
    built from the base pipeline's other components, gives the trained model's velocity; with a model card."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run = tmp_path / "run"
    cfg = _cfg(run, sd3_dir, finetune="full", epochs=1, lr=1e-3, keep_last=1)
    model = _train_keep_model(cfg, monkeypatch)
    loaded = SD3Transformer2DModel.from_pretrained(str(run / "transformer"))
    trained = model.transformer.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    base = _fresh_pipe(sd3_dir).transformer.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in trained.items())  # training moved the weights
    assert sorted(p.name for p in (run / "transformer_snapshots").iterdir()) == ["epoch_00001"]

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, transformer=loaded, local_files_only=True)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(["a cat"])
    assert torch.equal(
        _velocity(pipe.transformer.eval(), model, x, cond), _velocity(model.transformer.eval(), model, x, cond)
    )
    evals = [r for r in _records(run) if r["kind"] == "eval"]
    _check_card(run / "transformer", sd3_dir, evals[-1])
    best = torch.load(run / "best.pt", weights_only=True)
    best_loaded = SD3Transformer2DModel.from_pretrained(str(run / "best_transformer")).state_dict()
    assert all(torch.equal(best_loaded[k.removeprefix("transformer.")], v) for k, v in best["model"].items())
    assert "SD3Transformer2DModel.from_pretrained" in (run / "best_transformer" / "README.md").read_text()


def test_zero3_full_finetune_exports_the_consolidated_transformer(tmp_path):
    """A 2-rank ZeRO-3 full fine-tune (weights partitioned over the ranks) exports on rank 0 the whole
    transformer, gathered from the shards: it loads with from_pretrained and equals the 1-process run's export."""
    sys.path.insert(0, str(Path(__file__).parent))
    from diffusers import SD3Transformer2DModel
    from test_distributed import _deepspeed, _single
    from tiny_diffusers import build_tiny_sd3

    model_dir = build_tiny_sd3(tmp_path / "sd3")
    args = ["--model", "sd3", "--model-path", str(model_dir), "--resolution", "32", "--dtype", "fp32",
            "--max-sequence-length", "16", "--finetune", "full", "--epochs", "1", "--reward",
            "quality:1,jpeg_incompressibility:0.05", "--pairs-per-epoch", "2", "--churn", "0.05", "--lr", "1e-3",
            "--device", "cpu", "--diversity-prompts", "0"]  # fmt: skip
    _single(tmp_path / "one", *args)
    _deepspeed(tmp_path / "two", *args)
    one = SD3Transformer2DModel.from_pretrained(str(tmp_path / "one" / "transformer")).state_dict()
    two = SD3Transformer2DModel.from_pretrained(str(tmp_path / "two" / "transformer")).state_dict()
    base = SD3Transformer2DModel.from_pretrained(str(model_dir / "transformer")).state_dict()
    assert one.keys() == two.keys() == base.keys()
    moved = max(float((one[k] - base[k]).abs().max()) for k in one)
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"ZeRO-3 export vs 1 process: max |diff| {worst:.3g}; training moved the weights by {moved:.3g}")
    assert moved > 1e-4 and worst < 1e-3 * moved  # measured 1.8e-07 vs 3.9e-03
    assert (tmp_path / "two" / "transformer" / "README.md").is_file()
