"""Print versions and which backends (CUDA, Triton, C++ extension, optional packages) are available; write out the
DeepSpeed configs the package ships.

    fdfo-info                          # versions, backends, the C++ extension (sources found? built? can build?)
    fdfo-info --write-ds-configs .     # ./ds_z3.json (ZeRO-3 + bf16) and ./ds_z2.json (ZeRO-2), for
                                       # deepspeed fdfo_fast/train.py --ds_config ds_z3.json ...

A checkout has these configs at its top level; an installed wheel carries them as fdfo_fast/assets/ds_z*.json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from fdfo_fast import __version__
from fdfo_fast.backends import table
from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, overrides_from_args, replace_checked
from fdfo_fast.errors import FdfoError, cli_entry

# The checkout's top-level ds_z3.json / ds_z2.json are the same files (tests/test_packaging.py checks it).
DS_CONFIG_DIR = Path(__file__).resolve().parent / "assets"
DS_CONFIGS = ("ds_z3.json", "ds_z2.json")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class InfoConfig:
    write_ds_configs: str = _f(
        "", "write the shipped DeepSpeed configs ds_z3.json and ds_z2.json into this folder (created if needed)"
    )
    force: bool = _f(False, "with --write-ds-configs: overwrite files of those names that differ from the shipped ones")


def write_ds_configs(folder: str | Path, force: bool = False) -> list[Path]:
    """Copy the shipped DeepSpeed configs into `folder`; the paths written. A file of the same name that differs
    is kept (FdfoError) unless `force`: it may be the user's edited config."""
    from fdfo_fast.checkpoint import atomic_write_text

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise FdfoError(f"--write-ds-configs {folder}: exists and is not a folder")
    shipped = {name: (DS_CONFIG_DIR / name).read_text(encoding="utf-8") for name in DS_CONFIGS}
    differing = [
        str(out / name)
        for name, text in shipped.items()
        if (out / name).exists() and (out / name).read_bytes() != text.encode("utf-8")
    ]
    if differing and not force:
        raise FdfoError(
            f"--write-ds-configs: {', '.join(differing)} already exist and differ from the shipped configs "
            "(--force true overwrites them)"
        )
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in shipped.items():
            atomic_write_text(out / name, text)
            written.append(out / name)
    except OSError as e:
        raise FdfoError(f"--write-ds-configs {folder}: cannot write there ({e.strerror or e})") from None
    return written


def print_table() -> None:
    rows = table()
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"fdfo_fast {__version__}")
    for name, ver, status in rows:
        print(f"  {name:<{width}}  {ver:<{vwidth}}  {status}")


@cli_entry
def main(argv=None) -> None:
    parser = ArgumentParser(prog="fdfo-info", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, InfoConfig)
    cfg = replace_checked(InfoConfig(), overrides_from_args(parser.parse_args(argv), InfoConfig))
    if cfg.write_ds_configs:
        for path in write_ds_configs(cfg.write_ds_configs, cfg.force):
            print(f"wrote {path}")
        return
    if cfg.force:
        raise FdfoError("--force applies to --write-ds-configs")
    print_table()


if __name__ == "__main__":
    main()
