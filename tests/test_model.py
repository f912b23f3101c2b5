"""Toy flow model: shapes, conditioning, CFG null prompt, tokenizer errors, checkpoint load errors; the model
interface (`FlowModel`) and the registry of model kinds, and the toy model's side of it doing what the trainer did."""

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch

import fdfo_fast.models as models
from fdfo_fast import sampling
from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, atomic_save, load_toy_model, save_toy_model
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.models.base import MODEL_KINDS, FlowModel, choose_attention_backend, load_model
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

    with pytest.raises(FdfoError, match=f"^cannot write {path}: boom$"):  # one line naming the file
        atomic_save({"format": "x", "a": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"format": "x", "a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# -- the model interface ------------------------------------------------------------------------------------------
# The operations the training loop calls on every model (the lead's trainer is written against exactly these).
ABSTRACT = {
    "load", "encode_prompts", "forward", "decode", "sigma_schedule", "setup_finetune", "trainable_state_dict",
    "load_trainable_state_dict", "reference_model", "describe",
}  # fmt: skip


def test_every_registered_kind_is_a_flow_model_implementing_the_interface():
    assert models.MODEL_KINDS is MODEL_KINDS
    assert set(MODEL_KINDS) == {"toy", "sd3", "flux", "flux2", "qwen_image", "wan"}
    assert FlowModel.__abstractmethods__ == ABSTRACT
    with pytest.raises(TypeError, match="abstract"):
        FlowModel()
    for name, cls in MODEL_KINDS.items():
        assert issubclass(cls, FlowModel) and issubclass(cls, torch.nn.Module)
        assert not inspect.isabstract(cls), (name, cls.__abstractmethods__)
        assert cls.kind == name
        for method in ABSTRACT | {"set_attention_backend", "export_lora"}:
            assert callable(getattr(cls, method)), (name, method)
        assert isinstance(inspect.getattr_static(cls, "lora"), property)
    assert [n for n, c in MODEL_KINDS.items() if c.has_world_metric] == ["toy"]


def test_load_model_follows_the_registry():
    model = load_model(make_config().model)  # the shipped toy base model, as train.load_model loaded it
    assert type(model) is ToyFlowModel and not model.training
    base = load_toy_model(TOY_BASE_CHECKPOINT)
    assert model.cfg == base.cfg and model.meta == base.meta
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    with pytest.raises(FdfoError, match="--model must be one of toy, sd3, flux, flux2, qwen_image, wan, got 'sdxl'"):
        load_model(SimpleNamespace(model="sdxl"))


def _old_toy_finetune(model):
    """train.apply_finetune_mode's toy branch before the model interface (transcribed): all but the text encoder."""
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("text."))
    return [p for p in model.parameters() if p.requires_grad]


def test_toy_setup_finetune_trains_what_the_trainer_trained(model):
    cfg = make_config().model
    old = _old_toy_finetune(ToyFlowModel(SMALL))
    ours = model.setup_finetune(cfg)
    named = dict(model.named_parameters())
    assert [n for n, p in named.items() if p.requires_grad] == [n for n, p in ToyFlowModel(SMALL).named_parameters()
                                                                 if not n.startswith("text.")]  # fmt: skip
    assert [p.shape for p in ours] == [p.shape for p in old] and len(ours) < len(named)
    assert all(any(p is q for q in named.values()) for p in ours)
    with pytest.raises(FdfoError, match="--finetune must be 'full' for the toy model"):
        model.setup_finetune(SimpleNamespace(finetune="lora"))


def test_toy_trainable_state_is_the_whole_model_and_loads_strictly(model):
    state = model.trainable_state_dict()
    assert list(state) == list(model.state_dict())
    other = ToyFlowModel(SMALL)
    other.load_trainable_state_dict({k: v.clone() for k, v in state.items()}, "test")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))
    del state["conv_out.bias"]
    with pytest.raises(FdfoError, match="here does not match the model: missing 1 keys"):
        other.load_trainable_state_dict(state, "here")


def test_toy_reference_is_a_frozen_copy(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train().setup_finetune(make_config().model)
    ref, old = model.reference_model(), copy.deepcopy(model).requires_grad_(False).eval()  # old: make_context's
    assert isinstance(ref, ToyFlowModel) and ref is not model and not ref.training and model.training
    assert not any(p.requires_grad for p in ref.parameters()) and any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), old.state_dict().values()))
    x, s, c = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8]), model.encode_prompts(["a red circle", ""])
    with torch.no_grad():
        v = model.eval()(x, s, c)
        assert torch.equal(ref(x, s, c), v)
        next(model.parameters()).add_(1.0)  # a copy: training the policy leaves the reference where it was
        assert torch.equal(ref(x, s, c), v)


@pytest.mark.parametrize("num_steps", [1, 3, 10, 28])
def test_toy_sigma_schedule_is_the_sampling_grid(model, num_steps):
    assert torch.equal(model.sigma_schedule(num_steps, None), sampling.sigma_schedule(num_steps, 1.0))
    assert torch.equal(model.sigma_schedule(num_steps), sampling.sigma_schedule(num_steps, 1.0))
    for shift in (1.0, 3.0, 0.5):
        assert torch.equal(model.sigma_schedule(num_steps, shift), sampling.sigma_schedule(num_steps, shift))


def test_toy_attention_backend_is_sdpa_only(model, monkeypatch):
    assert model.set_attention_backend("sdpa") == "sdpa" and model.set_attention_backend("auto") == "sdpa"
    for choice, need in (("flash", "flash-attn"), ("xformers", "xformers")):  # no CUDA tensors here
        with pytest.raises(FdfoError, match=f"^--attention {choice} needs {need} and a CUDA device$"):
            model.set_attention_backend(choice)
    # with the packages and a CUDA device: auto picks flash, which the toy model refuses, as before
    monkeypatch.setattr("fdfo_fast.backends.package_version", lambda name: "1.0")
    assert choose_attention_backend("auto", on_cuda=True) == "flash"
    assert choose_attention_backend("xformers", on_cuda=True) == "xformers"
    assert choose_attention_backend("auto", on_cuda=False) == "sdpa"
    with pytest.raises(FdfoError, match="^--attention flash: the toy model supports sdpa only$"):
        model._apply_attention_backend("flash")


def test_toy_has_no_lora(model):
    assert model.lora is False and model.describe()["kind"] == "toy"
    with pytest.raises(FdfoError, match="the toy model has no LoRA adapter"):
        model.export_lora("unused")


def test_diffusers_models_behind_the_interface(sd3_dir, monkeypatch):
    """SD3 through the registry: the config's fields reach from_pretrained, the attention choice reaches the
    transformer, setup_finetune reads the config (LoRA init = peft's own under the same seed), the references."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    from fdfo_fast.models.diffusers_flow import SD3FlowModel

    mc = SimpleNamespace(model="sd3", model_path=sd3_dir, resolution=32, dtype="fp32", max_sequence_length=16,
                         finetune="lora", lora_rank=4, lora_alpha=8.0, lora_targets="auto",
                         gradient_checkpointing=False)  # fmt: skip
    model = load_model(mc)
    assert (
        type(model) is SD3FlowModel
        and model.latent_shape[1:] == (32 // model.vae_scale,) * 2
        and model.max_sequence_length == 16
    )
    assert model.dtype == torch.float32 and not model.has_world_metric and model.lora is False
    calls = []
    monkeypatch.setattr(model.transformer, "set_attention_backend", calls.append)
    assert model.set_attention_backend("auto") == "sdpa" and calls == ["native"]  # CPU: no flash
    with pytest.raises(FdfoError, match="^--attention flash needs flash-attn and a CUDA device$"):
        model.set_attention_backend("flash")
    monkeypatch.undo()

    torch.manual_seed(5)
    params = model.setup_finetune(mc)
    assert model.lora and params and all(p.dtype == torch.float32 for p in params)
    peft_own = load_model(mc).transformer
    torch.manual_seed(5)
    peft_own.add_adapter(LoraConfig(r=4, lora_alpha=8.0, init_lora_weights="gaussian",
                                    target_modules=list(SD3FlowModel.lora_recipe_targets)))  # fmt: skip
    ours = {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in peft_own.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert model.trainable_state_dict().keys() == {f"transformer.{n}" for n in ours}

    ref = model.reference_model()  # the adapters off: a FlowModel owning no weights
    assert isinstance(ref, FlowModel) and ref.kind == "sd3" and not list(ref.parameters()) and not ref.training
    assert ref.latent_shape == model.latent_shape and torch.equal(ref.sigma_schedule(3), model.sigma_schedule(3))
    with pytest.raises(FdfoError, match="frozen"):
        ref.setup_finetune(mc)

    full = load_model(mc)
    full.setup_finetune(SimpleNamespace(finetune="full", gradient_checkpointing=False))
    frozen = full.reference_model()
    assert type(frozen) is SD3FlowModel and frozen.transformer is not full.transformer and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters()) and all(
        p.requires_grad for p in full.transformer.parameters()
    )
    with pytest.raises(FdfoError, match="no LoRA to export"):
        full.export_lora("unused")
