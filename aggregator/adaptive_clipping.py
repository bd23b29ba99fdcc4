"""Quantile-based adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with
Adaptive Clipping", https://arxiv.org/abs/1905.03871), as plain functions of numbers.

A fixed clip norm C is a guess: too small and every update is shrunk (bias), too large and the
noise Z·C drowns the signal. Instead, each round counts the updates whose norm was at most C,
noises that count (stddev sigma_b), and moves C geometrically towards the target quantile γ of
the norms: C ← C·exp(−η(b̃ − γ)), where b̃ is the noised unclipped fraction. The count is a
second release about the same users, so the update sum gets slightly more noise,
z_Δ = (Z⁻² − (2σ_b)⁻²)^(−1/2), which keeps the whole round's noise multiplier at Z (the count's
sensitivity is 1/2 once centred, hence the 2). The arithmetic follows tensorflow_privacy's
`QuantileEstimatorQuery` with `geometric_update=True`, which TFF's
`DifferentiallyPrivateFactory.gaussian_adaptive` uses (tests/test_dp_adaptive_clipping.py
compares the sequences).
"""

from __future__ import annotations

import math

import numpy as np


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z_Δ = (Z⁻² − (2σ_b)⁻²)^(−1/2): the update noise that leaves the total multiplier at Z.

    Raises:
        ValueError: Z ≥ 2σ_b (z_Δ is undefined; the config refuses this at start).
    """
    z, sigma_b = float(noise_multiplier), float(clipped_count_stddev)
    if z == 0.0:
        return 0.0
    if not z < 2.0 * sigma_b:
        raise ValueError(f"noise multiplier {z} needs a clipped-count stddev above {z / 2}, got {sigma_b}")
    return (z ** -2 - (2.0 * sigma_b) ** -2) ** -0.5


def unclipped_fraction(unclipped: int, count: int, *, expected: float, stddev: float,
                       rng: np.random.Generator | None) -> float:
    """b̃: the noised fraction of a round's updates whose norm was at most the clip norm.

    Each update adds its indicator minus 1/2 (so one user moves the sum by at most 1/2), the sum
    gets Gaussian noise of stddev σ_b, is divided by the expected count (the fixed denominator,
    not the real count, which is private too) and shifted back, then clamped to [0, 1].
    """
    centred = unclipped - 0.5 * count
    if stddev > 0.0:
        centred += stddev * rng.standard_normal()
    return min(1.0, max(0.0, centred / expected + 0.5))


def next_clip_norm(clip_norm: float, fraction: float, *, target_quantile: float, learning_rate: float) -> float:
    """C·exp(−η(b̃ − γ)): shrink C when more than γ of the updates fit under it, grow it otherwise."""
    return float(clip_norm) * math.exp(-learning_rate * (fraction - target_quantile))
