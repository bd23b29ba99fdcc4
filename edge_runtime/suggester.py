"""The keyboard's suggestion strip: top-3 next words, served during training and model swaps.

Suggestions come from the version's constant-weight `inference.tflite` (a separate interpreter
from the trainable model, so training never blocks typing), through `edge_runtime.suggest.Suggester`,
which keeps the LSTM state between keystrokes: each new piece costs one model step, and the
word search (`fedkb_core.next_words`) branches off that state without disturbing it.

A swap builds the new version's suggester completely *before* taking the lock, then replaces the
reference; a keystroke in flight finishes on the old model and the next one uses the new one, so
the strip never goes blank. It is registered as a `ModelStore` listener, which is what makes the
trainable and the inference model change together.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedkb_core.manifest import Manifest
from edge_runtime.suggest import Suggester

log = logging.getLogger(__name__)


class LiveSuggester:
    """Thread-safe next-word suggestions from whichever model version is current.

    Args:
        model_dir: the version to start with (None: no suggestions until the first swap).
        num_threads: interpreter threads for the inference model.
    """

    def __init__(self, model_dir: Path | None = None, *, num_threads: int = 1):
        self.num_threads = num_threads
        self._lock = threading.Lock()
        self._suggester: Suggester | None = Suggester(model_dir, num_threads=num_threads) if model_dir else None
        self.swaps = 0

    @property
    def version(self) -> int | None:
        current = self._suggester
        return current.version if current is not None else None

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """The top-k next words after `text`; [] while no model is installed."""
        with self._lock:
            if self._suggester is None:
                return []
            return self._suggester.suggest(text, k=k)

    def reset(self) -> None:
        """A new text field: forget the state of what was typed."""
        with self._lock:
            if self._suggester is not None:
                self._suggester.reset()

    def swap(self, model_dir: Path, manifest: Manifest | None = None) -> None:
        """Switch to another version (loaded outside the lock, swapped under it)."""
        fresh = Suggester(Path(model_dir), num_threads=self.num_threads)
        with self._lock:
            self._suggester = fresh
            self.swaps += 1
        log.info("suggestions now from model version %d", fresh.version)
