"""Pack b-bit integers (b = 1..32) densely into bytes, and back: vectorized, any count.

Value i occupies bits [i·b, (i+1)·b) of the little-endian bit stream (least significant bit of
byte 0 first), so a count that is not a multiple of 8 ends in a partly used byte whose unused
high bits are zero. Eight values of b bits are exactly b bytes, so the stream is a table of
groups (8 values ↔ b bytes) in which value j always sits at the same byte and shift: packing
and unpacking are 8 column operations on uint16, whatever the count, with no loop over values.

Wider values (b = 9..32, the masked vectors of secure aggregation travel at r ≤ 32 bits) use the
same idea on 64-bit words: 64 values of b bits are exactly b little-endian uint64 words, value j
of a group always starts in word ⌊j·b/64⌋ at shift j·b mod 64 and spills into the next word when
shift + b > 64; 64 column operations (plus one per spill) on groups of 64, so a million values
take a few milliseconds. b = 16 and 32 are plain little-endian arrays. Unpacking gives uint8 for
b ≤ 8 and uint32 for b ≥ 9.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 32


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take."""
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def _places(bits: int):
    """(value j of a group, its first byte, its shift) for the 8 values of a group."""
    return [(j, (j * bits) >> 3, (j * bits) & 7) for j in range(8)]


def _word_places(bits: int):
    """(value j of a 64-value group, its first uint64 word, its shift) for the 64 values."""
    return [(j, (j * bits) >> 6, (j * bits) & 63) for j in range(64)]


def _as_values(values, bits: int) -> np.ndarray:
    """`values` as a flat contiguous unsigned array, after checking every one fits in `bits` bits."""
    values = np.asarray(values)
    if values.dtype.kind not in "ui":
        raise ValueError(f"values must be an unsigned integer array, got dtype {values.dtype}")
    values = values.ravel()
    if values.size:
        if values.dtype.kind == "i" and int(values.min()) < 0:
            raise ValueError(f"a value does not fit in {bits} bits (negative)")
        if int(values.max()) >> bits:
            raise ValueError(f"a value does not fit in {bits} bits")
    return values


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The values (an unsigned integer array, each < 2**bits) packed into `packed_size(len, bits)`
    bytes (uint8).

    Raises:
        ValueError: bits outside 1..32, values not of an integer dtype, or a value that does not
            fit in `bits` bits.
    """
    _check_bits(bits)
    values = _as_values(values, bits)
    if bits <= 8:
        return _pack_narrow(np.ascontiguousarray(values, np.uint8), bits)
    if bits in (16, 32):
        return np.ascontiguousarray(values, f"<u{bits // 8}").view(np.uint8).copy()
    groups = -(-values.size // 64)
    table = np.zeros((groups, 64), np.uint64)
    table.reshape(-1)[: values.size] = values
    words = np.zeros((groups, bits), np.uint64)
    for j, word, shift in _word_places(bits):
        words[:, word] |= table[:, j] << np.uint64(shift)
        if shift + bits > 64:
            words[:, word + 1] |= table[:, j] >> np.uint64(64 - shift)
    return words.astype("<u8", copy=False).view(np.uint8).reshape(-1)[: packed_size(values.size, bits)].copy()


def _pack_narrow(values: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return values.copy()
    groups = -(-values.size // 8)
    table = np.zeros((groups, 8), np.uint16)
    table.reshape(-1)[: values.size] = values
    out = np.zeros((groups, bits), np.uint16)
    for j, byte, shift in _places(bits):
        shifted = table[:, j] << shift
        out[:, byte] |= shifted & 0xFF
        if shift + bits > 8:
            out[:, byte + 1] |= shifted >> 8
    return out.astype(np.uint8).reshape(-1)[: packed_size(values.size, bits)]


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` values of `bits` bits held in `packed` (uint8): uint8 for bits ≤ 8, uint32 above.

    Raises:
        ValueError: bits outside 1..32, `packed` is not exactly `packed_size(count, bits)` bytes, or
            the unused bits of its last byte are not zero (one value, one encoding).
    """
    _check_bits(bits)
    packed = np.ascontiguousarray(packed, np.uint8).ravel()
    if packed.size != packed_size(count, bits):
        raise ValueError(f"{count} values of {bits} bits take {packed_size(count, bits)} bytes, got {packed.size}")
    used = (count * bits) % 8
    if used and int(packed[-1]) >> used:
        raise ValueError("the unused bits of the last byte are not zero")
    if bits <= 8:
        return _unpack_narrow(packed, bits, count)
    if bits in (16, 32):
        return packed.view(f"<u{bits // 8}").astype(np.uint32)
    groups = -(-count // 64)
    flat = np.zeros(groups * bits * 8, np.uint8)  # a value never spills past its group's last word
    flat[: packed.size] = packed
    words = flat.view("<u8").reshape(groups, bits)
    out = np.empty((groups, 64), np.uint32)
    mask = np.uint64((1 << bits) - 1)
    for j, word, shift in _word_places(bits):
        window = words[:, word] >> np.uint64(shift)
        if shift + bits > 64:
            window |= words[:, word + 1] << np.uint64(64 - shift)
        out[:, j] = window & mask
    return out.reshape(-1)[:count]


def _unpack_narrow(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed.copy()
    groups = -(-count // 8)
    flat = np.zeros(groups * bits, np.uint8)
    flat[: packed.size] = packed
    table = np.zeros((groups, bits + 1), np.uint16)  # one spare column: a value may end past the group
    table[:, :bits] = flat.reshape(groups, bits)
    out = np.empty((groups, 8), np.uint8)
    mask = (1 << bits) - 1
    for j, byte, shift in _places(bits):
        window = table[:, byte] | (table[:, byte + 1] << 8)
        out[:, j] = (window >> shift) & mask
    return out.reshape(-1)[:count]
