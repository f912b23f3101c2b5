"""Build argparse options from a typed dataclass (help text from field metadata) and read them back."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing

from fdfo_fast.errors import FdfoError


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract: a bad command line is one `error: ...` line (FdfoError, exit 2
    through `errors.cli_entry`) naming the problem and --help, not a usage dump; `--lr -1e-3` is a value (argparse
    takes "-1e-3" for an option because it only knows plain negative numbers)."""

    def error(self, message: str):
        raise FdfoError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        joined, i = [], 0
        while i < len(args):  # "--opt -1e-3" -> "--opt=-1e-3"
            tok = args[i]
            if tok.startswith("--") and "=" not in tok and i + 1 < len(args) and _NEGATIVE_NUMBER.match(args[i + 1]):
                joined.append(f"{tok}={args[i + 1]}")
                i += 2
                continue
            joined.append(tok)
            i += 1
        return super().parse_args(joined, namespace)


def option(default, help: str):
    """A dataclass field that `add_dataclass_args` turns into a `--name` option with this help text."""
    return dataclasses.field(default=default, metadata={"help": help})


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
            kw.update(type=parse_bool, metavar="BOOL")
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
