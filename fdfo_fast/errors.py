"""User-facing errors: one clear line that names the problem, never a bare traceback."""

from __future__ import annotations

import functools
import signal
import sys
import threading


class FdfoError(Exception):
    """A problem with the user's input (config, path, prompt, checkpoint, shape, dtype)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds like Ctrl-C: atomic writes remove their temp files."""


def _stop_on_sigterm():
    """SIGTERM -> Terminated in the main thread (the previous handler is returned, to restore); None elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated

    return signal.signal(signal.SIGTERM, handler)


def cli_entry(main):
    """Wrap a CLI `main(argv)` so an FdfoError prints `error: ...` and exits 2 instead of a traceback; Ctrl-C exits
    130 and SIGTERM 143, both after unwinding (no partial files)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        previous = _stop_on_sigterm()
        try:
            return main(argv)
        except FdfoError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except Terminated:
            print("terminated (SIGTERM): the last complete checkpoint is intact", file=sys.stderr)
            raise SystemExit(143) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
