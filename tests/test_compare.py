"""`fdfo-eval`: base vs trained on the same prompts and seeds, checked against independent recomputations.

The expected scores come from `evaluation.evaluate` and the rewards called directly on the seeds eval.json lists,
the expected diversity from transformers itself (the embedding model's own forward on its image processor's
output, torch's cosine_similarity) or, for the toy model, from the pixels; the statistics from their definitions.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fdfo_fast import sampling
from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model, read_checkpoint
from fdfo_fast.compare import main, to_tiles
from fdfo_fast.config import make_config
from fdfo_fast.evaluation import evaluate
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards.base import to_uint8_hwc
from fdfo_fast.train import train
from fdfo_fast.world.grammar import eval_prompts

TOY_RUN = dict(
    epochs=1, lr=1e-4, eval_every=0, reward="alignment:1,quality:1", num_steps=4, pairs_per_epoch=4,
    prompts_per_epoch=2, group_size=4, eval_per_category=1, eval_num_steps=4, opt_steps_per_epoch=2,
    progress=False, tensorboard=False, diversity_prompts=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 1-epoch FDFO toy run (its checkpoint.pt: the trained toy model)."""
    out = tmp_path_factory.mktemp("toy_run")
    train(make_config(overrides=dict(out=str(out), **TOY_RUN)))
    return out


def _toy_models(run):
    base = load_toy_model(TOY_BASE_CHECKPOINT).eval()
    trained = load_toy_model(TOY_BASE_CHECKPOINT)
    trained.load_state_dict(read_checkpoint(run / "checkpoint.pt")["model"])
    return base, trained.eval()


def _se(x: torch.Tensor) -> float:
    x = x.double()
    return float(x.std(correction=1) / math.sqrt(len(x)))


def _recorded_start_noise(monkeypatch):
    """Every start_noise call the samplers make: (seeds, x₁)."""
    calls, original = [], sampling.start_noise

    def recording(seeds, shape, device="cpu"):
        x1 = original(seeds, shape, device)
        calls.append((list(seeds), x1.cpu().clone()))
        return x1

    monkeypatch.setattr(sampling, "start_noise", recording)
    return calls


def test_toy_comparison_matches_an_independent_recomputation(toy_run, tmp_path, monkeypatch):
    calls = _recorded_start_noise(monkeypatch)
    prompt_file, out = tmp_path / "prompts.txt", tmp_path / "cmp"
    prompt_file.write_text("# three toy prompts\na red circle\ntwo squares\n\na circle and a square\n")
    P, per, batch = 3, 3, 4  # batches straddle prompts
    main(["--run", str(toy_run), "--prompts", str(prompt_file), "--images-per-prompt", str(per), "--batch", str(batch),
          "--grid-prompts", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    prompts, images = report["prompts"], report["images"]
    seeds = [r["seed"] for r in images]
    assert prompts == ["a red circle", "two squares", "a circle and a square"]
    assert len(seeds) == P * per and len(set(seeds)) == len(seeds)
    assert [(r["prompt"], r["image"]) for r in images] == [(j, i) for j in range(P) for i in range(per)]

    # the same seeds, so the same start noise, for both models: base first, then trained
    half = len(calls) // 2
    assert half > 0 and len(calls) == 2 * half
    for model_calls in (calls[:half], calls[half:]):
        assert [s for c in model_calls for s in c[0]] == seeds
    assert torch.equal(torch.cat([c[1] for c in calls[:half]]), torch.cat([c[1] for c in calls[half:]]))

    # the scores: evaluate + the run's terms and geneval, called here on the same (prompt, seed) items
    items = [(prompts[r["prompt"]], r["seed"]) for r in images]
    reward = CompositeReward("alignment:1,quality:1,geneval:0")
    expected = {
        name: evaluate(model, items, reward, num_steps=4, batch_size=batch)
        for name, model in zip(("base", "trained"), _toy_models(toy_run), strict=True)
    }
    assert set(report["scores"]["base"]) == {"reward", "geneval", "alignment", "quality"}
    for name, res in expected.items():
        for term, stat in report["scores"][name].items():
            x = res.scores[term]
            assert [r[name][term] for r in images] == pytest.approx(x.tolist(), abs=1e-6)
            assert stat["n"] == len(x) and stat["mean"] == pytest.approx(float(x.double().mean()), abs=1e-6)
            assert stat["se"] == pytest.approx(_se(x), abs=1e-6)
    for term, stat in report["differences"].items():
        d = expected["trained"].scores[term] - expected["base"].scores[term]
        assert stat["mean"] == pytest.approx(float(d.double().mean()), abs=1e-6)
        assert stat["se"] == pytest.approx(_se(d), abs=1e-6)
    assert report["differences"]["quality"]["mean"] != 0  # the trained weights differ from the base's

    # diversity: the toy's pixel RMS, per prompt the mean over its image pairs, then over prompts
    div = report["diversity"]
    assert div["metric"] == "diversity_rms" and div["computed"] and "toy" in div["how"]
    for name, res in expected.items():
        px = res.images.double().view(P, per, -1).numpy()
        per_prompt = [
            np.mean([np.sqrt(np.mean((p[a] - p[b]) ** 2)) for a in range(per) for b in range(a + 1, per)]) for p in px
        ]
        assert div[name]["mean"] == pytest.approx(np.mean(per_prompt), abs=1e-6)
        assert div[name]["se"] == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(P), abs=1e-6)

    # the table and the grid: 3 prompts at 2 a page = 2 pages, 3 tiles a side of 32 px × 3
    md = (out / "eval.md").read_text()
    assert "| term | base | trained | Δ (± se) |" in md and "| diversity_rms |" in md
    pages = sorted(out.glob("grid_*.png"))
    assert [p.name for p in pages] == ["grid_000.png", "grid_001.png"]
    sizes = [Image.open(p).size for p in pages]
    assert sizes[0][0] == 2 * per * (96 + 6) + 24 and all(w <= 1024 and h <= 1024 for w, h in sizes)
    assert sizes[1][1] < sizes[0][1]  # the last page holds the 1 remaining prompt

    # the default prompts (the run's held-out split, each prompt once) into the same folder, one image each: no
    # diversity, no standard error, and no stale page of the first comparison left behind
    main(["--run", str(toy_run), "--per-category", "1", "--images-per-prompt", "1", "--num-steps", "2",
          "--device", "cpu", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    heldout = dict.fromkeys(p.text() for p, _ in eval_prompts(1))
    assert report["prompts"] == list(heldout) and report["settings"]["prompts_spec"] == "auto"
    assert [p.name for p in out.glob("grid_*.png")] == ["grid_000.png"]
    assert not report["diversity"]["computed"] and "needs >= 2 images" in report["diversity"]["why_not"]
    assert report["scores"]["base"]["geneval"]["n"] == len(heldout)
    assert "not computed" in (out / "eval.md").read_text()


def test_grid_tiles_are_bounded():
    big = torch.rand(2, 3, 512, 512) * 2 - 1
    assert to_tiles(big).shape == (2, 256, 256, 3)
    small = torch.rand(1, 3, 32, 32) * 2 - 1
    tiles = to_tiles(small)
    assert tiles.shape == (1, 96, 96, 3)
    assert np.array_equal(tiles[0, ::3, ::3], to_uint8_hwc(small)[0])  # nearest upscaling keeps every pixel


# ---------------------------------------------------------------------------------------------------------------
# SD3 with a LoRA, diversity from CLIP / DINOv2 image embeddings
# ---------------------------------------------------------------------------------------------------------------
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


def _image_processor():
    import transformers

    return transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    """A tiny random-weight CLIPVisionModelWithProjection (projection 16) with its image processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **TINY_VISION)
    path = tmp_path_factory.mktemp("clip_vision")
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    _image_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A tiny random-weight Dinov2Model with an image processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.Dinov2Config(image_size=32, patch_size=8, **TINY_VISION)
    path = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(cfg).save_pretrained(path)
    _image_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd3_lora(sd3_dir, tmp_path_factory):
    """A LoRA on the tiny SD3 (random factors, r ≠ α) exported in the diffusers format by the model itself."""
    from fdfo_fast.config import ModelConfig
    from fdfo_fast.models.diffusers_flow import SD3FlowModel

    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32, max_sequence_length=16)
    params = model.setup_finetune(ModelConfig(model="sd3", finetune="lora", lora_rank=4, lora_alpha=8.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:  # peft initialises B = 0 (no change): give every factor a value
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.export_lora(tmp_path_factory.mktemp("sd3_lora") / "lora")


def _cosine_diversity(embeddings: torch.Tensor, per: int) -> list[float]:
    out = []
    for e in embeddings.view(-1, per, embeddings.shape[-1]):
        sims = [torch.nn.functional.cosine_similarity(e[a], e[b], dim=0) for a in range(per) for b in range(a + 1, per)]
        out.append(float(torch.stack([1 - s for s in sims]).double().mean()))
    return out


def test_sd3_lora_comparison_diversity_is_clips(sd3_dir, sd3_lora, clip_vision_dir, tmp_path):
    import transformers

    from fdfo_fast.models.diffusers_flow import SD3FlowModel

    out, per, prompts = tmp_path / "cmp", 3, ["a red cube", "two cats", "a photo of a dog"]
    main(["--model", "sd3", "--model-path", sd3_dir, "--lora", str(sd3_lora), "--dtype", "fp32", "--resolution", "32",
          "--max-sequence-length", "16", "--prompt", *prompts, "--images-per-prompt", str(per), "--num-steps", "3",
          "--cfg-scale", "2.0", "--reward", "jpeg_incompressibility:1", "--diversity-model", str(clip_vision_dir),
          "--grid-prompts", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    items = [(prompts[r["prompt"]], r["seed"]) for r in report["images"]]
    clip = transformers.CLIPVisionModelWithProjection.from_pretrained(clip_vision_dir).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_vision_dir)
    reward = CompositeReward("jpeg_incompressibility:1")
    div = report["diversity"]
    assert div["metric"] == "diversity_cosine" and div["computed"]
    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32, max_sequence_length=16).eval()
    for name in ("base", "trained"):
        if name == "trained":
            model.pipe.load_lora_weights(str(sd3_lora))  # diffusers' own LoRA loading
        res = evaluate(model, items, reward, num_steps=3, cfg_scale=2.0, batch_size=8)
        for term in ("jpeg_incompressibility", "reward"):
            assert report["scores"][name][term]["mean"] == pytest.approx(float(res.scores[term].mean()), abs=1e-4)
        pil = [Image.fromarray(a) for a in to_uint8_hwc(res.images)]
        with torch.no_grad():
            emb = clip(**processor(images=pil, return_tensors="pt")).image_embeds
        per_prompt = _cosine_diversity(emb, per)
        assert div["per_prompt"][name] == pytest.approx(per_prompt, abs=1e-5)
        assert div[name]["mean"] == pytest.approx(np.mean(per_prompt), abs=1e-5)
    assert abs(report["differences"]["jpeg_incompressibility"]["mean"]) > 0  # the LoRA changes the images
    pages = sorted(out.glob("grid_*.png"))
    assert len(pages) == 2 and all(max(Image.open(p).size) <= 2 * per * (256 + 6) + 24 for p in pages)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A whole tiny CLIPModel (projection 16, set in the top-level config) with an image processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=99, **TINY_VISION), projection_dim=16,
                                  vision_config=dict(image_size=32, patch_size=8, **TINY_VISION))  # fmt: skip
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(cfg).save_pretrained(path)
    _image_processor().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_embeddings_are_the_models_own(kind, dinov2_dir, clip_dir):
    """DINOv2: the pooled CLS (pooler_output); a whole CLIP: CLIPModel.get_image_features."""
    import transformers

    from fdfo_fast.compare import ImageEmbedder

    path = dinov2_dir if kind == "dinov2" else clip_dir
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = ImageEmbedder(str(path), torch.device("cpu"))(images)
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    pixels = processor(images=[Image.fromarray(a) for a in to_uint8_hwc(images)], return_tensors="pt")
    with torch.no_grad():
        if kind == "dinov2":
            theirs = transformers.Dinov2Model.from_pretrained(path).eval()(**pixels).pooler_output
        else:
            theirs = transformers.CLIPModel.from_pretrained(path).eval().get_image_features(**pixels)
            theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output  # transformers 4 | 5
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6)


def test_bad_inputs_are_one_error_line(toy_run, tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "nonsense"}')
    sd3 = ["--model", "sd3", "--model-path", str(tmp_path)]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        ([], "give the trained model"),
        (["--run", str(tmp_path / "none")], "does not exist"),
        (["--run", str(toy_run), "--checkpoint", "nope.pt"], "nope.pt does not exist"),
        (["--run", str(toy_run), "--model", "sd3"], "trained a toy model"),
        (["--run", str(toy_run), "--prompts", str(tmp_path / "missing.txt")], "missing.txt cannot be read"),
        (["--run", str(toy_run), "--diversity-model", str(not_a_model)], "does not load as a CLIP or DINOv2"),
        (["--run", str(toy_run), "--reward", "human:1"], "nobody labels"),
        (["--run", str(toy_run), "--prompt", "a purple elephant"], "prompt 0 ('a purple elephant')"),
        (["--run", str(toy_run), "--base", str(tmp_path / "nope.pt")], "no such toy checkpoint"),
        (["--run", str(toy_run), "--out", str(a_file / "sub")], "cannot be created"),
        # refused before the pipeline (here a stand-in folder) loads
        ([*sd3, "--lora", str(tmp_path / "no_lora"), "--reward", "quality:1"], "is not a folder"),
        ([*sd3, "--lora", str(tmp_path), "--reward", "geneval:1"], "toy model only"),
        ([*sd3, "--lora", str(tmp_path)], "give --reward TERMS"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(tmp_path / "o"), "--device", "cpu", *argv])  # a case's own --out wins
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
