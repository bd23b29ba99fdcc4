"""Creating LiteRT interpreters, without the runtime's start-up notice on stderr.

The first time a process applies LiteRT's default XNNPACK delegate (at the first AllocateTensors),
the C++ runtime writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." straight to file
descriptor 2. TF_CPP_MIN_LOG_LEVEL does not reach that logger (TFLite's minimal logger, whose
severity setter the Python package does not expose), so on a command line it lands between
progress bars and results. Every interpreter is therefore created here, with fd 2 pointed at a
temporary file while it is built and first allocated; afterwards everything written meanwhile
except that one line goes to the real stderr, so warnings and errors still show (a process
killed inside that window would lose what it wrote there).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path

NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_stderr_lock = threading.Lock()  # two threads swapping fd 2 at once would lose it for good


def create_interpreter(model_path: Path | str, *, num_threads: int):
    """A LiteRT `Interpreter` over `model_path`, its tensors allocated.

    Raises:
        ValueError: LiteRT's error for a missing or corrupt model file.
    """
    from ai_edge_litert.interpreter import Interpreter

    with without_notice():
        interpreter = Interpreter(model_path=str(model_path), num_threads=int(num_threads))
        interpreter.allocate_tensors()  # applies the delegate now, inside the filter
    return interpreter


@contextlib.contextmanager
def without_notice():
    """Within the block, anything written to fd 2 is held back, then re-emitted without NOTICE."""
    with _stderr_lock:
        _flush_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to filter
            yield
            return
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                kept = b"".join(line for line in held.read().splitlines(keepends=True)
                                if line.rstrip(b"\r\n") != NOTICE)
                while kept:
                    kept = kept[os.write(2, kept):]


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
