"""The cryptographic core of secure aggregation (`fedkb_core/secagg/`), with real keys and streams.

Shamir sharing (reconstruction from any t, refusal below t, forged shares detected, t − 1 shares
consistent with every secret), X25519 + HKDF (agreement, binding of every field, low-order keys
refused), the AES-GCM share boxes (every way of moving or altering a box refused), the ChaCha20
mask generator (a known answer, uniformity, masks that cancel) and the SecAgg+ neighbour graph
(regular, symmetric, seeded, uniformly permuted) with its thresholds.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections import Counter

import numpy as np
import pytest

from fedkb_core.secagg import graph, prg, shamir
from fedkb_core.secagg import key_agreement as ka
from fedkb_core.secagg import share_box as sb
from fedkb_core.secagg.key_agreement import BadPublicKey, KeyPair
from fedkb_core.secagg.shamir import PRIME, SHARE_BYTES, ShareError
from fedkb_core.secagg.share_box import ShareBoxError

_SMALL_PRIMES = [p for p in range(2, 400) if all(p % q for q in range(2, int(p**0.5) + 1))]


def _miller_rabin(n: int, bases) -> bool:
    """False proves n composite; True for every base is strong evidence of a prime."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _lagrange_at(points: list[tuple[int, int]], at: int) -> int:
    """The polynomial through `points` evaluated at `at`, mod PRIME: an implementation of its own,
    independent of shamir's."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num, den = num * (at - xj) % PRIME, den * (xi - xj) % PRIME
        total += yi * num * pow(den, -1, PRIME)
    return total % PRIME


# Shamir -----------------------------------------------------------------------------------

def test_the_prime_is_the_smallest_prime_above_2_256():
    assert PRIME > 2**256 and PRIME == 2**256 + 297
    assert _miller_rabin(PRIME, _SMALL_PRIMES)  # 78 bases
    # A failing witness proves a number composite: none of 2^256 + 1 .. 2^256 + 296 is prime.
    assert not any(_miller_rabin(2**256 + k, _SMALL_PRIMES[:12]) for k in range(1, 297))
    assert PRIME < 2 ** (8 * SHARE_BYTES)


@pytest.mark.parametrize("t,n", [(1, 1), (1, 5), (2, 2), (3, 5), (5, 5), (16, 30)])
def test_split_then_combine_gives_the_secret_back(t, n):
    for secret in (bytes(32), b"\xff" * 32, os.urandom(32), os.urandom(32)):
        xs = random.sample(range(1, 2**32), n)
        shares = shamir.split(secret, t, xs)
        assert list(shares) == xs and all(len(v) == SHARE_BYTES for v in shares.values())
        assert shamir.combine(shares, t) == secret  # all n: the n − t extra shares are checked
        assert shamir.combine(dict(random.sample(sorted(shares.items()), t)), t) == secret


def test_every_t_subset_reconstructs_and_fewer_than_t_are_refused():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5, 6])
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ShareError, match="2 shares cannot reconstruct a 3-of-n secret"):
            shamir.combine({x: shares[x] for x in subset}, 3)
    with pytest.raises(ShareError):
        shamir.combine({}, 1)


def test_a_known_polynomial_interpolates_to_its_constant_term():
    s = int.from_bytes(b"fedkb secure aggregation secret!", "big")
    f = lambda x: (s + 3 * x + 5 * x * x) % PRIME  # noqa: E731
    shares = {x: f(x).to_bytes(SHARE_BYTES, "big") for x in (1, 2, 7, 9, 2**32 - 1)}
    assert shamir.combine(shares, 3) == s.to_bytes(32, "big")
    # with too low a threshold the extra shares are off the line through the first two
    with pytest.raises(ShareError, match="x=7 does not lie on the polynomial of the shares at x=\\[1, 2\\]"):
        shamir.combine(shares, 2)


def test_t_minus_1_shares_are_consistent_with_every_secret():
    # For any candidate secret s', the t − 1 real shares plus (0, s') fix a polynomial of degree
    # t − 1; its value at a further x completes a set of t shares that reconstructs s'. So t − 1
    # shares rule no secret out (and each secret is completed by exactly one polynomial).
    real = shamir.split(os.urandom(32), 3, [4, 11, 12])
    known = [(x, int.from_bytes(real[x], "big")) for x in (4, 11)]
    for candidate in (bytes(32), b"\x01" * 32, os.urandom(32)):
        through = [(0, int.from_bytes(candidate, "big"))] + known
        completed = {x: y.to_bytes(SHARE_BYTES, "big") for x, y in known}
        completed[12] = _lagrange_at(through, 12).to_bytes(SHARE_BYTES, "big")
        assert shamir.combine(completed, 3) == candidate


def test_a_forged_share_among_more_than_t_is_detected_wherever_it_is():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    forged = dict(shares)
    forged[5] = ((int.from_bytes(shares[5], "big") + 1) % PRIME).to_bytes(SHARE_BYTES, "big")
    with pytest.raises(ShareError, match="x=5 does not lie"):
        shamir.combine(forged, 3)
    # a forged share among the first t makes the honest extras disagree with it
    forged = dict(shares)
    forged[2] = ((int.from_bytes(shares[2], "big") + 1) % PRIME).to_bytes(SHARE_BYTES, "big")
    with pytest.raises(ShareError, match="x=4 does not lie"):
        shamir.combine(forged, 3)
    # a share of another secret at the same x (a replay) is caught the same way
    other = shamir.split(os.urandom(32), 3, [1, 2, 3, 4, 5])
    with pytest.raises(ShareError, match="x=4 does not lie"):
        shamir.combine(shares | {4: other[4]}, 3)


def test_malformed_shares_are_refused():
    shares = shamir.split(os.urandom(32), 2, [1, 2, 3])
    with pytest.raises(ShareError, match="x=2 is not 33 bytes"):
        shamir.combine(shares | {2: shares[2][1:]}, 2)
    with pytest.raises(ShareError, match="not a field element"):
        shamir.combine(shares | {2: PRIME.to_bytes(SHARE_BYTES, "big")}, 2)
    for x in (0, 2**32, -1, True, "1"):
        with pytest.raises(ShareError, match="x must be an integer"):
            shamir.combine({x: shares[1], 2: shares[2]}, 2)
    # a valid polynomial whose constant term is >= 2^256 shares no 32-byte secret
    big = (2**256).to_bytes(SHARE_BYTES, "big")
    with pytest.raises(ShareError, match=">= 2\\^256"):
        shamir.combine({1: big, 2: big}, 1)
    with pytest.raises(ValueError, match="threshold"):
        shamir.combine(shares, 0)


@pytest.mark.parametrize("secret,t,xs,message", [
    (bytes(31), 1, [1], "a secret is 32 bytes, got 31 bytes"),
    ("x" * 32, 1, [1], "a secret is 32 bytes, got str"),
    (bytes(32), 0, [1, 2], "threshold must be an integer >= 1"),
    (bytes(32), True, [1, 2], "threshold must be an integer >= 1"),
    (bytes(32), 3, [1, 2], "threshold 3 exceeds the 2 shares"),
    (bytes(32), 1, [1, 2, 1], "1 appears twice"),
    (bytes(32), 1, [0, 2], "in 1..4294967295, got 0"),
    (bytes(32), 1, [2**32], "in 1..4294967295, got 4294967296"),
])
def test_split_refuses_bad_arguments(secret, t, xs, message):
    with pytest.raises(ValueError, match=message):
        shamir.split(secret, t, xs)


# Key agreement ----------------------------------------------------------------------------

def test_x25519_agreement_is_symmetric_and_keys_derive_alike_on_both_ends():
    u, v = KeyPair.generate(), KeyPair.generate()
    secret = ka.shared_secret(u.private, v.public)
    assert secret == ka.shared_secret(v.private, u.public) and len(secret) == ka.KEY_BYTES
    assert secret != ka.shared_secret(u.private, KeyPair.generate().public)
    assert KeyPair.from_private(u.private) == u
    assert repr(u) == f"KeyPair(public={u.public!r})"  # the private half stays out of logs
    for purpose, a, b in (("mask", "d01", "d02"), ("shares", "d02", "d01")):
        mine = ka.derive_key(secret, purpose=purpose, round_id=7, a=a, b=b)
        assert mine == ka.derive_key(ka.shared_secret(v.private, u.public), purpose=purpose, round_id=7, a=a, b=b)
        assert len(mine) == 32 and mine != secret


def test_hkdf_binds_purpose_round_and_both_ids():
    secret = ka.shared_secret(KeyPair.generate().private, KeyPair.generate().public)
    base = dict(purpose="shares", round_id=7, a="d01", b="d02")
    key = ka.derive_key(secret, **base)
    variants = [dict(base, purpose="mask"), dict(base, round_id=8), dict(base, round_id=2**63 - 1),
                dict(base, a="d03"), dict(base, b="d03"), dict(base, a="d02", b="d01"),
                dict(base, a="d0", b="1d02")]
    keys = {ka.derive_key(secret, **v) for v in variants} | {ka.derive_key(os.urandom(32), **base)}
    assert key not in keys and len(keys) == len(variants) + 1
    assert ka.encode_fields("ab", "c") != ka.encode_fields("a", "bc")
    assert ka.encode_fields(b"x", 1) == b"\0\0\0\1x" + b"\0\0\0\x08" + (1).to_bytes(8, "big")


@pytest.mark.parametrize("kwargs,message", [
    (dict(purpose="other", round_id=1, a="a", b="b"), "purpose must be one of"),
    (dict(purpose="mask", round_id=1, a="b", b="a"), "takes the two ids sorted"),
    (dict(purpose="shares", round_id=1, a="a", b="a"), "two different devices"),
    (dict(purpose="shares", round_id=-1, a="a", b="b"), "round id"),
    (dict(purpose="shares", round_id=2**63, a="a", b="b"), "round id"),
    (dict(purpose="shares", round_id=1, a="", b="b"), "non-empty string"),
])
def test_derive_key_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ka.derive_key(bytes(32), **kwargs)


def test_derive_key_takes_only_a_32_byte_secret():
    with pytest.raises(ValueError, match="32 bytes"):
        ka.derive_key(bytes(31), purpose="mask", round_id=1, a="a", b="b")


# Points of order 1, 2, 4 and 8 and their non-canonical encodings (u = p − 1, p, p + 1).
LOW_ORDER = ["00" * 32, "01" + "00" * 31,
             "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
             "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
             "ec" + "ff" * 30 + "7f", "ed" + "ff" * 30 + "7f", "ee" + "ff" * 30 + "7f"]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_public_keys_are_refused(point):
    raw = bytes.fromhex(point)
    with pytest.raises(BadPublicKey, match="low-order point"):
        ka.check_public_key(raw)
    with pytest.raises(BadPublicKey, match="low-order point"):
        ka.shared_secret(KeyPair.generate().private, raw)


def test_public_keys_of_the_wrong_size_are_refused():
    ka.check_public_key(KeyPair.generate().public)
    for raw in (b"", bytes(31), bytes(33), "a" * 32):
        with pytest.raises(BadPublicKey, match="32 raw bytes"):
            ka.check_public_key(raw)
    with pytest.raises(ValueError, match="private key is 32 raw bytes"):
        ka.shared_secret(bytes(31), KeyPair.generate().public)


# Share boxes ------------------------------------------------------------------------------

def _box_key(round_id=7, sender="d01", recipient="d02") -> bytes:
    u, v = KeyPair.generate(), KeyPair.generate()
    return ka.derive_key(ka.shared_secret(u.private, v.public), purpose="shares", round_id=round_id,
                         a=sender, b=recipient)


def test_a_box_opens_only_with_its_key_round_sender_and_recipient():
    key, where = _box_key(), dict(round_id=7, sender="d01", recipient="d02")
    b_share, s_share = os.urandom(SHARE_BYTES), os.urandom(SHARE_BYTES)
    box = sb.seal(key, sb.pack_shares("d01", "d02", 7, b_share, s_share), **where)
    assert len(box) == sb.NONCE_BYTES + 8 + 2 * (2 + 3) + 2 * SHARE_BYTES + sb.TAG_BYTES
    assert sb.unpack_shares(sb.open_box(key, box, **where), **where) == (b_share, s_share)
    assert box != sb.seal(key, sb.pack_shares("d01", "d02", 7, b_share, s_share), **where)  # fresh nonce

    refused = {
        "wrong key": (_box_key(), box, where),
        "wrong round": (key, box, dict(where, round_id=8)),
        "swapped direction": (key, box, dict(where, sender="d02", recipient="d01")),
        "other recipient": (key, box, dict(where, recipient="d03")),
        "truncated": (key, box[:-1], where),
        "too short": (key, box[:sb.NONCE_BYTES + sb.TAG_BYTES - 1], where),
        "empty": (key, b"", where),
    }
    for i in (0, sb.NONCE_BYTES, len(box) // 2, len(box) - 1):  # nonce, ciphertext, tag
        refused[f"bit flipped at {i}"] = (key, box[:i] + bytes([box[i] ^ 1]) + box[i + 1:], where)
    for name, (k, b, w) in refused.items():
        with pytest.raises(ShareBoxError, match="does not open for round"):
            sb.open_box(k, b, **w)
            pytest.fail(name)


def test_shares_replayed_under_a_reused_key_are_refused_by_their_contents():
    # A device that reused its keys across rounds: a box of round 7 re-sealed as round 8 opens,
    # but the plaintext still says round 7.
    key, b_share, s_share = _box_key(), os.urandom(SHARE_BYTES), os.urandom(SHARE_BYTES)
    plaintext = sb.pack_shares("d01", "d02", 7, b_share, s_share)
    opened = sb.open_box(key, sb.seal(key, plaintext, round_id=8, sender="d01", recipient="d02"),
                         round_id=8, sender="d01", recipient="d02")
    with pytest.raises(ShareBoxError, match="name round 7 from 'd01' to 'd02': replayed or misrouted"):
        sb.unpack_shares(opened, round_id=8, sender="d01", recipient="d02")
    for where in (dict(round_id=7, sender="d02", recipient="d01"), dict(round_id=7, sender="d01", recipient="d0")):
        with pytest.raises(ShareBoxError, match="replayed or misrouted"):
            sb.unpack_shares(plaintext, **where)


def test_malformed_share_plaintexts_are_refused():
    where = dict(round_id=7, sender="d01", recipient="dé")
    plaintext = sb.pack_shares("d01", "dé", 7, bytes(SHARE_BYTES), b"\1" * SHARE_BYTES)
    assert sb.unpack_shares(plaintext, **where) == (bytes(SHARE_BYTES), b"\1" * SHARE_BYTES)
    for bad in (plaintext[:-1], plaintext + b"\0", plaintext[:5], b"", plaintext[:8] + b"\xff\xff" + plaintext[10:]):
        with pytest.raises(ShareBoxError, match="malformed"):
            sb.unpack_shares(bad, **where)
    with pytest.raises(ValueError, match="33 bytes"):
        sb.pack_shares("d01", "d02", 7, bytes(32), bytes(SHARE_BYTES))
    with pytest.raises(ValueError, match="non-empty"):
        sb.pack_shares("", "d02", 7, bytes(SHARE_BYTES), bytes(SHARE_BYTES))
    with pytest.raises(ValueError, match="32 bytes"):
        sb.seal(bytes(16), b"x", **where)


# The mask generator -----------------------------------------------------------------------

def test_the_stream_is_chacha20_rfc_8439():
    # RFC 8439, appendix A.1, test vector #1: all-zero key, nonce and counter.
    expected = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7")
    assert prg.expand(bytes(32), 8, 32).tolist() == np.frombuffer(expected, "<u4").tolist()
    assert prg.expand(bytes(32), 2, 32).tolist() == [0xADE0B876, 0x903DF1A0]


def test_expand_is_deterministic_per_seed_and_bounded_by_its_bits():
    seed = os.urandom(32)
    long = prg.expand(seed, 1000, 32)
    assert long.dtype == np.uint32 and long.shape == (1000,) and long.flags.writeable
    assert np.array_equal(long, prg.expand(seed, 1000, 32))
    assert np.array_equal(long[:10], prg.expand(seed, 10, 32))  # a prefix of the same stream
    assert not np.array_equal(long, prg.expand(os.urandom(32), 1000, 32))
    for bits in (1, 7, 20, 31, 32):
        words = prg.expand(seed, 1000, bits)
        assert words.max() < 2**bits and np.array_equal(words, long & np.uint32(2**bits - 1))
        assert words.max() >= 2**bits * 7 // 8  # the top of the range is used too
    assert prg.expand(seed, 0, 8).shape == (0,)
    for bad in (0, 33, True):
        with pytest.raises(ValueError, match="bits must be an integer in 1..32"):
            prg.expand(seed, 10, bad)
    with pytest.raises(ValueError, match="a mask seed is 32 bytes, got 16 bytes"):
        prg.expand(bytes(16), 10, 8)
    with pytest.raises(ValueError, match="length"):
        prg.expand(seed, -1, 8)


def _chi_square(values: np.ndarray, buckets: int) -> float:
    counts = np.bincount(values, minlength=buckets)
    expected = values.size / buckets
    return float(((counts - expected) ** 2 / expected).sum())


def test_masks_are_uniform():
    # 15 degrees of freedom: chi-square exceeds 50 with probability < 1e-5 for a uniform source.
    seed = bytes.fromhex("5e" * 32)
    low = prg.expand(seed, 100_000, 4)
    high = prg.expand(seed, 100_000, 32) >> 28
    assert _chi_square(low, 16) < 50 and _chi_square(high, 16) < 50
    biased = low.copy()
    biased[::50] = 0  # 2 % of the values moved to one bucket: far outside the bound
    assert _chi_square(biased, 16) > 500
    # a masked vector's mean is the uniform's, whatever it hides
    for hidden in (np.zeros(100_000, np.uint32), np.arange(100_000, dtype=np.uint32) % 7):
        masked = hidden.copy()
        prg.apply_mask(masked, seed, 16)
        assert abs(masked.mean() / ((2**16 - 1) / 2) - 1) < 0.01


@pytest.mark.parametrize("bits", [1, 9, 24, 32])
def test_masks_cancel_modulo_2_to_the_bits(bits):
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**bits, 5000, dtype=np.uint64).astype(np.uint32)
    seed = os.urandom(32)
    acc = x.copy()
    prg.apply_mask(acc, seed, bits)
    assert not np.array_equal(acc, x) and acc.max() < 2**bits
    prg.apply_mask(acc, seed, bits, subtract=True)
    assert np.array_equal(acc, x)
    # a pairwise mask: u adds it, v subtracts it, the sum modulo 2^bits is the plain sum
    y = rng.integers(0, 2**bits, 5000, dtype=np.uint64).astype(np.uint32)
    yu, yv = x.copy(), y.copy()
    prg.apply_mask(yu, seed, bits)
    prg.apply_mask(yv, seed, bits, subtract=True)
    total = (yu.astype(np.uint64) + yv) % 2**bits
    assert np.array_equal(total, (x.astype(np.uint64) + y) % 2**bits)


def test_apply_mask_reduces_its_input_and_refuses_other_arrays():
    acc = np.full(4, 2**32 - 1, np.uint32)
    prg.apply_mask(acc, bytes(32), 8)
    assert np.array_equal(acc, (np.full(4, 255) + prg.expand(bytes(32), 4, 8)) % 256)
    read_only = np.zeros(4, np.uint32)
    read_only.flags.writeable = False
    for bad, what in ((np.zeros(4, np.int64), "int64"), (np.zeros((2, 2), np.uint32), "shape \\(2, 2\\)"),
                      (read_only, "read-only"), ([0, 0], "list")):
        with pytest.raises(ValueError, match=what):
            prg.apply_mask(bad, bytes(32), 8)


# The neighbour graph ----------------------------------------------------------------------

def test_default_degree_is_complete_up_to_32_then_grows_like_log_n():
    assert [graph.default_degree(n) for n in (2, 3, 10, 32)] == [1, 2, 9, 31]
    # Without dropout the floor 3·⌈log₂ n⌉ (even) is the degree.
    assert [graph.default_degree(n, 0.0) for n in (33, 64, 65, 1000, 10_000, 100_000)] == [18, 18, 22, 30, 42, 52]
    for n in range(33, 3000, 37):
        k = graph.default_degree(n, 0.0)
        assert k % 2 == 0 and k >= 3 * math.ceil(math.log2(n)) > k - 2
    with pytest.raises(ValueError, match="at least 2 devices"):
        graph.default_degree(1)
    with pytest.raises(ValueError, match="tolerated_dropout"):
        graph.default_degree(100, 0.5)


@pytest.mark.parametrize("n,dropout", [(100, 0.2), (1000, 0.2), (1000, 0.1), (10_000, 0.2), (1000, 0.3)])
def test_default_degree_is_the_smallest_whose_dropout_tail_meets_the_target(n, dropout):
    """Above the log n floor, k is raised until n devices, each losing neighbours at random, all
    keep t > k/2 of them except with probability 2^-20 (union bound); k − 2 would not."""
    k = graph.default_degree(n, dropout)
    floor = 3 * math.ceil(math.log2(n))
    floor += floor % 2
    assert k % 2 == 0 or k == n - 1
    if k < n - 1:
        assert n * graph.unmaskable_tail(k, dropout) <= graph.FAILURE_TARGET
    if k - 2 >= floor:
        assert n * graph.unmaskable_tail(k - 2, dropout) > graph.FAILURE_TARGET


def test_the_dropout_tail_is_the_binomial_one_by_simulation():
    """unmaskable_tail(k, d) against 200,000 simulated neighbourhoods (k = 22, d = 0.3: about 5 %)."""
    rng = np.random.default_rng(7)
    k, d = 22, 0.3
    kept = rng.binomial(k, 1 - d, size=200_000)
    simulated = float(np.mean(kept < k // 2 + 1))
    exact = graph.unmaskable_tail(k, d)
    assert 0.03 < exact < 0.08
    assert abs(simulated - exact) < 4 * math.sqrt(exact * (1 - exact) / 200_000)
    assert graph.unmaskable_tail(k, 0.0) == 0.0


def _check_graph(table: list[list[int]], n: int, k: int) -> None:
    assert len(table) == n
    edges = {(u, v) for u, row in enumerate(table) for v in row}
    for u, row in enumerate(table):
        assert row == sorted(row) and len(set(row)) == len(row) == min(k, n - 1)
        assert u not in row and all(0 <= v < n for v in row)
    assert all((v, u) in edges for u, v in edges)


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (5, 4), (6, 5), (6, 9), (7, 2), (10, 4), (11, 8), (100, 10),
                                 (1000, 30)])
def test_the_graph_is_regular_symmetric_and_loop_free(n, k):
    table = graph.neighbours(n, k, os.urandom(32))
    _check_graph(table, n, k)
    if k >= n - 1:
        assert table == [[v for v in range(n) if v != u] for u in range(n)]


def test_the_graph_is_a_harary_graph_over_a_seeded_permutation():
    seed = os.urandom(32)
    table = graph.neighbours(50, 6, seed)
    assert table == graph.neighbours(50, 6, seed)
    assert table != graph.neighbours(50, 6, os.urandom(32))
    # walking the ring: from any node, each next ring neighbour is in the previous one's list, and
    # the k/2 nodes before and after on the ring are exactly a node's neighbours
    order = graph._permutation(50, seed)
    for p in range(50):
        ring = {int(order[(p + d) % 50]) for d in (-3, -2, -1, 1, 2, 3)}
        assert set(table[order[p]]) == ring
    assert sorted(order.tolist()) == list(range(50))


def test_the_permutation_is_uniform():
    # All 24 orders of 4 nodes over 4,800 seeds; a Fisher–Yates off by one (Sattolo's algorithm,
    # or j drawn from 0..n−1) would give a few orders never, or some twice as often.
    counts = Counter(tuple(graph._permutation(4, i.to_bytes(32, "big")).tolist()) for i in range(4800))
    assert len(counts) == 24
    expected = 4800 / 24
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 60  # 23 d.o.f.: p < 1e-4


def test_the_shuffle_skips_words_that_would_bias_it():
    # 2^32 mod 3 = 1, so the word 2^32 − 1 would make j = 0 one draw in 2^32 more likely: it is
    # skipped and the next word (5 → j = 2) used; for i = 1 (m = 2) every word is fine.
    assert graph._shuffle(3, iter([2**32 - 1, 5, 2**32 - 1])) == [0, 1, 2]
    assert graph._shuffle(3, iter([2**32 - 3, 2**32 - 1])) == [0, 2, 1]  # below the limit: j = 1, kept
    seed = os.urandom(32)
    assert list(itertools.islice(prg.words(seed), 3000)) == prg.expand(seed, 3000, 32).tolist()


def test_neighbours_refuses_degrees_it_cannot_build():
    for n, k in ((10, 3), (10, 0), (10, -2), (10, 1)):
        with pytest.raises(ValueError, match="must be even and >= 2"):
            graph.neighbours(n, k, bytes(32))
    with pytest.raises(ValueError, match="at least 2 devices"):
        graph.neighbours(1, 2, bytes(32))
    with pytest.raises(ValueError, match="graph seed is 32 bytes"):
        graph.neighbours(10, 4, bytes(8))


def test_thresholds_take_a_strict_majority_of_the_neighbours():
    assert graph.thresholds(10) == graph.Thresholds(degree=9, threshold=5)
    assert graph.thresholds(1000) == graph.Thresholds(degree=84, threshold=43)  # default_degree at d = 0.2
    assert graph.thresholds(1000, degree=40) == graph.Thresholds(degree=40, threshold=21)
    assert graph.thresholds(5, degree=10, tolerated_dropout=0.2) == graph.Thresholds(degree=4, threshold=3)
    assert graph.thresholds(2, tolerated_dropout=0) == graph.Thresholds(degree=1, threshold=1)
    for n in range(6, 200):
        for dropout in (0.2, 0.3):
            th = graph.thresholds(n, tolerated_dropout=dropout)
            assert th.degree / 2 < th.threshold <= th.degree - math.ceil(dropout * th.degree)
    assert graph._neighbours_lost(50, 0.14) == 7 and math.ceil(0.14 * 50) == 8
    with pytest.raises(ValueError, match="degree/2 < t <= degree"):
        graph.Thresholds(degree=10, threshold=5)


@pytest.mark.parametrize("n,kwargs,message", [
    (5, dict(tolerated_dropout=0.3), "with 5 devices, degree 4 and threshold 3, a device that loses 2 of its 4 neighbours .* keeps 2"),
    (3, {}, "keeps 1 shareholder\\(s\\), fewer than the 2"),
    (1000, dict(degree=30, tolerated_dropout=0.47), "loses 15 of its 30 .* keeps 15 shareholder\\(s\\), fewer than the 16"),
    (1000, dict(degree=4, tolerated_dropout=0.3), "loses 2 of its 4"),
    (1, {}, "at least 2 devices"),
    (100, dict(degree=7), "must be even"),
    (100, dict(tolerated_dropout=0.5), "in \\[0, 0.5\\)"),
    (100, dict(tolerated_dropout=-0.1), "in \\[0, 0.5\\)"),
    (100, dict(tolerated_dropout=float("nan")), "in \\[0, 0.5\\)"),
])
def test_thresholds_refuse_settings_that_could_strand_a_device(n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        graph.thresholds(n, **kwargs)
