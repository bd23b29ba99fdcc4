"""A randomized Hadamard rotation of a flattened update, block-diagonal so padding stays tiny.

Rotating by R = H·D (D random ±1 signs from the round's seed, H a normalized Walsh-Hadamard
matrix) spreads any vector's energy evenly over its coordinates, so a quantizer with one range per
block wastes few levels on outliers (Suresh et al., 2017, "Distributed Mean Estimation with
Limited Communication"). R is orthogonal: norms, and hence clipping, are unchanged, and R⁻¹ = Rᵀ.

TFF's `HadamardTransformFactory` pads each tensor to the next power of two. Padding the whole
1,162,144-parameter model to 2^21 would nearly double the coordinates (and an 8-bit update would
cost 0.45 of float32), so the vector is cut into blocks of 2^14 and each block is rotated on its
own: block-diagonal, still orthogonal, and only the last block is padded (1,120 zeros, 0.1 %).
H of order 2^14 is H₁₂₈ ⊗ H₁₂₈ (Sylvester), so one block is Y = H₁₂₈·X·H₁₂₈ with X the block as
a 128×128 matrix: two batched matrix products (BLAS) instead of 14 butterfly passes in Python.

The signs come from PCG64's raw 64-bit stream (`random_raw`), which NumPy fixes by algorithm,
not from a `Generator` method, whose streams NumPy may change between versions: device and
server must draw the same signs from the same seed whatever NumPy each runs.
"""

from __future__ import annotations

import functools

import numpy as np

from fedkb_core.update_encoding import BLOCK

_SIDE = 1 << 7  # BLOCK = _SIDE², H_BLOCK = H_SIDE ⊗ H_SIDE
MAX_SEED = (1 << 63) - 1


def num_blocks(length: int) -> int:
    """Blocks a vector of `length` coordinates occupies (at least one)."""
    return max(1, -(-int(length) // BLOCK))


def padded_length(length: int) -> int:
    return num_blocks(length) * BLOCK


@functools.lru_cache(maxsize=1)
def _hadamard_side() -> np.ndarray:
    """H₁₂₈ / √128 (Sylvester's construction): symmetric and orthogonal, so its own inverse."""
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < _SIDE:
        h = np.block([[h, h], [h, -h]])
    out = (h / np.sqrt(_SIDE)).astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=4)
def random_signs(seed: int, length: int) -> np.ndarray:
    """`length` values of ±1 (float32) determined by `seed` alone; cached (a server decodes a
    round's updates with one seed)."""
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"rotation seed must be an integer in [0, 2^63), got {seed!r}")
    words = np.random.PCG64(np.random.SeedSequence(seed)).random_raw(length // 64 + 1)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), count=length, bitorder="little")
    signs = (1.0 - 2.0 * bits).astype(np.float32)
    signs.flags.writeable = False
    return signs


def _transform(blocks: np.ndarray) -> np.ndarray:
    """H·x for every row of `blocks` (shape (B, BLOCK)), in their dtype (float32 or float64); H is
    symmetric, so this is also Hᵀ·x."""
    h = _hadamard_side().astype(blocks.dtype, copy=False)
    square = blocks.reshape(-1, _SIDE, _SIDE)
    return np.matmul(np.matmul(h, square), h).reshape(-1, BLOCK)


def rotate(values: np.ndarray, seed: int) -> np.ndarray:
    """R·x of a 1-D vector: zero-padded to whole blocks, signs flipped, Hadamard per block.

    Returns:
        float32 array of shape (num_blocks(len), BLOCK).
    """
    values = np.asarray(values, np.float32).ravel()
    padded = np.zeros(padded_length(values.size), np.float32)
    padded[: values.size] = values
    padded *= random_signs(seed, padded.size)
    return _transform(padded.reshape(-1, BLOCK))


def unrotate(blocks: np.ndarray, seed: int, length: int) -> np.ndarray:
    """Rᵀ·y, cut back to the first `length` coordinates: the inverse of `rotate`, in y's precision
    (float64 for a round's sum, float32 otherwise).

    Raises:
        ValueError: `blocks` is not the shape `rotate` gives for `length`.
    """
    if blocks.shape != (num_blocks(length), BLOCK):
        raise ValueError(f"{length} coordinates rotate to shape {(num_blocks(length), BLOCK)}, got {blocks.shape}")
    blocks = np.asarray(blocks, np.float64 if np.asarray(blocks).dtype == np.float64 else np.float32)
    flat = _transform(blocks).reshape(-1)
    flat *= random_signs(seed, flat.size)
    return flat[:length]
