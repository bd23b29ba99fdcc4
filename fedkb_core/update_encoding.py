"""Which encoding a round asks devices to upload in: its name, and for `hadamard` the bits and the
round's rotation seed. Shared by the server's config and rounds, the task and the device.

`float32` is exact; `float16` halves the bytes (round to nearest, 11 significant bits);
`hadamard` is the unbiased compressed encoding (fedkb_core/hadamard.py, stochastic_rounding.py,
bitpack.py): about b/32 of float32's bytes plus 4 bytes per 16,384 coordinates. The old `int8`
(one round-to-nearest scale per tensor: biased, 8.9 % relative L2 error) is gone: `hadamard` at
8 bits costs the same bytes, is unbiased and errs ~1.3 % on a Gaussian vector.
"""

from __future__ import annotations

import dataclasses
import math

HADAMARD = "hadamard"
BLOCK = 1 << 14  # coordinates per rotated block (fedkb_core/hadamard.py)
ENCODINGS = ("float32", "float16", HADAMARD)  # what a deployment may choose with --update-encoding
DEFAULT_BITS = 8  # `hadamard` without --update-bits
MIN_BITS, MAX_BITS = 1, 8
# Secure aggregation's common-grid integers (fedkb_core/secagg/integer_encoding.py): never chosen
# with --update-encoding, always by --secure-aggregation, which sets a round's encoding to it.
SECAGG = "secagg"
TASK_ENCODINGS = ENCODINGS + (SECAGG,)  # what a round (and so a task) may ask for
# Bits per masked value of the tuned grid (no DP): a hadamard update's width; bench/bench_secagg_encoding.py
# and the README's paired quality runs measure it.
SECAGG_DEFAULT_BITS = 8
# The fixed grid's b under DP (r = b + ⌈log₂ m⌉): bench/bench_secagg_encoding.py, 0.0215 error on a real
# update; its rounding adds √P·step to the sensitivity, +3.2 % at 12 bits (+52 % at 8).
SECAGG_DP_DEFAULT_BITS = 12
SECAGG_MIN_BITS, SECAGG_MAX_BITS = 2, 24

# Probability, per block, that a rotated block's largest coordinate exceeds the bound
# `clip_inflation` assumes (Hoeffding for a Rademacher sum, union over the block's coordinates).
_TAIL = 1e-9


def clip_inflation(bits: int) -> float:
    """κ_b: how much larger than the clip norm an honest device's decoded update may be.

    Stochastic rounding adds an error e of variance at most Δ²/4 per coordinate, Δ = 2s/(2^b − 1),
    s the block's largest |coordinate|. After a random rotation, s² ≤ 2·ln(2d/δ)·‖y_block‖²/d with
    probability 1 − δ per block (d = BLOCK), so E‖e‖² ≤ 2·ln(2d/δ)·‖y‖²/(2^b − 1)², and
    ‖ŷ‖ ≤ κ_b·C with κ_b² = 1 + 2·ln(2d/δ)/(2^b − 1)². Without DP the server re-clips a decoded
    update at κ_b·C instead of C: a bound on a hostile device's influence that honest, clipped
    updates do not hit, so the mean stays unbiased (κ_8 = 1.0005, κ_4 = 1.13, κ_1 = 7.96).
    """
    top = (1 << int(bits)) - 1
    return math.sqrt(1.0 + 2.0 * math.log(2.0 * BLOCK / _TAIL) / top ** 2)


@dataclasses.dataclass(frozen=True)
class UpdateEncoding:
    """What a task asks for: `bits` and `rotation_seed` are set for `hadamard` and `secagg` only."""

    name: str = "float32"
    bits: int | None = None
    rotation_seed: int | None = None

    def problems(self, *, needs_seed: bool = True) -> list[str]:
        """What is wrong with this request, one message each (empty when valid).

        Args:
            needs_seed: False for a deployment's setting (the seed is drawn per round).
        """
        if self.name not in TASK_ENCODINGS:
            return [f"update encoding must be one of {', '.join(ENCODINGS)}, got {self.name!r}"]
        out = []
        if self.name in (HADAMARD, SECAGG):
            low, high = (MIN_BITS, MAX_BITS) if self.name == HADAMARD else (SECAGG_MIN_BITS, SECAGG_MAX_BITS)
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not low <= self.bits <= high:
                out.append(f"update bits must be an integer in {low}..{high} for {self.name}, got {self.bits!r}")
            seed = self.rotation_seed
            if needs_seed and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
                out.append(f"{self.name} needs a rotation seed in [0, 2^63), got {seed!r}")
        elif self.bits is not None:
            out.append(f"update bits apply to the {HADAMARD} and {SECAGG} encodings only, not {self.name}")
        return out
