"""The common-grid integer encoding of secure aggregation (fedkb_core/secagg/integer_encoding.py),
on vectors the tests build: real numpy, no mocks.

Vectors are two blocks long (LENGTH = BLOCK + 1000, P = 2·BLOCK) so every test is fast and the
padding of a partial block is exercised.

Notation of the bounds below: step = c/W; every device's rounding error e is, per coordinate,
zero-mean, inside (−step, step) and of variance at most step²/4, independent across coordinates
and devices. For a sum of m encodings the error E = Σ e_i therefore has |E_j| < m·step for every
coordinate (deterministic) and E‖E‖² ≤ m·P·step²/4; ‖E‖² is a sum of P independent bounded terms,
so it concentrates within a few percent of its mean and 1.5× that mean fails with probability far
below 1e-9 (Hoeffding). The rotation is orthogonal, so the same bound holds in the weights' layout.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkb_core import hadamard, update_encoding
from fedkb_core.secagg import integer_encoding as ie
from fedkb_core.update_encoding import BLOCK

LENGTH = BLOCK + 1000
SEED = 4242
N_MAX = 64


def _grid(bits=8, cohort=32, **kw) -> ie.SecAggGrid:
    base = dict(bits=bits, cohort=cohort, clip_norm=1.0, length=LENGTH, rotation_seed=SEED, max_examples=N_MAX)
    return ie.SecAggGrid.from_cohort(**{**base, **kw})


def _update(seed: int, norm: float = 0.9) -> np.ndarray:
    """A Gaussian update of the given norm (≤ C = 1), float32 as a device sends it."""
    x = np.random.default_rng(seed).normal(size=LENGTH)
    return (x * (norm / np.linalg.norm(x))).astype(np.float32)


def _signed(vector: np.ndarray, grid: ie.SecAggGrid) -> np.ndarray:
    """The body read modulo 2^r, the tail modulo 2^32, both as signed."""
    v = vector.astype(np.int64)
    body, tail = v[: grid.padded] & ((1 << grid.modulus_bits) - 1), v[grid.padded:]
    body = np.where(body >= 1 << (grid.modulus_bits - 1), body - (1 << grid.modulus_bits), body)
    return np.concatenate([body, np.where(tail >= 1 << 31, tail - (1 << 32), tail)])


def _fold(vectors, grid) -> np.ndarray:
    """As the server folds: every vector added modulo 2^32 (MASK_BITS)."""
    acc = np.zeros(grid.vector_length, np.uint32)
    for v in vectors:
        ie.add_mod(acc, v, ie.MASK_BITS)
    return acc


def _rotated(x: np.ndarray) -> np.ndarray:
    return hadamard.rotate(x, SEED).astype(np.float64)


def _weight(n: int, grid) -> float:
    return ie.weight_level(n, grid) / ie.WEIGHT_LEVELS


# The grid ---------------------------------------------------------------------------------

def test_modulus_is_bits_plus_the_cohorts_log2():
    assert ie.modulus_bits(8, 1) == 8
    assert ie.modulus_bits(8, 2) == 9
    assert ie.modulus_bits(8, 3) == ie.modulus_bits(8, 4) == 10
    assert ie.modulus_bits(8, 5) == 11
    assert ie.modulus_bits(12, 100) == 19 and ie.modulus_bits(12, 128) == 19 and ie.modulus_bits(12, 129) == 20
    assert ie.modulus_bits(24, 256) == 32
    assert ie.modulus_bits(2, 1) == 2


def test_modulus_refusals_explain_themselves():
    with pytest.raises(ValueError, match="above 2\\^32"):
        ie.modulus_bits(24, 257)
    with pytest.raises(ValueError, match="above 2\\^32"):
        ie.modulus_bits(20, 10_000)
    with pytest.raises(ValueError, match="b = 1 has no nonzero level"):
        ie.modulus_bits(1, 10)
    for bits in (0, 25, True, 8.0, "8"):
        with pytest.raises(ValueError, match="bits must be an integer in 2..24"):
            ie.modulus_bits(bits, 10)
    for cohort in (0, -3, 2.5, None, ie.MAX_TAIL_COUNT + 1):
        with pytest.raises(ValueError, match="cohort"):
            ie.modulus_bits(8, cohort)


def test_coordinate_bound_is_clip_inflations_tail_bound():
    """c²·d/C² = 2·ln(2d/δ) is the term κ_b² − 1 = 2·ln(2d/δ)/(2^b − 1)² of `clip_inflation`, with the
    same δ; and a rotated update of norm C stays within ±c (a spike, spread flat, and a Gaussian)."""
    assert ie.TAIL == update_encoding._TAIL
    for bits in (1, 4, 8):
        ratio = ie.coordinate_bound(2.0) ** 2 * BLOCK / 4.0
        assert ratio == pytest.approx((update_encoding.clip_inflation(bits) ** 2 - 1) * ((1 << bits) - 1) ** 2)
    assert ie.coordinate_bound(1.0) == pytest.approx(0.0616, abs=1e-4)
    spike = np.zeros(LENGTH, np.float32)
    spike[17] = 1.0
    for x in (spike, _update(1, 1.0)):
        assert np.abs(_rotated(x)).max() <= ie.coordinate_bound(1.0)
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="clip norm"):
            ie.coordinate_bound(bad)


def test_grid_properties():
    g = _grid(bits=8, cohort=100)
    assert (g.modulus_bits, g.levels, g.padded, g.vector_length) == (15, 127, 2 * BLOCK, 2 * BLOCK + 1)
    assert g.step == pytest.approx(ie.coordinate_bound(1.0) / 127)
    assert g.max_count == (2**14 - 1) // 127 == 129 >= 100
    assert _grid(count_unclipped=True).vector_length == 2 * BLOCK + 2
    assert g.problems() == []
    for bits in range(2, 25):  # the cohort the modulus was made for always fits
        for cohort in (1, 2, 3, 100, min(1 << (32 - bits), ie.MAX_TAIL_COUNT)):
            if bits + (cohort - 1).bit_length() <= 32:
                assert _grid(bits=bits, cohort=cohort).max_count >= cohort


def test_grid_problems_name_every_bad_field():
    good = _grid()
    assert ie.SecAggGrid(**{**good.__dict__, "bits": 1}).problems()[0].startswith("secure aggregation bits")
    bad = ie.SecAggGrid(bits=8, modulus_bits=7, clip_norm=math.nan, length=0, rotation_seed=-1, max_examples=0,
                        weighted="yes", count_unclipped=1)
    problems = " | ".join(bad.problems())
    for word in ("modulus bits", "clip norm", "length", "rotation seed", "max examples", "weighted",
                 "count_unclipped"):
        assert word in problems
    assert "modulus bits" in " ".join(ie.SecAggGrid(**{**good.__dict__, "modulus_bits": 33}).problems())
    with pytest.raises(ValueError, match="invalid secure aggregation grid.*no nonzero level"):
        ie.encode(_update(0), 1, ie.SecAggGrid(**{**good.__dict__, "bits": 1}), np.random.default_rng(0))


def test_weight_levels():
    g = _grid(bits=8)  # L = 65,535 whatever b is, n_max = 64
    top = ie.WEIGHT_LEVELS
    assert top == 65535 and ie.weight_level(64, g) == top and ie.weight_level(1000, g) == top
    assert ie.weight_level(1, g) == 1024 and ie.weight_level(0, g) == 1  # ⌈65535/64⌉; never 0
    assert ie.weight_level(32, g) == 32768  # ⌈32767.5⌉
    for n in range(1, N_MAX + 1):
        assert 0 <= ie.weight_level(n, g) / top - n / N_MAX < 1 / top
    unit = _grid(bits=8, weighted=False)
    assert {ie.weight_level(n, unit) for n in (0, 1, 64, 5000)} == {top}
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="num_examples"):
            ie.weight_level(bad, g)


# Encoding ---------------------------------------------------------------------------------

def test_encoding_is_uint32_on_the_grid_in_twos_complement():
    g = _grid(bits=6, cohort=5, count_unclipped=True)  # W = 31, r = 9
    x = _update(2, 1.0)
    v = ie.encode(x, 40, g, np.random.default_rng(0), unclipped=True)
    assert v.dtype == np.uint32 and v.shape == (g.vector_length,)
    assert int(v[: g.padded].max()) < 1 << g.modulus_bits
    s = _signed(v, g)
    assert s[: g.padded].min() >= -31 and s[: g.padded].max() <= 31 and s[: g.padded].min() < 0
    assert s[g.padded] == ie.weight_level(40, g) == 40960 and s[g.padded + 1] == 1
    # Each integer is the floor or the ceiling of w·y/step: stochastic rounding, never further.
    exact = _rotated(x).ravel() * (40960 / ie.WEIGHT_LEVELS) / g.step
    assert np.all((s[: g.padded] == np.floor(exact)) | (s[: g.padded] == np.ceil(exact)))
    assert ie.encode(x, 40, g, np.random.default_rng(0), unclipped=False)[g.padded + 1] == 0
    # Same rng state, same integers; another state, other roundings.
    np.testing.assert_array_equal(v, ie.encode(x, 40, g, np.random.default_rng(0), unclipped=True))
    assert not np.array_equal(v, ie.encode(x, 40, g, np.random.default_rng(1), unclipped=True))


def test_a_coordinate_beyond_c_is_clamped_to_w():
    """An update whose rotation is a spike of height C (possible only with probability ≤ 10⁻⁹ per
    block for an honest, un-adversarial update) is clamped to ±W, not wrapped."""
    g = _grid(bits=8, weighted=False)
    for sign in (1.0, -1.0):
        spike = np.zeros((2, BLOCK))
        spike[1, 5] = sign
        x = hadamard.unrotate(spike, SEED, 2 * BLOCK)
        x[LENGTH:] = 0
        x = (x * (0.999 / np.linalg.norm(x[:LENGTH])))[:LENGTH].astype(np.float32)
        s = _signed(ie.encode(x, 1, g, np.random.default_rng(0)), g)
        assert s[BLOCK + 5] == sign * 127
        assert np.abs(s[: g.padded]).max() == 127


def test_encode_refusals():
    g = _grid()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="above the clip norm"):
        ie.encode(_update(0, 1.001), 1, g, rng)
    ie.encode(_update(0, 1.000001), 1, g, rng)  # float32 slack
    bad = _update(0)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ie.encode(bad, 1, g, rng)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        ie.encode(bad, 1, g, rng)
    for wrong in (np.zeros(LENGTH - 1, np.float32), np.zeros(LENGTH + 1, np.float32),
                  np.zeros((1, LENGTH), np.float32)):
        with pytest.raises(ValueError, match=f"flat vector of {LENGTH}"):
            ie.encode(wrong, 1, g, rng)
    with pytest.raises(ValueError, match="num_examples"):
        ie.encode(_update(0), -1, g, rng)


# Sums and decoding ------------------------------------------------------------------------

def test_unbiased_mean_of_many_encodings_converges_like_one_over_sqrt_k():
    """K encodings of one update Δ (weight w = 40/64 rounded up on the grid), folded with
    `add_mod` and decoded once with count = K: the mean errs by ē with E‖ē‖² ≤ V/K, V = P·step²/4
    (module docstring), and its squared error falls like 1/K (×16 from K = 25 to 400). A biased
    rounding (to nearest) would keep its bias whatever K, and fail at K = 400."""
    g = _grid(bits=4, cohort=400)  # W = 7: coarse, so rounding dominates any float error
    x = _update(3, 0.9)
    w = _weight(40, g)
    target = w * _rotated(x)
    rng = np.random.default_rng(10)
    acc, errors = np.zeros(g.vector_length, np.uint32), {}
    for k in range(1, 401):
        ie.add_mod(acc, ie.encode(x, 40, g, rng), ie.MASK_BITS)
        if k in (25, 400):
            decoded = ie.decode_sum(acc, g, count=k)
            assert decoded.weight == pytest.approx(k * w)
            errors[k] = float(np.sum((decoded.rotated / k - target) ** 2))
            unrotated = float(np.linalg.norm(decoded.deltas(LENGTH) / k - w * x))
            assert unrotated <= math.sqrt(errors[k]) * (1 + 1e-6) + 1e-6  # orthogonal; padding dropped
    bound = g.padded * g.step**2 / 4
    assert errors[400] <= 1.5 * bound / 400, (errors, bound)
    assert errors[25] / errors[400] == pytest.approx(16, rel=0.2)
    assert math.sqrt(errors[400]) < 0.1 * np.linalg.norm(target)  # the mean is actually close


def test_sum_of_encodings_is_the_sum_of_decodes_and_within_the_rounding_bound():
    """m = 30 devices, different updates (some clipped exactly at C) and example counts, b = 8.
    The folded sum decodes to exactly the sum of the m one-device decodes (same integers; only
    the final multiplication by step rounds), and to Σ w_i·R·Δ_i within |E_j| < m·step per
    coordinate and ‖E‖² ≤ 1.5·m·P·step²/4 (module docstring), in both layouts."""
    m = 30
    g = _grid(bits=8, cohort=m)
    rng = np.random.default_rng(5)
    counts = [int(n) for n in np.random.default_rng(6).integers(1, N_MAX + 1, m)]
    updates = [_update(100 + i, 1.0 if i % 3 == 0 else 0.2 + 0.7 * (i / m)) for i in range(m)]
    vectors = [ie.encode(x, n, g, rng) for x, n in zip(updates, counts)]
    total = ie.decode_sum(_fold(vectors, g), g, count=m)
    singles = [ie.decode_sum(v, g, count=1) for v in vectors]
    summed = np.sum([s.rotated for s in singles], axis=0)
    np.testing.assert_array_equal(np.rint(total.rotated / g.step), np.rint(summed / g.step))
    np.testing.assert_allclose(total.rotated, summed, rtol=1e-12, atol=1e-12 * g.step)
    assert round(total.weight * ie.WEIGHT_LEVELS) == sum(ie.weight_level(n, g) for n in counts)
    assert total.weight == pytest.approx(sum(s.weight for s in singles))
    assert total.unclipped is None

    exact_rotated = sum(_weight(n, g) * _rotated(x) for x, n in zip(updates, counts))
    assert max(float(np.abs(_weight(n, g) * _rotated(x)).max()) for x, n in zip(updates, counts)) <= g.bound
    error = total.rotated - exact_rotated
    assert np.abs(error).max() < m * g.step
    l2_bound = math.sqrt(1.5 * m * g.padded * g.step**2 / 4)
    assert np.linalg.norm(error) <= l2_bound
    exact = sum(_weight(n, g) * x.astype(np.float64) for x, n in zip(updates, counts))
    assert np.linalg.norm(total.deltas(LENGTH) - exact) <= l2_bound


def test_the_worst_case_sum_does_not_wrap():
    """m devices all at +W, or all at −W, in every coordinate (weights all W): the sum is ±m·W,
    inside (−2^(r−1), 2^(r−1)), for m up to the cohort the modulus was made for and beyond, up to
    `max_count`; one more device could wrap and is refused."""
    for bits, cohort in ((8, 100), (4, 3), (12, 64), (2, 1), (24, 256)):
        g = ie.SecAggGrid.from_cohort(bits=bits, cohort=cohort, clip_norm=1.0, length=100, rotation_seed=1,
                                      max_examples=1, count_unclipped=True)
        top, mask = g.levels, (1 << g.modulus_bits) - 1
        assert g.max_count >= cohort
        for m in (cohort, g.max_count):
            for sign in (1, -1):
                one = np.full(g.vector_length, (sign * top) & mask, np.uint32)
                one[g.padded], one[g.padded + 1] = ie.WEIGHT_LEVELS, 1
                decoded = ie.decode_sum(_fold([one] * m, g), g, count=m)
                np.testing.assert_allclose(decoded.rotated, sign * m * top * g.step)
                assert decoded.weight == m and decoded.unclipped == m
        with pytest.raises(ValueError, match="count must be an integer in 1.."):
            ie.decode_sum(np.zeros(g.vector_length, np.uint32), g, count=g.max_count + 1)


def test_weighted_mean_is_the_example_weighted_mean_within_the_weight_quantization():
    """The decoded mean Σ w_i·Δ̂_i / Σ w_i against the exact FedAvg mean M = Σ n_i·Δ_i / Σ n_i.

    With v_i = n_i/n_max and w_i = v_i + ε_i, 0 ≤ ε_i < 1/W (`weight_level` rounds up), the mean
    with the quantized weights and exact updates is M_w = M + Σ ε_i·(Δ_i − M) / Σ w_i, so
    ‖M_w − M‖ ≤ (1/W)·Σ‖Δ_i − M‖ / Σ w_i: the 1/W relative weight error, as a bound. The rounding
    adds ‖E‖/Σ w_i with ‖E‖ ≤ √(1.5·m·P·step²/4). Both are checked, and the decoded mean is much
    closer to M than the unweighted mean is at b = 10 (the weights matter)."""
    m = 20
    for bits in (5, 10):  # W = 15, where the weight error shows, and W = 511
        g = _grid(bits=bits, cohort=m)
        counts = [1, 2, 3, 5, 8, 13, 21, 34, 55, 64] * 2
        updates = [_update(200 + i, 0.3 + 0.035 * i).astype(np.float64) for i in range(m)]
        n = np.array(counts, np.float64)
        exact = sum(c * x for c, x in zip(n, updates)) / n.sum()
        w = np.array([_weight(c, g) for c in counts])
        quantized = sum(wi * x for wi, x in zip(w, updates)) / w.sum()
        weight_bound = sum(np.linalg.norm(x - exact) for x in updates) / ie.WEIGHT_LEVELS / w.sum()
        assert np.linalg.norm(quantized - exact) <= weight_bound

        rng = np.random.default_rng(bits)
        vectors = [ie.encode(x.astype(np.float32), c, g, rng) for x, c in zip(updates, counts)]
        decoded = ie.decode_sum(_fold(vectors, g), g, count=m)
        assert decoded.weight == pytest.approx(w.sum())
        mean = decoded.deltas(LENGTH) / decoded.weight
        rounding_bound = math.sqrt(1.5 * m * g.padded * g.step**2 / 4) / w.sum()
        assert np.linalg.norm(mean - exact) <= weight_bound + rounding_bound
        if bits == 10:  # at W = 15 the rounding noise of 20 devices is as large as the weights' effect
            unweighted = sum(updates) / m
            assert np.linalg.norm(mean - exact) < 0.25 * np.linalg.norm(unweighted - exact)


def test_unit_weights_without_weighting():
    """weighted=False (DP): every weight is 1 whatever the examples, Σ w = count exactly, and the
    sum is Σ Δ_i within the rounding bound."""
    m = 6
    g = _grid(bits=10, cohort=m, weighted=False)
    updates = [_update(300 + i, 0.5) for i in range(m)]
    rng = np.random.default_rng(0)
    vectors = [ie.encode(x, n, g, rng) for x, n in zip(updates, (0, 1, 7, 64, 99, 3))]
    assert {int(v[g.padded]) for v in vectors} == {ie.WEIGHT_LEVELS}
    decoded = ie.decode_sum(_fold(vectors, g), g, count=m)
    assert decoded.weight == m
    exact = sum(x.astype(np.float64) for x in updates)
    assert np.linalg.norm(decoded.deltas(LENGTH) - exact) <= math.sqrt(1.5 * m * g.padded * g.step**2 / 4)


def test_unclipped_bits_sum_to_the_count():
    m = 9
    g = _grid(bits=8, cohort=m, count_unclipped=True)
    flags = [True, False, True, True, False, False, True, False, True]
    rng = np.random.default_rng(1)
    vectors = [ie.encode(_update(400 + i, 0.4), 10, g, rng, unclipped=f) for i, f in enumerate(flags)]
    assert ie.decode_sum(_fold(vectors, g), g, count=m).unclipped == sum(flags) == 5
    plain = _grid(bits=8, cohort=m)
    v = ie.encode(_update(1, 0.4), 10, plain, rng, unclipped=True)  # no place for the bit: ignored
    assert v.shape == (plain.vector_length,) and ie.decode_sum(v, plain, count=1).unclipped is None


def test_decode_refuses_what_cannot_be_an_honest_sum():
    """A coordinate beyond ±count·W, a weight sum below count, an unclipped count above count: the
    sum wrapped or a device sent values outside the grid, and decode cannot tell which."""
    g = _grid(bits=8, cohort=4, count_unclipped=True)  # W = 127, r = 10
    top, mask = g.levels, (1 << 32) - 1
    honest = np.zeros(g.vector_length, np.int64)
    honest[g.padded] = 2 * ie.WEIGHT_LEVELS
    honest[7] = 2 * top  # the edge of two devices' range: accepted
    honest[8] = -2 * top
    ie.decode_sum((honest & mask).astype(np.uint32), g, count=2)
    for index, value, match in ((7, 2 * top + 1, "coordinate 7 of the sum is 255, beyond ±count·W = ±254"),
                                (8, -2 * top - 1, "coordinate 8 of the sum is -255"),
                                (g.padded, 1, "sum of 2 weights is 1, outside 2..131070"),
                                (g.padded, -5, "sum of 2 weights is -5"),
                                (g.padded, 2 * ie.WEIGHT_LEVELS + 1, "sum of 2 weights is 131071"),
                                (g.padded + 1, 3, "unclipped count is 3")):
        bad = honest.copy()
        bad[index] = value
        with pytest.raises(ValueError, match=match) as caught:
            ie.decode_sum((bad & mask).astype(np.uint32), g, count=2)
        assert "decoding cannot tell which" in str(caught.value)
    # The body is read modulo 2^r: bits above r (carries of the server's modulo-2^32 fold) are ignored.
    high = (honest & mask).astype(np.uint32)
    high[: g.padded] += np.uint32(5 << g.modulus_bits)
    np.testing.assert_array_equal(ie.decode_sum(high, g, count=2).rotated,
                                  ie.decode_sum((honest & mask).astype(np.uint32), g, count=2).rotated)
    with pytest.raises(ValueError, match="in \\[0, 2\\^32\\)"):
        ie.decode_sum(np.full(g.vector_length, 1 << 32, np.uint64), g, count=2)
    for wrong in (np.zeros(g.vector_length - 1, np.uint32), np.zeros(g.vector_length, np.float64)):
        with pytest.raises(ValueError, match="the sum must be"):
            ie.decode_sum(wrong, g, count=2)
    for count in (0, g.max_count + 1, 2.0):
        with pytest.raises(ValueError, match="count must be"):
            ie.decode_sum((honest & mask).astype(np.uint32), g, count=count)


def test_add_mod_wraps_and_refuses():
    acc = np.array([0, 1, 1023, 1000], np.uint32)
    ie.add_mod(acc, np.array([5, 1023, 1, 1000], np.uint32), 10)
    assert acc.tolist() == [5, 0, 0, (2000) % 1024]
    full = np.array([2**32 - 1, 7], np.uint32)
    ie.add_mod(full, np.array([2, 2**32 - 7], np.uint32), 32)
    assert full.tolist() == [1, 0]
    ie.add_mod(acc, np.array([1, 2, 3, 4], np.uint16), 10)  # narrower unsigned values are fine
    with pytest.raises(ValueError, match="does not fit in 10 bits"):
        ie.add_mod(acc, np.array([0, 0, 1024, 0], np.uint32), 10)
    with pytest.raises(ValueError, match="shape"):
        ie.add_mod(acc, np.zeros(3, np.uint32), 10)
    with pytest.raises(ValueError, match="uint32"):
        ie.add_mod(acc.astype(np.int64), np.zeros(4, np.uint32), 10)
    with pytest.raises(ValueError, match="unsigned"):
        ie.add_mod(acc, np.zeros(4, np.int64), 10)
    for bits in (0, 33, True):
        with pytest.raises(ValueError, match="bits must be"):
            ie.add_mod(acc, np.zeros(4, np.uint32), bits)


# The tuned grid ---------------------------------------------------------------------------

def _tuned(r=8, cohort=32, block_rms_per_device=None, **kw) -> ie.SecAggGrid:
    length = kw.pop("length", LENGTH)
    steps = ie.tuned_steps(r, cohort, 1.0, hadamard.num_blocks(length), block_rms_per_device)
    base = dict(bits=r, modulus_bits=r, clip_norm=1.0, length=length, rotation_seed=SEED, max_examples=N_MAX,
                tuned_steps=steps)
    return ie.SecAggGrid(**{**base, **kw})


def test_tuned_steps_start_at_the_prior_then_follow_the_measurement_per_block():
    prior = 1.0 / math.sqrt(BLOCK)  # one device's block RMS at norm C = 1
    assert ie.tuned_steps(8, 20, 1.0, 2) == pytest.approx((ie.TUNED_Z * prior * 20 / 127,) * 2)
    measured = (prior / 10, prior / 2)
    assert ie.tuned_steps(8, 20, 1.0, 2, measured) == pytest.approx(
        tuple(ie.TUNED_Z * x * 20 / 127 for x in measured))
    # Never coarser than the prior, never finer than MEASURED_FLOOR of it (a block that did not move).
    assert ie.tuned_steps(8, 20, 1.0, 2, (1.0, 0.0)) == pytest.approx(
        (ie.TUNED_Z * prior * 20 / 127, ie.TUNED_Z * prior * ie.MEASURED_FLOOR * 20 / 127))
    # Several rounds' measurements, newest first: the largest per block, times the recent growth
    # (the median of the blocks' newest/previous ratios, here 2 and 4: 3), never below 1 nor above 4.
    newest, previous = np.array([prior / 10, prior / 20]), np.array([prior / 20, prior / 80])
    assert ie.tuned_steps(8, 20, 1.0, 2, [newest, previous]) == pytest.approx(
        tuple(ie.TUNED_Z * 3 * x * 20 / 127 for x in newest))
    assert ie.tuned_steps(8, 20, 1.0, 2, [previous, newest]) == pytest.approx(  # shrinking: the largest, as is
        tuple(ie.TUNED_Z * x * 20 / 127 for x in newest))
    assert ie.tuned_steps(8, 20, 1.0, 2, [newest * 100, newest]) == pytest.approx(  # growth capped at 4
        tuple(ie.TUNED_Z * min(4 * 100 * x, prior) * 20 / 127 for x in newest))
    assert ie.tuned_steps(12, 20, 1.0, 1, (prior / 10,)) == pytest.approx((ie.TUNED_Z * prior / 10 * 20 / 2047,))
    for args, match in (((1, 20, 1.0, 1), "modulus bits"), ((8, 0, 1.0, 1), "cohort"),
                        ((8, ie.MAX_TAIL_COUNT + 1, 1.0, 1), "cohort"), ((8, 20, 0.0, 1), "clip norm"),
                        ((8, 20, 1.0, 0), "num_blocks"), ((8, 20, 1.0, 2, (1.0,)), "2 finite numbers"),
                        ((8, 20, 1.0, 1, (math.nan,)), "finite"), ((8, 20, 1.0, 1, (-1.0,)), ">= 0")):
        with pytest.raises(ValueError, match=match):
            ie.tuned_steps(*args)
    good = _tuned()
    assert good.tuned and good.problems() == [] and good.step == max(good.tuned_steps)
    assert good.max_count == ie.MAX_TAIL_COUNT and good.vector_length == good.padded + 1
    assert "bits are its modulus bits" in " ".join(ie.SecAggGrid(**{**good.__dict__, "bits": 12}).problems())
    assert "one step per block: 2" in " ".join(ie.SecAggGrid(**{**good.__dict__, "tuned_steps": (0.1,)}).problems())
    for steps in ((0.0, 1.0), (-1.0, 1.0), (math.inf, 1.0), (True, 1.0), [0.1, 0.1]):
        assert "tuned steps" in " ".join(ie.SecAggGrid(**{**good.__dict__, "tuned_steps": steps}).problems())


def test_each_block_is_encoded_on_its_own_step():
    """Two blocks with steps 1:8: the same update's integers in the second block are 1/8 of the
    first's scale, and decoding multiplies each block back by its own step."""
    g = _tuned(12, 4, (0.5 / math.sqrt(BLOCK), 4 / math.sqrt(BLOCK) / 64 * 8))
    ratio = g.tuned_steps[1] / g.tuned_steps[0]
    x = _update(7, 0.9)
    decoded = ie.decode_sum(ie.encode(x, N_MAX, g, np.random.default_rng(0)), g, count=1)
    error = decoded.rotated - _rotated(x)
    for b, step in enumerate(g.tuned_steps):
        assert np.abs(error[b]).max() < step
    assert np.abs(error[1]).max() > np.abs(error[0]).max() * ratio / 4  # coarser where the step is
    assert len(decoded.block_rms) == 2


def test_the_first_tuned_round_of_a_small_cohort_cannot_wrap_whatever_the_updates():
    """No measurement yet, m·⌈c/step⌉ within the range (m = 40 at r = 8): m devices all at ±c in
    every coordinate, weights all L, sum inside ±127 units and decode (the sum's spread is not
    judged where it cannot have wrapped)."""
    m = 40
    g = _tuned(8, m)
    for sign in (1, -1):
        one = np.full(g.vector_length, (sign * math.ceil(g.bound / g.step)) & 255, np.uint32)
        one[g.padded] = ie.WEIGHT_LEVELS
        total = _fold([one] * m, g)
        assert np.abs(_signed(total, g)[: g.padded]).max() <= 127
        assert ie.decode_sum(total, g, count=m).weight == m


def test_a_tuned_sum_of_a_thousand_devices_at_8_bits_is_unbiased_and_its_tail_does_not_wrap():
    """m = 1,000 devices at r = 8 (a byte per value, the 8-bit hadamard update's width), the steps
    tuned from the block RMS per device of an earlier sum of 100 such updates: the decoded sum is
    within the rounding bound (‖E‖² ≤ 1.5·m·Σ_b d·step_b²/4) of Σ w_i·R·Δ_i, held with fill ≥ MIN_Z,
    and Σ w and the unclipped count (summed modulo 2^32 in the tail) are exact though m·L is far
    beyond 2^8."""
    m, length = 1000, 3000
    rng = np.random.default_rng(0)
    base = rng.normal(size=length)  # a shared direction, as a cohort's updates have
    updates = []
    for i in range(m):
        x = 0.5 * base / np.linalg.norm(base) + rng.normal(size=length) / math.sqrt(length)
        updates.append((x * (0.8 / np.linalg.norm(x))).astype(np.float32))
    counts = rng.integers(1, N_MAX + 1, m)
    kw = dict(length=length, count_unclipped=True)
    prior = _tuned(8, m, **kw)
    first = ie.decode_sum(_fold([ie.encode(x, int(n), prior, rng) for x, n in zip(updates[:100], counts)], prior),
                          prior, count=100)
    g = _tuned(8, m, tuple(x / 100 for x in first.block_rms), **kw)
    assert g.step < prior.step / 1.5  # the measurement buys resolution
    vectors = [ie.encode(x, int(n), g, rng, unclipped=i % 2 == 0) for i, (x, n) in enumerate(zip(updates, counts))]
    assert all(int(v[: g.padded].max()) < 256 for v in vectors)
    decoded = ie.decode_sum(_fold(vectors, g), g, count=m)
    assert decoded.weight * ie.WEIGHT_LEVELS == pytest.approx(sum(ie.weight_level(int(n), g) for n in counts))
    assert decoded.unclipped == m // 2
    assert ie.MIN_Z <= decoded.fill
    exact = sum(_weight(int(n), g) * hadamard.rotate(x, SEED).astype(np.float64) for x, n in zip(updates, counts))
    assert np.linalg.norm(decoded.rotated - exact) <= math.sqrt(1.5 * m * BLOCK * sum(s**2 for s in g.tuned_steps) / 4)


def test_a_sum_that_outgrows_its_tuned_range_is_refused_with_its_measured_spread():
    """Steps tuned to a measurement 20× too small: the sum wraps in many coordinates. Decoding
    refuses it (ModulusOverflow, a ValueError) and gives the block RMS it saw, widened for the
    blocks that overflowed; steps tuned to that decode the same updates."""
    m = 20
    updates = [_update(500 + i, 0.9) for i in range(m)]
    rng = np.random.default_rng(3)
    right = _tuned(8, m)
    decoded = ie.decode_sum(_fold([ie.encode(x, 64, right, rng) for x in updates], right), right, count=m)
    tight = _tuned(8, m, tuple(x / m / 20 for x in decoded.block_rms))
    with pytest.raises(ie.ModulusOverflow, match="likely wrapped") as caught:
        ie.decode_sum(_fold([ie.encode(x, 64, tight, rng) for x in updates], tight), tight, count=m)
    assert len(caught.value.block_rms) == 2 and all(x > 0 for x in caught.value.block_rms)
    retuned = _tuned(8, m, tuple(x / m for x in caught.value.block_rms))
    again = ie.decode_sum(_fold([ie.encode(x, 64, retuned, rng) for x in updates], retuned), retuned, count=m)
    assert again.fill >= ie.MIN_Z


def test_a_block_that_outgrows_its_range_is_left_out_and_the_rest_released():
    """Eight blocks, one of them tuned to a measurement 20× too small: that block wraps, so the
    decoded sum zeroes it (its parameters do not move this round), names it in `dropped_blocks`
    and reports its spread widened by OVERFLOW_WIDENING; the other seven decode within the rounding
    bound. Three of eight are a partial release too; all eight refuse the sum."""
    m, length = 20, 8 * BLOCK
    rng = np.random.default_rng(4)
    updates = []
    for i in range(m):
        x = rng.normal(size=length)
        updates.append((x * (0.9 / np.linalg.norm(x))).astype(np.float32))
    prior = _tuned(8, m, length=length)
    first = ie.decode_sum(_fold([ie.encode(x, N_MAX, prior, rng) for x in updates], prior), prior, count=m)
    measured = np.array(first.block_rms) / m

    def decode(tight_blocks):
        rms = measured.copy()
        rms[list(tight_blocks)] /= 20
        g = _tuned(8, m, tuple(rms), length=length)
        return g, ie.decode_sum(_fold([ie.encode(x, N_MAX, g, rng) for x in updates], g), g, count=m)

    g, decoded = decode([5])
    assert decoded.dropped_blocks == (5,)
    assert not decoded.rotated[5].any()
    assert ie.MIN_Z <= decoded.fill
    # The widened record tunes the next round so that the block fits again.
    retuned = _tuned(8, m, tuple(np.array(decoded.block_rms) / m), length=length)
    again = ie.decode_sum(_fold([ie.encode(x, N_MAX, retuned, rng) for x in updates], retuned), retuned, count=m)
    assert again.dropped_blocks == ()
    exact = sum(hadamard.rotate(x, SEED).astype(np.float64) for x in updates)
    kept = [b for b in range(8) if b != 5]
    bound = math.sqrt(1.5 * m * BLOCK * sum(g.tuned_steps[b] ** 2 for b in kept) / 4)
    assert np.linalg.norm(decoded.rotated[kept] - exact[kept]) <= bound
    g, partial = decode([1, 2, 3])
    assert partial.dropped_blocks == (1, 2, 3) and not partial.rotated[[1, 2, 3]].any()
    with pytest.raises(ie.ModulusOverflow, match="8 of the sum's 8 blocks"):
        decode(range(8))
