"""Prompt sets for real models: the GenEval-style COCO generator against GenEval's own templates, its fixed split,
named sets and prompt files in the config and the training entry point, and the toy-world guards for sd3 / flux."""

import hashlib
import itertools
import json
import subprocess
import sys

import pytest

from fdfo_fast import coco_prompts
from fdfo_fast.config import PRESETS, make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.prompts import load_eval_items, load_prompt_pool, read_prompt_file
from fdfo_fast.train import main

# -- transcribed from djghosh13/geneval prompts/object_names.txt and prompts/create_prompts.py ----------------------
GENEVAL_CLASSES = [  # object_names.txt, one name per line there
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
GENEVAL_POSITIONS = ["left of", "right of", "above", "below"]
GENEVAL_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def with_article(name: str) -> str:  # GenEval's
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:  # GenEval's
    return f"{name}es" if name[-1] in "s" else f"{name}s"


# Where GenEval's rules give wrong English, the standard plural (and "a pair of" for the plural-only nouns).
PLURAL_FIXES = {
    "persons": "people", "sheeps": "sheep", "knifes": "knives", "benchs": "benches", "sandwichs": "sandwiches",
    "toothbrushs": "toothbrushes", "couchs": "couches", "computer mouses": "computer mice",
    "skises": "pairs of skis", "scissorses": "pairs of scissors",
}  # fmt: skip
PAIR_NOUNS = ("skis", "scissors")


def plural(name: str) -> str:
    p = make_plural(name)
    return PLURAL_FIXES.get(p, p)


def one(name: str, color: str | None = None) -> str:
    """GenEval's noun phrase ({with_article(obj)} / {with_article(color)} {obj}), "a pair of ..." for skis and
    scissors."""
    if name in PAIR_NOUNS:
        return f"a pair of {color + ' ' if color else ''}{name}"
    return with_article(name) if color is None else f"{with_article(color)} {name}"


def geneval_prompts() -> dict[str, set[str]]:
    """Every prompt each of GenEval's generators can draw (its constraints kept), with the fixes above."""
    names = GENEVAL_CLASSES
    colourable = [c for c in names if c != "person"]  # GenEval: no "[COLOR] person" prompts
    pairs = [(a, b) for a in names for b in names if a != b]  # rng.choice(size=2, replace=False)
    return {
        "single_object": {f"a photo of {one(c)}" for c in names},
        "two_object": {f"a photo of {one(a)} and {one(b)}" for a, b in pairs},
        "counting": {f"a photo of {GENEVAL_NUMBERS[n]} {plural(c)}" for c in names for n in range(2, 5)},
        "colors": {f"a photo of {one(c, col)}" for c in colourable for col in GENEVAL_COLORS},
        "position": {f"a photo of {one(a)} {p} {one(b)}" for a, b in pairs for p in GENEVAL_POSITIONS},
        "color_attr": {
            f"a photo of {one(a, ca)} and {one(b, cb)}"
            for a, b in itertools.permutations(colourable, 2)
            for ca, cb in itertools.permutations(GENEVAL_COLORS, 2)
        },
    }


def test_generator_spells_every_prompt_of_genevals_templates_once():
    assert list(coco_prompts.COCO_CLASSES) == GENEVAL_CLASSES and len(GENEVAL_CLASSES) == 80
    assert list(coco_prompts.COLOURS) == GENEVAL_COLORS and list(coco_prompts.CATEGORIES) == GENEVAL_TAGS
    sets = coco_prompts.splits()
    expected = geneval_prompts()
    for cat in GENEVAL_TAGS:
        ours = sets["train"][cat] + sets["test"][cat]
        assert len(set(ours)) == len(ours), cat  # no duplicates
        assert set(ours) == expected[cat], (cat, sorted(set(ours) ^ expected[cat])[:5])
    n, c = 80, 79  # classes; classes that take a colour (not "person")
    sizes = {cat: len(sets["train"][cat]) + len(sets["test"][cat]) for cat in GENEVAL_TAGS}
    assert sizes == {
        "single_object": n, "two_object": n * (n - 1), "counting": 3 * n, "colors": 10 * c,
        "position": 4 * n * (n - 1), "color_attr": c * (c - 1) * 10 * 9,
    }  # fmt: skip


def test_english_forms():
    p = coco_prompts.splits()
    everything = {t for split in p.values() for texts in split.values() for t in texts}
    for text in [
        "a photo of an orange car", "a photo of an umbrella", "a photo of two people", "a photo of three sheep",
        "a photo of four knives", "a photo of two benches", "a photo of three computer mice",
        "a photo of two pairs of skis", "a photo of a pair of scissors", "a photo of a pair of red skis",
        "a photo of a wine glass left of an oven", "a photo of four buses", "a photo of two wine glasses",
    ]:  # fmt: skip
        assert text in everything, text
    for wrong in ["a photo of two persons", "a photo of a skis", "a photo of a red person", "a photo of an tv"]:
        assert wrong not in everything


def test_split_is_fixed_disjoint_and_by_hash():
    sets = coco_prompts.splits()
    for cat in GENEVAL_TAGS:
        train, test = set(sets["train"][cat]), set(sets["test"][cat])
        assert train and test and not train & test
        # the rule, recomputed here: the first 8 bytes of sha1("geneval-coco:" + text) below 2^62 (a quarter)
        by_rule = {t for t in train | test if int.from_bytes(hashlib.sha1(f"geneval-coco:{t}".encode()).digest()[:8],
                                                                   "big") < 2**62}  # fmt: skip
        assert test == by_rule, cat
    # pinned: a change of the rule, the templates or the class list moves these
    assert {cat: len(v) for cat, v in sets["test"].items()} == {
        "single_object": 22, "two_object": 1534, "counting": 57, "colors": 161, "position": 6336,
        "color_attr": 138549,
    }  # fmt: skip
    assert sets["test"]["single_object"][:2] == ("a photo of a tv remote", "a photo of a computer mouse")


def test_named_sets_load_as_pools_and_eval_items():
    pool = load_prompt_pool("geneval-coco:train", world_grammar=False)
    assert list(pool) == GENEVAL_TAGS and pool == coco_prompts.splits()["train"]
    items = load_eval_items("geneval-coco:test", 3, seed=0)
    assert len(items) == 18 and [t for t, _ in items[:3]] == list(coco_prompts.splits()["test"]["single_object"][:3])
    assert len({s for _, s in items}) == 18
    assert load_eval_items("geneval-coco:test", 3, seed=5) == items  # fixed, whatever the run's seed
    with pytest.raises(FdfoError, match="unknown prompt set 'geneval-coco:val'"):
        coco_prompts.prompt_pool("geneval-coco:val")


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("toy-")])
def test_dry_run_of_real_presets_shows_the_coco_prompts(preset, capsys):
    main(["--preset", preset, "--dry-run"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] != "toy"
    assert shown["prompts"] == "geneval-coco:train" and shown["eval_prompts"] == "geneval-coco:test"


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("toy-")])
def test_toy_presets_keep_the_worlds_splits(preset):
    cfg = make_config(preset)
    assert (cfg.run.prompts, cfg.eval.eval_prompts) == ("train", "heldout")


REAL = dict(model="sd3", model_path="someone/model", reward="pickscore:1")


def test_real_models_default_to_the_coco_prompts():
    cfg = make_config(overrides=REAL)
    assert (cfg.run.prompts, cfg.eval.eval_prompts) == ("geneval-coco:train", "geneval-coco:test")
    assert (make_config().run.prompts, make_config().eval.eval_prompts) == ("train", "heldout")


@pytest.mark.parametrize(
    "overrides, msg",
    [
        (dict(reward="alignment:1"), "--reward uses reward term 'alignment', which scores the toy shapes world"),
        (dict(reward="pickscore:1,geneval:0"), "--reward uses reward term 'geneval', which scores the toy shapes"),
        (dict(reward="human:1", human_fraction=0.5, human_auto_label="alignment:1"), "--human-auto-label uses reward "
         "term 'alignment'"),
        (dict(prompts="train"), "--prompts is the toy shapes world's split: --model sd3 needs real prompts"),
        (dict(eval_prompts="heldout"), "--eval-prompts is the toy shapes world's split"),
        (dict(prompts="geneval-coco:val"), "--prompts names an unknown prompt set"),
        (dict(prompts="nope.txt"), "--prompts must be 'train' .* or an existing prompt file"),
    ],
)  # fmt: skip
def test_real_models_refuse_toy_prompts_and_toy_rewards(overrides, msg):
    with pytest.raises(FdfoError, match=msg):
        make_config(overrides={**REAL, **overrides})


def test_toy_model_refuses_the_coco_sets():
    with pytest.raises(FdfoError, match="--prompts is a prompt set for the diffusers models"):
        make_config(overrides=dict(prompts="geneval-coco:train"))
    with pytest.raises(FdfoError, match="--eval-prompts is a prompt set for the diffusers models"):
        make_config(overrides=dict(eval_prompts="geneval-coco:test"))


def test_cli_error_is_one_line_before_any_model_loads():
    """The check runs in make_config, before a weight is read: a hub id that does not exist is never reached."""
    proc = subprocess.run(
        [sys.executable, "-m", "fdfo_fast.train", "--preset", "sd35m-fdfo", "--model-path", "nobody/nothing",
         "--reward", "alignment:1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --reward uses reward term 'alignment', which scores the toy shapes world")
    assert "needs model rewards, e.g. 'pickscore:1'" in line


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\na photo of a cat\n\n  a photo of two dogs  \n")
    assert read_prompt_file(str(text)) == ("a photo of a cat", "a photo of two dogs")
    jsonl = tmp_path / "evaluation_metadata.jsonl"  # GenEval's metadata format: one object per line
    jsonl.write_text(
        '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n\n'
        '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}\n'
    )
    cfg = make_config(overrides={**REAL, "prompts": str(jsonl), "eval_prompts": str(text)})
    assert load_prompt_pool(cfg.run.prompts, world_grammar=False) == {
        "file": ("a photo of a bench", "a photo of two cats")
    }
    assert [p for p, _ in load_eval_items(cfg.eval.eval_prompts, 4, cfg.run.seed)] == [
        "a photo of a cat",
        "a photo of two dogs",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"caption": "x"}\n')
    with pytest.raises(FdfoError, match=r'bad.jsonl, line 2: needs a non-empty string "prompt" field'):
        read_prompt_file(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(FdfoError, match=r"bad.jsonl, line 2: not JSON"):
        read_prompt_file(str(bad))
    with pytest.raises(FdfoError, match="not a shapes-world prompt"):  # the toy model checks files against its grammar
        load_prompt_pool(str(jsonl), world_grammar=True)
