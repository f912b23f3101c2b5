"""Reward plugins (--reward-plugin, entry points) and prompt metadata: load, score, resume, every error one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo_fast.checkpoint import read_checkpoint
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.prompts import prompt_metadata, read_prompt_records
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards.plugins import load_plugins
from fdfo_fast.train import train
from fdfo_fast.world.grammar import parse_prompt
from fdfo_fast.world.render import render_batch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = f"{REPO / 'examples' / 'reward_plugin.py'}:make_colour_coverage"
TINY = dict(num_steps=3, pairs_per_epoch=2, eval_per_category=1, eval_num_steps=2, progress=False, log_with="none")


def _plugin_file(tmp_path, body: str, name: str = "my_reward.py") -> str:
    path = tmp_path / name
    path.write_text("import torch\nfrom fdfo_fast.rewards import Reward\n\n" + body)
    return str(path)


def test_geneval_metadata_has_genevals_own_form():
    # GenEval's prompts/evaluation_metadata.jsonl: {"tag": "position", "include": [{"class": "couch", "count": 1},
    # {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a cat left of a couch"}
    assert parse_prompt("a blue triangle left of a white square").geneval_metadata() == {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1, "color": "white"},
            {"class": "triangle", "count": 1, "color": "blue", "position": ["left of", 0]},
        ],
    }
    assert parse_prompt("three triangles").geneval_metadata() == {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3}],
    }
    assert parse_prompt("a blue square and a white circle").geneval_metadata()["include"] == [
        {"class": "square", "count": 1, "color": "blue"},
        {"class": "circle", "count": 1, "color": "white"},
    ]


def test_jsonl_prompt_fields_reach_the_reward_as_metadata(tmp_path):
    prompts = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "a red circle", "difficulty": 2, "tag": "mine"},
        {"prompt": "two squares", "source": "x"},
        {"prompt": "a red circle", "difficulty": 2, "tag": "mine"},  # the same prompt again, same fields: fine
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_prompt_records(str(prompts))[1] == ("two squares", {"source": "x"})
    table = prompt_metadata(str(prompts), world_grammar=True)
    # the file's fields over the grammar's record (its own "tag" wins)
    assert table["a red circle"] == {"tag": "mine", "include": [{"class": "circle", "count": 1, "color": "red"}],
                                     "difficulty": 2}  # fmt: skip
    assert prompt_metadata(str(prompts), world_grammar=False)["two squares"] == {"source": "x"}
    lines.append({"prompt": "two squares", "source": "y"})
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(FdfoError, match=r"line 4: 'two squares' repeats line 2 with other fields"):
        read_prompt_records(str(prompts))

    seen = _plugin_file(
        tmp_path,
        "class Seen(Reward):\n    names = ('seen',)\n    wants_metadata = True\n    wants_seeds = True\n"
        "    log = []\n"
        "    def __call__(self, images, prompts, metadata=None, seeds=None):\n"
        "        Seen.log.append((list(prompts), metadata, seeds))\n"
        "        return {'seen': torch.zeros(len(images))}\n"
        "def make():\n    return Seen()\n",
        "seen_reward.py",
    )
    (plugin,) = load_plugins(f"{seen}:make")
    reward = CompositeReward("seen:1", models=[plugin])
    reward.prompt_metadata = {"a red circle": {"k": 1}}
    reward(torch.zeros(2, 3, 8, 8), ["a red circle", "a blue circle"], seeds=[5, 6])
    assert plugin.inner.log[-1] == (["a red circle", "a blue circle"], [{"k": 1}, {}], [5, 6])


def test_the_example_plugin_scores_the_worlds_renders_by_the_requested_colour():
    (plugin,) = load_plugins(EXAMPLE)
    assert plugin.names == ("colour_coverage",)
    specs = [parse_prompt(p) for p in ("a red circle", "a blue square", "two triangles")]
    images = render_batch(specs, [1, 2, 3], 32)  # the world's own renders of the prompts
    reward = CompositeReward("colour_coverage:1", models=[plugin])
    reward.prompt_metadata = {s.text(): s.geneval_metadata() for s in specs}
    got = reward(images, [s.text() for s in specs])["colour_coverage"]
    assert got.tolist() == [1.0, 1.0, 1.0]  # every foreground pixel has the asked colour; no colour asked: 1
    swapped = reward(images, ["a blue circle", "a red square", "two triangles"])  # no metadata for these: 1
    assert swapped["colour_coverage"].tolist() == [1.0, 1.0, 1.0]
    reward.prompt_metadata.update({"a blue circle": parse_prompt("a blue circle").geneval_metadata()})
    wrong = reward(images[:1], ["a blue circle"])["colour_coverage"]  # a red render asked to be blue
    assert wrong.tolist() == [0.0]


RETURNS_R = "def make():\n    return R()\n"
CANNOT_LOAD = [
    ("import no_such_module_xyz\n", ":make", "cannot import .*ModuleNotFoundError: No module named 'no_such_mod"),
    ("def make(:\n", ":make", "cannot import .*SyntaxError"),
    ("x = 1\n", ":make", "has no attribute 'make'"),
    ("make = 3\n", ":make", "make is not callable"),
    ("def make():\n    raise RuntimeError('no GPU')\n", ":make", "the factory raised RuntimeError: no GPU"),
    ("def make():\n    return lambda i, p: {}\n", ":make", "returned function; expected an fdfo_fast.rewards.Reward"),
    ("class R(Reward):\n    names = ()\n" + RETURNS_R, ":make", "`names` must list its term names"),
    ("class R(Reward):\n    names = ('quality',)\n" + RETURNS_R, ":make", "'quality' is a built-in term"),
    ("def make():\n    return 1\n", ":make;threshold", "option 'threshold' is not key=value"),
]


@pytest.mark.parametrize("body, spec_tail, message", CANNOT_LOAD)
def test_a_plugin_that_cannot_load_is_one_clear_error(tmp_path, body, spec_tail, message):
    path = _plugin_file(tmp_path, body)
    with pytest.raises(FdfoError, match=message):
        load_plugins(path + spec_tail, known={"quality"})


@pytest.mark.parametrize(
    "returned, message",
    [
        ("[0.0] * len(images)", r"returned list; expected a float tensor of shape \(3,\)"),
        ("torch.zeros(len(images), 1)", r"returned a torch.float32 tensor of shape \(3, 1\)"),
        ("torch.zeros(len(images), dtype=torch.int64)", r"returned a torch.int64 tensor of shape \(3,\)"),
        ("torch.tensor([0.0, float('nan'), 1.0])", r"returned non-finite values for rows \[1\] \(e.g. nan\)"),
        ("torch.tensor([float('inf'), 0.0, 1.0])", r"returned non-finite values for rows \[0\] \(e.g. inf\)"),
    ],
)
def test_a_plugin_returning_a_bad_score_is_one_clear_error(tmp_path, returned, message):
    path = _plugin_file(
        tmp_path,
        f"class R(Reward):\n    names = ('mine',)\n    def __call__(self, images, prompts):\n"
        f"        return {{'mine': {returned}}}\ndef make():\n    return R()\n",
    )
    (plugin,) = load_plugins(f"{path}:make")
    with pytest.raises(FdfoError, match=f"reward plugin .*my_reward.py:make: term 'mine' {message}"):
        CompositeReward("mine:1", models=[plugin])(torch.zeros(3, 3, 8, 8), ["a", "b", "c"])
    wrong_terms = _plugin_file(
        tmp_path,
        "class R(Reward):\n    names = ('mine',)\n    def __call__(self, images, prompts):\n"
        "        return {'other': torch.zeros(len(images))}\ndef make():\n    return R()\n",
        "wrong_terms.py",
    )
    (plugin,) = load_plugins(f"{wrong_terms}:make")
    with pytest.raises(FdfoError, match=r"returned \['other'\]; it declares the terms \['mine'\]"):
        plugin(torch.zeros(1, 3, 8, 8), ["a"])


def test_options_device_and_dtype_reach_the_factory_and_two_plugins_cannot_share_a_term(tmp_path):
    path = _plugin_file(
        tmp_path,
        "class R(Reward):\n    def __init__(self, **kw):\n        self.kw = kw\n        self.names = (kw['name'],)\n"
        "def make(name, scale=1.0, device=None, dtype=None):\n"
        "    return R(name=name, scale=scale, device=device, dtype=dtype)\n",
    )
    (plugin,) = load_plugins(f"{path}:make;name=ocr;scale=0.5", device="cpu", dtype=torch.bfloat16)
    assert plugin.inner.kw == {"name": "ocr", "scale": 0.5, "device": "cpu", "dtype": torch.bfloat16}
    with pytest.raises(FdfoError, match="both define the term 'ocr'"):
        load_plugins(f"{path}:make;name=ocr,{path}:make;name=ocr")


def test_an_installed_entry_point_plugin_is_found_by_its_term_name(tmp_path):
    site = tmp_path / "site"
    (site / "fake_plugin_pkg").mkdir(parents=True)
    (site / "fake_plugin_pkg" / "__init__.py").write_text(
        "import torch\nfrom fdfo_fast.rewards import Reward\n"
        "class Bright(Reward):\n    names = ('brightness',)\n"
        "    def __call__(self, images, prompts):\n        return {'brightness': images.float().mean((1, 2, 3))}\n"
        "def make():\n    return Bright()\n"
    )
    dist = site / "fake_plugin_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fdfo_fast.rewards]\nbrightness = fake_plugin_pkg:make\n")
    code = (
        "import torch; from fdfo_fast.builder import load_reward_plugins; from fdfo_fast.config import RewardConfig\n"
        "(p,) = load_reward_plugins(RewardConfig(reward='brightness:1'), [], 'cpu')\n"
        "print(p.target, float(p(torch.ones(2, 3, 4, 4), ['a', 'b'])['brightness'][0]))\n"
    )
    env = {"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "fake_plugin_pkg:make (entry point 'brightness') 1.0"


def test_a_plugin_trains_is_recorded_and_resume_reloads_it(tmp_path):
    out = tmp_path / "run"
    opts = dict(out=str(out), reward="alignment:1,colour_coverage:0.5", reward_plugin=EXAMPLE, eval_every=0, **TINY)
    train(make_config("toy-fdfo", overrides=dict(epochs=2, **opts)))
    assert json.loads((out / "config.json").read_text())["reward_plugin"] == EXAMPLE
    assert read_checkpoint(out / "checkpoint.pt")["config"]["reward_plugin"] == EXAMPLE
    # --resume with nothing but the folder: the plugin comes back from the saved config
    proc = subprocess.run(
        [sys.executable, "-m", "fdfo_fast.train", "--resume", "--out", str(out), "--epochs", "3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["epoch"] for r in train_records] == [1, 2, 3]
    # The composite weighs the plugin's term like a built-in one: the logged mean of the float32 row sums
    # a_i + 0.5·c_i equals mean(a) + 0.5·mean(c) up to float32 rounding: one rounding per row sum and, for each of
    # the three means over the n = 4 rows, at most n − 1 additions and the division, all of values ≤ 1.5 (both terms
    # lie in [0, 1]): (1 + 3·n) · 2^-24 · 1.5.
    bound = (1 + 3 * 4) * 2**-24 * 1.5
    for r in train_records:
        want = r["reward/alignment"] + 0.5 * r["reward/colour_coverage"]
        assert abs(r["reward/reward"] - want) <= bound, r
    # the plugin file gone: one error line, and the run's files untouched
    stale = tmp_path / "stale_plugin.py"
    stale.write_text((REPO / "examples" / "reward_plugin.py").read_text())
    out2 = tmp_path / "run2"
    opts.update(out=str(out2), reward_plugin=f"{stale}:make_colour_coverage")
    train(make_config("toy-fdfo", overrides=dict(epochs=1, **opts)))
    before = {p.name: p.read_bytes() for p in out2.iterdir() if p.is_file()}
    stale.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "fdfo_fast.train", "--resume", "--out", str(out2), "--epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: reward plugin {stale}:make_colour_coverage: no file {stale}"
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out2.iterdir() if p.is_file()} == before
