"""Unbiased stochastic rounding of rotated blocks to b bits, one range [-s, s] per block.

Each block's scale s is its largest magnitude; the 2^b levels are evenly spaced on [-s, s] with
step Δ = 2s / (2^b − 1). A value y between two levels rounds up with probability equal to its
fractional position, so E[ŷ] = y exactly (unbiased), and its variance is at most Δ²/4. Errors
of different coordinates and of different devices are independent, so the error of a mean of m
updates falls like 1/√m, which is what makes a few bits per coordinate enough in FL.

One scale per block of 2^14 (not one per update) costs 4 bytes per 16,384 coordinates and keeps
the step small where the update is small: an LSTM language model's update is far from uniform
(the embedding rows of words a device never typed barely move). On a real Shakespeare update the
blocks' scales span a factor of 1,750 and one scale per update errs 9.5× more (docs/architecture.md).

TFF's `StochasticDiscretizationFactory` rounds to a fixed grid instead (a step size, int32
output, for secure aggregation), and says it does not control L2-norm inflation; neither does
this (docs/architecture.md, "Compressed updates", on clipping and DP).
"""

from __future__ import annotations

import numpy as np


def num_levels(bits: int) -> int:
    """The largest level, 2^b − 1 (levels are 0 … 2^b − 1)."""
    return (1 << int(bits)) - 1


def quantize(blocks: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Round every row of `blocks` (float32, shape (B, d)) to `bits` bits, stochastically.

    Returns:
        (levels, scales): uint8 levels of shape (B, d), each in 0 … 2^b − 1, and the float32
        scale s of each row.
    """
    top = num_levels(bits)
    blocks = np.asarray(blocks, np.float32)
    scales = np.max(np.abs(blocks), axis=1) if blocks.size else np.zeros(blocks.shape[0], np.float32)
    per_step = np.divide(np.float32(top / 2.0), scales, out=np.zeros_like(scales), where=scales > 0)
    position = blocks * per_step[:, None]
    position += np.float32(top / 2.0)  # in [0, top]: y = -s is level 0, y = s is level top
    position += rng.random(position.shape, dtype=np.float32)
    np.floor(position, out=position)
    np.clip(position, 0, top, out=position)  # float32 rounding at y = ±s only
    return position.astype(np.uint8), scales.astype(np.float32)


def dequantize(levels: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The float32 values the levels stand for: level·(2s / (2^b − 1)) − s, row by row."""
    top = num_levels(bits)
    scales = np.asarray(scales, np.float32)
    out = levels.astype(np.float32)
    out *= (2.0 * scales / np.float32(top))[:, None]
    out -= scales[:, None]
    return out
