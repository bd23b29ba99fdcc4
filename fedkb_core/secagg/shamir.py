"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(PRIME).

A secret s (32 bytes read as a big-endian integer) is the constant term of a random polynomial
f of degree t − 1 over GF(p); device x's share is f(x). Any t shares determine f, hence s = f(0)
(Lagrange interpolation); t − 1 shares are consistent with every secret, each with the same
number of polynomials, so they say nothing about it (Shamir 1979).

p = 2^256 + 297 is the smallest prime above 2^256 (the tests check both), so every 32-byte
secret is a field element and encodes without loss; a share value is < p < 2^264, so 33 bytes
big-endian. A device's x is its index in the cohort, 1..2^32 − 1 (never 0: f(0) is the secret).

When more than t shares arrive, the surplus is not thrown away: every extra share must lie on
the polynomial the first t define. A forged, corrupted or replayed share then fails loudly (as
`ShareError` naming its x) instead of silently yielding a wrong secret and, downstream, a wrong
mask that would turn the cohort's sum into noise.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33
MAX_X = 2**32 - 1


class ShareError(ValueError):
    """Shares that cannot be combined: too few, malformed, or not on one polynomial."""


def _check_threshold(threshold: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")


def _is_x(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_X


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """f(x) mod p by Horner's rule; coefficients[0] is the constant term."""
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of `secret` at each x of `xs`, any `threshold` of which reconstruct it.

    The t − 1 non-constant coefficients are drawn uniformly from GF(p) with `secrets`.

    Returns:
        {x: the 33-byte big-endian share value} in the order of `xs`.

    Raises:
        ValueError: `secret` is not 32 bytes; `threshold` is not in 1..len(xs); an x is not an
            integer in 1..2^32 − 1 or appears twice.
    """
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        got = f"{len(secret)} bytes" if isinstance(secret, bytes) else type(secret).__name__
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {got}")
    xs = list(xs)
    bad = [x for x in xs if not _is_x(x)]
    if bad:
        raise ValueError(f"share x-coordinates must be integers in 1..{MAX_X}, got {bad[0]!r}")
    if len(set(xs)) != len(xs):
        duplicate = next(x for x in xs if xs.count(x) > 1)
        raise ValueError(f"share x-coordinates must be distinct, {duplicate} appears twice")
    _check_threshold(threshold)
    if threshold > len(xs):
        raise ValueError(f"threshold {threshold} exceeds the {len(xs)} shares asked for")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def _parse(shares: Mapping[int, bytes]) -> list[tuple[int, int]]:
    """(x, y) pairs sorted by x, each checked."""
    points = []
    for x, value in shares.items():
        if not _is_x(x):
            raise ShareError(f"a share's x must be an integer in 1..{MAX_X}, got {x!r}")
        if not isinstance(value, bytes) or len(value) != SHARE_BYTES:
            size = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
            raise ShareError(f"the share at x={x} is not {SHARE_BYTES} bytes (got {size})")
        y = int.from_bytes(value, "big")
        if y >= PRIME:
            raise ShareError(f"the share at x={x} is not a field element (>= the prime)")
        points.append((x, y))
    return sorted(points)


def _barycentric_weights(xs: Sequence[int]) -> list[int]:
    """w_i = 1 / Π_{j≠i} (x_i − x_j): with them, any evaluation of the interpolating polynomial
    costs O(t) multiplications and no inversion."""
    weights = []
    for i, xi in enumerate(xs):
        denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                denominator = denominator * (xi - xj) % PRIME
        weights.append(pow(denominator, -1, PRIME))
    return weights


def _interpolate(xs: Sequence[int], ys: Sequence[int], weights: Sequence[int], at: int) -> int:
    """L(at), L the polynomial of degree < t through (xs, ys): Σ_i y_i·w_i·Π_{j≠i} (at − x_j),
    with the products Π_{j≠i} from prefix and suffix products."""
    t = len(xs)
    prefix = [1] * (t + 1)
    for i, x in enumerate(xs):
        prefix[i + 1] = prefix[i] * (at - x) % PRIME
    total, suffix = 0, 1
    for i in range(t - 1, -1, -1):
        total = (total + ys[i] * weights[i] % PRIME * prefix[i] % PRIME * suffix) % PRIME
        suffix = suffix * (at - xs[i]) % PRIME
    return total


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret that `shares` ({x: 33-byte share}) share `threshold`-of-n.

    Interpolates at 0 through the `threshold` shares of smallest x; every further share must lie
    on that polynomial.

    Returns:
        The 32-byte secret.

    Raises:
        ShareError: fewer than `threshold` shares; an x outside 1..2^32 − 1; a share that is not
            33 bytes or not below the prime; an extra share off the polynomial of the first t
            (named by its x); or a result >= 2^256, which no 32-byte secret shares to.
        ValueError: `threshold` is not an integer >= 1.
    """
    _check_threshold(threshold)
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    points = _parse(shares)
    xs, ys = [x for x, _ in points[:threshold]], [y for _, y in points[:threshold]]
    weights = _barycentric_weights(xs)
    for x, y in points[threshold:]:
        if _interpolate(xs, ys, weights, x) != y:
            raise ShareError(f"the share at x={x} does not lie on the polynomial of the shares at x={xs}: "
                             "a share is forged, corrupted or belongs to another secret")
    secret = _interpolate(xs, ys, weights, 0)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError(f"the shares at x={xs} reconstruct a value >= 2^256, which is not a shared "
                         f"{SECRET_BYTES}-byte secret: a share is forged, corrupted or belongs to another secret")
    return secret.to_bytes(SECRET_BYTES, "big")
