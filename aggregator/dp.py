"""User-level DP-FedAvg's aggregate (McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models", https://arxiv.org/abs/1710.06963): plain numpy, no I/O.

One user's influence on a round is bounded by clipping their update to C and giving every update
the same weight: weighting by example counts would let one user with many examples move the mean
further than C/goal. The sum is divided by a fixed denominator (the round's goal), never by the
number of updates that arrived, which is itself private (TFF's
`DifferentiallyPrivateFactory.gaussian_fixed` does the same). Gaussian noise of stddev z·C is
added once, to the sum, when the round is released.

The noise comes from a generator seeded by 128 bits of the OS's CSPRNG (`secrets`). The seed is
drawn and stored durably before any noise exists (aggregator/worker.py), so a crash between the
draw and the publication replays the same noise instead of releasing a second, independent draw
of the same sum: two such releases would average the noise away.
"""

from __future__ import annotations

import secrets
from typing import Mapping

import numpy as np

from aggregator.fedavg import ClippedSum, EmptyAggregate, Tensors, WeightedSum

UPDATE_NOISE, COUNT_NOISE = 0, 1  # the two independent streams one round's seed feeds


def new_noise_seed() -> str:
    """128 bits from the OS's CSPRNG, as hex (the form the database keeps)."""
    return secrets.token_hex(16)


def noise_generator(seed: str, stream: int) -> np.random.Generator:
    """The round's generator for one stream: the same seed and stream always give the same draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed, 16), spawn_key=(stream,))))


class UnitWeights:
    """Wraps a `WeightedSum` so every update weighs 1, whatever its example count claims.

    The weight is what differential privacy bounds: with unit weights and clipping, adding or
    removing one user moves the sum by at most C.
    """

    def __init__(self, inner: WeightedSum):
        self.inner = inner

    def add(self, deltas: Mapping[str, np.ndarray], num_examples: int, *, scale: float = 1.0) -> None:
        self.inner.add(deltas, 1, scale=scale)

    def add_flat(self, values: np.ndarray, num_examples: int, *, scale: float = 1.0) -> None:
        self.inner.add_flat(values, 1, scale=scale)

    def mean(self) -> Tensors:
        return self.inner.mean()


class DPGaussianSum:
    """Σ of clipped, unit-weight updates, released once as (Σ + N(0, (z·C)²)) / denominator.

    Same `add`/`add_flat` as `ClippedSum` (they return the norm measured before clipping), over
    `ClippedSum(UnitWeights(total), C)`; `release` replaces `mean`.
    """

    def __init__(self, total: WeightedSum, *, clip_norm: float, noise_multiplier: float, denominator: int):
        """Raises: ValueError: a negative noise multiplier or a denominator below 1."""
        if not (noise_multiplier >= 0 and np.isfinite(noise_multiplier)):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
        if denominator < 1:
            raise ValueError(f"the fixed denominator must be >= 1, got {denominator}")
        self.total = total
        self.clipped = ClippedSum(UnitWeights(total), clip_norm)
        self.clip_norm = self.clipped.clip_norm
        self.noise_multiplier = float(noise_multiplier)
        self.denominator = int(denominator)

    def add(self, deltas: Mapping[str, np.ndarray], num_examples: int, *, norm: float | None = None) -> float:
        return self.clipped.add(deltas, num_examples, norm=norm)

    def add_flat(self, values: np.ndarray, num_examples: int) -> float:
        return self.clipped.add_flat(values, num_examples)

    @property
    def noise_stddev(self) -> float:
        """z·C, the stddev of the noise on each coordinate of the sum."""
        return self.noise_multiplier * self.clip_norm

    def release(self, rng: np.random.Generator | None) -> Tensors:
        """The noised mean, as float32 by weight name; the sum itself is left untouched.

        The noise is drawn tensor by tensor in weight-name order, so (seed, names, shapes) alone
        determine it. With a noise multiplier of 0, `rng` may be None.

        Raises:
            EmptyAggregate: no update was added (a DP round still needs its minimum of updates).
        """
        if self.total.count <= 0:
            raise EmptyAggregate("no updates were added to this round's sum")
        out = {}
        for name in sorted(self.total.weighted_sum):  # drawn in name order, whatever the sum's layout
            acc = self.total.weighted_sum[name]
            noised = rng.standard_normal(acc.shape) if self.noise_stddev else np.zeros(acc.shape)
            noised *= self.noise_stddev
            noised += acc
            noised /= self.denominator
            out[name] = noised.astype(np.float32)
        return out
