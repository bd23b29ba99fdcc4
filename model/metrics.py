"""Keyboard metrics, as pure functions over numpy arrays.

- token perplexity: exp(total NLL / number of predicted pieces);
- word perplexity: exp(total NLL / number of words), the same total over words, so that models
  with different tokenizers compare (a word is counted once, at the piece that starts it or at
  the end of the utterance);
- top-k next-word recall: at a word boundary, is the next word among the k suggestions? The
  production keyboard metric (Hard et al., 2018, https://arxiv.org/abs/1811.03604).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The keyboard metrics on one evaluation set."""

    token_perplexity: float
    word_perplexity: float
    top1: float
    top3: float
    tokens: int = 0
    words: int = 0
    recall_samples: int = 0


def token_nll(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """−log softmax(logits)[y] per position ([..., V] logits, [...] targets), stable in float32."""
    peak = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    return lse - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]


def count_words(y: np.ndarray, mask: np.ndarray, word_start: np.ndarray) -> int:
    """Words among the predicted targets: word-initial pieces (and EOS) under the mask."""
    return int(np.sum(word_start[y] & (mask > 0)))


def perplexity(total_nll: float, count: int) -> float:
    """exp(total / count), inf for an empty set rather than a division error."""
    if count <= 0:
        return float("inf")
    return float(math.exp(min(total_nll / count, 700.0)))


def recall_at(hits: np.ndarray, k: int) -> float:
    """hits[i] is the rank (0-based) of the right word among the suggestions, or -1."""
    if len(hits) == 0:
        return 0.0
    return float(np.mean((hits >= 0) & (hits < k)))
