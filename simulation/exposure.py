"""Exposure of planted secrets (Carlini et al., 2019, "The Secret Sharer", §4), as pure functions.

A secret is L symbols, each one of an alphabet of A; the candidate space is all A^L of them.
Given the model's log-perplexity of every candidate (lower: the model finds it more likely),
the rank of the true secret is 1 + the number of candidates the model prefers to it, and

    exposure = log2 |candidates| − log2 rank.

A model that never saw the secret ranks it like any other candidate (expected exposure
≈ log2 e ≈ 1.44 bits); one that memorized it ranks it first (exposure log2 |candidates|).

How the rank is found, by the size of the space against `max_candidates`:
* `exact`: every candidate is scored, the rank is counted. Ties go in the secret's favour (only
  candidates strictly more likely count), which errs towards more exposure, the cautious side for
  an audit.
* `sampled`: a uniform sample of n candidates (with replacement) is scored; with m of them
  strictly more likely than the secret, the rank is estimated as 1 + (m / n)·(|candidates| − 1).
* `extrapolated`: when fewer than `MIN_SAMPLED_ABOVE` sampled candidates beat the secret, the
  sample says little about so small a tail. As in the paper (§4.3, "exposure by extrapolation"),
  a skew-normal distribution is fitted to the sampled log-perplexities and its CDF at the secret's
  log-perplexity stands in for m / n. This is an estimate and is labelled as one.

Several secrets planted at once are not candidates for each other: a secret the model memorized
would otherwise lower the rank of every other secret. Each one's candidates are the space without
the other planted secrets.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

# secrets [n, L] of alphabet indices -> log-perplexity of each [n] (any fixed log base)
Scorer = Callable[[np.ndarray], np.ndarray]

MAX_SPACE = 2**62  # candidates are indexed as int64
MIN_SAMPLED_ABOVE = 10  # sampled candidates more likely than the secret for the sample's own estimate


@dataclasses.dataclass(frozen=True)
class Exposure:
    exposure: float  # bits
    rank: float  # 1 = the model's most likely candidate; an estimate unless method is exact
    candidates: int  # the size of the candidate space the rank is among
    scored: int  # candidates the model scored to find the rank
    method: str  # exact | sampled | extrapolated
    log_perplexity: float  # the scorer's value for the secret


def space_size(alphabet_size: int, length: int) -> int:
    return alphabet_size**length


def secret_index(secret: Sequence[int], alphabet_size: int) -> int:
    """The secret's place in `itertools.product(range(A), repeat=L)` order (a base-A number)."""
    index = 0
    for symbol in secret:
        index = index * alphabet_size + int(symbol)
    return index


def _exposure(candidates: int, rank: float) -> float:
    return math.log2(candidates) - math.log2(rank)


def _skewnorm_tail(sample: np.ndarray, value: float) -> float:
    """P(X ≤ value) under a skew-normal fitted to the sample (the paper's extrapolation)."""
    from scipy import stats

    shape, loc, scale = stats.skewnorm.fit(sample)
    return float(stats.skewnorm.cdf(value, shape, loc, scale))


def measure_exposures(secrets: Sequence[Sequence[int]], *, alphabet_size: int, length: int, score: Scorer,
                      max_candidates: int, seed: int = 0) -> list[Exposure]:
    """The exposure of each planted secret under `score`.

    Args:
        secrets: the planted secrets, each `length` alphabet indices, all distinct.
        score: log-perplexities for a batch of secrets; called on every candidate once (exact)
            or on a sample of `max_candidates` and on the secrets (sampled).
        max_candidates: score every candidate of a space up to this size, a sample this big beyond.
        seed: the sample's.
    """
    secrets = np.asarray(secrets, dtype=np.int64).reshape(len(secrets), length)
    if len(secrets) == 0:
        return []
    if secrets.min() < 0 or secrets.max() >= alphabet_size:
        raise ValueError(f"secrets must hold alphabet indices in [0, {alphabet_size})")
    total = space_size(alphabet_size, length)
    if total > MAX_SPACE:
        raise ValueError(f"a space of {alphabet_size}^{length} candidates is too large to index (at most 2^62)")
    planted = [secret_index(s, alphabet_size) for s in secrets]
    if len(set(planted)) != len(planted):
        raise ValueError("the planted secrets must be distinct")
    candidates = total - len(planted) + 1  # the space without the other planted secrets
    if total <= max_candidates:
        every = np.array(list(itertools.product(range(alphabet_size), repeat=length)), dtype=np.int64)
        scores = np.asarray(score(every), dtype=np.float64)
        others = np.delete(scores, planted)  # the candidates no secret is
        results = []
        for index in planted:
            mine = scores[index]
            # Strictly more likely: the unplanted candidates, and the other secrets not at all.
            rank = 1 + int(np.sum(others < mine))
            results.append(Exposure(_exposure(candidates, rank), float(rank), candidates, total, "exact", float(mine)))
        return results
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, alphabet_size, size=(max_candidates, length), dtype=np.int64)
    indices = (sample * alphabet_size ** np.arange(length - 1, -1, -1, dtype=np.int64)).sum(axis=1)
    sample = sample[~np.isin(indices, planted)]
    sample_scores = np.asarray(score(sample), dtype=np.float64)
    secret_scores = np.asarray(score(secrets), dtype=np.float64)
    results = []
    for mine in secret_scores:
        above = int(np.sum(sample_scores < mine))
        if above >= MIN_SAMPLED_ABOVE:
            fraction, method = above / len(sample_scores), "sampled"
        else:
            fraction, method = _skewnorm_tail(sample_scores, float(mine)), "extrapolated"
        rank = 1.0 + fraction * (candidates - 1)
        results.append(Exposure(_exposure(candidates, rank), rank, candidates, len(sample) + len(secrets), method,
                                float(mine)))
    return results
