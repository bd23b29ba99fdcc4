"""Bit packing at every width 1..32 (fedkb_core/bitpack.py): the masked vectors of secure
aggregation travel at r ≤ 32 bits per coordinate. The narrow widths' original tests stay in
tests/test_hadamard_codec.py."""

from __future__ import annotations

import numpy as np
import pytest

from fedkb_core import bitpack

COUNTS = (0, 1, 3, 7, 8, 9, 63, 64, 65, 127, 1001)


def _reference_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The little-endian bit stream built bit by bit with numpy's unpackbits/packbits: value i's
    bit k is stream bit i·b + k, independent of the groups the packer uses."""
    wide = np.asarray(values, np.uint64).astype("<u8")
    per_value = np.unpackbits(wide.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(per_value.reshape(-1), bitorder="little")


def _values(rng, count: int, bits: int, dtype) -> np.ndarray:
    values = rng.integers(0, 1 << bits, count, dtype=np.uint64)
    values[: min(count, 2)] = (1 << bits) - 1  # the extremes are always there
    if count > 2:
        values[2] = 0
    return values.astype(dtype)


@pytest.mark.parametrize("bits", range(1, 33))
def test_round_trips_at_every_width_and_odd_counts(bits):
    rng = np.random.default_rng(bits)
    out_dtype = np.uint8 if bits <= 8 else np.uint32
    for count in COUNTS:
        values = _values(rng, count, bits, out_dtype)
        packed = bitpack.pack(values, bits)
        assert packed.dtype == np.uint8 and packed.size == bitpack.packed_size(count, bits) == -(-count * bits // 8)
        np.testing.assert_array_equal(packed, _reference_pack(values, bits))
        unpacked = bitpack.unpack(packed, bits, count)
        assert unpacked.dtype == out_dtype
        np.testing.assert_array_equal(unpacked, values)


@pytest.mark.parametrize("bits", [9, 13, 16, 17, 24, 31, 32])
def test_a_long_vector_round_trips(bits):
    """A masked vector's length (several 64-value groups and a partial one) at a few widths."""
    values = _values(np.random.default_rng(100 + bits), 100_003, bits, np.uint32)
    packed = bitpack.pack(values, bits)
    np.testing.assert_array_equal(packed, _reference_pack(values, bits))
    np.testing.assert_array_equal(bitpack.unpack(packed, bits, values.size), values)


def test_any_unsigned_dtype_packs_the_same_stream():
    values = np.array([0, 1, 255, 200, 7], np.uint8)
    for bits in (8, 9, 12, 32):
        expected = _reference_pack(values, bits)
        for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int64):
            np.testing.assert_array_equal(bitpack.pack(values.astype(dtype), bits), expected)
    assert bitpack.pack([1, 2, 3], 10).tolist() == _reference_pack(np.array([1, 2, 3]), 10).tolist()


@pytest.mark.parametrize("bits", [1, 5, 8, 9, 13, 16, 24, 31])
def test_a_value_that_does_not_fit_is_refused(bits):
    too_big = np.array([0, (1 << bits) - 1, 1 << bits], np.uint64)
    with pytest.raises(ValueError, match="does not fit"):
        bitpack.pack(too_big, bits)
    with pytest.raises(ValueError, match="does not fit"):
        bitpack.pack(np.array([3, -1], np.int64), bits)


def test_widths_and_dtypes_outside_the_range_are_refused():
    for bits in (0, 33, -1, True, 8.0):
        with pytest.raises(ValueError, match="bits must be"):
            bitpack.pack(np.zeros(1, np.uint32), bits)
        with pytest.raises(ValueError, match="bits must be"):
            bitpack.unpack(np.zeros(1, np.uint8), bits, 1)
    with pytest.raises(ValueError, match="unsigned integer"):
        bitpack.pack(np.array([1.0, 2.0]), 12)
    with pytest.raises(ValueError, match="does not fit"):
        bitpack.pack(np.array([1 << 32], np.uint64), 32)


@pytest.mark.parametrize("bits", [9, 12, 16, 20, 24, 27, 32])
def test_a_wrong_packed_size_is_refused(bits):
    for count in (1, 5, 64, 67):
        size = bitpack.packed_size(count, bits)
        for wrong in (size - 1, size + 1):
            with pytest.raises(ValueError, match=f"take {size} bytes"):
                bitpack.unpack(np.zeros(wrong, np.uint8), bits, count)


@pytest.mark.parametrize("bits", [x for x in range(9, 33) if x % 8])
def test_nonzero_unused_bits_are_refused(bits):
    """A count whose bits end inside a byte: each of that byte's unused high bits, set alone, is
    refused (one value, one encoding); the used ones are accepted."""
    for count in (1, 3, 65):
        used = (count * bits) % 8
        if not used:
            continue
        packed = bitpack.pack(np.zeros(count, np.uint32), bits)
        for bit in range(8):
            tampered = packed.copy()
            tampered[-1] |= 1 << bit
            if bit < used:
                assert int(bitpack.unpack(tampered, bits, count)[-1]) == 1 << (bits - used + bit)
            else:
                with pytest.raises(ValueError, match="unused bits"):
                    bitpack.unpack(tampered, bits, count)
