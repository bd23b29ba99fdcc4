"""An update on the cohort's common integer grid, and the decoding of the cohort's sum.

Secure aggregation sums masked integer vectors modulo R = 2^r, so every device of a round must
put its update on the same grid (the `hadamard` encoding's per-device, per-block scales cannot be
summed). docs/secure_aggregation.md, "Integer encoding on a common grid":

1. the clipped update Δ (‖Δ‖ ≤ C) is weighted by w = ⌈n·W/n_max⌉/W, W = 2^(b−1) − 1 the levels
   of one sign (w = 1 when the grid is unweighted, as under DP), so ‖w·Δ‖ ≤ C;
2. rotated with the round's seed (`hadamard.rotate`: orthogonal, energy spread evenly);
3. clamped to ±c, c = C·√(2·ln(2d/δ)/d) (`coordinate_bound`; d = BLOCK, δ = TAIL = 10⁻⁹: the
   bound `update_encoding.clip_inflation` uses, so an honest update is clamped with probability
   ≤ 10⁻⁹ per block), then rounded stochastically to the grid of step c/W: the integer ⌊y/step + u⌋,
   u uniform in [0, 1), so E = y/step exactly (unbiased) and every integer is in [−W, W];
4. followed by the weight's integer w·W (1..W) and, under adaptive clipping, the "was not
   clipped" bit;
5. written modulo 2^r (two's complement masked to r bits) with r = b + ⌈log₂ m⌉ for a cohort of at
   most m (`modulus_bits`): the signed sum of m values in [−W, W] has magnitude ≤ m·W < 2^(r−1),
   so it never wraps and the server reads it back as a signed integer.

The server folds the masked vectors with `add_mod`, removes the masks (fedkb_core/secagg/prg.py)
and `decode_sum` gives Σ w·R·Δ (rotated, float64) and Σ w; the mean is their ratio (weighted
FedAvg with quantized weights), the sum is what DP divides by its fixed denominator.

Error. Each coordinate's rounding error is zero-mean, within (−step, step) and of variance at most
step²/4, independent across coordinates and devices. One update of P = padded coordinates then
errs by at most √P·step/2 in L2 in expectation, whatever its size: the grid is fixed by C, not by
the update, so an update much shorter than C (or weighted by a small w) errs relatively more than
under `hadamard`, whose scale follows each block. A sum of m errs by √(m·P)·step/2.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from fedkb_core import hadamard
from fedkb_core.update_encoding import BLOCK

TAIL = 1e-9  # probability, per block, that an honest rotated block has a coordinate beyond ±c
MIN_BITS, MAX_BITS = 2, 24
MAX_MODULUS_BITS = 32


def coordinate_bound(clip_norm: float) -> float:
    """c = C·√(2·ln(2d/δ)/d): after the rotation, every coordinate of a block of norm ≤ C lies in
    [−c, c] with probability ≥ 1 − δ (Hoeffding for a Rademacher sum, union over the d coordinates
    of the block)."""
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) or not 0 < clip_norm < math.inf:
        raise ValueError(f"clip norm must be a finite number > 0, got {clip_norm!r}")
    return float(clip_norm) * math.sqrt(2.0 * math.log(2.0 * BLOCK / TAIL) / BLOCK)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _bits_problem(bits) -> str | None:
    if not _is_int(bits) or not MIN_BITS <= bits <= MAX_BITS:
        return (f"secure aggregation bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r} "
                "(b is the signed range of one coordinate, levels −W..W with W = 2^(b−1) − 1: b = 1 "
                f"has no nonzero level, and above {MAX_BITS} no modulus of at most {MAX_MODULUS_BITS} "
                "bits is left for the cohort)")
    return None


def modulus_bits(bits: int, cohort: int) -> int:
    """r = b + ⌈log₂ m⌉ for a cohort of at most m devices (r = b for m = 1): a sum of m values in
    [−W, W] never wraps modulo 2^r.

    Raises:
        ValueError: bits outside 2..24, a cohort below 1, or r above 32 (masked vectors are uint32).
    """
    problem = _bits_problem(bits)
    if problem:
        raise ValueError(problem)
    if not _is_int(cohort) or cohort < 1:
        raise ValueError(f"cohort must be an integer >= 1, got {cohort!r}")
    r = int(bits) + (int(cohort) - 1).bit_length()  # ⌈log₂ m⌉ for m ≥ 1
    if r > MAX_MODULUS_BITS:
        raise ValueError(f"{bits} bits for a cohort of {cohort} need a modulus of 2^{r}, above "
                         f"2^{MAX_MODULUS_BITS}: use fewer bits or a smaller cohort")
    return r


@dataclasses.dataclass(frozen=True)
class SecAggGrid:
    """A round's common grid, the same for every device of the cohort and for the server.

    Attributes:
        bits: b, the signed range of one coordinate: integers in [−W, W], W = 2^(b−1) − 1.
        modulus_bits: r, the vector is written modulo 2^r (b ≤ r ≤ 32).
        clip_norm: C, the task's clip norm (sets the grid's range ±c).
        length: n, the model's parameter count.
        rotation_seed: the round's Hadamard seed.
        max_examples: n_max, the task's example cap (the weight's denominator).
        weighted: False under DP: every device's weight is 1.
        count_unclipped: adaptive clipping: one more coordinate, the "was not clipped" bit.
    """

    bits: int
    modulus_bits: int
    clip_norm: float
    length: int
    rotation_seed: int
    max_examples: int
    weighted: bool = True
    count_unclipped: bool = False

    @classmethod
    def from_cohort(cls, *, bits: int, cohort: int, clip_norm: float, length: int, rotation_seed: int,
                    max_examples: int, weighted: bool = True, count_unclipped: bool = False) -> SecAggGrid:
        """The grid whose modulus fits a cohort of at most `cohort` devices (`modulus_bits`)."""
        return cls(bits=bits, modulus_bits=modulus_bits(bits, cohort), clip_norm=clip_norm, length=length,
                   rotation_seed=rotation_seed, max_examples=max_examples, weighted=weighted,
                   count_unclipped=count_unclipped)

    @property
    def levels(self) -> int:
        """W = 2^(b−1) − 1: the integers of one coordinate are −W..W."""
        return (1 << (int(self.bits) - 1)) - 1

    @property
    def bound(self) -> float:
        """c, the clamp of every rotated coordinate (`coordinate_bound`)."""
        return coordinate_bound(self.clip_norm)

    @property
    def step(self) -> float:
        """c/W: the value of one integer unit."""
        return self.bound / self.levels

    @property
    def padded(self) -> int:
        """P, the rotated coordinates (whole blocks)."""
        return hadamard.padded_length(self.length)

    @property
    def vector_length(self) -> int:
        """P + 1 (the weight) + 1 if the unclipped bit is counted."""
        return self.padded + 1 + (1 if self.count_unclipped else 0)

    @property
    def max_count(self) -> int:
        """The most vectors whose sum cannot wrap: m·W ≤ 2^(r−1) − 1 (at least 2^(r−b))."""
        return ((1 << (int(self.modulus_bits) - 1)) - 1) // self.levels

    def problems(self) -> list[str]:
        """What is wrong with this grid, one message each (empty when valid)."""
        out = []
        problem = _bits_problem(self.bits)
        if problem:
            out.append(problem)
        r = self.modulus_bits
        if not _is_int(r) or not (self.bits if problem is None else 1) <= r <= MAX_MODULUS_BITS:
            out.append(f"modulus bits must be an integer in b..{MAX_MODULUS_BITS}, got {r!r}")
        c = self.clip_norm
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < math.inf:
            out.append(f"clip norm must be a finite number > 0, got {c!r}")
        if not _is_int(self.length) or self.length < 1:
            out.append(f"length must be an integer >= 1, got {self.length!r}")
        seed = self.rotation_seed
        if not _is_int(seed) or not 0 <= seed <= hadamard.MAX_SEED:
            out.append(f"rotation seed must be an integer in [0, 2^63), got {seed!r}")
        if not _is_int(self.max_examples) or self.max_examples < 1:
            out.append(f"max examples must be an integer >= 1, got {self.max_examples!r}")
        for name in ("weighted", "count_unclipped"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        return out


def _require(grid: SecAggGrid) -> None:
    problems = grid.problems()
    if problems:
        raise ValueError("invalid secure aggregation grid: " + "; ".join(problems))


def weight_level(num_examples: int, grid: SecAggGrid) -> int:
    """w·W = ⌈n·W/n_max⌉ clamped to 1..W (W when the grid is unweighted: unit weight).

    Rounding up, never to 0: a device that trained on one example still counts. The weight errs
    by less than 1/W (absolute, on the scale where n_max weighs 1).
    """
    if not _is_int(num_examples) or num_examples < 0:
        raise ValueError(f"num_examples must be an integer >= 0, got {num_examples!r}")
    _require(grid)
    top = grid.levels
    if not grid.weighted:
        return top
    level = -(-int(num_examples) * top // int(grid.max_examples))
    return min(max(level, 1), top)


def encode(update: np.ndarray, num_examples: int, grid: SecAggGrid, rng: np.random.Generator, *,
           unclipped: bool = False) -> np.ndarray:
    """One device's update as `grid.vector_length` uint32 integers, each in [0, 2^r).

    Args:
        update: the flat update Δ (length `grid.length`), already clipped to `grid.clip_norm`.
        num_examples: the examples it was trained on (its weight, if the grid is weighted).
        rng: the randomness of the stochastic rounding (a device's own, never shared).
        unclipped: the adaptive-clipping bit (Δ was not clipped); ignored unless the grid counts it.

    Raises:
        ValueError: an invalid grid, an update of another length or shape, a non-finite value, or
            a norm above the clip norm (the caller clips; 10⁻⁵ relative slack for float32).
    """
    _require(grid)
    update = np.asarray(update)
    if update.ndim != 1 or update.size != grid.length:
        raise ValueError(f"the update must be a flat vector of {grid.length} values, got shape {update.shape}")
    if update.dtype.kind not in "fiu":
        raise ValueError(f"the update must be a real array, got dtype {update.dtype}")
    if not np.all(np.isfinite(update)):
        raise ValueError("the update has non-finite values")
    wide = update.astype(np.float64, copy=False)
    norm = math.sqrt(float(wide @ wide))
    if norm > grid.clip_norm * (1 + 1e-5):
        raise ValueError(f"the update's norm {norm:.6g} is above the clip norm {grid.clip_norm:.6g}: clip it first")
    top = grid.levels
    level = weight_level(num_examples, grid)
    # w·y/step = (level/W)·y/(c/W) = level·y/c; the clamp of w·y to ±c is the clamp of this to ±W.
    position = hadamard.rotate(update, grid.rotation_seed).astype(np.float64)
    position *= level / grid.bound
    np.clip(position, -top, top, out=position)
    position += rng.random(position.shape)
    np.floor(position, out=position)
    np.clip(position, -top, top, out=position)  # ±W + u can round up to ±W + 1 in float64 when W is large
    out = np.empty(grid.vector_length, np.int64)
    out[: grid.padded] = position.reshape(-1)
    out[grid.padded] = level
    if grid.count_unclipped:
        out[grid.padded + 1] = 1 if unclipped else 0
    out &= (1 << grid.modulus_bits) - 1  # two's complement, masked to r bits
    return out.astype(np.uint32)


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedSum:
    """A decoded cohort sum.

    Attributes:
        rotated: Σ w·R·Δ on the grid (float64, shape (num_blocks, BLOCK)): the sum in the rotated
            domain, where the server may fold or check it before rotating back once.
        weight: Σ w = Σ weight_level / W (the count of devices when the grid is unweighted).
        unclipped: how many devices were not clipped, when the grid counts it; else None.
        rotation_seed: the round's seed, to rotate `rotated` back.
    """

    rotated: np.ndarray
    weight: float
    unclipped: int | None
    rotation_seed: int

    def deltas(self, length: int) -> np.ndarray:
        """Σ w·Δ in the weights' layout: Rᵀ·`rotated` cut to `length` coordinates (float64)."""
        return hadamard.unrotate(self.rotated, self.rotation_seed, length)


def decode_sum(total: np.ndarray, grid: SecAggGrid, *, count: int) -> DecodedSum:
    """The sum of `count` devices' `encode` vectors, read back from its value modulo 2^r.

    Args:
        total: the unmasked sum modulo 2^r (`grid.vector_length` integers in [0, 2^r)).
        count: how many devices' vectors it holds (the survivors).

    Raises:
        ValueError: an invalid grid, a total of another shape or with entries ≥ 2^r, a count
            outside 1..`grid.max_count` (the sum could wrap), or a decoded coordinate beyond
            ±count·W (a weight below count, an unclipped count outside 0..count): either the sum
            wrapped modulo 2^r or a device sent values outside the grid (an honest encoder never
            does; masked, the server cannot see which device did) — decoding cannot tell which,
            and neither result is usable.
    """
    _require(grid)
    total = np.asarray(total)
    if total.shape != (grid.vector_length,) or total.dtype.kind not in "ui":
        raise ValueError(f"the sum must be {grid.vector_length} integers, got {total.dtype} of shape {total.shape}")
    if not _is_int(count) or not 1 <= count <= grid.max_count:
        raise ValueError(f"count must be an integer in 1..{grid.max_count} (beyond it a sum of values in ±W can "
                         f"wrap modulo 2^{grid.modulus_bits}), got {count!r}")
    r, top, p = int(grid.modulus_bits), grid.levels, grid.padded
    signed = total.astype(np.int64)
    if signed.size and (int(signed.min()) < 0 or int(signed.max()) >> r):
        raise ValueError(f"the sum's entries must be in [0, 2^{r})")
    signed[signed >= 1 << (r - 1)] -= 1 << r
    limit = int(count) * top
    unusable = ("either the sum wrapped modulo 2^r or a device sent values outside the grid; decoding "
                "cannot tell which")
    beyond = np.flatnonzero(np.abs(signed) > limit)
    if beyond.size:
        i = int(beyond[0])
        raise ValueError(f"coordinate {i} of the sum is {int(signed[i])}, beyond ±count·W = ±{limit} "
                         f"({beyond.size} such): {unusable}")
    weight = int(signed[p])
    if weight < count:
        raise ValueError(f"the sum of {count} weights is {weight}, below {count} (each is 1..W): {unusable}")
    unclipped = None
    if grid.count_unclipped:
        unclipped = int(signed[p + 1])
        if not 0 <= unclipped <= count:
            raise ValueError(f"the unclipped count is {unclipped}, outside 0..{count}: {unusable}")
    rotated = signed[:p].astype(np.float64).reshape(-1, BLOCK)
    rotated *= grid.step
    return DecodedSum(rotated=rotated, weight=weight / top, unclipped=unclipped, rotation_seed=int(grid.rotation_seed))


def add_mod(acc: np.ndarray, values: np.ndarray, bits: int) -> None:
    """acc ← (acc + values) mod 2^bits, in place (the server's fold of masked vectors).

    Raises:
        ValueError: bits outside 1..32, `acc` not a writeable uint32 array, `values` of another
            shape or not unsigned, or a value ≥ 2^bits.
    """
    if not _is_int(bits) or not 1 <= bits <= MAX_MODULUS_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_MODULUS_BITS}, got {bits!r}")
    if not isinstance(acc, np.ndarray) or acc.dtype != np.uint32 or not acc.flags.writeable:
        raise ValueError("the accumulator must be a writeable uint32 array")
    values = np.asarray(values)
    if values.shape != acc.shape:
        raise ValueError(f"values of shape {values.shape} cannot be added to a sum of shape {acc.shape}")
    if values.dtype.kind != "u" or values.dtype.itemsize > 4:
        raise ValueError(f"values must be unsigned integers of at most 32 bits, got {values.dtype}")
    if bits < MAX_MODULUS_BITS and values.size and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    np.add(acc, values, out=acc)  # wraps modulo 2^32, a multiple of 2^bits
    if bits < MAX_MODULUS_BITS:
        np.bitwise_and(acc, np.uint32((1 << bits) - 1), out=acc)
