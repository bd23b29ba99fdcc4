"""A SecAgg round's release: the unmasked, decoded sum, and what the server step or DP takes of it.

Plain numpy over the cohort (aggregator/secagg_cohort.py) and the common grid
(fedkb_core/secagg/integer_encoding.py); no I/O. When unmasking closed:

    total   = cohort.result()                    Σ_{U3} x_u mod 2^r (the masks removed)
    decoded = decode_sum(total, grid, count=|U3|) Σ w·R·Δ on the grid, Σ w, the unclipped count
    Σ w·Δ   = decoded.deltas(n)                  rotated back once, in the weights' layout

Without DP the server step takes the weighted mean Σ w·Δ / Σ w (weighted FedAvg with the grid's
quantized weights, `weighted_mean`). With DP every weight is 1 and the sum goes into the usual
Gaussian release (`private_sum`), over the fixed denominator, with the noise calibrated to the
sensitivity of an honest device on the grid (`secagg_sensitivity`), not to C: the server can no
longer re-clip what the rounding added.

A round whose sum cannot be released raises `CohortAbandoned` (the cohort's `too_few_shares` or
`inconsistent_shares`, or `undecodable`: the unmasked sum is not a sum of |U3| vectors on the grid,
so it wrapped or a device sent values outside the grid, which masking hides from the server; or
`modulus_overflow`: a tuned grid's sum filled its range, so some coordinates likely wrapped).
"""

from __future__ import annotations

import math

import numpy as np

from aggregator.dp import DPGaussianSum
from aggregator.fedavg import Tensors, WeightedSum
from aggregator.rounds import RoundRecord
from aggregator.secagg_cohort import CohortAbandoned, SecAggCohort
from fedkb_core.secagg.integer_encoding import DecodedSum, ModulusOverflow, SecAggGrid, decode_sum
from fedkb_core.wire import WeightSpec, split_by_name

UNDECODABLE = "undecodable"
MODULUS_OVERFLOW = "modulus_overflow"  # a tuned grid's sum filled its range: likely wrapped, not released


def unmasked_sum(cohort: SecAggCohort, grid: SecAggGrid) -> DecodedSum:
    """The survivors' decoded sum.

    Raises:
        CohortAbandoned: too_few_shares, inconsistent_shares (the cohort's), `undecodable`, or
            `modulus_overflow` (a tuned grid's sum filled its range; with the block RMS it measured).
    """
    total = cohort.result()
    try:
        return decode_sum(total, grid, count=len(cohort.state.u3))
    except ModulusOverflow as err:
        raise CohortAbandoned(MODULUS_OVERFLOW, str(err), block_rms=err.block_rms) from None
    except ValueError as err:
        raise CohortAbandoned(UNDECODABLE, str(err)) from None


def _by_name(decoded: DecodedSum, specs: list[WeightSpec]) -> dict[str, np.ndarray]:
    return split_by_name(decoded.deltas(sum(s.size for s in specs)), specs)


def weighted_mean(decoded: DecodedSum, specs: list[WeightSpec]) -> Tensors:
    """Σ w·Δ / Σ w as float32 by weight name (Σ w ≥ the count: `decode_sum` checked it)."""
    return {name: (values / decoded.weight).astype(np.float32) for name, values in _by_name(decoded, specs).items()}


def secagg_sensitivity(grid: SecAggGrid) -> float:
    """How far one honest device's encoded vector can move the decoded sum, in L2: C + √P·step.

    A device clips Δ to C, rotates it (norm kept), clamps each coordinate to ±c (norm can only
    shrink) and rounds it stochastically to the grid of step c/W: each of the P rotated coordinates
    moves by less than one step, so the vector it adds is within ‖Δ‖ + √P·step ≤ C + √P·step of
    nothing (unit weight under DP). Without SecAgg the server re-clips the decoded update to C; here
    it never sees it, so the DP noise must cover the rounding too: a factor 1 + √P·step/C over C,
    +3.2 % at b = 12 on the Shakespeare model (P ≈ 1.16 M), +52 % at b = 8, +0.4 % for one block at
    b = 12. The weight coordinate is exactly W (1 after decoding) for every device, and adaptive
    clipping's bit is the count's release (its own noise, σ_b), so neither adds to it.
    """
    return float(grid.clip_norm) + math.sqrt(grid.padded) * grid.step


def private_sum(decoded: DecodedSum, specs: list[WeightSpec], round_: RoundRecord, grid: SecAggGrid) -> DPGaussianSum:
    """The unit-weight sum Σ Δ as a DP-FedAvg release: noise z_Δ·`secagg_sensitivity` per coordinate,
    divided by the round's fixed denominator (aggregator/dp.py)."""
    count = int(round(decoded.weight))
    total = WeightedSum.restore(_by_name(decoded, specs), total_examples=count, count=count)
    return DPGaussianSum(total, clip_norm=secagg_sensitivity(grid), noise_multiplier=round_.dp_update_noise_multiplier,
                         denominator=round_.dp_denominator)
