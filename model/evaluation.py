"""Evaluate any weights on held-out text the same way: numpy only, fixed-seed samples.

The same function scores the initial model, every federated version, the centralized baseline
and the TFF reference, so their curves are comparable point for point.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from datasets.tokenizer import EOS_ID
from datasets.windows import concat_windows, make_windows
from fedkb_core.next_words import top_words
from model import numpy_lm
from model.metrics import EvalResult, count_words, perplexity, recall_at, token_nll
from model.weights import Weights


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How much to evaluate: the full set is slow, a fixed-seed sample is not."""

    seq_len: int = 20
    max_windows: int = 512
    recall_samples: int = 200  # word boundaries scored for top-1/top-3
    seed: int = 0
    batch: int = 128  # windows per numpy forward pass


def sample_windows(streams: dict[str, np.ndarray], config: EvalConfig):
    """A fixed-seed sample of windows across all clients of an evaluation set."""
    parts = [make_windows(s, config.seq_len) for s in streams.values()]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no evaluation text")
    windows = concat_windows(parts)
    if len(windows) > config.max_windows:
        rng = np.random.default_rng(config.seed)
        windows = windows.take(np.sort(rng.choice(len(windows), config.max_windows, replace=False)))
    return windows


def _word_end(y_row: np.ndarray, mask_row: np.ndarray, start: int, word_start: np.ndarray) -> int | None:
    """Index one past the last piece of the word starting at `start`, if it ends in the window."""
    for j in range(start + 1, len(y_row)):
        if mask_row[j] <= 0:
            return None
        if word_start[y_row[j]]:
            return j
    return None


def evaluate_weights(weights: Weights, streams: dict[str, np.ndarray], word_start: np.ndarray,
                     config: EvalConfig = EvalConfig()) -> EvalResult:
    """Token/word perplexity on a window sample; top-1/top-3 on a sample of word boundaries."""
    return evaluate_with_hits(weights, streams, word_start, config)[0]


def evaluate_with_hits(weights: Weights, streams: dict[str, np.ndarray], word_start: np.ndarray,
                       config: EvalConfig = EvalConfig()) -> tuple[EvalResult, np.ndarray]:
    """`evaluate_weights`, plus the rank of the true word at every sampled boundary (0 = top-1,
    -1 = not in the top 3), in boundary order. The boundaries depend on the streams and the config's
    seed only, not on the weights, so two models' hits are paired boundary by boundary: their
    difference in top-1 has a standard error from the paired differences, much smaller than two
    independent samples' (bench/paired_eval.py)."""
    windows = sample_windows(streams, config)
    total_nll, tokens, words = 0.0, 0, 0
    boundary_states = []  # (window, position, h, c, logits)
    rng = np.random.default_rng(config.seed + 1)
    for start in range(0, len(windows), config.batch):
        part = windows.take(slice(start, start + config.batch))
        logits, hs, cs = numpy_lm.forward(weights, part.x)
        total_nll += float(np.sum(token_nll(logits, part.y) * part.mask))
        tokens += int(part.mask.sum())
        words += count_words(part.y, part.mask, word_start)
        # Candidate boundaries: the target starts a real word (not EOS) and the word ends in the window.
        for n, t in zip(*np.nonzero((part.mask > 0) & word_start[part.y] & (part.y != EOS_ID)), strict=True):
            end = _word_end(part.y[n], part.mask[n], t, word_start)
            if end is not None:
                boundary_states.append((tuple(part.y[n, t:end]), hs[n, t], cs[n, t], logits[n, t]))
    hits = []
    if boundary_states:
        chosen = rng.choice(len(boundary_states), min(config.recall_samples, len(boundary_states)), replace=False)
        step = lambda token, state: numpy_lm.step(weights, token, state)  # noqa: E731
        for i in sorted(chosen):
            target, h, c, logits = boundary_states[i]
            words_k = top_words(step, (h, c), logits, word_start, k=3)
            ranks = [r for r, w in enumerate(words_k) if w.pieces == target]
            hits.append(ranks[0] if ranks else -1)
    hits = np.array(hits, dtype=np.int64)
    return hits_result(hits, total_nll, tokens, words), hits


def hits_result(hits: np.ndarray, total_nll: float, tokens: int, words: int) -> EvalResult:
    return EvalResult(
        token_perplexity=perplexity(total_nll, tokens),
        word_perplexity=perplexity(total_nll, words),
        top1=recall_at(hits, 1),
        top3=recall_at(hits, 3),
        tokens=tokens,
        words=words,
        recall_samples=len(hits),
    )
