"""The SecAgg+ neighbour graph, its default degree and the Shamir threshold.

In SecAgg+ (Bell et al. 2020) a device masks with, and shares its secrets among, only its k
neighbours in a k-regular graph instead of all n − 1 other devices: O(k) keys, shares and masks
per device instead of O(n). The graph is the Harary graph H(k, n) (node at ring position p is
joined to positions p ± 1, ..., p ± k/2 mod n) laid over a uniformly random permutation of the
devices, so nobody can choose whose neighbour they become. The permutation is drawn from a
32-byte seed the server picks, by a Fisher–Yates shuffle fed with ChaCha20 keystream words and
rejection sampling (exactly uniform): device and server, or a later audit, rebuild the same graph
from the seed whatever NumPy version each runs. k ≥ n − 1 is the complete graph (Bonawitz et al.).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from fedkb_core.secagg import prg

COMPLETE_UP_TO = 32  # cohorts this small use the complete graph: k = n − 1 costs little
DEGREE_PER_LOG2 = 3
FAILURE_TARGET = 2.0 ** -20  # per round: some device can no longer be unmasked under random dropout
_GRAPH_NONCE = bytes(4) + b"secagg-graph"  # counter 0, 12-byte nonce: not the masks' stream of a seed
_WORD = 1 << 32


def default_degree(n: int, tolerated_dropout: float = 0.2) -> int:
    """k for a cohort of n devices: n − 1 (complete) for n <= 32; else the smallest even
    k >= 3·⌈log₂ n⌉ at which random dropout at rate `tolerated_dropout` leaves every device t =
    ⌊k/2⌋ + 1 surviving neighbours except with probability <= FAILURE_TARGET (union bound over
    the n devices of P(Binomial(k, 1 − d) < t)), capped at n − 1.

    Bell et al. show that k growing like log n suffices for the graph's security: the graph left
    after removing dropped and corrupted devices stays connected, and no device has t corrupted
    neighbours, except with probability falling exponentially in k. 3·⌈log₂ n⌉ is the floor for
    that (with 30 % of the cohort bad, the union bound over pairs of bad runs on the ring that
    Google's SecAgg+ parameter finder uses gives P(disconnected) <= 2^-34.8 at n = 1,000, k = 30).
    Dropout binds harder here, because fedkb's t > k/2 (see `thresholds`) means a device whose
    neighbours lose half their number cannot be unmasked and abandons the round: at k = 3·⌈log₂ n⌉
    and 30 % random dropout a round of 100 devices fails with probability 0.98 (binomial
    estimate). Raising k until that tail is
    2^-20 gives k = 74 at n = 100 and 84 at n = 1,000 for d = 0.2 (fedkb's default), but the
    complete graph at n = 100 and k = 212 at n = 1,000 for d = 0.3: tolerating more dropout costs
    neighbours (tests/test_secagg_primitives.py checks the tail at k and k − 2).

    Raises:
        ValueError: n < 2, or `tolerated_dropout` not in [0, 0.5).
    """
    _check_n(n)
    _check_dropout(tolerated_dropout)
    if n <= COMPLETE_UP_TO:
        return n - 1
    k = DEGREE_PER_LOG2 * (n - 1).bit_length()  # (n − 1).bit_length() = ⌈log₂ n⌉ for n >= 2
    k += k % 2
    while k < n - 1 and n * unmaskable_tail(k, float(tolerated_dropout)) > FAILURE_TARGET:
        k += 2
    return min(k, n - 1)


def unmaskable_tail(k: int, dropout: float) -> float:
    """P(a device keeps fewer than t = ⌊k/2⌋ + 1 of its k neighbours) when each drops
    independently with probability `dropout`: P(Binomial(k, 1 − dropout) <= k/2), summed in logs."""
    if dropout <= 0:
        return 0.0
    t, keep = k // 2 + 1, 1.0 - dropout
    terms = [math.lgamma(k + 1) - math.lgamma(s + 1) - math.lgamma(k - s + 1)
             + s * math.log(keep) + (k - s) * math.log(dropout) for s in range(t)]
    top = max(terms)
    return math.exp(top) * sum(math.exp(x - top) for x in terms)


def _check_dropout(tolerated_dropout: float) -> None:
    if isinstance(tolerated_dropout, bool) or not isinstance(tolerated_dropout, (int, float)) \
            or not 0 <= tolerated_dropout < 0.5:
        raise ValueError(f"tolerated_dropout must be a fraction in [0, 0.5), got {tolerated_dropout!r}")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"secure aggregation needs a cohort of at least 2 devices, got {n!r}")


def effective_degree(n: int, k: int) -> int:
    """min(k, n − 1), after checking k is a degree `neighbours` can build.

    Raises:
        ValueError: n < 2; k below n − 1 and odd or < 2 (H(k, n) is k-regular only for even k).
    """
    _check_n(n)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"a degree is an integer, got {k!r}")
    if k >= n - 1:
        return n - 1
    if k < 2 or k % 2:
        raise ValueError(f"a degree below n - 1 = {n - 1} must be even and >= 2, got {k}")
    return k


def _permutation(n: int, seed: bytes) -> np.ndarray:
    """A uniformly random permutation of 0..n−1 determined by `seed` (`_shuffle` of the graph's
    keystream words)."""
    prg.check_seed(seed, what="graph seed")
    return np.array(_shuffle(n, prg.words(seed, nonce=_GRAPH_NONCE)), dtype=np.int64)


def _shuffle(n: int, words: Iterator[int]) -> list[int]:
    """Fisher–Yates over 0..n−1: for i = n−1 down to 1, swap i with j uniform in 0..i, j = w mod
    (i + 1) for the next word w below 2^32 − (2^32 mod (i + 1)); a word at or above that limit
    would favour small j, so it is skipped (probability < n / 2^32)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        m = i + 1
        limit = _WORD - _WORD % m
        word = next(words)
        while word >= limit:
            word = next(words)
        j = word % m
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(n: int, k: int, seed: bytes) -> list[list[int]]:
    """Each node's neighbours (sorted) in H(k, n) over the permutation drawn from `seed`.

    k even in 2..n−1, or k >= n − 1 for the complete graph (which needs no permutation, but the
    seed is checked all the same). Every node has min(k, n − 1) neighbours; the graph is
    symmetric and has no self loops.

    Raises:
        ValueError: a bad n or k (`effective_degree`), or a seed that is not 32 bytes.
    """
    k = effective_degree(n, k)
    prg.check_seed(seed, what="graph seed")
    if k == n - 1:
        return [[v for v in range(n) if v != u] for u in range(n)]
    order = _permutation(n, seed)  # order[p] = the node at ring position p
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    half = np.arange(1, k // 2 + 1)
    offsets = np.concatenate([half, -half])
    table = order[(position[:, None] + offsets[None, :]) % n]
    table.sort(axis=1)
    return table.tolist()


def _neighbours_lost(k: int, tolerated_dropout: float) -> int:
    """⌈tolerated_dropout·k⌉, with the fraction taken as the decimal it prints as."""
    return math.ceil(Fraction(str(float(tolerated_dropout))) * k)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """A cohort's neighbour-graph degree k and Shamir threshold t, with k/2 < t <= k."""

    degree: int
    threshold: int

    def __post_init__(self):
        if not (1 <= self.degree and self.degree / 2 < self.threshold <= self.degree):
            raise ValueError(f"a threshold must satisfy degree/2 < t <= degree, got t = {self.threshold} "
                             f"for degree {self.degree}")


def thresholds(n: int, *, degree: int | None = None, tolerated_dropout: float = 0.2) -> Thresholds:
    """k and t for a cohort of n devices: k = `degree` (default `default_degree(n, tolerated_dropout)`) clamped to
    n − 1, t = ⌊k/2⌋ + 1, the smallest t > k/2.

    Why t > k/2: in stage 3 the server tells each neighbour of device u whether u survived (the
    neighbour returns its share of u's self-mask seed b_u) or dropped (its share of u's mask key
    s_u), and an honest neighbour never gives both. A server lying to different neighbours can
    therefore collect at most k shares of u in all; with t > k/2 it can never hold t of both
    kinds, so it never learns both b_u and s_u, which together would unmask u's own input.

    The other side of the trade: t <= k − (neighbours lost), or a device's seeds cannot be
    rebuilt. A device is assumed to lose up to ⌈tolerated_dropout·k⌉ of its k neighbours
    (`tolerated_dropout` read as the decimal it prints as: 0.14 of 50 is 7, though 0.14 * 50 is
    7.000000000000001 in floating point).

    Raises:
        ValueError: n < 2; a degree `neighbours` cannot build; `tolerated_dropout` not in [0, 0.5);
            or k − ⌈tolerated_dropout·k⌉ < t, i.e. a device could lose the ability to be unmasked.
    """
    _check_n(n)
    _check_dropout(tolerated_dropout)
    k = effective_degree(n, default_degree(n, tolerated_dropout) if degree is None else degree)
    t = k // 2 + 1
    lost = _neighbours_lost(k, tolerated_dropout)
    if k - lost < t:
        raise ValueError(
            f"with {n} devices, degree {k} and threshold {t}, a device that loses {lost} of its {k} "
            f"neighbours (tolerated_dropout={tolerated_dropout}) keeps {k - lost} shareholder(s), fewer than the "
            f"{t} that rebuild its seeds: raise the degree (at most {n - 1}) or lower tolerated_dropout")
    return Thresholds(degree=k, threshold=t)
