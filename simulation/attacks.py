"""What a released update gives away: the embedding-row attack, as a measurement.

An embedding row moves when its token is an input (its gradient is that row's) and, because
the output layer is tied to the embedding, moves most when the token is also a target. So the
rows an update changed most are the words its user typed: ranking one device's embedding delta
by row norm reads back its bag of words (Melis et al. 2019, "Exploiting Unintended Feature
Leakage in Collaborative Learning", §5). The same function measures any release the server or a
downloader sees (one upload, a round's mean, a noised DP aggregate), so each privacy mode can
show what it changes. Pure numpy; the tests and docs/privacy.md call it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class RowRecovery:
    """How many of the typed token ids the top-k changed rows hold, against random ranking."""

    k: int
    hits: int  # typed ids among the top k rows
    typed: int  # distinct typed ids
    vocab: int

    @property
    def fraction(self) -> float:
        """Recovered fraction of the typed ids."""
        return self.hits / self.typed

    @property
    def precision(self) -> float:
        """The share of the top-k rows that are typed ids."""
        return self.hits / self.k

    @property
    def random_fraction(self) -> float:
        """The fraction a ranking that knows nothing recovers on average (k / vocab)."""
        return self.k / self.vocab

    @property
    def random_tail(self) -> float:
        """P[a random top-k holds ≥ `hits` typed ids] (hypergeometric): how surprising `hits` is."""
        total = math.comb(self.vocab, self.k)
        return sum(math.comb(self.typed, h) * math.comb(self.vocab - self.typed, self.k - h)
                   for h in range(self.hits, min(self.typed, self.k) + 1)) / total


def rows_by_change(embedding_delta: np.ndarray) -> np.ndarray:
    """Row indices of a [vocab, dim] delta, most changed (largest L2 norm) first; ties by index."""
    norms = np.linalg.norm(np.asarray(embedding_delta, dtype=np.float64), axis=1)
    return np.lexsort((np.arange(len(norms)), -norms))


def embedding_row_attack(embedding_delta: np.ndarray, typed_ids: Iterable[int], ks: Iterable[int]) -> list[RowRecovery]:
    """The recovery of `typed_ids` among the top-k changed rows, for each k (capped at the vocabulary).

    Raises:
        ValueError: no typed ids, or an id outside the delta's rows.
    """
    ranking = rows_by_change(embedding_delta)
    vocab = len(ranking)
    typed = set(int(t) for t in typed_ids)
    if not typed or min(typed) < 0 or max(typed) >= vocab:
        raise ValueError(f"typed ids must be a non-empty set of rows of the {vocab}-row embedding")
    out = []
    for k in ks:
        k = min(int(k), vocab)
        out.append(RowRecovery(k=k, hits=len(typed & set(ranking[:k].tolist())), typed=len(typed), vocab=vocab))
    return out
