"""An update on the cohort's common integer grid, and the decoding of the cohort's sum.

Secure aggregation sums masked integer vectors modulo R = 2^r, so every device of a round must
put its update on the same grid (the `hadamard` encoding's per-device, per-block scales cannot be
summed). docs/secure_aggregation.md, "Integer encoding on a common grid":

1. the clipped update Δ (‖Δ‖ ≤ C) is weighted by w = ⌈n·L/n_max⌉/L, L = WEIGHT_LEVELS (w = 1
   when the grid is unweighted, as under DP), so ‖w·Δ‖ ≤ C;
2. rotated with the round's seed (`hadamard.rotate`: orthogonal, energy spread evenly);
3. clamped to ±c, c = C·√(2·ln(2d/δ)/d) (`coordinate_bound`; d = BLOCK, δ = TAIL = 10⁻⁹: the
   bound `update_encoding.clip_inflation` uses, so an honest update is clamped with probability
   ≤ 10⁻⁹ per block), then rounded stochastically to the grid of step c/W: the integer ⌊y/step + u⌋,
   u uniform in [0, 1), so E = y/step exactly (unbiased) and every integer is in [−W, W];
4. followed by the wide tail: the weight's integer w·WEIGHT_LEVELS and, under adaptive clipping,
   the "was not clipped" bit;
5. written modulo 2^r (two's complement masked to r bits) with r = b + ⌈log₂ m⌉ for a cohort of at
   most m (`modulus_bits`): the signed sum of m values in [−W, W] has magnitude ≤ m·W < 2^(r−1),
   so it never wraps and the server reads it back as a signed integer.

The **tuned grid** (`tuned_steps`; every round without DP) reverses step 5: the modulus is what
the upload costs (r = b bits per value, 8 by default: a hadamard update's width), and the steps,
one per rotation block, are chosen so that the cohort's *sum* fills it. After the rotation every
coordinate of a block of the sum is a Rademacher sum of variance ‖s_b‖²/d, so it stays within
±z·RMS_b except with probability ≤ 2·exp(−z²/2): the server sets each block's step from the
previous rounds' measured RMS per device (`tuned_steps`, z = TUNED_Z), accepts that a coordinate
beyond ±z·RMS_b wraps, and leaves out of the round a block whose measured RMS leaves less than
MIN_Z (`decode_sum`: its parameters do not move; the next round widens it), or refuses the whole
sum only if every block did (ModulusOverflow; the round is abandoned). A deployment's first
round calibrates on the fixed grid (CALIBRATION_BITS). One device's values may exceed the
modulus: only the sum must fit. Bonawitz et al. 2019, "Federated
Learning with Autotuned Communication-Efficient Secure Aggregation", tune the same trade-off.
The price is resolution: a device's rounding error is set by the sum's spread, not its own, so
the mean of m devices errs by about √m times more than on a fixed grid of r bits (measured in
the README; DP keeps the fixed grid, whose sensitivity C + √P·step stays near C).

The weight and the unclipped bit form the vector's **wide tail**: they are summed modulo 2^32
(MASK_BITS) whatever r is, with WEIGHT_LEVELS levels, so they never wrap for a cohort of up to
32,767. Masks and the server's sums are modulo 2^32 throughout; a body value travels as its low r
bits, which is the same value modulo 2^r (2^r divides 2^32), and decoding reduces the body's sum
modulo 2^r before reading it as signed.

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
from fedkb_core.protocol import RoundTask
from fedkb_core.update_encoding import BLOCK

TAIL = 1e-9  # probability, per block, that an honest rotated block has a coordinate beyond ±c
MIN_BITS, MAX_BITS = 2, 24
MAX_MODULUS_BITS = 32
MASK_BITS = 32  # masks, the wide tail and the server's running sums are modulo 2^32
WEIGHT_LEVELS = (1 << 16) - 1  # the weight's integer is 1..WEIGHT_LEVELS
MAX_TAIL_COUNT = ((1 << 31) - 1) // WEIGHT_LEVELS  # the most weights whose sum fits a signed 32-bit tail
# The tuned grid: a block's range of 2^(r−1) units covers TUNED_Z times the predicted RMS of the
# block's coordinates; a block whose measured RMS leaves less than MIN_Z is left out of the round
# (zeroed), and a sum with MAX_DROPPED_FRACTION such blocks is not released (1: only when every
# block overflowed; each kept block is checked on its own, so a partial release is
# sound, and on Shakespeare early training grows updates faster than any margin: refusing at a
# quarter abandoned 2 of 60 rounds). A coordinate
# wraps with probability ≤ 2·exp(−z²/2) (Hoeffding over the rotation's signs): 1e-31 at z = 12,
# 3e-8 at 6, so ≤ 0.04 expected on the model's 1.16 M coordinates at MIN_Z. TUNED_Z/MIN_Z = 2 is
# the growth over the prediction a block absorbs: on Shakespeare a block's spread moved by up to
# 2.8x between consecutive rounds' cohorts, which the prediction (the largest of the last
# MEASURED_ROUNDS measurements, times their recent growth) mostly covers: replayed on the
# measurements of a 60-round run, 0.03 % of blocks would be left out at a median fill of 15.5.
TUNED_Z = 12.0
MIN_Z = 6.0
MAX_DROPPED_FRACTION = 1.0
OVERFLOW_WIDENING = 4.0
MEASURED_ROUNDS = 3
MAX_GROWTH = 4.0
# A tuned deployment's first round (nothing measured yet) runs on the fixed grid at this b, to
# measure the sum's spread (aggregator/rounds.py, `round_settings`).
CALIBRATION_BITS = 12
# A measurement's floor, relative to the prior C/√d: real updates are far below C per block (on
# Shakespeare a device's block RMS is 1e-3 of the prior), so the floor only keeps a step above 0.
MEASURED_FLOOR = 2.0 ** -20


class ModulusOverflow(ValueError):
    """A tuned grid's sum fills its modulus in MAX_DROPPED_FRACTION of its blocks (all of them):
    nothing of it can be released.

    Attributes:
        block_rms: the RMS of each block of the sum as decoded (value units), OVERFLOW_WIDENING
            times that for the blocks that overflowed (a wrapped block under-reads its spread):
            what the next round's steps are tuned from.
    """

    def __init__(self, message: str, block_rms: tuple[float, ...]):
        super().__init__(message)
        self.block_rms = block_rms


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
        ValueError: bits outside 2..24, a cohort outside 1..MAX_TAIL_COUNT, or r above 32.
    """
    problem = _bits_problem(bits)
    if problem:
        raise ValueError(problem)
    if not _is_int(cohort) or not 1 <= cohort <= MAX_TAIL_COUNT:
        raise ValueError(f"cohort must be an integer in 1..{MAX_TAIL_COUNT} (the wide tail's bound), got {cohort!r}")
    r = int(bits) + (int(cohort) - 1).bit_length()  # ⌈log₂ m⌉ for m ≥ 1
    if r > MAX_MODULUS_BITS:
        raise ValueError(f"{bits} bits for a cohort of {cohort} need a modulus of 2^{r}, above "
                         f"2^{MAX_MODULUS_BITS}: use fewer bits or a smaller cohort")
    return r


def tuned_steps(modulus_bits: int, cohort: int, clip_norm: float, num_blocks: int,
                block_rms_per_device=None) -> tuple[float, ...]:
    """The steps, one per rotation block, of a tuned grid of r = `modulus_bits` for a cohort of at
    most m = `cohort` devices.

    The rotation makes every coordinate of a block of the sum a Rademacher sum of variance
    ‖s_b‖²/d (d = BLOCK), so it leaves ±z·RMS_b with probability ≤ 2·exp(−z²/2) (Hoeffding): the
    range of 2^(r−1) − 1 units covers TUNED_Z times the block's predicted RMS. One device of norm
    ≤ C has a block RMS ≤ C/√d, the prior of the first round. After a round whose decoded sum over
    n devices had block RMS σ_b, `block_rms_per_device` = σ_b/n, the next sum of m is predicted at
    m·σ_b/n (linear in m, as if every update pointed one way; independent ones grow as √m), never
    above the prior nor below MEASURED_FLOOR of it (a block that did not move has a step all the
    same; if it moves in the next round it overflows, is left out, and its widened record covers
    it from the round after).
    Given rows of several rounds' measurements, newest first (the server passes the last
    MEASURED_ROUNDS), the prediction is their largest per block (cohorts differ, and so does a
    block's spread) times the growth from the second newest to the newest (the median over the
    blocks of their ratio, clipped to 1..MAX_GROWTH; MAX_GROWTH with a single row): early in
    training updates grow by up to 4× a round on Shakespeare, faster than the range's margin.

    Raises:
        ValueError: bits outside 2..24, a cohort outside 1..MAX_TAIL_COUNT, a clip norm that is not
            a finite number > 0, a block count below 1, or measurements that are not `num_blocks`
            finite numbers ≥ 0.
    """
    problem = _bits_problem(modulus_bits)
    if problem:
        raise ValueError(problem.replace("secure aggregation bits", "a tuned grid's modulus bits"))
    if not _is_int(cohort) or not 1 <= cohort <= MAX_TAIL_COUNT:
        raise ValueError(f"cohort must be an integer in 1..{MAX_TAIL_COUNT}, got {cohort!r}")
    coordinate_bound(clip_norm)  # checks it
    if not _is_int(num_blocks) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    prior = float(clip_norm) / math.sqrt(BLOCK)
    if block_rms_per_device is None:
        measured = np.full(int(num_blocks), prior)
    else:
        measured = np.asarray(block_rms_per_device, dtype=np.float64) if not isinstance(block_rms_per_device, str) \
            else np.array([])
        if measured.ndim == 2 and measured.shape[0] >= 1:  # several rounds' measurements, newest first
            growth = MAX_GROWTH  # one record says nothing of the trend: assume the steepest
            if measured.shape[0] >= 2 and measured.shape[1] == num_blocks:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = measured[0] / measured[1]
                ratios = ratios[np.isfinite(ratios) & (measured[1] > 0)]
                growth = float(np.clip(np.median(ratios), 1.0, MAX_GROWTH)) if ratios.size else 1.0
            measured = measured.max(axis=0) * growth
        if measured.shape != (num_blocks,) or not np.all(np.isfinite(measured)) or np.any(measured < 0):
            raise ValueError(f"the measured RMS per device must be {num_blocks} finite numbers >= 0 (one per block), "
                             "or rows of them")
    half = (1 << (int(modulus_bits) - 1)) - 1
    steps = TUNED_Z * np.clip(measured, prior * MEASURED_FLOOR, prior) * int(cohort) / half
    return tuple(float(x) for x in steps)


def tail_length(count_unclipped: bool) -> int:
    """The wide tail's length: the weight, and adaptive clipping's "not clipped" bit if counted."""
    return 2 if count_unclipped else 1


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
        tuned_steps: a tuned grid's step per rotation block (`tuned_steps`; then bits =
            modulus_bits = r), or None for the fixed grid (step c/W, r = b + ⌈log₂ m⌉).
    """

    bits: int
    modulus_bits: int
    clip_norm: float
    length: int
    rotation_seed: int
    max_examples: int
    weighted: bool = True
    count_unclipped: bool = False
    tuned_steps: tuple[float, ...] | None = None

    @classmethod
    def from_cohort(cls, *, bits: int, cohort: int, clip_norm: float, length: int, rotation_seed: int,
                    max_examples: int, weighted: bool = True, count_unclipped: bool = False) -> SecAggGrid:
        """The grid whose modulus fits a cohort of at most `cohort` devices (`modulus_bits`)."""
        return cls(bits=bits, modulus_bits=modulus_bits(bits, cohort), clip_norm=clip_norm, length=length,
                   rotation_seed=rotation_seed, max_examples=max_examples, weighted=weighted,
                   count_unclipped=count_unclipped)

    @classmethod
    def for_task(cls, task: RoundTask, length: int) -> SecAggGrid:
        """The grid a `secagg` task asks for, for a model of `length` parameters: what the device
        encodes on and the server decodes with (it builds the task from its round). Not checked:
        `problems()` says what is wrong.

        Raises:
            ValueError: the task has no secagg parameters.
        """
        if task.secagg is None:
            raise ValueError("the task has no secagg parameters")
        return cls(bits=task.update_bits, modulus_bits=task.secagg.modulus_bits, clip_norm=task.clip_norm,
                   length=length, rotation_seed=task.rotation_seed, max_examples=task.max_examples,
                   weighted=not task.secagg.unit_weights, count_unclipped=task.secagg.count_unclipped,
                   tuned_steps=task.secagg.steps)

    @property
    def tuned(self) -> bool:
        """Whether the steps are tuned to the sum (`tuned_steps`) rather than fixed by b."""
        return self.tuned_steps is not None

    @property
    def levels(self) -> int:
        """W = 2^(b−1) − 1: a fixed grid's integers of one coordinate are −W..W."""
        return (1 << (int(self.bits) - 1)) - 1

    @property
    def bound(self) -> float:
        """c, the clamp of every rotated coordinate (`coordinate_bound`)."""
        return coordinate_bound(self.clip_norm)

    @property
    def step(self) -> float:
        """The value of one integer unit: c/W (the largest block's step on a tuned grid)."""
        return max(self.tuned_steps) if self.tuned else self.bound / self.levels

    @property
    def block_steps(self) -> np.ndarray:
        """The step of every rotation block (float64, shape (num_blocks,))."""
        if self.tuned:
            return np.asarray(self.tuned_steps, np.float64)
        return np.full(self.padded // BLOCK, self.bound / self.levels)

    @property
    def tail_length(self) -> int:
        """The wide tail: the weight, and the unclipped bit if counted (summed modulo 2^32)."""
        return tail_length(self.count_unclipped)

    @property
    def padded(self) -> int:
        """P, the rotated coordinates (whole blocks)."""
        return hadamard.padded_length(self.length)

    @property
    def vector_length(self) -> int:
        """P + the tail."""
        return self.padded + self.tail_length

    @property
    def max_count(self) -> int:
        """The most vectors a sum may hold: on a fixed grid, m·W ≤ 2^(r−1) − 1 (at least 2^(r−b));
        on a tuned one, the tail's bound (the body's fit is measured, `decode_sum`)."""
        if self.tuned:
            return MAX_TAIL_COUNT
        return min(((1 << (int(self.modulus_bits) - 1)) - 1) // self.levels, MAX_TAIL_COUNT)

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
        steps = self.tuned_steps
        if steps is not None:
            blocks = hadamard.num_blocks(self.length) if _is_int(self.length) and self.length >= 1 else None
            if not isinstance(steps, tuple) or any(isinstance(x, bool) or not isinstance(x, numbers.Real)
                                                   or not 0 < x < math.inf for x in steps):
                out.append("tuned steps must be a tuple of finite numbers > 0")
            elif blocks is not None and len(steps) != blocks:
                out.append(f"a tuned grid has one step per block: {blocks} for {self.length} values, got {len(steps)}")
            if self.bits != r:
                out.append(f"a tuned grid's bits are its modulus bits (r = b), got b = {self.bits!r}, r = {r!r}")
        return out


def _require(grid: SecAggGrid) -> None:
    problems = grid.problems()
    if problems:
        raise ValueError("invalid secure aggregation grid: " + "; ".join(problems))


def weight_level(num_examples: int, grid: SecAggGrid) -> int:
    """w·L = ⌈n·L/n_max⌉ clamped to 1..L, L = WEIGHT_LEVELS (L when the grid is unweighted: unit
    weight).

    Rounding up, never to 0: a device that trained on one example still counts. The weight errs
    by less than 1/L (absolute, on the scale where n_max weighs 1).
    """
    if not _is_int(num_examples) or num_examples < 0:
        raise ValueError(f"num_examples must be an integer >= 0, got {num_examples!r}")
    _require(grid)
    top = WEIGHT_LEVELS
    if not grid.weighted:
        return top
    level = -(-int(num_examples) * top // int(grid.max_examples))
    return min(max(level, 1), top)


def encode(update: np.ndarray, num_examples: int, grid: SecAggGrid, rng: np.random.Generator, *,
           unclipped: bool = False) -> np.ndarray:
    """One device's update as `grid.vector_length` uint32 integers: the body's P values each in
    [0, 2^r), the tail's in [0, 2^32).

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
    level = weight_level(num_examples, grid)
    # w·y/step per block, the clamp of w·y to ±c being the clamp of this to ±c/step (W on a fixed grid).
    steps = grid.block_steps[:, None]
    top = grid.bound / steps
    position = hadamard.rotate(update, grid.rotation_seed).astype(np.float64)
    position *= (level / WEIGHT_LEVELS) / steps
    np.clip(position, -top, top, out=position)
    position += rng.random(position.shape)
    np.floor(position, out=position)
    np.clip(position, -np.ceil(top), np.ceil(top), out=position)  # ±W + u rounds up to ±W + 1 in float64
    out = np.empty(grid.vector_length, np.int64)
    out[: grid.padded] = position.reshape(-1)
    out[grid.padded] = level
    if grid.count_unclipped:
        out[grid.padded + 1] = 1 if unclipped else 0
    out[: grid.padded] &= (1 << grid.modulus_bits) - 1  # two's complement, masked to r bits
    out[grid.padded:] &= (1 << MASK_BITS) - 1  # the tail: modulo 2^32
    return out.astype(np.uint32)


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedSum:
    """A decoded cohort sum.

    Attributes:
        rotated: Σ w·R·Δ on the grid (float64, shape (num_blocks, BLOCK)): the sum in the rotated
            domain, where the server may fold or check it before rotating back once.
        weight: Σ w = Σ weight_level / L (the count of devices when the grid is unweighted).
        unclipped: how many devices were not clipped, when the grid counts it; else None.
        rotation_seed: the round's seed, to rotate `rotated` back.
        block_rms: the RMS of each rotation block of the sum (value units), OVERFLOW_WIDENING times
            that for the dropped blocks (a wrapped block under-reads its spread): what the next
            round's steps are tuned from.
        fill: the least, over the kept blocks, of 2^(r−1) units over the block's RMS in units:
            the z the sum's range held; inf for a zero sum.
        dropped_blocks: a tuned grid's blocks whose fill was below MIN_Z: they have likely
            wrapped, so they are zeroed in `rotated` (their parameters do not move this round).
    """

    rotated: np.ndarray
    weight: float
    unclipped: int | None
    rotation_seed: int
    block_rms: tuple[float, ...] = ()
    fill: float = math.inf
    dropped_blocks: tuple[int, ...] = ()

    def deltas(self, length: int) -> np.ndarray:
        """Σ w·Δ in the weights' layout: Rᵀ·`rotated` cut to `length` coordinates (float64)."""
        return hadamard.unrotate(self.rotated, self.rotation_seed, length)


def decode_sum(total: np.ndarray, grid: SecAggGrid, *, count: int) -> DecodedSum:
    """The sum of `count` devices' `encode` vectors, read back from its value modulo 2^32 (the
    body's modulo 2^r: its low r bits).

    Args:
        total: the unmasked sum (`grid.vector_length` integers in [0, 2^32)).
        count: how many devices' vectors it holds (the survivors).

    Raises:
        ModulusOverflow: a tuned grid's sum with every block below MIN_Z (fewer are left out:
            `DecodedSum.dropped_blocks`).
        ValueError: an invalid grid, a total of another shape, a count outside
            1..`grid.max_count`, a fixed grid's decoded coordinate beyond ±count·W, a weight below
            count or above count·L, an unclipped count outside 0..count: either the sum wrapped or
            a device sent values outside the grid (an honest encoder never does; masked, the
            server cannot see which device did) — decoding cannot tell which, and neither result
            is usable.
    """
    _require(grid)
    total = np.asarray(total)
    if total.shape != (grid.vector_length,) or total.dtype.kind not in "ui":
        raise ValueError(f"the sum must be {grid.vector_length} integers, got {total.dtype} of shape {total.shape}")
    if not _is_int(count) or not 1 <= count <= grid.max_count:
        raise ValueError(f"count must be an integer in 1..{grid.max_count} (beyond it the sum can wrap), got {count!r}")
    r, p = int(grid.modulus_bits), grid.padded
    signed = total.astype(np.int64)
    if signed.size and (int(signed.min()) < 0 or int(signed.max()) >> MASK_BITS):
        raise ValueError(f"the sum's entries must be in [0, 2^{MASK_BITS})")
    signed[:p] &= (1 << r) - 1
    body = signed[:p]
    body[body >= 1 << (r - 1)] -= 1 << r
    tail = signed[p:]
    tail[tail >= 1 << (MASK_BITS - 1)] -= 1 << MASK_BITS
    unusable = ("either the sum wrapped or a device sent values outside the grid; decoding cannot tell which")
    if not grid.tuned:
        limit = int(count) * grid.levels
        beyond = np.flatnonzero(np.abs(body) > limit)
        if beyond.size:
            i = int(beyond[0])
            raise ValueError(f"coordinate {i} of the sum is {int(body[i])}, beyond ±count·W = ±{limit} "
                             f"({beyond.size} such): {unusable}")
    weight = int(tail[0])
    if not count <= weight <= count * WEIGHT_LEVELS:
        raise ValueError(f"the sum of {count} weights is {weight}, outside {count}..{count * WEIGHT_LEVELS} "
                         f"(each is 1..{WEIGHT_LEVELS}): {unusable}")
    unclipped = None
    if grid.count_unclipped:
        unclipped = int(tail[1])
        if not 0 <= unclipped <= count:
            raise ValueError(f"the unclipped count is {unclipped}, outside 0..{count}: {unusable}")
    rotated = body.astype(np.float64).reshape(-1, BLOCK)
    rms_units = np.sqrt(np.einsum("ij,ij->i", rotated, rotated) / BLOCK)
    half = (1 << (r - 1)) - 1
    with np.errstate(divide="ignore"):
        fills = np.where(rms_units > 0, (half + 1) / np.maximum(rms_units, 1e-300), np.inf)
    steps = grid.block_steps
    block_rms = rms_units * steps
    # A block whose `count` values in ±⌈c/step⌉ fit the range cannot wrap (small cohorts, the
    # prior's coarse steps): only the others are judged by their spread.
    can_wrap = int(count) * np.ceil(grid.bound / steps) > half
    overflowed = can_wrap & (fills < MIN_Z) if grid.tuned else np.zeros(fills.shape, bool)
    measured = tuple(float(x) for x in np.where(overflowed, OVERFLOW_WIDENING * block_rms, block_rms))
    if overflowed.sum() >= max(MAX_DROPPED_FRACTION * fills.size, 1):
        worst = int(np.argmin(np.where(can_wrap, fills, np.inf)))
        raise ModulusOverflow(
            f"{int(overflowed.sum())} of the sum's {fills.size} blocks fill their range (at most "
            f"{MAX_DROPPED_FRACTION:.0%} but not all may be left out): block {worst}'s RMS is {rms_units[worst]:.1f} units, "
            f"1/{fills[worst]:.2f} of ±2^{r - 1} (a tuned grid needs {MIN_Z:g}), so some coordinates have likely "
            "wrapped modulo 2^r and the sum is not released", measured)
    rotated *= steps[:, None]
    rotated[overflowed] = 0.0  # left out of this round: their parameters do not move
    return DecodedSum(rotated=rotated, weight=weight / WEIGHT_LEVELS, unclipped=unclipped,
                      rotation_seed=int(grid.rotation_seed), block_rms=measured,
                      fill=float(fills[~overflowed].min()) if (~overflowed).any() else math.inf,
                      dropped_blocks=tuple(int(i) for i in np.flatnonzero(overflowed)))


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
