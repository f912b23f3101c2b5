"""Toy flow model: shapes, conditioning, CFG null prompt, tokenizer errors, checkpoint load errors."""

import pytest
import torch

from fdfo_fast.checkpoint import atomic_save, load_toy_model, save_toy_model
from fdfo_fast.errors import FdfoError
from fdfo_fast.models.toy_flow import ToyFlowConfig, ToyFlowModel

SMALL = ToyFlowConfig(base_channels=8, channel_mult=(1, 2), attn_levels=(1,), text_dim=16, emb_dim=16)


@pytest.fixture
def model():
    return ToyFlowModel(SMALL).eval()


@pytest.mark.parametrize("size", [16, 32])
def test_forward_shapes_and_parameter_budget(size):
    cfg = ToyFlowConfig(image_size=size)
    m = ToyFlowModel(cfg)
    assert sum(p.numel() for p in m.parameters()) <= 5_000_000
    x = torch.randn(3, 3, size, size)
    v = m(x, torch.rand(3), m.encode_prompts(["a red circle", "", "two squares"]))
    assert v.shape == x.shape and v.dtype == torch.float32
    v0 = m(x, torch.tensor(0.5), m.encode_prompts(["a red circle"] * 3))  # scalar σ broadcasts
    assert v0.shape == x.shape


def test_prompt_changes_the_velocity_and_null_prompt_is_a_token(model):
    # zero-initialised output layers make a fresh model's output 0: perturb them so conditioning shows
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, s = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    c = model.encode_prompts(["a red circle", "a blue square"])
    u = model.encode_prompts(["", ""])
    assert u["mask"].sum(1).tolist() == [1, 1]  # the <null> token
    v_c, v_u = model(x, s, c), model(x, s, u)
    assert not torch.allclose(v_c, v_u)
    # the batch rows are independent: row 0 alone gives the same answer
    v0 = model(x[:1], s[:1], model.encode_prompts(["a red circle"]))
    assert torch.allclose(v0, v_c[:1], atol=1e-5)


def test_tokenizer_rejects_unknown_words_and_long_prompts(model):
    with pytest.raises(FdfoError, match="not in the toy model's vocabulary"):
        model.encode_prompts(["a purple circle"])
    with pytest.raises(FdfoError, match="words"):
        model.encode_prompts(["a " * 20])


def test_checkpoint_round_trip(tmp_path, model):
    path = tmp_path / "m.pt"
    save_toy_model(model, path, {"note": "x"})
    loaded = load_toy_model(path)
    assert loaded.cfg == model.cfg and loaded.meta == {"note": "x"}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_errors_are_one_clear_line(tmp_path, model):
    with pytest.raises(FdfoError, match="does not exist"):
        load_toy_model(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    save_toy_model(model, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(FdfoError, match="corrupt or not a torch file"):
        load_toy_model(truncated)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(FdfoError, match="corrupt or not a torch file"):
        load_toy_model(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(FdfoError, match="not an fdfo_fast checkpoint"):
        load_toy_model(foreign)
    # a checkpoint whose weights do not fit its stated architecture
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    del ckpt["state_dict"]["conv_out.bias"]
    mismatched = tmp_path / "mismatched.pt"
    atomic_save(ckpt, mismatched)
    with pytest.raises(FdfoError, match="does not match the model.*missing 1 keys.*shape mismatch"):
        load_toy_model(mismatched)
    ckpt["model_config"]["widgets"] = 3
    atomic_save(ckpt, mismatched)
    with pytest.raises(FdfoError, match="unknown fields"):
        load_toy_model(mismatched)


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"format": "x", "a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"format": "x", "a": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"format": "x", "a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
