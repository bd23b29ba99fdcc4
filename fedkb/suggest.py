"""Next-word suggestions from a model folder's inference.tflite, in LiteRT (no TensorFlow).

The recurrent state is kept between keystrokes: `feed` costs one model step per new piece, and
`suggest` branches a small beam search off the current state without disturbing it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from datasets.tokenizer import BOS_ID, load_tokenizer, word_start_table
from fedkb.manifest import INFERENCE_FILE, TOKENIZER_FILE, load_manifest
from fedkb.next_words import top_words


class InferenceStepper:
    """One LiteRT interpreter running the `step(token, h, c)` signature."""

    def __init__(self, model_path: Path, *, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        self._step = self._interpreter.get_signature_runner("step")
        self._lock = threading.Lock()  # a signature runner is not safe to call concurrently
        self.units = int(self._step.get_input_details()["h"]["shape"][1])

    def zero_state(self):
        return np.zeros((1, self.units), np.float32), np.zeros((1, self.units), np.float32)

    def __call__(self, token: int, state):
        h, c = state
        with self._lock:
            out = self._step(token=np.array([token], np.int32), h=h, c=c)
        return out["logits"][0].copy(), (out["h"].copy(), out["c"].copy())


class Suggester:
    """Top-k next words for typed text, keeping the state of what was already typed."""

    def __init__(self, model_dir: Path, *, num_threads: int = 1):
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        self.version = manifest.version
        self.tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE)
        self.word_start = word_start_table(self.tokenizer)
        self.stepper = InferenceStepper(model_dir / INFERENCE_FILE, num_threads=num_threads)
        self.reset()

    def reset(self) -> None:
        """Start a new utterance (a new text field, or after sending a message)."""
        self._fed: list[int] = []
        self._logits, self._state = self.stepper(BOS_ID, self.stepper.zero_state())

    def feed_text(self, text: str) -> None:
        """Bring the state up to `text`: only pieces not yet fed cost a model step."""
        ids = self.tokenizer.encode(text)
        common = 0
        while common < min(len(ids), len(self._fed)) and ids[common] == self._fed[common]:
            common += 1
        if common < len(self._fed):  # the user edited earlier text: replay from the start
            self.reset()
            common = 0
        for token in ids[common:]:
            self._logits, self._state = self.stepper(token, self._state)
            self._fed.append(token)

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """The k most likely next words after `text` (complete words)."""
        self.feed_text(text)
        candidates = top_words(self.stepper, self._state, self._logits, self.word_start, k=k)
        return [self.tokenizer.decode(list(c.pieces)).strip() for c in candidates]
