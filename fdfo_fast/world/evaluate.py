"""Symbolic check of a prompt against a list of objects: GenEval-style correctness plus dense partial credit."""

from __future__ import annotations

from dataclasses import dataclass

from fdfo_fast.world.grammar import ObjectSpec, PromptSpec
from fdfo_fast.world.render import SceneObject, relation_holds


@dataclass(frozen=True)
class FoundObject:
    """An object as seen by a detector (or taken from the renderer's ground truth)."""

    shape: str
    colour: str
    cx: float
    cy: float

    @classmethod
    def from_scene(cls, o: SceneObject) -> FoundObject:
        cx, cy = o.centroid
        return cls(o.shape, o.colour, cx, cy)


def _matches(o: FoundObject, want: ObjectSpec) -> bool:
    return o.shape == want.shape and (want.colour is None or o.colour == want.colour)


def _credit(objs: list[FoundObject], want: ObjectSpec) -> float:
    """1 for an exact match; 1/2 if only the shape or only the colour is present; else 0."""
    if any(_matches(o, want) for o in objs):
        return 1.0
    if want.colour is not None and any(o.shape == want.shape or o.colour == want.colour for o in objs):
        return 0.5
    return 0.0


def check(spec: PromptSpec, objs: list[FoundObject], margin: float) -> tuple[bool, float]:
    """(correct, dense) for one image. `dense` ∈ [0, 1] and equals 1 exactly when `correct`.

    GenEval semantics: named objects must be present (extra objects are allowed), counting needs the exact
    count, position compares centroids along the relation's axis with a margin.
    """
    cat = spec.category
    if cat == "counting":
        want = spec.objects[0]
        n = sum(o.shape == want.shape for o in objs)
        parts = [float(n > 0), max(0.0, 1.0 - abs(n - spec.count) / spec.count)]
    elif cat == "single_object":
        parts = [float(len(objs) > 0), _credit(objs, spec.objects[0])]
    elif cat == "position":
        a, b = spec.objects
        rel = any(
            relation_holds(spec.relation, (oa.cx, oa.cy), (ob.cx, ob.cy), margin)
            for oa in objs
            if _matches(oa, a)
            for ob in objs
            if ob is not oa and _matches(ob, b)
        )
        parts = [_credit(objs, a), _credit(objs, b), float(rel)]
    else:  # two_object, colors, color_attr: every named object present (distinct, since they differ)
        parts = [_credit(objs, o) for o in spec.objects]
    dense = sum(parts) / len(parts)
    return dense == 1.0, dense
