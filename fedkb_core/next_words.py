"""Top-k next *words* from a next-*piece* model: a small beam search to a word boundary.

A keyboard suggests words, but the model predicts SentencePiece pieces. A word is one piece
that starts with the boundary marker '▁', followed by zero or more continuation pieces, and it
ends where the next piece starts a new word (or the utterance ends). We keep the best `beam`
partial words, score each finished word by log P(pieces) + log P(a boundary comes next), and
return the best k. Works with any step function (LiteRT on the device, numpy in evaluation),
so it imports only numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

# step(token_id, state) -> (logits over the vocabulary for the piece after token_id, new state)
StepFn = Callable[[int, Any], tuple[np.ndarray, Any]]


@dataclasses.dataclass(frozen=True)
class WordCandidate:
    pieces: tuple[int, ...]
    log_prob: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64).ravel()
    peak = logits.max()
    return logits - peak - np.log(np.exp(logits - peak).sum())


def top_words(step: StepFn, state: Any, logits: np.ndarray, word_start: np.ndarray, *, k: int = 3,
              beam: int = 4, max_pieces: int = 4, eos_id: int = 3) -> list[WordCandidate]:
    """The k most probable next words, given the logits for the next piece and the state.

    Args:
        step: advances the model by one piece.
        state: the recurrent state that produced `logits`.
        logits: [V] logits for the next piece.
        word_start: bool [V]; True for pieces that begin a word, and for EOS (which ends one).
        eos_id: EOS ends a word but is never suggested.
    """
    word_start = np.asarray(word_start, dtype=bool)
    starters = np.where(word_start, log_softmax(logits), -np.inf)
    starters[eos_id] = -np.inf
    # A beam is (pieces, log-probability, state before its last piece was fed).
    beams = [((int(i),), float(starters[i]), state) for i in np.argsort(-starters)[:beam] if np.isfinite(starters[i])]
    finished: list[WordCandidate] = []
    for depth in range(max_pieces):
        grown = []
        for pieces, score, before_last in beams:
            next_logits, after_last = step(pieces[-1], before_last)
            next_lp = log_softmax(next_logits)
            # The word can end here if the next piece starts a new word or ends the utterance.
            finished.append(WordCandidate(pieces, score + float(np.logaddexp.reduce(next_lp[word_start]))))
            if depth + 1 < max_pieces:
                continuation = np.where(word_start, -np.inf, next_lp)
                for j in np.argsort(-continuation)[:beam]:
                    if np.isfinite(continuation[j]):
                        grown.append((pieces + (int(j),), score + float(continuation[j]), after_last))
        grown.sort(key=lambda b: -b[1])
        beams = grown[:beam]
        if not beams:
            break
    finished.sort(key=lambda c: -c.log_prob)
    return finished[:k]
