"""Network rewards loaded through transformers: CLIPScore, PickScore, HPSv2, the LAION aesthetic predictor, VLM yes/no.

Every class loads with `from_pretrained(path_or_id, device, dtype, micro_batch, **options)`: a local folder loads
with `local_files_only=True`, anything else is a hub id that transformers resolves (and that fails fast when
HF_HUB_OFFLINE=1). Every failure is one `FdfoError` naming the term, the source and the reason.

The CLIP-based rewards are `ModelReward`s: they read the pixel tensor the fused preprocessing pass prepares from
their folder's image processor (`ImageInputSpec.from_hf_processor`, 8-bit or float: `uint8=`) and never run the HF
processor themselves. `VLMYesNoReward` hands the images to its VLM's own processor (image tokens): by default float
images it resized itself (the paper's form); with `form=p_yes` the uint8 images (`wants_uint8`, like `JpegReward`).
It is a plain `Reward`.

`load_reward_models("pickscore=yuvalkirstain/PickScore_v1,aesthetic=/m/clip-l14;head=/m/sac.pth")` builds them from
one config string (syntax in its docstring); `CompositeReward(weights, models=...)` then weighs their terms.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fdfo_fast.config import DTYPES as CONFIG_DTYPES
from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.base import ModelReward, Reward, check_images, score_in_micro_batches, to_uint8_hwc
from fdfo_fast.rewards.preprocess import ImageInputSpec

_log = logging.getLogger("fdfo_fast")
# --reward-dtype's names and torch's own (a reward entry's ';dtype=' takes either)
DTYPES = {name: getattr(torch, CONFIG_DTYPES[short]) for short in ("fp32", "fp16", "bf16")
          for name in (CONFIG_DTYPES[short], short)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Loading helpers
# ---------------------------------------------------------------------------------------------------------------
def _transformers():
    """transformers, imported on first use so the library imports without the [diffusers] extra."""
    try:
        import transformers
    except ImportError:
        raise FdfoError(
            "network rewards need transformers: pip install -e '.[diffusers]' in the fdfo_fast checkout"
        ) from None
    return transformers


def _dtype_kw(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 takes `dtype=` (and warns on `torch_dtype=`); older releases only know `torch_dtype=`."""
    major, minor = (int(re.match(r"\d+", v).group()) for v in _transformers().__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise FdfoError(f"reward model dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _choice(what: str, choices: dict) -> Callable[[str], object]:
    """An option converter: the value (case-insensitive) must be a key of `choices`; its __name__ lists them, so a
    bad value is reported as "not a valid dtype (float32 | fp32 | ...)"."""

    def convert(text: str):
        if text.lower() not in choices:
            raise ValueError(text)
        return choices[text.lower()]

    convert.__name__ = f"{what} ({' | '.join(choices)})"
    return convert


_BOOLEAN = _choice("boolean", {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False})
# Options every network reward takes: micro-batch size, weight dtype and device (overriding load_reward_models'
# dtype and device for that model).
_COMMON_OPTIONS: dict[str, tuple[str, Callable]] = {
    "micro_batch": ("micro_batch", int),
    "dtype": ("dtype", _choice("dtype", DTYPES)),
    "device": ("device", str),
}


def _source(path_or_id: str | Path, what: str) -> tuple[str, dict]:
    """(source, from_pretrained kwargs): a folder loads offline; a missing path errors here, not as a hub 404."""
    text = str(path_or_id).strip()
    path = Path(text).expanduser()
    if text and path.is_dir():
        return str(path), {"local_files_only": True}
    if text and path.exists():
        raise FdfoError(f"{what}: {text} is a file; expected a model folder or a hub id")
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    if not text or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise FdfoError(f"{what}: model folder not found: {text or '(empty path)'}")
    return text, {}


@contextmanager
def _loading(what: str, source: str):
    """Turn whatever transformers raises (OSError offline, ValueError for a wrong class, ...) into one FdfoError."""
    try:
        yield
    except FdfoError:
        raise
    except Exception as err:  # a loader boundary: every failure becomes one clear line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FdfoError(f"cannot load {what} from {source}: {reason}") from err


def _check_model_type(source: str, kw: dict, what: str, expected: tuple[str, ...] | None) -> str:
    """Read the folder's config first, so a wrong model type is named instead of half-loaded with random weights."""
    tf = _transformers()
    with _loading(f"{what} config", source):
        model_type = getattr(tf.AutoConfig.from_pretrained(source, **kw), "model_type", None)
    if expected is not None and model_type not in expected:
        raise FdfoError(f"{what}: {source} holds a {model_type!r} model, expected model_type {' or '.join(expected)}")
    return model_type


def _load_tokenizer(source: str, what: str, vocab_size: int):
    """AutoTokenizer, validated: offline, `from_pretrained(hub_id)` can silently return a 2-token tokenizer."""
    src, kw = _source(source, what)
    with _loading(f"{what} tokenizer", src):
        tokenizer = _transformers().AutoTokenizer.from_pretrained(src, **kw)
    if not 2 < len(tokenizer) <= vocab_size:
        raise FdfoError(
            f"{what}: tokenizer from {src} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size} "
            "(no tokenizer files there? name the folder that has them with processor=)"
        )
    return tokenizer


def _image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings [b, d]; transformers 5 wraps them in an output object's `pooler_output`."""
    out = model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _text_features(model, **tokens) -> torch.Tensor:
    out = model.get_text_features(**tokens)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _freeze(model: nn.Module, device: torch.device | str) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


class _Placed:
    """`to(device)` for a reward whose networks are `networks()`: they move, and `self.device` (where score() sends
    its inputs) follows. Scores come back on the CPU wherever the networks are (score_in_micro_batches)."""

    def networks(self) -> list[nn.Module]:
        return [self.model]

    def to(self, device: torch.device | str):
        device = torch.device(device)
        for net in self.networks():
            net.to(device)
        self.device = device
        return self


def load_clip(
    path_or_id: str | Path,
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    processor_path: str | Path | None = None,
    default_processor: str | None = None,
    with_tokenizer: bool = True,
):
    """(CLIPModel, tokenizer or None, ImageInputSpec) from a Hugging Face CLIP folder or hub id.

    The tokenizer and image processor come from `processor_path` (default: the model's own folder). A model-only
    folder (PickScore_v1 ships no processor) falls back to `default_processor` if given; a folder without an image
    processor config falls back to `CLIPImageProcessor()` (OpenAI CLIP's 224 px bicubic, mean/std), with a log line.
    """
    tf = _transformers()
    src, kw = _source(path_or_id, what)
    _check_model_type(src, kw, what, ("clip",))
    with _loading(f"{what} model", src):
        model = _freeze(tf.CLIPModel.from_pretrained(src, **kw, **_dtype_kw(dtype)), device)
    proc_src = str(processor_path) if processor_path is not None else src
    tokenizer = None
    if with_tokenizer:
        vocab_size = model.config.text_config.vocab_size
        try:
            tokenizer = _load_tokenizer(proc_src, what, vocab_size)
        except FdfoError as err:
            if processor_path is not None or default_processor is None:
                raise
            _log.warning("%s: %s; using the tokenizer and image processor of %s", what, err, default_processor)
            proc_src = default_processor
            tokenizer = _load_tokenizer(proc_src, what, vocab_size)
    psrc, pkw = _source(proc_src, what)
    try:
        image_processor = tf.CLIPImageProcessor.from_pretrained(psrc, **pkw)
    except OSError as err:  # no preprocessor_config.json there
        _log.warning("%s: no image processor config in %s (%s); using CLIPImageProcessor() defaults", what, psrc, err)
        image_processor = tf.CLIPImageProcessor()
    return model, tokenizer, ImageInputSpec.from_hf_processor(image_processor, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# CLIP image-text similarity: CLIPScore, PickScore, HPSv2
# ---------------------------------------------------------------------------------------------------------------
class ClipSimilarityReward(_Placed, ModelReward):
    """cos(CLIP image embedding, CLIP text embedding) of each (image, prompt), mapped by `from_cosine`.

    Subclasses differ only in the term name, the default processor and the map; they share loading and scoring.
    Prompts are tokenised here (truncated to the text tower's length) and each distinct prompt is embedded once
    per micro-batch: RL batches repeat every prompt across its group of samples.
    """

    names: tuple[str, ...] = ()
    default_processor: str | None = None
    # uint8=true: the HF processor's 8-bit PIL pipeline (images as PIL would hold them); false: float images, no
    # 8-bit rounding (the HF processor's torchvision backend on float tensors, do_rescale=False).
    default_uint8: bool = True
    OPTIONS: dict[str, tuple[str, Callable]] = {
        **_COMMON_OPTIONS,
        "processor": ("processor_path", str),
        "uint8": ("uint8", _BOOLEAN),
    }

    def __init__(self, model, tokenizer, input_spec: ImageInputSpec, micro_batch: int = 16):
        self.model, self.tokenizer, self.input_spec, self.micro_batch = model, tokenizer, input_spec, micro_batch
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        micro_batch: int = 16,
        processor_path: str | Path | None = None,
        uint8: bool | None = None,
        **kw,
    ):
        """Load a Hugging Face CLIPModel; `processor_path` names where its tokenizer and image processor live;
        `uint8` picks 8-bit or float preprocessing (None = the class's `default_uint8`)."""
        dtype = _as_dtype(dtype)
        model, tokenizer, spec = load_clip(
            path_or_id, cls.names[0], device, dtype, processor_path, cls.default_processor
        )
        spec = dataclasses.replace(spec, quantize=cls.default_uint8 if uint8 is None else uint8)
        return cls(model, tokenizer, spec, micro_batch=micro_batch, **kw)

    def cosine(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image, text) [b] in float32."""
        image = _image_features(self.model, pixels.to(self.device, self.dtype)).float()  # [b, d]
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        text = _text_features(self.model, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).float()
        text = text[torch.tensor([unique.index(p) for p in prompts], device=self.device)]  # [b, d]
        return nn.functional.cosine_similarity(image, text, dim=-1)

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {self.names[0]: self.from_cosine(self.cosine(pixels, prompts))}


class CLIPScoreReward(ClipSimilarityReward):
    """`clip_score` = scale·cos(image, text) (CLIPScore, Hessel et al. 2021, without its 2.5·max(·, 0) clipping)."""

    names = ("clip_score",)
    OPTIONS = {**ClipSimilarityReward.OPTIONS, "scale": ("scale", float)}

    def __init__(self, model, tokenizer, input_spec: ImageInputSpec, micro_batch: int = 16, scale: float = 1.0):
        super().__init__(model, tokenizer, input_spec, micro_batch)
        self.scale = scale

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * cos


class PickScoreReward(ClipSimilarityReward):
    """`pickscore` = exp(logit_scale)·cos(image, text): PickScore's logit (Kirstain et al. 2023), about 20-23.

    PickScore_v1 ships without tokenizer or image processor; its authors load them from the CLIP-H it was
    fine-tuned from, which is the fallback here when the model folder has none (or pass processor=...). The FDFO
    reference scores the decoded float images without 8-bit rounding (docs/method.md §1.4): `uint8=false` by default.
    """

    names = ("pickscore",)
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    default_uint8 = False

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * cos


class HPSReward(ClipSimilarityReward):
    """`hps` = cos(image, text) of an HPSv2 CLIP (Wu et al. 2023) converted to Hugging Face format; HPSv2 reports
    the raw cosine (about 0.2-0.3). Its base is the same CLIP-H as PickScore's, hence the same processor fallback."""

    names = ("hps",)
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return cos


# ---------------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor v2
# ---------------------------------------------------------------------------------------------------------------
class AestheticHead(nn.Module):
    """The MLP of LAION's improved-aesthetic-predictor (christophschuhmann/improved-aesthetic-predictor), same layer
    indices so its published state dict (`layers.0.weight`, ... `layers.7.bias`) loads as is."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, dim] -> [b]
        return self.layers(x).squeeze(-1)


def load_aesthetic_head(path: str | Path, dim: int) -> AestheticHead:
    """The head from a .pth/.pt (a state dict, loaded with weights_only) or .safetensors file, shapes checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FdfoError(f"aesthetic: head file not found: {path}")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise FdfoError(f"aesthetic: head file must be .pth, .pt or .safetensors, got {path}")
    with _loading("aesthetic head", str(path)):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise FdfoError(f"aesthetic: {path} holds a {type(state).__name__}, expected a state dict")
    head = AestheticHead(dim)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k} is {got[k]}, expected {s}" for k, s in expected.items() if k in got and got[k] != s]
    if problems:
        raise FdfoError(f"aesthetic: {path} does not fit the head for {dim}-d CLIP embeddings: {'; '.join(problems)}")
    head.load_state_dict(state)
    return head


class AestheticReward(_Placed, ModelReward):
    """`aesthetic`: LAION aesthetic predictor v2 = MLP(L2-normalised CLIP image embedding); prompt-free.

    The published head expects CLIP ViT-L/14 (768-d); the head's input size follows the CLIP's projection size,
    so any CLIP with a matching head works. The head runs in float32 whatever the CLIP's dtype (it is tiny).
    """

    names = ("aesthetic",)
    OPTIONS = {
        **_COMMON_OPTIONS,
        "head": ("head_path", str),
        "processor": ("processor_path", str),
        "uint8": ("uint8", _BOOLEAN),
    }

    def __init__(self, model, head: AestheticHead, input_spec: ImageInputSpec, micro_batch: int = 16):
        self.model, self.input_spec, self.micro_batch = model, input_spec, micro_batch
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.head = _freeze(head.float(), self.device)

    def networks(self) -> list[nn.Module]:
        return [self.model, self.head]

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        micro_batch: int = 16,
        head_path: str | Path | None = None,
        processor_path: str | Path | None = None,
        uint8: bool = True,
    ):
        """CLIP from `path_or_id`, head from `head_path` (e.g. sac+logos+ava1-l14-linearMSE.pth); `uint8` as for
        the CLIP terms (the LAION predictor scores PIL images: 8-bit by default)."""
        if head_path is None:
            raise FdfoError("aesthetic: needs head_path (the predictor's .pth, e.g. sac+logos+ava1-l14-linearMSE.pth)")
        dtype = _as_dtype(dtype)
        model, _, spec = load_clip(path_or_id, "aesthetic", device, dtype, processor_path, with_tokenizer=False)
        spec = dataclasses.replace(spec, quantize=uint8)
        return cls(model, load_aesthetic_head(head_path, model.config.projection_dim), spec, micro_batch)

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        emb = _image_features(self.model, pixels.to(self.device, self.dtype)).float()  # [b, d]
        return {"aesthetic": self.head(nn.functional.normalize(emb, dim=-1))}


# ---------------------------------------------------------------------------------------------------------------
# VLM yes/no
# ---------------------------------------------------------------------------------------------------------------
YES_SPELLINGS = ("yes", "Yes", " yes", " Yes")
NO_SPELLINGS = ("no", "No", " no", " No")


def answer_token_ids(tokenizer, spellings: tuple[str, ...]) -> list[int]:
    """Distinct first-token ids of an answer's spellings, unknown-token ids dropped.

    A chat model may begin its answer with "Yes" or "yes", with or without a leading space (byte-level BPEs give each
    its own id; SentencePiece/WordLevel may map several to one); scoring all of them makes P(yes) independent of the
    model's capitalisation habit.
    """
    ids = (tokenizer.encode(s, add_special_tokens=False)[:1] for s in spellings)
    return list(dict.fromkeys(i[0] for i in ids if i and i[0] != tokenizer.unk_token_id))


class VLMYesNoReward(_Placed, Reward):
    """`vlm_yes`: how strongly a vision-language model answers yes to `question.format(prompt=...)` about each image.

    Two forms (`form=`):

    logit_diff (default, the FDFO paper's, docs/method.md §1.4): 100·sigmoid(logit("Yes") − logit("No")) ∈ [0, 100] from
        the next-token logits of the single tokens "Yes" and "No". The float image in [0, 1] is resized bilinearly
        (torch's `interpolate`, align_corners=False, no antialias) to `size`² (504) and handed to the processor with
        its own resize and rescale off, so no 8-bit rounding happens anywhere.
    p_yes: P(yes) ∈ [0, 1] = p(yes-ids) / (p(yes-ids) + p(no-ids)), each answer's logit the logsumexp over the
        first tokens of its spellings (`answer_token_ids`: yes / Yes / " yes" / " Yes"), the uint8 images going
        through the processor's own resize.

    The question goes through the processor's chat template (user turn: image then text, then the generation
    prompt), or, without one, is "<image token>\\n<question>". Prompts are padded on the left so the last position is
    every row's next token (rotary positions make the shift harmless) and only that position's logits are computed.
    """

    names = ("vlm_yes",)
    FORMS = ("logit_diff", "p_yes")
    DEFAULT_QUESTION = 'Does this image match the caption "{prompt}"? Answer Yes or No.'
    DEFAULT_SIZE = 504
    OPTIONS = {
        **_COMMON_OPTIONS,
        "question": ("question", str),
        "form": ("form", _choice("form", {f: f for f in FORMS})),
        "size": ("size", int),
    }

    def __init__(
        self,
        model,
        processor,
        question: str = DEFAULT_QUESTION,
        micro_batch: int = 16,
        form: str = "logit_diff",
        size: int = DEFAULT_SIZE,
    ):
        try:
            question.format(prompt="")
        except (KeyError, IndexError, ValueError) as err:
            raise FdfoError(f"vlm_yes: question may only use the field {{prompt}}: {question!r} ({err!r})") from None
        if form not in self.FORMS:
            raise FdfoError(f"vlm_yes: form must be one of {', '.join(self.FORMS)}, got {form!r}")
        if size < 1:
            raise FdfoError(f"vlm_yes: size must be >= 1, got {size}")
        self.model, self.processor, self.question, self.micro_batch = model, processor, question, micro_batch
        self.form, self.size = form, size
        self.wants_uint8 = form == "p_yes"  # logit_diff reads the float images
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        if form == "logit_diff":
            self.yes_ids, self.no_ids = [self._single_token(tokenizer, "Yes")], [self._single_token(tokenizer, "No")]
        else:
            self.yes_ids = answer_token_ids(tokenizer, YES_SPELLINGS)
            self.no_ids = answer_token_ids(tokenizer, NO_SPELLINGS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise FdfoError(f"vlm_yes: tokenizer has no distinct 'yes'/'no' tokens (ids {self.yes_ids}/{self.no_ids})")
        self.chat = getattr(processor, "chat_template", None) is not None
        if not self.chat and not getattr(processor, "image_token", None):
            raise FdfoError("vlm_yes: the processor has neither a chat template nor an image token")
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    @staticmethod
    def _single_token(tokenizer, word: str) -> int:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise FdfoError(
                f"vlm_yes: {word!r} is not a single known token of this tokenizer (ids {ids}); form=logit_diff reads "
                "the logits of 'Yes' and 'No' (form=p_yes sums the spellings' first tokens)"
            )
        return ids[0]

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        micro_batch: int = 16,
        question: str = DEFAULT_QUESTION,
        form: str = "logit_diff",
        size: int = DEFAULT_SIZE,
    ):
        """AutoProcessor + AutoModelForImageTextToText (Qwen2.5-VL, LLaVA, ...) from a folder or hub id."""
        tf = _transformers()
        dtype = _as_dtype(dtype)
        src, kw = _source(path_or_id, "vlm_yes")
        model_type = _check_model_type(src, kw, "vlm_yes", None)
        with _loading("vlm_yes model", src):
            model = tf.AutoModelForImageTextToText.from_pretrained(src, **kw, **_dtype_kw(dtype))
        model = _freeze(model, device)
        with _loading("vlm_yes processor", src):
            processor = tf.AutoProcessor.from_pretrained(src, **kw)
        tokenizer = getattr(processor, "tokenizer", None)
        n_embed = model.get_input_embeddings().num_embeddings
        if tokenizer is None or not 2 < len(tokenizer) <= n_embed:
            raise FdfoError(
                f"vlm_yes: {src} ({model_type}) has no usable tokenizer "
                f"({len(tokenizer) if tokenizer is not None else 0} tokens for a {n_embed}-token model)"
            )
        return cls(model, processor, question, micro_batch, form, size)

    def texts(self, prompts: list[str]) -> list[str]:
        out = []
        for prompt in prompts:
            question = self.question.format(prompt=prompt)
            if self.chat:
                content = [{"type": "image"}, {"type": "text", "text": question}]
                messages = [{"role": "user", "content": content}]
                out.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            else:
                out.append(f"{self.processor.image_token}\n{question}")
        return out

    def answer_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[b, vocab] next-token logits -> [b, 2] (yes, no) logits."""
        logits = logits.float()
        return torch.stack([logits[:, self.yes_ids].logsumexp(-1), logits[:, self.no_ids].logsumexp(-1)], -1)

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """logit_diff's model images: [B, 3, H, W] float in [-1, 1] (or uint8) -> float [B, 3, size, size] in [0, 1]."""
        unit = images.float() / 255 if images.dtype == torch.uint8 else ((images.float() + 1) / 2).clamp(0, 1)
        size = (self.size, self.size)
        return nn.functional.interpolate(unit, size=size, mode="bilinear", align_corners=False, antialias=False)

    def next_token_logits(self, images, prompts: list[str], **processor_kw) -> torch.Tensor:
        inputs = self.processor(
            images=images, text=self.texts(prompts), padding=True, return_tensors="pt", **processor_kw
        )
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        return self.model(**inputs, **({"logits_to_keep": 1} if self.keep_last else {})).logits[:, -1]  # [b, V]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """One micro-batch: logit_diff takes the [b, 3, H, W] images, p_yes the uint8 [b, H, W, 3] ones."""
        if self.form == "p_yes":
            from PIL import Image

            pil = [Image.fromarray(a) for a in images.cpu().numpy()]
            return {"vlm_yes": self.answer_logits(self.next_token_logits(pil, prompts)).softmax(-1)[:, 0]}
        pixels = list(self.resized(images).cpu())
        logits = self.next_token_logits(pixels, prompts, do_resize=False, do_rescale=False).float()
        return {"vlm_yes": 100 * torch.sigmoid(logits[:, self.yes_ids[0]] - logits[:, self.no_ids[0]])}

    def __call__(
        self, images: torch.Tensor, prompts: list[str], uint8_nhwc: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        self.check_batch(images, prompts)
        if self.form == "p_yes":
            u8 = uint8_nhwc.cpu() if uint8_nhwc is not None else torch.from_numpy(to_uint8_hwc(images))
            return score_in_micro_batches(self.score, u8, prompts, self.micro_batch)
        check_images(images)
        return score_in_micro_batches(self.score, images, prompts, self.micro_batch)


# ---------------------------------------------------------------------------------------------------------------
# From a config string
# ---------------------------------------------------------------------------------------------------------------
HF_REWARD_CLASSES: dict[str, type] = {
    cls.names[0]: cls for cls in (CLIPScoreReward, PickScoreReward, HPSReward, AestheticReward, VLMYesNoReward)
}
# Split only where a new `name=` begins, so a question may contain commas and semicolons.
_ENTRY_SPLIT = re.compile(r",(?=\s*\w+\s*=)")
_OPTION_SPLIT = re.compile(r";(?=\s*\w+\s*=)")


def load_reward_models(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32
) -> list[Reward]:
    """Reward instances from a config string, ready for `CompositeReward(weights, models=...)`.

    Syntax: comma-separated `term=path_or_hub_id`, each optionally followed by `;option=value` pairs:

        pickscore=yuvalkirstain/PickScore_v1
        clip_score=/m/clip;scale=2.5,aesthetic=/m/clip-l14;head=/m/sac+logos+ava1-l14-linearMSE.pth
        vlm_yes=Qwen/Qwen2.5-VL-7B-Instruct;micro_batch=4;dtype=bf16;device=cuda:1;question=Is this "{prompt}"? ...

    Terms: clip_score, pickscore, hps, aesthetic, vlm_yes. Options: micro_batch, dtype and device (all; dtype fp32 |
    bf16 | fp16 and device cpu | cuda | cuda:N override the `dtype` and `device` arguments for that model: its
    inputs are moved there and its scores come back on the CPU), processor (CLIP terms and aesthetic: folder of the
    tokenizer and image processor), uint8 (CLIP terms and aesthetic: true = 8-bit PIL-style preprocessing, false =
    float; pickscore defaults to false, the others to true), scale (clip_score), head (aesthetic, required),
    question, form (logit_diff | p_yes) and size (vlm_yes). A value runs to the next `,name=` / `;name=`, so it may
    hold commas and semicolons otherwise. "" gives []. Every entry is parsed and every device checked before the
    first model loads (`parse_reward_models`).
    """
    entries = parse_reward_models(spec)
    if not entries:
        return []
    from fdfo_fast.placement import check_device

    device = check_device(device, "reward models' device")
    _as_dtype(dtype)
    return [cls.from_pretrained(path, **{"device": device, "dtype": dtype, **kw}) for cls, path, kw in entries]


def parse_reward_models(spec: str) -> list[tuple[type, str, dict]]:
    """(class, path_or_id, from_pretrained keyword arguments) per entry of a `load_reward_models` string, options
    converted and `;device=` checked against this machine; loads nothing (the trainer calls it before loading the
    flow model, so a bad entry costs no minutes of loading)."""
    from fdfo_fast.placement import check_device

    entries: list[tuple[type, str, dict]] = []
    for entry in filter(None, (e.strip() for e in _ENTRY_SPLIT.split(spec or ""))):
        head, *options = _OPTION_SPLIT.split(entry)
        term, sep, path = (s.strip() for s in head.partition("="))
        if not sep or not path:
            raise FdfoError(f"reward model entry {entry!r} must be term=path_or_hub_id")
        cls = HF_REWARD_CLASSES.get(term)
        if cls is None:
            raise FdfoError(f"unknown reward model term {term!r}; known: {', '.join(HF_REWARD_CLASSES)}")
        if any(term in c.names for c, _, _ in entries):
            raise FdfoError(f"reward model term {term!r} is given twice")
        kwargs = {}
        for option in options:
            key, _, value = (s.strip() for s in option.partition("="))
            if key not in cls.OPTIONS:
                raise FdfoError(f"{term}: unknown option {key!r}; known: {', '.join(cls.OPTIONS)}")
            name, convert = cls.OPTIONS[key]
            try:
                kwargs[name] = convert(value)
            except ValueError:
                raise FdfoError(f"{term}: option {key}={value!r} is not a valid {convert.__name__}") from None
        if "device" in kwargs:
            kwargs["device"] = check_device(kwargs["device"], f"{term}: option device")
        entries.append((cls, path, kwargs))
    return entries


__all__ = [
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "ClipSimilarityReward",
    "HF_REWARD_CLASSES",
    "HPSReward",
    "PickScoreReward",
    "VLMYesNoReward",
    "answer_token_ids",
    "load_aesthetic_head",
    "load_clip",
    "load_reward_models",
    "parse_reward_models",
]
