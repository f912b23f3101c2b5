"""Prompts for real models: GenEval-style captions over the 80 COCO classes, with a fixed train / test split.

GenEval (Ghosh et al. 2023, djghosh13/geneval `prompts/create_prompts.py`) draws its evaluation prompts from six
templates over the COCO class names and ten colours. This module spells every prompt those templates can produce,
with the same constraints (two distinct classes in two_object / position / color_attr, two distinct colours in
color_attr, no coloured "person", counts two to four), and splits each category by a hash of the prompt text:

    single_object  a photo of a/an {obj}
    two_object     a photo of a/an {obj1} and a/an {obj2}
    counting       a photo of {two|three|four} {obj plural}
    colors         a photo of a/an {colour} {obj}
    position       a photo of a/an {obj1} {left of|right of|above|below} a/an {obj2}
    color_attr     a photo of a/an {colour1} {obj1} and a/an {colour2} {obj2}

The article follows GenEval's rule ("an" before a vowel letter). The plurals are English ones, where GenEval's rule
(append "es" after a final s, else "s") is not: people, sheep, knives, benches, computer mice, ...; "skis" and
"scissors" are counted in pairs ("a pair of skis", "two pairs of scissors").

Named sets, as `--prompts` / `--eval-prompts` take them: "geneval-coco:train" and "geneval-coco:test". A prompt's
split depends on its text alone (sha1), so it never changes between runs, machines or Python versions.
"""

from __future__ import annotations

import hashlib
import itertools
from functools import cache

from fdfo_fast.errors import FdfoError

# GenEval's prompts/object_names.txt: the 80 COCO class names, in its order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
UNCOLOURED = ("person",)  # GenEval asks for no "[colour] person"

# Nouns whose plural is not the regular one; "pair" nouns are plural already and counted in pairs.
_IRREGULAR = {"person": "people", "sheep": "sheep", "knife": "knives", "computer mouse": "computer mice"}
_PAIRS = ("skis", "scissors")

SET_NAME = "geneval-coco"
SPLITS = ("train", "test")
NAMED_SETS = tuple(f"{SET_NAME}:{s}" for s in SPLITS)
TEST_FRACTION = 0.25  # of each category's prompts, chosen by hash


def plural(name: str) -> str:
    """English plural of a class name ("bench" -> "benches", "person" -> "people", "skis" -> "pairs of skis")."""
    if name in _PAIRS:
        return f"pairs of {name}"
    if name in _IRREGULAR:
        return _IRREGULAR[name]
    if name.endswith(("s", "sh", "ch", "x", "z")):
        return name + "es"
    return name + "s"


def noun_phrase(name: str, colour: str | None = None) -> str:
    """'a dog', 'an orange car', 'a pair of red skis': one object, with GenEval's a/an rule."""
    words = f"{colour} {name}" if colour else name
    if name in _PAIRS:
        return f"a pair of {words}"
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _enumerate() -> dict[str, list[str]]:
    photo = "a photo of "
    pairs = list(itertools.permutations(COCO_CLASSES, 2))
    colourable = [c for c in COCO_CLASSES if c not in UNCOLOURED]
    return {
        "single_object": [photo + noun_phrase(c) for c in COCO_CLASSES],
        "two_object": [f"{photo}{noun_phrase(a)} and {noun_phrase(b)}" for a, b in pairs],
        "counting": [f"{photo}{word} {plural(c)}" for n, word in NUMBERS.items() for c in COCO_CLASSES],
        "colors": [photo + noun_phrase(c, col) for col in COLOURS for c in colourable],
        "position": [f"{photo}{noun_phrase(a)} {r} {noun_phrase(b)}" for a, b in pairs for r in RELATIONS],
        "color_attr": [
            f"{photo}{noun_phrase(a, ca)} and {noun_phrase(b, cb)}"
            for a, b in itertools.permutations(colourable, 2)
            for ca, cb in itertools.permutations(COLOURS, 2)
        ],
    }


def _hash(text: str) -> bytes:
    return hashlib.sha1(f"{SET_NAME}:{text}".encode()).digest()


_THRESHOLD = int(TEST_FRACTION * 2**64)


def in_test_split(text: str) -> bool:
    """Whether a prompt belongs to the test split: the first 8 bytes of its sha1 below TEST_FRACTION · 2^64."""
    return int.from_bytes(_hash(text)[:8], "big") < _THRESHOLD


@cache
def splits() -> dict[str, dict[str, tuple[str, ...]]]:
    """{"train"|"test": {category: prompts in hash order}}; disjoint, and together every prompt of the category."""
    out: dict[str, dict[str, tuple[str, ...]]] = {s: {} for s in SPLITS}
    for cat, texts in _enumerate().items():
        by_hash = sorted((_hash(t), t) for t in texts)
        out["test"][cat] = tuple(t for h, t in by_hash if int.from_bytes(h[:8], "big") < _THRESHOLD)
        out["train"][cat] = tuple(t for h, t in by_hash if int.from_bytes(h[:8], "big") >= _THRESHOLD)
    return out


def is_named_set(spec: str) -> bool:
    """Whether `spec` names a prompt set of this module (rather than a file)."""
    return spec.partition(":")[0] == SET_NAME


def check_named_set(spec: str) -> str:
    """The split a named set asks for; FdfoError for an unknown one."""
    if spec not in NAMED_SETS:
        raise FdfoError(f"unknown prompt set {spec!r}; known: {', '.join(map(repr, NAMED_SETS))}")
    return spec.partition(":")[2]


def prompt_pool(spec: str) -> dict[str, tuple[str, ...]]:
    """{category: prompts} of a named set, e.g. 'geneval-coco:train'."""
    return dict(splits()[check_named_set(spec)])


def eval_items(spec: str, per_category: int) -> list[tuple[str, int]]:
    """A fixed evaluation set: `per_category` (prompt, seed) items per category, the first prompts in hash order
    (cycling when a category has fewer); seeds as the shapes world's eval_prompts gives them."""
    pool = prompt_pool(spec)
    items = []
    for ci, cat in enumerate(CATEGORIES):
        texts = pool[cat]
        items += [(texts[i % len(texts)], 1_000_003 * (ci + 1) + i) for i in range(per_category)]
    return items
