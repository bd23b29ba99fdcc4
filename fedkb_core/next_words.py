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


def _log_sum_exp(log_probs: np.ndarray) -> float:
    """log Σ exp(x), shifted by the max. `np.logaddexp.reduce` gives the same value but pays a
    log and an exp per pair: it was most of a keystroke's suggestion time at V=8000."""
    peak = log_probs.max(initial=-np.inf)
    if not np.isfinite(peak):
        return float(peak)
    return float(peak + np.log(np.exp(log_probs - peak).sum()))


def _next_piece(logits: np.ndarray, word_start: np.ndarray, continuations: np.ndarray) -> tuple[float, np.ndarray]:
    """(log P(the next piece starts a word or ends the utterance), log P of each continuation piece),
    from one exp over the vocabulary."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    peak = logits.max()
    mass = np.exp(logits - peak)
    log_total = np.log(mass.sum())
    boundary = mass[word_start].sum()
    if boundary > 0:
        boundary_lp = float(np.log(boundary) - log_total)
    else:  # every boundary piece is -inf, or underflowed: exact, slower
        boundary_lp = _log_sum_exp(logits[word_start] - peak) - float(log_total)
    return boundary_lp, logits[continuations] - peak - log_total


def _best(log_probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest finite values, largest first, ties by lower index (what a stable
    `argsort(-x)[:n]` gives), without sorting the whole vocabulary."""
    if n < log_probs.size:
        cutoff = -np.partition(-log_probs, n - 1)[n - 1]
        candidates = np.flatnonzero(log_probs >= cutoff)
    else:
        candidates = np.arange(log_probs.size)
    chosen = candidates[np.argsort(-log_probs[candidates], kind="stable")][:n]
    return chosen[np.isfinite(log_probs[chosen])]


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
    continuations = np.flatnonzero(~word_start)  # the pieces that extend a word, ascending
    starters = np.where(word_start, log_softmax(logits), -np.inf)
    starters[eos_id] = -np.inf
    # A beam is (pieces, log-probability, state before its last piece was fed).
    beams = [((int(i),), float(starters[i]), state) for i in _best(starters, beam)]
    finished: list[WordCandidate] = []
    for depth in range(max_pieces):
        grown = []
        for pieces, score, before_last in beams:
            next_logits, after_last = step(pieces[-1], before_last)
            boundary, continuation = _next_piece(next_logits, word_start, continuations)
            # The word can end here if the next piece starts a new word or ends the utterance.
            finished.append(WordCandidate(pieces, score + boundary))
            if depth + 1 < max_pieces:
                for j in _best(continuation, beam):
                    grown.append((pieces + (int(continuations[j]),), score + float(continuation[j]), after_last))
        grown.sort(key=lambda b: -b[1])
        beams = grown[:beam]
        if not beams:
            break
    finished.sort(key=lambda c: -c.log_prob)
    return finished[:k]
