"""User-facing errors: one clear line that names the problem, never a bare traceback."""

from __future__ import annotations

import functools
import sys


class FdfoError(Exception):
    """A problem with the user's input (config, path, prompt, checkpoint, shape, dtype)."""


def cli_entry(main):
    """Wrap a CLI `main(argv)` so an FdfoError prints `error: ...` and exits 2 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except FdfoError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
