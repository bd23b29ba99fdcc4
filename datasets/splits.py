"""Federated splits: held-out clients, and a per-client train/test split by position.

The per-client split keeps the last 20 % of a client's utterances for testing, as LEAF does, so
the test text comes after the training text, as it would on a phone. Held-out clients never
train; they measure how well the model generalizes to people it has not seen.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from datasets.corpus import ClientText, Corpus


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How clients are filtered and split."""

    min_words: int = 64  # roles with fewer words give the model almost nothing to learn from
    test_fraction: float = 0.2
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.min_words < 1:
            raise ValueError(f"min_words must be at least 1, got {self.min_words}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclasses.dataclass(frozen=True)
class FederatedSplit:
    """Training clients' (train, test) utterances, and the held-out clients' full text."""

    train: dict[str, tuple[str, ...]]
    test: dict[str, tuple[str, ...]]
    heldout: dict[str, tuple[str, ...]]
    dropped: tuple[str, ...]  # clients under min_words


def split_by_position(utterances: tuple[str, ...], test_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Last `test_fraction` of the utterances (at least one, if there are two or more) to test."""
    n = len(utterances)
    if n < 2:
        return utterances, ()
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))
    return utterances[: n - n_test], utterances[n - n_test :]


def split_corpus(corpus: Corpus, config: SplitConfig) -> FederatedSplit:
    """Filter small clients, draw held-out clients with the seed, split the rest by position."""
    kept: list[ClientText] = [c for c in corpus.clients if c.num_words >= config.min_words]
    dropped = tuple(c.client_id for c in corpus.clients if c.num_words < config.min_words)
    rng = np.random.default_rng(config.seed)
    n_heldout = int(round(len(kept) * config.heldout_fraction))
    if config.heldout_fraction > 0 and len(kept) >= 2:
        n_heldout = max(1, n_heldout)
    n_heldout = min(n_heldout, max(0, len(kept) - 1))
    heldout_idx = set(rng.choice(len(kept), size=n_heldout, replace=False).tolist()) if n_heldout else set()
    train, test, heldout = {}, {}, {}
    for i, client in enumerate(kept):
        if i in heldout_idx:
            heldout[client.client_id] = client.utterances
        else:
            train[client.client_id], test[client.client_id] = split_by_position(client.utterances, config.test_fraction)
    return FederatedSplit(train=train, test=test, heldout=heldout, dropped=dropped)
