"""The wire format of a masked SecAgg upload: one bit-packed tensor and a minimal header.

A masked vector y_u is uniform modulo 2^r, so it travels at exactly r bits per coordinate
(`fedkb_core.bitpack`) in the same safetensors container as every update (no pickle, header
checked before any data is read; `fedkb_core.wire.read_header`). The metadata says only what the
server needs to route and check it: `round_id`, `model_version`, `device_id`, `encoding`
(`secagg`), `modulus_bits` and `vector_length`. Unlike a plain update it carries no
`num_examples`, `clip_norm` or `update_norm`: those would tell the server something about one
device's update, which secure aggregation exists to hide (the weight travels inside the masked
vector; docs/secure_aggregation.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fedkb_core import bitpack
from fedkb_core.update_encoding import SECAGG
from fedkb_core.wire import UpdateRejected, parse_decimal, read_header

MASKED = "masked"  # the one tensor
_FIELDS = ("round_id", "model_version", "device_id", "encoding", "modulus_bits", "vector_length")


@dataclasses.dataclass(frozen=True)
class MaskedUpload:
    """A decoded masked upload: its header and the uint32 values, each < 2^modulus_bits."""

    round_id: int
    model_version: int
    device_id: str
    modulus_bits: int
    values: np.ndarray


def encode_masked(values: np.ndarray, modulus_bits: int, *, round_id: int, device_id: str,
                  model_version: int) -> bytes:
    """The upload body of a masked vector (uint32, every value < 2^modulus_bits).

    Raises:
        ValueError: modulus_bits outside 1..32, or a value that does not fit in it.
    """
    values = np.ascontiguousarray(values, np.uint32).ravel()
    packed = bitpack.pack(values, int(modulus_bits))
    metadata = {"round_id": str(int(round_id)), "model_version": str(int(model_version)), "device_id": str(device_id),
                "encoding": SECAGG, "modulus_bits": str(int(modulus_bits)), "vector_length": str(values.size)}
    return _st_save({MASKED: packed}, metadata=metadata)


def decode_masked(body: bytes, *, modulus_bits: int, vector_length: int) -> MaskedUpload:
    """Check a masked upload against the round's modulus and vector length, then unpack it.

    Everything in the header is checked before any tensor data is read: the metadata fields
    (exactly `_FIELDS`, numbers canonical), the encoding, the modulus, the length and the one
    tensor's dtype and shape. Codes as `fedkb_core.wire`'s: `malformed_update`,
    `encoding_mismatch`, `bits_mismatch`, `length_mismatch`, `weight_mismatch`.

    Raises:
        UpdateRejected: the body is not a masked upload for this round's grid.
    """
    header, raw, _ = read_header(body)
    if set(raw) != set(_FIELDS):
        extra, missing = sorted(set(raw) - set(_FIELDS)), sorted(set(_FIELDS) - set(raw))
        raise UpdateRejected("malformed_update", f"a masked upload's metadata is exactly {', '.join(_FIELDS)}; "
                                                 f"missing {missing[:6]}, unexpected {[k[:40] for k in extra[:6]]}")
    if raw["encoding"] != SECAGG:
        raise UpdateRejected("encoding_mismatch", f"update is {raw['encoding']!r:.40}, the round asked for {SECAGG}")
    try:
        numbers = {k: parse_decimal(raw[k]) for k in ("round_id", "model_version", "modulus_bits", "vector_length")}
    except ValueError as err:
        raise UpdateRejected("malformed_update", f"a masked upload's metadata has a bad number ({err})") from None
    if numbers["modulus_bits"] != modulus_bits:
        raise UpdateRejected("bits_mismatch", f"update is modulo 2^{numbers['modulus_bits']}, the round sums "
                                              f"modulo 2^{modulus_bits}")
    if numbers["vector_length"] != vector_length:
        raise UpdateRejected("length_mismatch", f"update has {numbers['vector_length']} values, the round's "
                                                f"vector has {vector_length}")
    want = [bitpack.packed_size(vector_length, modulus_bits)]
    if set(header) != {MASKED} or header[MASKED]["dtype"] != "U8" or header[MASKED]["shape"] != want:
        raise UpdateRejected("weight_mismatch", f"a masked upload holds one tensor {MASKED!r} of U8 {want}")
    try:
        packed = _st_load(bytes(body))[MASKED]
    except Exception as err:  # safetensors raises its own error types for truncated data
        raise UpdateRejected("malformed_update", f"tensor data is unreadable ({err})") from None
    try:
        values = bitpack.unpack(packed, modulus_bits, vector_length).astype(np.uint32, copy=False)
    except ValueError as err:
        raise UpdateRejected("malformed_update", f"the masked values are not {modulus_bits}-bit packed ({err})") from None
    return MaskedUpload(round_id=numbers["round_id"], model_version=numbers["model_version"],
                        device_id=raw["device_id"], modulus_bits=modulus_bits, values=values)
