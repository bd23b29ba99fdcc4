"""SIGTERM handled as Ctrl-C, so a command's `finally` blocks run when a supervisor stops it.

Python's default SIGTERM ends the process at once: no `finally`, no `atexit`. A command that owns
children (`fedkb simulate` starts a `fedkb serve` and a pool of device workers) or a worker thread
(`fedkb serve --dev`) would leave them running or half-stopped. kill -9 cannot be caught; the
server's durable state is safe against it, but children started by a killed parent are not ended.
"""

from __future__ import annotations

import signal


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_sigterm_like_ctrl_c() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread (which `fedkb.cli.main`
    turns into exit status 130)."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
