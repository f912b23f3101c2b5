"""Reward interface: composite weighting, JPEG sizes, quality score, input validation."""

import pytest
import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards import REWARD_TERMS, TOY_WORLD_TERMS, VIDEO_TERMS, CompositeReward, parse_weights
from fdfo_fast.rewards.image_stats import JpegReward, PaletteQualityReward
from fdfo_fast.world.grammar import eval_prompts
from fdfo_fast.world.render import render_batch


def _batch(n=4):
    items = eval_prompts(1)[:n]
    return render_batch([p for p, _ in items], [s for _, s in items]), [p.text() for p, _ in items]


def test_composite_is_the_weighted_sum_of_its_terms():
    images, prompts = _batch()
    r = CompositeReward("alignment:2.0, quality:-0.5")
    out = r(images, prompts)
    assert set(out) >= {"reward", "alignment", "geneval", "quality"}
    assert torch.allclose(out["reward"], 2.0 * out["alignment"] - 0.5 * out["quality"])
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in out.values())


def test_uint8_and_float_images_score_the_same():
    images, prompts = _batch()
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    r = CompositeReward("alignment:1,quality:1,jpeg_compressibility:1")
    a, b = r(images, prompts), r(as_uint8, prompts)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_jpeg_noise_is_less_compressible_than_a_flat_image():
    flat = torch.zeros(1, 3, 32, 32)
    noise = torch.rand(1, 3, 32, 32) * 2 - 1
    out = JpegReward()(torch.cat([flat, noise]), ["", ""])
    assert out["jpeg_incompressibility"][1] > 2 * out["jpeg_incompressibility"][0]
    assert torch.equal(out["jpeg_compressibility"], -out["jpeg_incompressibility"])


def test_quality_prefers_clean_palette_colours():
    images, prompts = _batch(2)
    muddy = images * 0.5  # every colour halfway to grey
    q = PaletteQualityReward()
    clean, dirty = q(images, prompts)["quality"], q(muddy, prompts)["quality"]
    assert torch.allclose(clean, torch.ones(2)) and (dirty < 0.7).all()


@pytest.mark.parametrize(
    "spec, msg", [("sharpness:1", "unknown reward term"), ("alignment:x", "not a number"), ("", "at least one term")]
)
def test_bad_reward_specs(spec, msg):
    with pytest.raises(FdfoError, match=msg):
        parse_weights(spec)


def test_bad_image_batches():
    r = CompositeReward("alignment:1")
    with pytest.raises(FdfoError, match=r"\[B, 3, H, W\]"):
        r(torch.zeros(3, 16, 16), ["a circle"] * 3)
    with pytest.raises(FdfoError, match="dtype"):
        r(torch.zeros(1, 3, 16, 16, dtype=torch.int32), ["a circle"])
    with pytest.raises(FdfoError, match="2 prompts"):
        r(torch.zeros(1, 3, 16, 16), ["a circle", "a square"])
    with pytest.raises(FdfoError, match="not a shapes-world prompt"):
        r(torch.zeros(1, 3, 16, 16), ["a dog"])


def test_toy_world_terms_are_the_terms_that_parse_the_grammar():
    """The terms refused for sd3 / flux are exactly those that cannot score a prompt outside the shapes world."""
    images = torch.zeros(1, 3, 16, 16)
    for name in REWARD_TERMS:
        try:  # a video term scores a clip (here 3 frames of the image)
            clip = images[:, :, None].expand(1, 3, 3, 16, 16) if name in VIDEO_TERMS else images
            CompositeReward(f"{name}:1")(clip, ["a photo of a dog"])
            parses = False
        except FdfoError as err:
            assert "not a shapes-world prompt" in str(err), name
            parses = True
        assert parses == (name in TOY_WORLD_TERMS), name


def test_sd35m_fdfo_reward_is_pickscore_plus_a_tenth_of_the_papers_vlm_score():
    """docs/method.md §1.4: combined = PickScore + 0.1·VLM with VLM = 100·sigmoid(logit Yes − logit No), the vlm_yes
    term's default form (its entry in the preset sets no form=)."""
    from fdfo_fast.config import make_config

    cfg = make_config("sd35m-fdfo")
    assert parse_weights(cfg.rewards.reward, {"pickscore": None, "vlm_yes": None}) == {"pickscore": 1.0, "vlm_yes": 0.1}
    vlm_entry = cfg.rewards.reward_models.split(",vlm_yes=")[1]
    assert "form=" not in vlm_entry
