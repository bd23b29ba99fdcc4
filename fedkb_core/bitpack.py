"""Pack b-bit integers (b = 1..8) densely into bytes, and back: vectorized, any count.

Value i occupies bits [i·b, (i+1)·b) of the little-endian bit stream (least significant bit of
byte 0 first), so a count that is not a multiple of 8 ends in a partly used byte whose unused
high bits are zero. Eight values of b bits are exactly b bytes, so the stream is a table of
groups (8 values ↔ b bytes) in which value j always sits at the same byte and shift: packing
and unpacking are 8 column operations on uint16, whatever the count, with no loop over values.
"""

from __future__ import annotations

import numpy as np


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take."""
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _places(bits: int):
    """(value j of a group, its first byte, its shift) for the 8 values of a group."""
    return [(j, (j * bits) >> 3, (j * bits) & 7) for j in range(8)]


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The values (uint8, each < 2**bits) packed into `packed_size(len, bits)` bytes.

    Raises:
        ValueError: bits outside 1..8, or a value that does not fit in `bits` bits.
    """
    _check_bits(bits)
    values = np.ascontiguousarray(values, np.uint8).ravel()
    if bits < 8 and values.size and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
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
    """The `count` values of `bits` bits held in `packed` (uint8).

    Raises:
        ValueError: bits outside 1..8, `packed` is not exactly `packed_size(count, bits)` bytes, or
            the unused bits of its last byte are not zero (one value, one encoding).
    """
    _check_bits(bits)
    packed = np.ascontiguousarray(packed, np.uint8).ravel()
    if packed.size != packed_size(count, bits):
        raise ValueError(f"{count} values of {bits} bits take {packed_size(count, bits)} bytes, got {packed.size}")
    used = (count * bits) % 8
    if used and int(packed[-1]) >> used:
        raise ValueError("the unused bits of the last byte are not zero")
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
