"""The wire format of a masked SecAgg upload: one bit-packed tensor and a minimal header.

A masked vector y_u is masked modulo 2^32; its body (the update's P coordinates) is summed
modulo 2^r, so each body value travels as its low r bits, uniform modulo 2^r (`fedkb_core.bitpack`),
and its wide tail (the weight and adaptive clipping's bit, summed modulo 2^32 whatever r is) as
32-bit words, in the same safetensors container as every update (no pickle, header checked before
any data is read; `fedkb_core.wire.read_header`). The metadata says only what the server needs to
route and check it: `round_id`, `model_version`, `device_id`, `encoding` (`secagg`),
`modulus_bits`, `vector_length` and `tail_length`. Unlike a plain update it carries no
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
from fedkb_core.secagg import prg
from fedkb_core.update_encoding import SECAGG
from fedkb_core.wire import UpdateRejected, parse_decimal, read_header

MASKED = "masked"  # the body, r-bit packed
MASKED_TAIL = "masked_tail"  # the wide tail, 32-bit words (little-endian bytes)
_FIELDS = ("round_id", "model_version", "device_id", "encoding", "modulus_bits", "vector_length", "tail_length")


@dataclasses.dataclass(frozen=True)
class MaskedUpload:
    """A decoded masked upload: its header and the uint32 values (the body's each < 2^modulus_bits)."""

    round_id: int
    model_version: int
    device_id: str
    modulus_bits: int
    values: np.ndarray


def encode_masked(values: np.ndarray, modulus_bits: int, *, tail_length: int, round_id: int, device_id: str,
                  model_version: int) -> bytes:
    """The upload body of a masked vector: uint32 values masked modulo 2^32, the last `tail_length`
    the wide tail; the body travels as its values' low `modulus_bits` bits.

    Raises:
        ValueError: modulus_bits outside 1..32, or a tail as long as the vector.
    """
    values = np.ascontiguousarray(values, np.uint32).ravel()
    if isinstance(tail_length, bool) or not isinstance(tail_length, int) or not 0 <= tail_length < values.size:
        raise ValueError(f"tail_length must be an integer in 0..{values.size - 1}, got {tail_length!r}")
    split = values.size - tail_length
    body = values[:split] & prg.modulus_mask(int(modulus_bits))
    tensors = {MASKED: bitpack.pack(body, int(modulus_bits)),
               MASKED_TAIL: np.frombuffer(values[split:].astype("<u4").tobytes(), np.uint8).copy()}
    metadata = {"round_id": str(int(round_id)), "model_version": str(int(model_version)), "device_id": str(device_id),
                "encoding": SECAGG, "modulus_bits": str(int(modulus_bits)), "vector_length": str(values.size),
                "tail_length": str(tail_length)}
    return _st_save(tensors, metadata=metadata)


def decode_masked(body: bytes, *, modulus_bits: int, vector_length: int, tail_length: int) -> MaskedUpload:
    """Check a masked upload against the round's modulus, vector and tail lengths, then unpack it.

    Everything in the header is checked before any tensor data is read: the metadata fields
    (exactly `_FIELDS`, numbers canonical), the encoding, the modulus, the lengths and the two
    tensors' dtypes and shapes. Codes as `fedkb_core.wire`'s: `malformed_update`,
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
        numbers = {k: parse_decimal(raw[k])
                   for k in ("round_id", "model_version", "modulus_bits", "vector_length", "tail_length")}
    except ValueError as err:
        raise UpdateRejected("malformed_update", f"a masked upload's metadata has a bad number ({err})") from None
    if numbers["modulus_bits"] != modulus_bits:
        raise UpdateRejected("bits_mismatch", f"update is modulo 2^{numbers['modulus_bits']}, the round sums "
                                              f"modulo 2^{modulus_bits}")
    if numbers["vector_length"] != vector_length:
        raise UpdateRejected("length_mismatch", f"update has {numbers['vector_length']} values, the round's "
                                                f"vector has {vector_length}")
    if numbers["tail_length"] != tail_length:
        raise UpdateRejected("length_mismatch", f"update has a tail of {numbers['tail_length']} values, the round's "
                                                f"vector has {tail_length}")
    split = vector_length - tail_length
    want = {MASKED: [bitpack.packed_size(split, modulus_bits)], MASKED_TAIL: [4 * tail_length]}
    if set(header) != set(want) or any(header[k]["dtype"] != "U8" or header[k]["shape"] != want[k] for k in want):
        raise UpdateRejected("weight_mismatch", f"a masked upload holds the tensors {MASKED!r} of U8 {want[MASKED]} "
                                                f"and {MASKED_TAIL!r} of U8 {want[MASKED_TAIL]}")
    try:
        tensors = _st_load(bytes(body))
    except Exception as err:  # safetensors raises its own error types for truncated data
        raise UpdateRejected("malformed_update", f"tensor data is unreadable ({err})") from None
    try:
        head = bitpack.unpack(tensors[MASKED], modulus_bits, split).astype(np.uint32, copy=False)
    except ValueError as err:
        raise UpdateRejected("malformed_update", f"the masked values are not {modulus_bits}-bit packed ({err})") from None
    values = np.concatenate([head, np.frombuffer(tensors[MASKED_TAIL].tobytes(), "<u4").astype(np.uint32)])
    return MaskedUpload(round_id=numbers["round_id"], model_version=numbers["model_version"],
                        device_id=raw["device_id"], modulus_bits=modulus_bits, values=values)
