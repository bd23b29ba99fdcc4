"""Next-word suggestions from a model folder's inference.tflite, in LiteRT (no TensorFlow).

The recurrent state is kept between keystrokes: `feed` costs one model step per new piece, and
`suggest` branches a small beam search off the current state without disturbing it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from datasets.tokenizer import BOS_ID, load_tokenizer, word_start_table
from edge_runtime.litert_interpreter import create_interpreter
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import INFERENCE_FILE, TOKENIZER_FILE, load_manifest
from fedkb_core.next_words import top_words


class InferenceStepper:
    """One LiteRT interpreter running the `step(token, h, c)` signature."""

    def __init__(self, model_path: Path, *, num_threads: int = 1):
        if not Path(model_path).is_file():
            raise FedkbError(f"{model_path}: inference model not found")
        try:  # ValueError: a corrupt flatbuffer or no `step` signature; RuntimeError: it cannot allocate
            self._interpreter = create_interpreter(model_path, num_threads=num_threads)
            self._step = self._interpreter.get_signature_runner("step")
        except (ValueError, RuntimeError) as err:
            raise FedkbError(f"{model_path}: not an inference model with a `step` signature ({err})") from None
        self._lock = threading.Lock()  # a signature runner is not safe to call concurrently
        self.units = int(self._step.get_input_details()["h"]["shape"][1])
        self.logits_size = int(self._step.get_output_details()["logits"]["shape"][-1])  # the vocabulary

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
        self._states = [self._state]  # _states[i]: the state after BOS and the first i fed pieces

    def feed_text(self, text: str) -> None:
        """Bring the state up to `text`: only pieces not yet fed cost a model step."""
        ids = self.tokenizer.encode(text)
        common = 0
        while common < min(len(ids), len(self._fed)) and ids[common] == self._fed[common]:
            common += 1
        if common == 0 and self._fed:  # new text from its first piece on
            self.reset()
        elif common < len(self._fed):
            # An edit, or (far more often) the word being typed re-tokenized as it grew ("▁no" ->
            # "▁not"): go back to the state before the last common piece and re-feed that piece,
            # which restores its logits, rather than replaying the whole text.
            common -= 1
            del self._fed[common:], self._states[common + 1:]
            self._state = self._states[-1]
        for token in ids[common:]:
            self._logits, self._state = self.stepper(token, self._state)
            self._fed.append(token)
            self._states.append(self._state)

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """The k most likely next words after `text` (complete, non-empty, distinct words)."""
        self.feed_text(text)
        # Rank every finished word (the search costs the same for any k) and keep the first k
        # distinct non-empty strings: a lone "▁" piece decodes to "", and two segmentations of
        # one word decode alike.
        words: list[str] = []
        for candidate in top_words(self.stepper, self._state, self._logits, self.word_start, k=len(self.word_start)):
            word = self.tokenizer.decode(list(candidate.pieces)).strip()
            if word and word not in words:
                words.append(word)
        return words[:k]
