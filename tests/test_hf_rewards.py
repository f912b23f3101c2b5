"""Network rewards through transformers, offline: tiny random-weight CLIP and LLaVA models are built, saved to a
temporary folder and loaded back through `from_pretrained` / `load_reward_models`, then checked against the same
computation done by hand with the Hugging Face processor and model."""

import dataclasses
import functools
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub miss must fail at once, not after minutes of retries

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from fdfo_fast.errors import FdfoError  # noqa: E402
from fdfo_fast.rewards import CompositeReward  # noqa: E402
from fdfo_fast.rewards.hf_models import (  # noqa: E402
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    HPSReward,
    PickScoreReward,
    VLMYesNoReward,
    load_reward_models,
)
from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images, to_uint8_nhwc  # noqa: E402

CLIP_CLASSES = [CLIPScoreReward, PickScoreReward, HPSReward]
PROMPTS = ["a red circle", "a blue square", "a red circle", "a blue circle", "a red square"]
TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
VLM_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":", "yes", "Yes", "no", "Does", "this"]
VLM_WORDS += ["image", "show", '"', '"?', "Answer", "or", ".", "a", "red", "blue", "circle", "square", "Is", "it"]
VLM504_WORDS = [*VLM_WORDS, "No", "match", "the", "caption"]
CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def _images(b: int = 5, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """Non-square float images in [-1, 1], so the resize and the centre crop are both exercised."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8_nhwc(images).numpy()]


def _clip_tokenizer():
    """The 514-token byte-level CLIP tokenizer (no merges), built with no files."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=77)


def _tiny_image_processor():
    return transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel (projection 16) with its tokenizer and image processor, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    tok = _clip_tokenizer()
    text = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id, **TINY)
    text.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = transformers.CLIPConfig(
        text_config=text, vision_config=dict(image_size=32, patch_size=8, **TINY), projection_dim=16
    )
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    _tiny_image_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_model_only_dir(clip_dir, tmp_path_factory):
    """The same CLIP without tokenizer and image processor (as PickScore_v1 is published)."""
    path = tmp_path_factory.mktemp("clip_model_only")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    """The aesthetic head for 16-d embeddings as .pth and .safetensors, and a 768-d one that does not fit."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("heads")
    state = AestheticHead(16).state_dict()
    torch.save(state, path / "head.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "head.safetensors"))
    torch.save(AestheticHead(768).state_dict(), path / "head768.pth")
    return path


def _save_tiny_llava(path, words, image_processor, image_size, patch_size):
    """A tiny LLaVA (CLIP vision tower + Llama) with a WordLevel tokenizer over `words` and a chat template, saved
    with its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    text = transformers.LlamaConfig(vocab_size=len(words), num_key_value_heads=2, max_position_embeddings=128, **TINY)
    text.update(dict(pad_token_id=0, bos_token_id=2, eos_token_id=3))
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **TINY),
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """The tiny LLaVA for the p_yes form: 32 px images, 8 px patches (16 image tokens); "No" is not a token."""
    torch.manual_seed(2)
    return _save_tiny_llava(tmp_path_factory.mktemp("vlm"), VLM_WORDS, _tiny_image_processor(), 32, 8)


@pytest.fixture(scope="module")
def vlm504_dir(tmp_path_factory):
    """A tiny LLaVA for the paper's form: its vision tower takes 504 px images (56 px patches: 81 image tokens), its
    processor resizes to 504² without a crop (as Qwen2.5-VL's), and "Yes", "No" and the paper's question are words
    of its vocabulary."""
    torch.manual_seed(3)
    processor = transformers.CLIPImageProcessor(size={"height": 504, "width": 504}, do_center_crop=False)
    return _save_tiny_llava(tmp_path_factory.mktemp("vlm504"), VLM504_WORDS, processor, 504, 56)


@pytest.fixture(scope="module")
def clip_rewards(clip_dir):
    return {cls: cls.from_pretrained(clip_dir, micro_batch=2) for cls in CLIP_CLASSES}


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return VLMYesNoReward.from_pretrained(vlm_dir, micro_batch=2, form="p_yes")


def _pooled(out):
    """transformers 5 returns the projected embeddings as `pooler_output` of an output object, 4.x as a tensor."""
    return getattr(out, "pooler_output", out)


def _clip_by_hand(clip_dir, images, prompts):
    """CLIP cosine the way a user of transformers computes it: HF processor on PIL images, HF tokenizer, model."""
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    pixels = transformers.CLIPImageProcessor.from_pretrained(clip_dir)(_pil(images), return_tensors="pt").pixel_values
    tokens = transformers.AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = _pooled(model.get_image_features(pixel_values=pixels))
        text = _pooled(model.get_text_features(**tokens))
    return model, pixels, torch.nn.functional.cosine_similarity(image, text, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# CLIP terms
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLIP_CLASSES, ids=lambda c: c.names[0])
def test_clip_terms_are_finite_deterministic_and_frozen(clip_rewards, cls):
    reward = clip_rewards[cls]
    out = reward(_images(), PROMPTS, impl="ref")
    assert list(out) == list(cls.names) and out[cls.names[0]].shape == (5,) and out[cls.names[0]].dtype == torch.float32
    assert torch.isfinite(out[cls.names[0]]).all()
    assert torch.equal(out[cls.names[0]], reward(_images(), PROMPTS, impl="ref")[cls.names[0]])
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())


def test_clip_score_matches_transformers_by_hand(clip_dir, clip_rewards):
    images = _images()
    _, hf_pixels, cos = _clip_by_hand(clip_dir, images, PROMPTS)
    reward = clip_rewards[CLIPScoreReward]
    # Same pixels in: the scoring itself (tokenisation, embeddings, cosine) matches to float rounding.
    torch.testing.assert_close(reward.score(hf_pixels, PROMPTS)["clip_score"], cos, atol=1e-5, rtol=0)
    # Our preprocessing (PyTorch reference of the fused op) is within 2 8-bit levels of the HF PIL processor per
    # pixel, i.e. 2/255/std after normalisation (measured here: 1 level); the cosine then moves by ~2e-5, so 1e-3.
    (ours,), _ = preprocess_images(images, [reward.input_spec], impl="ref")
    assert (ours - hf_pixels).abs().max() <= 2 / 255 / min(reward.input_spec.std) + 1e-5
    end_to_end = reward(images, PROMPTS, impl="ref")["clip_score"]
    torch.testing.assert_close(end_to_end, cos, atol=1e-3, rtol=0)


def test_pickscore_is_logit_scale_times_cosine_and_clip_score_scales(clip_dir, clip_rewards):
    pixels = torch.randn(4, 3, 32, 32)
    prompts = PROMPTS[:4]
    cos = clip_rewards[HPSReward].score(pixels, prompts)["hps"]  # HPSv2: the raw cosine
    logit_scale = transformers.CLIPModel.from_pretrained(clip_dir).logit_scale.detach()  # log(1 / 0.07) at init
    pick = clip_rewards[PickScoreReward].score(pixels, prompts)["pickscore"]
    torch.testing.assert_close(pick, logit_scale.exp() * cos, atol=1e-5, rtol=1e-5)
    scaled = CLIPScoreReward.from_pretrained(clip_dir, scale=2.5).score(pixels, prompts)["clip_score"]
    torch.testing.assert_close(scaled, 2.5 * cos, atol=1e-6, rtol=1e-6)
    assert cos.abs().max() <= 1


@pytest.mark.parametrize("cls", CLIP_CLASSES, ids=lambda c: c.names[0])
def test_clip_terms_read_the_prompt(clip_rewards, cls):
    images = _images(3)
    a = clip_rewards[cls](images, ["a red circle"] * 3, impl="ref")[cls.names[0]]
    b = clip_rewards[cls](images, ["a blue square"] * 3, impl="ref")[cls.names[0]]
    assert (a - b).abs().min() > 1e-4


@pytest.mark.parametrize("cls", [*CLIP_CLASSES, AestheticReward], ids=lambda c: c.names[0])
def test_micro_batches_give_the_scores_of_one_batch(clip_dir, head_files, cls):
    kw = {"head_path": head_files / "head.pth"} if cls is AestheticReward else {}
    images, name = _images(), cls.names[0]
    chunked = cls.from_pretrained(clip_dir, micro_batch=2, **kw)(images, PROMPTS, impl="ref")[name]  # 2 + 2 + 1 (pad)
    whole = cls.from_pretrained(clip_dir, micro_batch=5, **kw)(images, PROMPTS, impl="ref")[name]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_tokenizer_and_image_processor_sources(clip_dir, clip_model_only_dir, tmp_path, monkeypatch, caplog):
    pixels = torch.randn(2, 3, 32, 32)
    expected = CLIPScoreReward.from_pretrained(clip_dir).score(pixels, PROMPTS[:2])["clip_score"]
    # A model-only folder: no tokenizer is an error unless `processor_path` (or a class default) says where it is.
    with pytest.raises(
        FdfoError, match="tokenizer from .*clip_model_only0 has 2 tokens but the model's vocabulary has 514"
    ):
        CLIPScoreReward.from_pretrained(clip_model_only_dir)
    reward = CLIPScoreReward.from_pretrained(clip_model_only_dir, processor_path=clip_dir)
    assert reward.input_spec == CLIPScoreReward.from_pretrained(clip_dir).input_spec
    torch.testing.assert_close(reward.score(pixels, PROMPTS[:2])["clip_score"], expected, atol=1e-6, rtol=0)
    monkeypatch.setattr(PickScoreReward, "default_processor", str(clip_dir))  # stands in for the CLIP-H hub id
    with caplog.at_level(logging.WARNING, logger="fdfo_fast"):
        pick = PickScoreReward.from_pretrained(clip_model_only_dir)
    assert len(pick.tokenizer) == 514 and f"tokenizer and image processor of {clip_dir}" in caplog.text
    # Tokenizer but no image processor config: CLIP's defaults (224 px), said in a log line.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(clip_dir / name, tmp_path / name)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdfo_fast"):
        reward = CLIPScoreReward.from_pretrained(tmp_path)
    assert reward.input_spec == ImageInputSpec.from_hf_processor(transformers.CLIPImageProcessor())
    assert reward.input_spec.size == 224 and "using CLIPImageProcessor() defaults" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Aesthetic predictor
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["head.pth", "head.safetensors"])
def test_aesthetic_is_the_laion_head_on_normalised_clip_embeddings(clip_dir, head_files, head):
    reward = AestheticReward.from_pretrained(clip_dir, head_path=head_files / head)
    images = _images()
    model, pixels, _ = _clip_by_hand(clip_dir, images, PROMPTS)
    mlp = AestheticHead(16).eval()
    mlp.load_state_dict(torch.load(head_files / "head.pth", weights_only=True))
    with torch.no_grad():
        emb = _pooled(model.get_image_features(pixel_values=pixels))
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(reward.score(pixels, PROMPTS)["aesthetic"], expected, atol=1e-5, rtol=1e-5)
    out = reward(images, PROMPTS, impl="ref")["aesthetic"]
    assert out.shape == (5,) and torch.isfinite(out).all()
    assert torch.equal(out, reward(images, ["anything else"] * 5, impl="ref")["aesthetic"])  # prompt-free


def test_aesthetic_head_errors(clip_dir, head_files, tmp_path):
    with pytest.raises(FdfoError, match=r"layers\.0\.weight is \(1024, 768\), expected \(1024, 16\)"):
        AestheticReward.from_pretrained(clip_dir, head_path=head_files / "head768.pth")
    with pytest.raises(FdfoError, match="head file not found: .*nope.pth"):
        AestheticReward.from_pretrained(clip_dir, head_path=tmp_path / "nope.pth")
    with pytest.raises(FdfoError, match="needs head_path"):
        AestheticReward.from_pretrained(clip_dir)
    partial = {k: v for k, v in AestheticHead(16).state_dict().items() if not k.startswith("layers.7")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(FdfoError, match=r"missing layers\.7\.weight"):
        AestheticReward.from_pretrained(clip_dir, head_path=tmp_path / "partial.pt")
    (tmp_path / "head.txt").write_text("0")
    with pytest.raises(FdfoError, match=r"must be \.pth, \.pt or \.safetensors"):
        AestheticReward.from_pretrained(clip_dir, head_path=tmp_path / "head.txt")


# ---------------------------------------------------------------------------------------------------------------
# VLM yes/no
# ---------------------------------------------------------------------------------------------------------------
VLM_PROMPTS = ["a red circle", "blue", "a blue square or a red circle", "red", "a circle"]  # lengths differ: padding


def _vlm_by_hand(vlm_dir, images, prompts, question=VLMYesNoReward.DEFAULT_QUESTION):
    """P(yes) one image at a time (no padding): chat template, HF processor, full forward, last position."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(vlm_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(vlm_dir)
    vocab = processor.tokenizer.get_vocab()
    out = []
    for image, prompt in zip(_pil(images), prompts):
        content = [{"type": "image"}, {"type": "text", "text": question.format(prompt=prompt)}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        with torch.no_grad():
            logits = model(**processor(images=[image], text=[text], return_tensors="pt")).logits[0, -1]
        yes = logits[[vocab["yes"], vocab["Yes"]]].logsumexp(0)  # "No" is not in this vocabulary: no has one id
        out.append(torch.stack([yes, logits[vocab["no"]]]).softmax(0)[0])
    return torch.stack(out)


def test_vlm_yes_is_the_next_token_probability_of_yes(vlm_dir, vlm):
    images = _images()
    out = vlm(images, VLM_PROMPTS)
    assert list(out) == ["vlm_yes"] and out["vlm_yes"].shape == (5,) and out["vlm_yes"].dtype == torch.float32
    assert ((out["vlm_yes"] > 0) & (out["vlm_yes"] < 1)).all()
    assert torch.equal(out["vlm_yes"], vlm(images, VLM_PROMPTS)["vlm_yes"])
    # micro_batch=2 pads rows of different lengths on the left; the by-hand rows are unpadded.
    torch.testing.assert_close(out["vlm_yes"], _vlm_by_hand(vlm_dir, images, VLM_PROMPTS), atol=1e-5, rtol=0)
    whole = VLMYesNoReward.from_pretrained(vlm_dir, micro_batch=5, form="p_yes")(images, VLM_PROMPTS)["vlm_yes"]
    torch.testing.assert_close(out["vlm_yes"], whole, atol=1e-5, rtol=0)
    u8 = vlm(torch.zeros(5, 3, 1, 1), VLM_PROMPTS, uint8_nhwc=to_uint8_nhwc(images))["vlm_yes"]
    assert torch.equal(u8, out["vlm_yes"])  # the composite's uint8 images are what is scored


def test_vlm_answer_tokens_and_question(vlm_dir, vlm):
    vocab = vlm.processor.tokenizer.get_vocab()
    # "yes"/" yes" share an id, "Yes" has its own, "No" is unknown and dropped.
    assert vlm.yes_ids == [vocab["yes"], vocab["Yes"]] and vlm.no_ids == [vocab["no"]]
    assert vlm.texts(["a red circle"]) == [  # the FDFO paper's question (docs/method.md §1.4)
        'USER: <image> Does this image match the caption "a red circle"? Answer Yes or No. ASSISTANT:'
    ]
    images = _images(2)
    asked = VLMYesNoReward.from_pretrained(vlm_dir, question="Is it {prompt}?", form="p_yes")
    asked = asked(images, VLM_PROMPTS[:2])["vlm_yes"]
    expected = _vlm_by_hand(vlm_dir, images, VLM_PROMPTS[:2], "Is it {prompt}?")
    torch.testing.assert_close(asked, expected, atol=1e-5, rtol=0)
    assert (asked - vlm(images, VLM_PROMPTS[:2])["vlm_yes"]).abs().min() > 1e-6
    with pytest.raises(FdfoError, match="only use the field"):
        VLMYesNoReward(vlm.model, vlm.processor, question="Is {it} {prompt}?")


def test_vlm_without_chat_template_uses_the_image_token(vlm_dir):
    processor = transformers.AutoProcessor.from_pretrained(vlm_dir)
    processor.chat_template = None
    reward = VLMYesNoReward(VLMYesNoReward.from_pretrained(vlm_dir, form="p_yes").model, processor, form="p_yes")
    assert reward.texts(["red"]) == ['<image>\nDoes this image match the caption "red"? Answer Yes or No.']
    p = reward(_images(2), VLM_PROMPTS[:2])["vlm_yes"]
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()


def _published_vlm_by_hand(vlm_dir, images, prompts):
    """The FDFO paper's VLM reward (docs/method.md §1.4), one unpadded image at a time: the float image in [0, 1]
    resized bilinearly with torch to 504² before the processor, whose own resize and rescale are off; the paper's
    question through the chat template; 100·sigmoid(logit("Yes") − logit("No")) of the next-token logits."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(vlm_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(vlm_dir)
    vocab = processor.tokenizer.get_vocab()
    out = []
    for image, prompt in zip(images, prompts):
        unit = ((image + 1) / 2).clamp(0, 1)
        resized = torch.nn.functional.interpolate(unit[None], size=(504, 504), mode="bilinear", align_corners=False)
        question = f'Does this image match the caption "{prompt}"? Answer Yes or No.'
        content = [{"type": "image"}, {"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[resized[0]], text=[text], do_resize=False, do_rescale=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        out.append(100 * torch.sigmoid(logits[vocab["Yes"]] - logits[vocab["No"]]))
    return torch.stack(out)


def test_vlm_yes_default_is_the_papers_logit_difference(vlm504_dir):
    reward = VLMYesNoReward.from_pretrained(vlm504_dir, micro_batch=2)
    vocab = reward.processor.tokenizer.get_vocab()
    assert reward.form == "logit_diff" and not reward.wants_uint8  # it reads the float images
    assert reward.yes_ids == [vocab["Yes"]] and reward.no_ids == [vocab["No"]]  # single tokens, no other spellings
    images = _images()
    out = reward(images, VLM_PROMPTS)["vlm_yes"]
    assert out.shape == (5,) and out.dtype == torch.float32 and ((out > 0) & (out < 100)).all()
    # micro_batch=2 pads rows on the left, the by-hand rows are unpadded: the attention sums differ in order only
    # (measured 7.6e-6, 2 float32 ulps of values near 48; bound: 8 ulps of the [64, 100] binade, 8·2⁻¹⁷).
    torch.testing.assert_close(out, _published_vlm_by_hand(vlm504_dir, images, VLM_PROMPTS), atol=8 * 2**-17, rtol=0)
    assert (out - out.mean()).abs().max() > 1e-3  # the image matters
    # uint8 images score as the same values in [-1, 1] would (the composite may hand either)
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(
        reward(u8, VLM_PROMPTS)["vlm_yes"], _published_vlm_by_hand(vlm504_dir, u8.float() / 127.5 - 1, VLM_PROMPTS),
        atol=8 * 2**-17, rtol=0,
    )  # fmt: skip


def test_vlm_logit_diff_needs_single_yes_and_no_tokens(vlm_dir):
    with pytest.raises(FdfoError, match=r"vlm_yes: 'No' is not a single known token .*form=p_yes"):
        VLMYesNoReward.from_pretrained(vlm_dir)  # this vocabulary has "no" but not "No"
    with pytest.raises(FdfoError, match="form must be one of logit_diff, p_yes"):
        VLMYesNoReward.from_pretrained(vlm_dir, form="prob")


def test_reward_dtype_loads_the_weights_in_that_dtype(clip_dir, vlm504_dir):
    """`;dtype=` per entry overrides the `dtype` argument (the config's --reward-dtype) for that model only."""
    from fdfo_fast.builder import make_reward
    from fdfo_fast.config import make_config

    weights = lambda m: {p.dtype for p in m.model.parameters()}
    vlm, hps, pick = load_reward_models(
        f"vlm_yes={vlm504_dir};dtype=bf16,hps={clip_dir};dtype=bfloat16,pickscore={clip_dir}", dtype="fp32"
    )
    assert weights(vlm) == weights(hps) == {torch.bfloat16} and weights(pick) == {torch.float32}
    assert hps.input_spec.dtype == torch.bfloat16 and vlm.dtype == torch.bfloat16
    out = vlm(_images(2), VLM_PROMPTS[:2])["vlm_yes"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    (fp32,) = load_reward_models(f"hps={clip_dir};dtype=fp32", dtype="bf16")
    assert weights(fp32) == {torch.float32}
    cfg = make_config(overrides=dict(reward="hps:1", reward_models=f"hps={clip_dir}", reward_dtype="bf16"))
    (model,) = make_reward(cfg.rewards, cfg.human, Path(cfg.run.out), cfg.run.seed, torch.device("cpu")).models
    assert weights(model) == {torch.bfloat16}
    with pytest.raises(FdfoError, match="--reward-dtype must be fp32, bf16 or fp16"):
        make_config(overrides=dict(reward_dtype="int8"))


def test_pickscore_preprocesses_float_images_as_the_torchvision_processor(clip_dir, clip_rewards):
    """PickScore's default input is the float image without 8-bit rounding (the FDFO reference, docs/method.md §1.4):
    what transformers' CLIPImageProcessor does to float tensors with do_rescale=False on its torchvision backend.
    That backend (TorchvisionBackend._preprocess) resizes with torchvision's resize, which for float32 is
    torch's interpolate(bicubic, align_corners=False, antialias=True), centre-crops at int((h - ch) / 2) and
    normalises; transcribed here from the processor's own settings (torchvision itself is not installed)."""
    reward = clip_rewards[PickScoreReward]
    assert not reward.input_spec.quantize and CLIPScoreReward.from_pretrained(clip_dir).input_spec.quantize
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    images = _images()  # 40 x 48: the short side becomes 32, the long int(32·48/40) = 38, then a 32 x 32 crop
    unit = (images + 1) / 2
    short, (h, w) = processor.size["shortest_edge"], unit.shape[-2:]
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resized = torch.nn.functional.interpolate(unit, size=size, mode="bicubic", align_corners=False, antialias=True)
    ch, cw = processor.crop_size["height"], processor.crop_size["width"]
    top, left = int((size[0] - ch) / 2), int((size[1] - cw) / 2)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    expected = (resized[..., top : top + ch, left : left + cw] - mean) / std
    (ref,), _ = preprocess_images(images, [reward.input_spec], impl="ref")
    (fused,), _ = preprocess_images(images, [reward.input_spec])  # the extension where it builds
    torch.testing.assert_close(ref, expected, atol=0, rtol=0)
    # the extension-vs-reference bound of tests/test_preprocess.py for float specs (measured here: 7.7e-6)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(images, PROMPTS, impl="ref")["pickscore"], reward.score(expected, PROMPTS)[
        "pickscore"], atol=1e-5, rtol=0)  # fmt: skip
    # the 8-bit PIL pipeline gives other pixels (rounding, and PIL clips the bicubic overshoot): uint8=true
    hf_pil = processor(_pil(images), return_tensors="pt").pixel_values
    assert (hf_pil - expected).abs().max() > 2 / 255 / min(reward.input_spec.std)
    pil_path = PickScoreReward.from_pretrained(clip_dir, uint8=True)
    assert pil_path.input_spec == dataclasses.replace(reward.input_spec, quantize=True)


# ---------------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------------
ALL_CLASSES = [*CLIP_CLASSES, AestheticReward, VLMYesNoReward]


def _load(cls, path):
    return cls.from_pretrained(path, **({"head_path": "unused.pth"} if cls is AestheticReward else {}))


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.names[0])
def test_bad_sources_raise_one_clear_error(cls, clip_dir, vlm_dir, tmp_path):
    with pytest.raises(FdfoError, match=f"model folder not found: {tmp_path}/missing"):
        _load(cls, tmp_path / "missing")
    with pytest.raises(FdfoError, match="config.json is a file"):
        _load(cls, clip_dir / "config.json")
    start = time.perf_counter()
    with pytest.raises(FdfoError, match="cannot load .* from fdfo-test-org/no-such-model: "):
        _load(cls, "fdfo-test-org/no-such-model")  # a hub id: offline, transformers fails at once
    assert time.perf_counter() - start < 15
    if cls is VLMYesNoReward:
        with pytest.raises(FdfoError, match=f"cannot load vlm_yes model from {clip_dir}: Unrecognized configuration"):
            _load(cls, clip_dir)
    else:
        with pytest.raises(FdfoError, match=f"{vlm_dir} holds a 'llava' model, expected model_type clip"):
            _load(cls, vlm_dir)


# ---------------------------------------------------------------------------------------------------------------
# Config string and composite
# ---------------------------------------------------------------------------------------------------------------
def test_load_reward_models_parses_terms_and_options(clip_dir, vlm_dir, head_files):
    question = 'Is it, in short, "{prompt}"; answer yes or no'
    spec = (
        f"clip_score={clip_dir};scale=2, pickscore={clip_dir};micro_batch=3,hps={clip_dir},"
        f"aesthetic={clip_dir};head={head_files / 'head.pth'};uint8=false,"
        f"vlm_yes={vlm_dir};form=p_yes;question={question}"
    )
    models = load_reward_models(spec, dtype="fp32")
    assert [type(m) for m in models] == ALL_CLASSES
    assert models[0].scale == 2.0 and models[1].micro_batch == 3 and models[4].question == question
    assert models[4].form == "p_yes" and models[4].wants_uint8
    # 8-bit preprocessing (HF's PIL pipeline) except where asked otherwise; PickScore: float, as the FDFO reference
    assert [m.input_spec.quantize for m in models[:4]] == [True, False, True, False]
    assert load_reward_models("") == []


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("nope=/x", r"unknown reward model term 'nope'; known: clip_score, pickscore, hps, aesthetic, vlm_yes"),
        ("clip_score", "must be term=path_or_hub_id"),
        (
            "clip_score={clip};bogus=1",
            "clip_score: unknown option 'bogus'; known: micro_batch, dtype, device, processor, uint8, scale",
        ),
        ("clip_score={clip};micro_batch=two", "micro_batch='two' is not a valid int"),
        ("hps={clip};dtype=fp64", r"dtype='fp64' is not a valid dtype \(float32 \| fp32 \| float16"),
        ("pickscore={clip};uint8=maybe", r"uint8='maybe' is not a valid boolean \(true \| false"),
        ("hps={clip},hps={clip}", "'hps' is given twice"),
        ("aesthetic={clip}", "needs head_path"),
    ],
)
def test_load_reward_models_errors(clip_dir, spec, msg):
    with pytest.raises(FdfoError, match=msg):
        load_reward_models(spec.format(clip=clip_dir))
    with pytest.raises(FdfoError, match="dtype must be one of"):
        load_reward_models(f"hps={clip_dir}", dtype="float64")


def test_composite_weighs_network_rewards(clip_dir, vlm_dir, head_files):
    models = load_reward_models(
        f"clip_score={clip_dir};micro_batch=2,aesthetic={clip_dir};head={head_files / 'head.pth'},"
        f"vlm_yes={vlm_dir};form=p_yes"
    )
    composite = CompositeReward("clip_score:1,aesthetic:0.5,vlm_yes:0.25", models=models, preprocess_impl="ref")
    assert len(composite.specs) == 1  # CLIP and aesthetic share one processor, hence one prepared tensor
    images = _images()
    out = composite(images, VLM_PROMPTS)
    assert set(out) == {"reward", "clip_score", "aesthetic", "vlm_yes"}
    torch.testing.assert_close(out["reward"], out["clip_score"] + 0.5 * out["aesthetic"] + 0.25 * out["vlm_yes"])
    for model in models:  # each term is what the reward computes on its own
        (name,) = model.names
        alone = model(images, VLM_PROMPTS, **({} if model is models[2] else {"impl": "ref"}))[name]
        torch.testing.assert_close(out[name], alone, atol=1e-6, rtol=0)


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # round to nearest, 8 / 11 significand bits


def _low_precision_path_length(reward, images, prompts) -> int:
    """How many leaf modules of the reward's networks return a bf16 / fp16 tensor while one micro-batch is scored:
    the number of roundings on the path from pixels (and tokens) to the score, each one relative error <= u."""
    calls = []
    hook = lambda m, i, out: calls.append(1) if torch.is_tensor(out) and out.dtype in UNIT_ROUNDOFF else None  # noqa: E731
    leaves = [m for net in reward.networks() for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        reward(images[: reward.micro_batch], prompts[: reward.micro_batch], **({} if reward.names == ("vlm_yes",)
               else {"impl": "ref"}))  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def _score_error_bound(full, reward, images, prompts, u: float) -> float:
    """First-order worst case of |score(low precision) - score(fp32)| from the unit roundoff u: n roundings on the
    path (counted) give each embedding a relative error <= n·u (the ops assumed well conditioned), and the score's
    own formula maps that to the score:
      cosine of unit vectors: |Δcos| <= Δ|a|/|a| + Δ|b|/|b| <= n·u (n counts both towers);
      clip_score = scale·cos; hps = cos; pickscore = e^s·cos with s = logit_scale itself rounded (relative u) and its
        exp rounded once more: e^s·(n·u + |cos|·(|s| + 1)·u);
      aesthetic: the LAION head is linear (no activations), head(x) = w·x + c in fp32 on the unit embedding:
        ||w||·n·u;
      vlm_yes: a logit l_i = w_i·h moves by <= ||w_i||·||h||·n·u (h: the last position's final hidden state, read
        from the fp32 model); p_yes = sigmoid(lse_yes - lse_no) moves by <= 1/4 of its argument's change,
        logit_diff = 100·sigmoid(l_Yes - l_No) by <= 25 times it."""
    n = _low_precision_path_length(reward, images, prompts)
    name = full.names[0]
    if name == "aesthetic":
        w = functools.reduce(
            lambda acc, lin: acc @ lin.weight.double().T,
            [m for m in full.head.layers if isinstance(m, torch.nn.Linear)],
            torch.eye(full.head.layers[0].in_features).double(),
        )
        return float(w.norm()) * n * u
    if name == "vlm_yes":
        lm_head = full.model.get_output_embeddings()
        seen = []
        handle = lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0][:, -1].norm(dim=-1).max()))
        try:
            full(images, prompts)
        finally:
            handle.remove()
        ids = full.yes_ids + full.no_ids
        delta_logit = float(lm_head.weight[ids].norm(dim=-1).max()) * float(max(seen)) * n * u
        return (25.0 if full.form == "logit_diff" else 0.25) * 2 * delta_logit
    cos = full.cosine(preprocess_images(images, [full.input_spec], impl="ref")[0][0], prompts).abs().max()
    if name == "pickscore":
        s = float(full.model.logit_scale)
        return math.exp(s) * (n * u + float(cos) * (abs(s) + 1) * u)
    return getattr(full, "scale", 1.0) * n * u


def test_low_precision_models_score_within_the_propagated_roundoff(clip_dir, vlm_dir, head_files):
    """Every network reward loads in bf16 and in fp16 (`dtype=`), scores finite float32 values on the CPU, and stays
    within the first-order propagation of the dtype's unit roundoff (`_score_error_bound`) of the fp32 model.

    Measured on these tiny models (bound in brackets), bf16: clip_score / hps 7.6e-3 (0.18: 45 roundings x 2^-8),
    pickscore 7.6e-2 (2.6), aesthetic 8.8e-5 (7.0e-3), vlm_yes p_yes 1.6e-4 (6.7e-2); fp16: 5.5e-4 (2.2e-2),
    1.2e-2 (0.32), 6.4e-6 (8.8e-4), 2.0e-5 (8.4e-3). The bound holds with 20-400x to spare (it adds every rounding
    up, where they mostly cancel), and fp16's errors sit below bf16's, as their roundoffs (2^-11 vs 2^-8) say.
    The paper's logit_diff form in bf16 on the 504 px tiny VLM: test_reward_dtype_loads_the_weights_in_that_dtype."""
    opts = ";micro_batch=5"  # the batch in one micro-batch, no padding rows
    spec = (f"clip_score={clip_dir}{opts},pickscore={clip_dir}{opts},hps={clip_dir}{opts},aesthetic={clip_dir};head="
            f"{head_files / 'head.pth'}{opts},vlm_yes={vlm_dir};form=p_yes{opts}")  # fmt: skip
    images = _images()
    full = load_reward_models(spec, dtype="fp32")
    kw = lambda m: {} if m.names[0] == "vlm_yes" else {"impl": "ref"}  # noqa: E731
    reference = [m(images, VLM_PROMPTS, **kw(m))[m.names[0]] for m in full]
    errors = {}
    for low, u in UNIT_ROUNDOFF.items():
        for a, hi, b in zip(full, reference, load_reward_models(spec, dtype=low), strict=True):
            (name,) = a.names
            assert {p.dtype for p in b.model.parameters()} == {low} and b.dtype == low, name
            if name == "aesthetic":
                assert {p.dtype for p in b.head.parameters()} == {torch.float32}  # the head stays fp32
            if name != "vlm_yes":
                assert b.input_spec.dtype == low
            lo = b(images, VLM_PROMPTS, **kw(b))[name]
            assert lo.dtype == torch.float32 and lo.device.type == "cpu" and torch.isfinite(lo).all(), name
            errors[name, low] = float((lo - hi).abs().max())
            bound = _score_error_bound(a, b, images, VLM_PROMPTS, u)
            assert 0 < errors[name, low] <= bound, (name, low, errors[name, low], bound)  # > 0: it ran in `low`
    for m in full:
        assert errors[m.names[0], torch.float16] < errors[m.names[0], torch.bfloat16]


def test_reward_device_option_and_errors(clip_dir, head_files, monkeypatch):
    """`;device=` per entry and the `device` argument (--reward-device): the weights go there, the scores come back
    on the CPU; a device this machine lacks is one FdfoError raised before any weights load."""
    spec = f"clip_score={clip_dir};device=cpu,aesthetic={clip_dir};head={head_files / 'head.pth'}"
    clip, aesthetic = load_reward_models(spec, device="cpu")
    assert clip.device == aesthetic.device == torch.device("cpu")
    assert {p.device.type for m in (clip, aesthetic) for net in m.networks() for p in net.parameters()} == {"cpu"}
    assert clip(_images(), PROMPTS, impl="ref")["clip_score"].device.type == "cpu"
    loads = []
    monkeypatch.setattr(CLIPScoreReward, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    if not torch.cuda.is_available():
        with pytest.raises(FdfoError, match="aesthetic: option device: cuda:0 requested but no CUDA device"):
            load_reward_models(f"clip_score={clip_dir},aesthetic={clip_dir};device=cuda:0;head=x.pth")
        with pytest.raises(FdfoError, match="reward models' device: cuda requested but no CUDA device"):
            load_reward_models(f"clip_score={clip_dir}", device="cuda")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(FdfoError, match=f"cuda:{n} requested but this machine has {n} CUDA device"):
            load_reward_models(f"clip_score={clip_dir},hps={clip_dir};device=cuda:{n}")
    with pytest.raises(FdfoError, match="hps: option device: 'gpu0' is not a device name"):
        load_reward_models(f"clip_score={clip_dir},hps={clip_dir};device=gpu0")
    assert loads == []  # no entry was loaded before the bad one was found


def test_missing_transformers_is_a_clear_error(clip_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(FdfoError, match=r"need transformers: pip install -e '\.\[diffusers\]' in the"):
        CLIPScoreReward.from_pretrained(clip_dir)
