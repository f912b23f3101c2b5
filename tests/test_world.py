"""Shapes world: grammar, splits, renderer determinism, and validation of the programmatic alignment scorer."""

import numpy as np
import pytest
import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.alignment import AlignmentReward, detect
from fdfo_fast.world.evaluate import FoundObject, check
from fdfo_fast.world.grammar import CATEGORIES, eval_prompts, parse_prompt, prompt_sets, vocabulary
from fdfo_fast.world.render import SceneObject, relation_margin, render, render_batch, sample_scene


def test_splits_are_disjoint_fixed_and_cover_every_category():
    sets = prompt_sets()
    for cat in CATEGORIES:
        train = {p.text() for p in sets["train"][cat]}
        held = {p.text() for p in sets["heldout"][cat]}
        assert train and held and not train & held
    assert parse_prompt("a red circle left of a blue square").relation == "left of"
    # the split is a pure function of the prompt text (sha1), pinned here so it can never drift
    assert [p.text() for p in sets["heldout"]["single_object"]] == ["a triangle"]
    assert [p.text() for p in sets["heldout"]["counting"]] == ["four triangles", "two circles"]
    assert sum(len(v) for v in sets["heldout"].values()) == 249


def test_every_prompt_round_trips_through_the_parser():
    for split in prompt_sets().values():
        for specs in split.values():
            for spec in specs:
                assert parse_prompt(spec.text()) == spec
                assert set(spec.text().split()) <= set(vocabulary())


@pytest.mark.parametrize("bad", ["a purple circle", "", "a circle left of", "five squares"])
def test_bad_prompt_is_one_clear_error(bad):
    with pytest.raises(FdfoError, match="not a shapes-world prompt"):
        parse_prompt(bad)


@pytest.mark.parametrize("size", [16, 32])
def test_renderer_is_deterministic_and_in_range(size):
    items = eval_prompts(3)
    specs, seeds = [p for p, _ in items], [s for _, s in items]
    a, b = render_batch(specs, seeds, size), render_batch(specs, seeds, size)
    assert a.shape == (len(items), 3, size, size) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    c = render_batch(specs, [s + 1 for s in seeds], size)
    assert not torch.equal(a, c)


def _ground_truth_objects(spec, seed, size):
    objs = sample_scene(spec, np.random.default_rng(seed), size)
    return objs, [FoundObject.from_scene(o) for o in objs]


@pytest.mark.parametrize("size", [16, 32])
def test_scenes_satisfy_their_prompt_symbolically(size):
    for cat in CATEGORIES:
        for i, spec in enumerate(prompt_sets()["train"][cat][:40]):
            _, found = _ground_truth_objects(spec, i, size)
            ok, dense = check(spec, found, relation_margin(size))
            assert ok and dense == 1.0, (spec.text(), found)


@pytest.mark.parametrize("size", [16, 32])
def test_alignment_scorer_validated_on_renderer_ground_truth(size):
    """≥ 98 % correct on rendered truth; ≤ 5 % on mismatched prompts (prompts the scene does NOT satisfy)."""
    rng = np.random.default_rng(123)
    sets = prompt_sets()
    all_specs = [s for split in sets.values() for specs in split.values() for s in specs]
    match_hits, mismatch_hits, n_per_cat = [], [], 40
    reward = AlignmentReward()
    for cat in CATEGORIES:
        pool = sets["train"][cat] + sets["heldout"][cat]
        for _ in range(n_per_cat):
            spec = pool[rng.integers(len(pool))]
            seed = int(rng.integers(2**31))
            objs, found = _ground_truth_objects(spec, seed, size)
            image = torch.from_numpy(render(objs, size))[None]
            match_hits.append(reward(image, [spec.text()])["geneval"].item())
            # a mismatched prompt of the same category that is false for this scene by ground truth
            cands = [
                s for s in (sets["train"][cat] + sets["heldout"][cat]) if not check(s, found, relation_margin(size))[0]
            ]
            if not cands:  # e.g. a counting scene that every counting prompt... take any category
                cands = [s for s in all_specs if not check(s, found, relation_margin(size))[0]]
            wrong = cands[rng.integers(len(cands))]
            mismatch_hits.append(reward(image, [wrong.text()])["geneval"].item())
    match_rate, mismatch_rate = np.mean(match_hits), np.mean(mismatch_hits)
    assert match_rate >= 0.98, f"scorer accuracy on ground truth {match_rate:.3f}"
    assert mismatch_rate <= 0.05, f"scorer false-positive rate on mismatched prompts {mismatch_rate:.3f}"


def test_detector_recovers_objects_exactly():
    spec = parse_prompt("a red circle left of a blue square")
    objs = sample_scene(spec, np.random.default_rng(0), 16)
    found = detect((render(objs, 16).transpose(1, 2, 0) + 1) / 2)
    assert sorted((f.shape, f.colour) for f in found) == sorted((o.shape, o.colour) for o in objs)


def test_dense_credit_is_partial_and_one_only_when_correct():
    spec = parse_prompt("a red circle and a blue square")
    half = [FoundObject("circle", "red", 3, 3), FoundObject("square", "green", 12, 12)]
    ok, dense = check(spec, half, 2.0)
    assert not ok and dense == pytest.approx(0.75)
    ok, dense = check(parse_prompt("three circles"), [FoundObject("circle", "red", 3, 3)] * 2, 2.0)
    assert not ok and 0 < dense < 1
    ok, dense = check(parse_prompt("a circle"), [], 2.0)
    assert not ok and dense == 0.0


def _score(objs, size, prompt):
    """(geneval, dense) of the alignment reward on the rendered scene, end to end (render -> detect -> check)."""
    out = AlignmentReward()(torch.from_numpy(render(objs, size))[None], [prompt])
    return bool(out["geneval"].item()), out["alignment"].item()


# The position rule (evaluate.check, render.relation_holds): "A left of B" holds when B's centroid is right of A's by
# MORE than the margin, 1/8 of the image: 2 px at 16 px, 4 px at 32 px; likewise right of / above / below on their
# own axis. So at offsets margin − 1, margin, margin + 1 the relation is false, false (strict), true.
POSITION_CASES = {16: {1: False, 2: False, 3: True}, 32: {3: False, 4: False, 5: True}}


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_position_needs_an_offset_of_more_than_the_margin(size, axis):
    """Hand-built scenes: a red and a blue square of side k (k = 4 at 16 px, 8 at 32 px; centroid = corner + k/2)
    whose centroids differ by exactly 1, 2, 3 px (16 px) or 3, 4, 5 px (32 px) along the relation's axis and by k
    (touching, not overlapping) along the other, which the scorer's rule ignores."""
    k = size // 4
    red = SceneObject("square", "red", 4, 4, k)
    near, far = ("left of", "right of") if axis == "horizontal" else ("above", "below")
    for offset, holds in POSITION_CASES[size].items():
        # horizontal: blue below red and `offset` px to the right; vertical: blue beside red and `offset` px lower
        x, y = (4 + offset, 4 + k) if axis == "horizontal" else (4 + k, 4 + offset)
        blue = SceneObject("square", "blue", x, y, k)
        prompts = {
            f"a red square {near} a blue square": holds,
            f"a blue square {far} a red square": holds,
            f"a red square {far} a blue square": False,
            f"a blue square {near} a red square": False,
        }
        objs = [red, blue]
        assert red.centroid == (4 + k / 2, 4 + k / 2)
        d = np.subtract(blue.centroid, red.centroid)
        assert tuple(d) == ((offset, k) if axis == "horizontal" else (k, offset))
        found = sorted(detect((render(objs, size).transpose(1, 2, 0) + 1) / 2), key=lambda f: f.colour)
        assert [(f.cx, f.cy) for f in found] == [blue.centroid, red.centroid]  # the detector sees these centroids
        for prompt, want in prompts.items():
            ok, dense = check(parse_prompt(prompt), [FoundObject.from_scene(o) for o in objs], size / 8)
            assert ok is want, (size, offset, prompt)
            assert _score(objs, size, prompt) == (want, 1.0 if want else pytest.approx(2 / 3)), (size, offset, prompt)


def test_counting_needs_the_exact_count():
    """GenEval counting: exactly N objects of the named class (its `exclude` rule rejects N + 1 or more); objects of
    other classes do not count against it."""
    squares = [SceneObject("square", c, x, 1, 4) for c, x in (("red", 1), ("green", 6), ("blue", 11))]
    extra = [SceneObject("square", "yellow", 1, 10, 4)]
    circle = [SceneObject("circle", "white", 10, 10, 5)]
    cases = [
        (squares[:1], "two squares", False),
        (squares[:2], "two squares", True),
        (squares[:2] + circle, "two squares", True),
        (squares, "two squares", False),  # 3 squares are not "two squares"
        (squares + extra, "two squares", False),
        (squares, "three squares", True),
        (squares + extra, "three squares", False),
        (squares + extra, "four squares", True),
        (squares, "four squares", False),
    ]
    for objs, prompt, want in cases:
        ok, dense = check(parse_prompt(prompt), [FoundObject.from_scene(o) for o in objs], 2.0)
        assert ok is want and (dense == 1.0) is want, (len(objs), prompt)
        assert _score(objs, 16, prompt)[0] is want, (len(objs), prompt)
