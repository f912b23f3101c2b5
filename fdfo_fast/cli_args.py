"""Build argparse options from a typed dataclass (help text from field metadata) and read them back."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from fdfo_fast.errors import FdfoError


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` option per field of `cls`, typed from the annotation, defaulting to the field default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        origin = typing.get_origin(typ)
        args = typing.get_args(typ)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
            typ = next(a for a in args if a is not type(None))  # Optional[X] -> X
            origin, args = typing.get_origin(typ), typing.get_args(typ)
        kw: dict = {"default": None, "help": f.metadata.get("help", "")}
        if typ is bool:
            kw.update(type=_parse_bool, metavar="BOOL")
        elif origin is tuple:
            kw.update(type=args[0], nargs="+")
        elif typ in (int, float, str):
            kw["type"] = typ
        else:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None:
            kw["help"] = f"{kw['help']} (default: {default})".strip()
        names = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:  # launchers and DeepSpeed habits spell options with underscores (--ds_config)
            names.append("--" + f.name)
        parser.add_argument(*names, dest=f.name, **kw)


def overrides_from_args(ns: argparse.Namespace, cls) -> dict:
    """The fields the user set on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        val = getattr(ns, f.name, None)
        if val is not None:
            out[f.name] = tuple(val) if isinstance(val, list) else val
    return out


def replace_checked(obj, overrides: dict):
    """dataclasses.replace with a clear error for unknown fields."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise FdfoError(f"unknown option(s) {unknown} for {type(obj).__name__}")
    return dataclasses.replace(obj, **overrides)
