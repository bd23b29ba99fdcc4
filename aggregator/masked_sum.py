"""A SecAgg round's running sum: Σ y mod 2^32 of its accepted masked uploads (the body's low r bits
its sum modulo 2^r), as the folder keeps it.

The folder (aggregator/folding.py) treats it as it treats a plain round's `RoundSum`: it adds each
accepted blob once, in row order, and checkpoints {sum, count, last_folded_id} atomically to
`<state>/sums/<round>.safetensors` (one uint32 tensor), so after `kill -9` the round continues
with exactly the accepted inputs, none counted twice. A sum of masked inputs is still masked: every
device's self mask PRG(b_u) stays in it until `SecAggCohort.result` removes the survivors' masks
once input has closed (aggregator/secagg_release.py), so neither a blob nor a checkpoint ever holds
one device's input in the clear. There is nothing to clip or count: a masked vector says nothing
about its norm, its example count, or whether it was clipped (the weight and adaptive clipping's
bit travel inside it, summed).
"""

from __future__ import annotations

import numpy as np

from aggregator.rounds import RoundRecord
from fedkb_core.secagg.integer_encoding import MASK_BITS, add_mod, tail_length
from fedkb_core.secagg.masked_wire import MaskedUpload, decode_masked
from fedkb_core.wire import UpdateRejected

MASKED_SUM = "masked_sum"  # the checkpoint's one tensor


class MaskedSum:
    """Σ y mod 2^32 (uint32, the round's vector length) and how many inputs it holds."""

    total_examples = 0  # a masked input carries no example count
    unclipped = 0  # nor a clipped/unclipped verdict the server could read

    def __init__(self, round_: RoundRecord, vector_length: int, *, values: np.ndarray | None = None, count: int = 0,
                 last_folded_id: int = 0):
        self.round_id = round_.id
        self.modulus_bits = int(round_.secagg_modulus_bits)
        self.vector_length = int(vector_length)
        self.tail_length = tail_length(round_.secagg_task.count_unclipped)
        self.values = np.zeros(self.vector_length, np.uint32) if values is None else np.array(values, np.uint32)
        if self.values.shape != (self.vector_length,):
            raise ValueError(f"a masked sum has {self.vector_length} values, got shape {self.values.shape}")
        self.count = int(count)
        self.last_folded_id = int(last_folded_id)

    def add(self, body: bytes) -> None:
        """Fold one accepted masked upload (its body as stored); nothing is added if it raises.

        Raises:
            fedkb_core.wire.UpdateRejected, ValueError: the blob no longer decodes for this round.
        """
        upload = decode_masked(body, modulus_bits=self.modulus_bits, vector_length=self.vector_length,
                               tail_length=self.tail_length)
        add_mod(self.values, upload.values, MASK_BITS)  # the body's low r bits are its sum modulo 2^r
        self.count += 1

    def count_norm(self, measured, reported) -> None:
        """Nothing to count (see `unclipped`)."""

    def tensors(self) -> dict[str, np.ndarray]:
        """What the checkpoint stores."""
        return {MASKED_SUM: self.values}

    @classmethod
    def restore(cls, round_: RoundRecord, vector_length: int, tensors: dict, *, count: int,
                last_folded_id: int) -> "MaskedSum":
        """The sum a checkpoint held."""
        return cls(round_, vector_length, values=tensors[MASKED_SUM], count=count, last_folded_id=last_folded_id)
