"""Prompt grammar of the shapes world: GenEval-style categories, parsing, and fixed train / held-out splits."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import cache

from fdfo_fast.errors import FdfoError

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3, "four": 4}
# GenEval's six task families, in the order they are reported.
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

HELDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt asks for; `colour=None` means any colour."""

    shape: str
    colour: str | None = None

    def text(self) -> str:
        return f"a {self.colour} {self.shape}" if self.colour else f"a {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """The structured meaning of a prompt: what the scorer checks."""

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1  # counting: exactly `count` objects of objects[0].shape
    relation: str | None = None  # position: objects[0] <relation> objects[1]

    def text(self) -> str:
        if self.category == "counting":
            word = {v: k for k, v in NUMBERS.items()}[self.count]
            return f"{word} {self.objects[0].shape}s"
        if self.category == "position":
            return f"{self.objects[0].text()} {self.relation} {self.objects[1].text()}"
        return " and ".join(o.text() for o in self.objects)

    def geneval_metadata(self) -> dict:
        """The prompt as a GenEval `evaluation_metadata.jsonl` record without its "prompt": `tag` (the category)
        and `include`, one {"class", "count"[, "color"][, "position": [relation, index]]} per object, in GenEval's
        own form (djghosh13/geneval prompts/evaluation_metadata.jsonl): "a cat left of a couch" lists the couch
        first and the cat with "position": ["left of", 0]."""
        include = []
        for obj in self.objects:
            entry = {"class": obj.shape, "count": self.count if self.category == "counting" else 1}
            if obj.colour:
                entry["color"] = obj.colour
            include.append(entry)
        if self.category == "position":  # text: objects[0] <relation> objects[1]
            include = [include[1], {**include[0], "position": [self.relation, 0]}]
        return {"tag": self.category, "include": include}


def _enumerate() -> dict[str, list[PromptSpec]]:
    coloured = [ObjectSpec(s, c) for c in COLOURS for s in SHAPES]
    out = {
        "single_object": [PromptSpec("single_object", (ObjectSpec(s),)) for s in SHAPES],
        "two_object": [
            PromptSpec("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in itertools.permutations(SHAPES, 2)
        ],
        "counting": [PromptSpec("counting", (ObjectSpec(s),), count=n) for n in NUMBERS.values() for s in SHAPES],
        "colors": [PromptSpec("colors", (o,)) for o in coloured],
        "position": [
            PromptSpec("position", (a, b), relation=r)
            for a, b in itertools.permutations(coloured, 2)
            for r in RELATIONS
        ],
        "color_attr": [
            PromptSpec("color_attr", (a, b))
            for a, b in itertools.permutations(coloured, 2)
            if a.colour != b.colour and a.shape != b.shape
        ],
    }
    return out


def _stable_hash(text: str) -> bytes:
    # sha1, not Python's salted hash(), so the split never changes between runs or machines.
    return hashlib.sha1(text.encode()).digest()


@cache
def prompt_sets() -> dict[str, dict[str, tuple[PromptSpec, ...]]]:
    """{"train"|"heldout": {category: prompts}}: disjoint and fixed; per category the HELDOUT_FRACTION of
    prompts with the smallest hash (at least one) is held out, and at least one prompt stays for training."""
    train, heldout = {}, {}
    for cat, specs in _enumerate().items():
        by_hash = sorted(specs, key=lambda s: _stable_hash(s.text()))
        n_held = min(len(specs) - 1, max(1, round(HELDOUT_FRACTION * len(specs))))
        heldout[cat] = tuple(by_hash[:n_held])
        train[cat] = tuple(by_hash[n_held:])
    return {"train": train, "heldout": heldout}


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["a", "and", "of", "left", "right", "above", "below", *NUMBERS, *COLOURS]
    words += [*SHAPES, *(s + "s" for s in SHAPES)]
    return tuple(words)


@cache
def _text_index() -> dict[str, PromptSpec]:
    return {s.text(): s for specs in _enumerate().values() for s in specs}


def parse_prompt(text: str) -> PromptSpec:
    """Prompt text -> PromptSpec; raises FdfoError naming the prompt if it is not in the grammar."""
    norm = " ".join(text.lower().strip().rstrip(".").split())
    spec = _text_index().get(norm)
    if spec is None:
        unknown = [w for w in norm.split() if w not in vocabulary()]
        why = f"unknown words {unknown}" if unknown else "not a sentence of the shapes-world grammar"
        raise FdfoError(
            f"prompt {text!r} is not a shapes-world prompt ({why}); "
            f"examples: 'a red circle', 'three squares', 'a blue triangle left of a white square'"
        )
    return spec


def eval_prompts(per_category: int = 16, split: str = "heldout") -> list[tuple[PromptSpec, int]]:
    """A fixed evaluation set: `per_category` (prompt, seed) items per category, cycling through its prompts."""
    if split not in ("train", "heldout"):
        raise FdfoError(f"split must be 'train' or 'heldout', got {split!r}")
    items = []
    for ci, cat in enumerate(CATEGORIES):
        # Hash order, not alphabetical, so 16 position prompts are not all "a blue circle ...".
        specs = prompt_sets()[split][cat]  # already in hash order
        for i in range(per_category):
            items.append((specs[i % len(specs)], 1_000_003 * (ci + 1) + i))
    return items
