"""Print versions and which backends (CUDA, Triton, C++ extension, optional packages) are available."""

from __future__ import annotations

from fdfo_fast import __version__
from fdfo_fast.backends import table


def main(argv=None) -> None:
    rows = table()
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"fdfo_fast {__version__}")
    for name, ver, status in rows:
        print(f"  {name:<{width}}  {ver:<{vwidth}}  {status}")


if __name__ == "__main__":
    main()
