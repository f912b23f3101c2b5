"""Reward plugins: reward terms from the user's own code, weighted in `--reward` like the built-in ones.

A plugin is a factory that returns one `fdfo_fast.rewards.Reward` (or a list of them); each declares its term names
(`names`) and returns a dict of float [B] tensors for a batch of images and prompts. It is named one of two ways:

- `--reward-plugin module:factory` or `--reward-plugin path/to/file.py:factory` (several, comma-separated), options
  after `;` handed to the factory as keywords: `'my_rewards:make;threshold=0.5;name=ocr'` calls
  `make(threshold=0.5, name="ocr")` (each value read as JSON when it parses, else kept as text);
- an installed package's entry point in the group `fdfo_fast.rewards` (`[project.entry-points."fdfo_fast.rewards"]
  ocr = "my_pkg.rewards:make_ocr"`): loaded when `--reward` names the entry point's term and nothing else does.

A factory that takes `device` / `dtype` parameters receives the run's reward device and `--reward-dtype`. The option
string is part of the run's config (config.json, checkpoint.pt), so `--resume` imports the same plugins again.

Every score a plugin returns is checked (`PluginReward`): exactly its declared terms, each a floating-point tensor of
shape [B] with finite values; anything else is one FdfoError naming the plugin and the term. A plugin's reward may set
`wants_uint8` / `wants_seeds` / `wants_metadata` (`fdfo_fast.rewards.base.Reward`) to receive the uint8 images, the
samples' seeds, or each prompt's metadata (the fields of a JSONL prompt file's record besides "prompt").
`examples/reward_plugin.py` is a documented example.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.base import Reward

ENTRY_POINT_GROUP = "fdfo_fast.rewards"


def parse_plugin_specs(spec: str) -> list[tuple[str, dict]]:
    """'mod:make;a=1,path/x.py:f' -> [('mod:make', {'a': 1}), ('path/x.py:f', {})]."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        target, *opts = (p.strip() for p in entry.split(";"))
        module, sep, attr = target.rpartition(":")
        if not sep or not module or not attr.isidentifier():
            raise FdfoError(f"--reward-plugin {entry!r}: expected module:factory or path/to/file.py:factory")
        options = {}
        for opt in filter(None, opts):
            key, eq, value = opt.partition("=")
            if not eq or not key.strip().isidentifier():
                raise FdfoError(f"--reward-plugin {target}: option {opt!r} is not key=value")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
        out.append((target, options))
    return out


def _import_factory(target: str):
    """The object `module:factory` names; `module` may be a path to a .py file (imported under its stem)."""
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise FdfoError(f"reward plugin {target}: no file {path}")
            name = f"fdfo_reward_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except FdfoError:
        raise
    except Exception as err:  # ImportError, SyntaxError, whatever the plugin's top level raises: one line
        raise FdfoError(f"reward plugin {target}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise FdfoError(f"reward plugin {target}: {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise FdfoError(f"reward plugin {target}: {attr} is not callable")
    return factory


def _build(target: str, factory, options: dict, device, dtype) -> list[PluginReward]:
    """Call the factory (device / dtype where it takes them) and wrap what it returns."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in params and k not in options}
    try:
        made = factory(**options, **extra)
    except FdfoError:
        raise
    except Exception as err:
        raise FdfoError(f"reward plugin {target}: the factory raised {type(err).__name__}: {err}") from None
    rewards = list(made) if isinstance(made, (list, tuple)) else [made]
    for r in rewards:
        names = getattr(r, "names", None)
        if not isinstance(r, Reward) or not callable(r):
            raise FdfoError(
                f"reward plugin {target} returned {type(r).__name__}; expected an fdfo_fast.rewards.Reward "
                "(or a list of them)"
            )
        if not names or not all(isinstance(n, str) and n and n != "reward" for n in names):
            raise FdfoError(f"reward plugin {target}: `names` must list its term names (not 'reward'), got {names!r}")
    return [PluginReward(target, r) for r in rewards]


class PluginReward(Reward):
    """A plugin's reward behind the checks the trainer relies on: its declared terms, float [B], all finite."""

    def __init__(self, target: str, inner: Reward):
        self.target, self.inner = target, inner
        self.names = tuple(inner.names)
        self.wants_uint8 = bool(getattr(inner, "wants_uint8", False))
        self.wants_seeds = bool(getattr(inner, "wants_seeds", False))
        self.wants_metadata = bool(getattr(inner, "wants_metadata", False))
        # a plugin whose scores depend on which rows share a call says so (Reward.score_block; a Reward subclass
        # inherits 1, or its `micro_batch`)
        self._score_block = getattr(inner, "score_block", 1)

    @property
    def score_block(self) -> int | None:
        return self._score_block

    def begin_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "begin_epoch"):
            self.inner.begin_epoch(epoch)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()

    def __call__(self, images: torch.Tensor, prompts: list[str], **extras) -> dict[str, torch.Tensor]:
        self.check_batch(images, prompts)
        try:
            scores = self.inner(images, prompts, **extras)
        except FdfoError:
            raise
        except Exception as err:  # the plugin's own bug: named, without our traceback around it
            raise FdfoError(f"reward plugin {self.target} raised {type(err).__name__}: {err}") from err
        n = len(images)
        if not isinstance(scores, dict) or set(scores) != set(self.names):
            got = sorted(scores) if isinstance(scores, dict) else type(scores).__name__
            raise FdfoError(f"reward plugin {self.target} returned {got}; it declares the terms {list(self.names)}")
        out = {}
        for name, value in scores.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,) or not value.is_floating_point():
                what = (
                    f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                    if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise FdfoError(
                    f"reward plugin {self.target}: term {name!r} returned {what}; "
                    f"expected a float tensor of shape ({n},)"
                )
            value = value.detach().to("cpu", torch.float32)
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            if bad:
                raise FdfoError(
                    f"reward plugin {self.target}: term {name!r} returned non-finite values for rows {bad[:8]} "
                    f"(e.g. {float(value[bad[0]])})"
                )
            out[name] = value
        return out


def entry_point_factories() -> dict[str, object]:
    """Installed plugins: entry-point name -> its (not yet loaded) entry point, group `fdfo_fast.rewards`."""
    return {ep.name: ep for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_plugins(
    spec: str, wanted_terms: list[str] = (), known: set[str] = frozenset(), device="cpu", dtype=None
) -> list[PluginReward]:
    """The rewards of `--reward-plugin` and of the installed entry points that `wanted_terms` name and neither the
    built-ins (`known`) nor the option's plugins provide. A term two plugins (or a plugin and a built-in) both
    define is an error: weights would be ambiguous."""
    rewards: list[PluginReward] = []
    for target, options in parse_plugin_specs(spec):
        rewards += _build(target, _import_factory(target), options, device, dtype)
    provided = {n for r in rewards for n in r.names}
    installed = entry_point_factories()
    for term in wanted_terms:
        if term in known or term in provided or term not in installed:
            continue
        ep = installed[term]
        try:
            factory = ep.load()
        except Exception as err:
            raise FdfoError(f"reward plugin {ep.value} (entry point {term!r}): cannot load: {err}") from None
        rewards += _build(f"{ep.value} (entry point {term!r})", factory, {}, device, dtype)
        provided = {n for r in rewards for n in r.names}
    seen: dict[str, str] = {}
    for r in rewards:
        for name in r.names:
            if name in known:
                raise FdfoError(f"reward plugin {r.target}: term {name!r} is a built-in term; give it another name")
            if name in seen:
                raise FdfoError(f"reward plugins {seen[name]} and {r.target} both define the term {name!r}")
            seen[name] = r.target
    return rewards
