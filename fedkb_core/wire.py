"""The wire format for model updates: safetensors bytes, shared by device and server.

An update is `local_weights - global_weights` by weight name, with string metadata (round,
model version, device, number of examples, clip norm, update norm, encoding). safetensors
carries no pickle, so a hostile body can at worst be rejected. The header is parsed and checked
against the expected weight layout (and the encoding the task asked for) *before* any tensor
data is read, and every rejection names its reason with a stable code the server reports over HTTP.

Encodings (fedkb_core/update_encoding.py): `float32` (exact) and `float16` (half the bytes) carry
one tensor per weight. `hadamard` carries two tensors whatever the model: `levels` (uint8, the
b-bit levels of the rotated, concatenated update, bit-packed) and `scales` (float32, one per
rotated block), with `update_bits`, `rotation_seed`, `hadamard_length` (coordinates before
padding) and `hadamard_block` in the metadata. Weights are concatenated in name order. Decoding
always yields float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fedkb_core import bitpack, hadamard, stochastic_rounding
from fedkb_core.protocol import INT64_MAX
from fedkb_core.update_encoding import ENCODINGS, HADAMARD, MAX_BITS, MIN_BITS, UpdateEncoding

_ST_DTYPES = {"float32": "F32", "float16": "F16"}
LEVELS, SCALES = "levels", "scales"  # the tensors of a `hadamard` update
_MAX_HEADER_BYTES = 1 << 20

# Canonical forms, ASCII only (`[0-9]`, never `\d`, which also matches other scripts' digits):
# what `str(int)` and `repr(float)` write, and nothing else.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?")


def max_update_bytes(num_params: int) -> int:
    """The largest well-formed update of `num_params` parameters: float32 data plus the largest header."""
    return 4 * num_params + _MAX_HEADER_BYTES + 8


class UpdateRejected(Exception):
    """An update that fails validation; `code` is stable, the message is for humans."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Name, shape and dtype of one model weight, as the manifest lists them."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class UpdateMetadata:
    """What travels with an update besides the tensors."""

    round_id: int
    model_version: int
    device_id: str
    num_examples: int
    clip_norm: float
    update_norm: float  # L2 norm before the device clipped
    encoding: str = "float32"
    update_bits: int | None = None  # hadamard only
    rotation_seed: int | None = None  # hadamard only: the round's

    @property
    def update_encoding(self) -> UpdateEncoding:
        return UpdateEncoding(self.encoding, self.update_bits, self.rotation_seed)


@dataclasses.dataclass(frozen=True)
class RotatedUpdate:
    """A validated `hadamard` update left in the rotated domain: the dequantized, padded vector
    R·Δ + rounding error (float32, `hadamard.padded_length(n)` values). Its norm is the decoded
    update's (R is orthogonal); the server folds these and rotates the round's sum back once."""

    metadata: UpdateMetadata
    values: np.ndarray


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """A decoded, validated update: float32 deltas by weight name."""

    metadata: UpdateMetadata
    deltas: dict[str, np.ndarray]


def _flatten(deltas: dict[str, np.ndarray]) -> np.ndarray:
    """All weights as one float32 vector, in name order (the order of the server's sum)."""
    return np.concatenate([np.ravel(np.asarray(deltas[name], np.float32)) for name in sorted(deltas)])


def _encode_hadamard(deltas: dict[str, np.ndarray], metadata: UpdateMetadata,
                     rng: np.random.Generator) -> tuple[dict, dict]:
    flat = _flatten(deltas)
    levels, scales = stochastic_rounding.quantize(hadamard.rotate(flat, metadata.rotation_seed),
                                                  metadata.update_bits, rng)
    tensors = {LEVELS: bitpack.pack(levels.reshape(-1), metadata.update_bits), SCALES: scales}
    return tensors, {"hadamard_length": str(flat.size), "hadamard_block": str(hadamard.BLOCK)}


def encode_update(deltas: dict[str, np.ndarray], metadata: UpdateMetadata, *,
                  rng: np.random.Generator | None = None) -> bytes:
    """Serialize deltas (float32 arrays by weight name) in the metadata's encoding.

    Args:
        rng: the stochastic rounding's randomness (`hadamard`); None: fresh OS entropy.

    Raises:
        ValueError: the metadata's encoding (with its bits and seed) is not a valid request.
    """
    problems = metadata.update_encoding.problems()
    if problems:
        raise ValueError("; ".join(problems))
    extra = {}
    if metadata.encoding == HADAMARD:
        tensors, extra = _encode_hadamard(deltas, metadata, rng or np.random.default_rng())
    else:
        dtype = np.float16 if metadata.encoding == "float16" else np.float32
        tensors = {name: np.ascontiguousarray(t, dtype=np.float32).astype(dtype, copy=False)
                   for name, t in deltas.items()}
    meta = {k: str(v) for k, v in dataclasses.asdict(metadata).items() if v is not None}
    return _st_save(tensors, metadata={**meta, **extra})


def parse_decimal(text: object) -> int:
    """A non-negative integer written canonically: ASCII digits, no sign, whitespace, underscore
    or leading zero (except "0" itself), at most int64.

    Python's `int()` also takes " 7 ", "1_0", "+5" and Arabic-Indic "١٢"; two parsers of one
    field must never disagree on what a device said.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text) or int(text) > INT64_MAX:
        raise ValueError(f"not a canonical decimal integer: {text!r:.40}")
    return int(text)


def parse_float(text: object) -> float:
    """A finite float written plainly, as `repr(float)` writes one ("0.5", "-1e-05", "3.0").

    Refuses whitespace, underscores, a leading "+", non-ASCII digits, "nan", "inf" and values that
    overflow to infinity.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(text, str) or not _FLOAT.fullmatch(text):
        raise ValueError(f"not a plain decimal number: {text!r:.40}")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r:.40}")
    return value


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads` hook: an object that names a key twice is refused (JSON says "should be
    unique"; Python and safetensors would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise UpdateRejected("malformed_update", f"safetensors header names {key!r:.80} twice")
        out[key] = value
    return out


def _refuse_constant(name: str):
    raise UpdateRejected("malformed_update", f"safetensors header contains {name}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def _check_tensor_entry(name: str, info: object) -> None:
    """One tensor's header entry: {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [a, b]}."""
    if not isinstance(info, dict):
        raise UpdateRejected("malformed_update", f"tensor {name!r:.80} has no shape/dtype in the header")
    shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise UpdateRejected("malformed_update", f"tensor {name!r:.80} has no string dtype")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise UpdateRejected("malformed_update", f"tensor {name!r:.80} has shape {shape!r:.80}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise UpdateRejected("malformed_update", f"tensor {name!r:.80} has no [begin, end] data_offsets")


def read_header(body: bytes) -> tuple[dict, dict[str, str], int]:
    """Parse a safetensors header without touching tensor data: (tensors, metadata, data offset).

    Checks the header's structure strictly (unique keys, every tensor entry well formed, metadata
    string to string), so code that reads it later needs no defensive conversions.
    """
    if len(body) < 8:
        raise UpdateRejected("malformed_update", "body is too short to be safetensors")
    (n,) = struct.unpack("<Q", body[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(body):
        raise UpdateRejected("malformed_update", f"safetensors header length {n} does not fit the body")
    try:
        header = json.loads(bytes(body[8 : 8 + n]), object_pairs_hook=_unique_object,
                            parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise UpdateRejected("malformed_update", f"safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise UpdateRejected("malformed_update", "safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UpdateRejected("malformed_update", "safetensors metadata is not an object of strings")
    for name, info in header.items():
        _check_tensor_entry(name, info)
    return header, metadata, 8 + n


_OPTIONAL_FIELDS = ("update_bits", "rotation_seed")  # hadamard's


def _parse_metadata(raw: dict[str, str]) -> UpdateMetadata:
    fields = {f.name: f.type for f in dataclasses.fields(UpdateMetadata)}
    missing = [k for k in fields if k not in raw and k not in _OPTIONAL_FIELDS]
    if missing:
        raise UpdateRejected("malformed_update", f"metadata lacks {', '.join(missing)}")
    try:
        num_examples = parse_decimal(raw["num_examples"])
    except ValueError as err:
        raise UpdateRejected("bad_num_examples", f"num_examples must be a positive count ({err})") from None
    try:
        meta = UpdateMetadata(
            round_id=parse_decimal(raw["round_id"]),
            model_version=parse_decimal(raw["model_version"]),
            device_id=str(raw["device_id"]),
            num_examples=num_examples,
            clip_norm=parse_float(raw["clip_norm"]),
            update_norm=parse_float(raw["update_norm"]),
            encoding=str(raw["encoding"]),
            **{k: parse_decimal(raw[k]) for k in _OPTIONAL_FIELDS if k in raw},
        )
    except (TypeError, ValueError) as err:
        raise UpdateRejected("malformed_update", f"metadata has a value of the wrong type ({err})") from None
    if meta.encoding not in ENCODINGS:
        raise UpdateRejected("bad_encoding", f"unknown encoding {meta.encoding!r}; expected one of {ENCODINGS}")
    if meta.encoding == HADAMARD:
        if meta.update_bits is None or meta.rotation_seed is None:
            raise UpdateRejected("malformed_update", f"a {HADAMARD} update needs update_bits and rotation_seed")
        if not MIN_BITS <= meta.update_bits <= MAX_BITS:
            raise UpdateRejected("bad_bits", f"update_bits must be in {MIN_BITS}..{MAX_BITS}, got {meta.update_bits}")
    elif meta.update_bits is not None or meta.rotation_seed is not None:
        raise UpdateRejected("malformed_update", f"update_bits and rotation_seed belong to {HADAMARD} updates only")
    return meta


def _check_requested(meta: UpdateMetadata, expected: UpdateEncoding) -> None:
    """The update is in the encoding the task asked for: name, bits and this round's seed."""
    if meta.encoding != expected.name:
        raise UpdateRejected("encoding_mismatch", f"update is {meta.encoding}, the task asked for {expected.name}")
    if meta.update_bits != expected.bits:
        raise UpdateRejected("bits_mismatch", f"update has {meta.update_bits} bits, the task asked for {expected.bits}")
    if meta.rotation_seed != expected.rotation_seed:
        raise UpdateRejected("seed_mismatch", "update was rotated with a seed that is not this round's")


def _check_hadamard_header(header: dict, raw_meta: dict[str, str], meta: UpdateMetadata, length: int) -> None:
    """The two tensors of a `hadamard` update have exactly the shapes its bits and length give."""
    try:
        claimed = parse_decimal(raw_meta.get("hadamard_length"))
        block = parse_decimal(raw_meta.get("hadamard_block"))
    except ValueError:
        raise UpdateRejected("malformed_update", "a hadamard update needs hadamard_length and hadamard_block") from None
    if claimed != length:
        raise UpdateRejected("length_mismatch", f"update has {claimed} coordinates, the model has {length}")
    if block != hadamard.BLOCK:
        raise UpdateRejected("malformed_update", f"rotation blocks of {block}, expected {hadamard.BLOCK}")
    if set(header) != {LEVELS, SCALES}:
        raise UpdateRejected("weight_mismatch", f"a hadamard update holds the tensors {LEVELS!r} and {SCALES!r}, "
                                                f"got {sorted(header)[:10]}")
    want = {LEVELS: ("U8", [bitpack.packed_size(hadamard.padded_length(length), meta.update_bits)]),
            SCALES: ("F32", [hadamard.num_blocks(length)])}
    for name, (dtype, shape) in want.items():
        if header[name]["dtype"] != dtype or header[name]["shape"] != shape:
            raise UpdateRejected("length_mismatch", f"tensor {name!r} is {header[name]['dtype']} "
                                                    f"{header[name]['shape']}, {meta.update_bits} bits of {length} "
                                                    f"coordinates need {dtype} {shape}")


def _dequantize_hadamard(tensors: dict, meta: UpdateMetadata, length: int) -> np.ndarray:
    """The rotated blocks a `hadamard` update's levels and scales stand for (float32, (B, BLOCK))."""
    scales = tensors[SCALES]
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise UpdateRejected("non_finite", "a hadamard update's scales must be finite and >= 0")
    try:
        levels = bitpack.unpack(tensors[LEVELS], meta.update_bits, hadamard.padded_length(length))
    except ValueError as err:
        raise UpdateRejected("malformed_update", f"levels are not {meta.update_bits}-bit packed ({err})") from None
    return stochastic_rounding.dequantize(levels.reshape(-1, hadamard.BLOCK), scales, meta.update_bits)


def split_by_name(flat: np.ndarray, specs: list[WeightSpec]) -> dict[str, np.ndarray]:
    """One vector in name order → arrays by weight name (views)."""
    deltas, offset = {}, 0
    for spec in sorted(specs, key=lambda s: s.name):
        deltas[spec.name] = flat[offset: offset + spec.size].reshape(spec.shape)
        offset += spec.size
    return deltas


def decode_update(body: bytes, specs: list[WeightSpec], *, max_examples: int | None = None,
                  expected: UpdateEncoding | None = None) -> ClientUpdate:
    """Validate and decode an update against the expected weight layout.

    Args:
        expected: the encoding the task asked for (None: any valid one, e.g. a blob accepted already).

    Raises:
        UpdateRejected: with code `malformed_update`, `bad_encoding`, `bad_bits`, `encoding_mismatch`,
            `bits_mismatch`, `seed_mismatch`, `length_mismatch`, `weight_mismatch`, `bad_num_examples`
            or `non_finite`.
    """
    meta, tensors = _validated(body, specs, max_examples, expected)
    if meta.encoding == HADAMARD:
        length = sum(s.size for s in specs)
        blocks = _dequantize_hadamard(tensors, meta, length)
        flat = hadamard.unrotate(blocks, meta.rotation_seed, length)
        return ClientUpdate(metadata=meta, deltas=split_by_name(flat, specs))
    deltas = {}
    for spec in specs:
        t = tensors[spec.name].astype(np.float32, copy=False)  # float32 arrays are already fresh copies
        if not np.all(np.isfinite(t)):
            raise UpdateRejected("non_finite", f"tensor {spec.name!r} contains NaN or infinity")
        deltas[spec.name] = t
    return ClientUpdate(metadata=meta, deltas=deltas)


def decode_rotated(body: bytes, specs: list[WeightSpec], *, max_examples: int | None = None,
                   expected: UpdateEncoding | None = None) -> RotatedUpdate:
    """Validate a `hadamard` update exactly as `decode_update` does, but stop before the inverse
    rotation (the dearest step): what the server needs to measure, clip and fold it.

    Raises:
        UpdateRejected: as `decode_update`; `encoding_mismatch` for an update of another encoding.
    """
    meta, tensors = _validated(body, specs, max_examples, expected)
    if meta.encoding != HADAMARD:
        raise UpdateRejected("encoding_mismatch", f"update is {meta.encoding}, not {HADAMARD}")
    return RotatedUpdate(metadata=meta, values=_dequantize_hadamard(tensors, meta, sum(s.size for s in specs)).reshape(-1))


def _validated(body: bytes, specs: list[WeightSpec], max_examples: int | None,
               expected: UpdateEncoding | None) -> tuple[UpdateMetadata, dict]:
    """The metadata and tensors of a body whose header passed every check (data read last)."""
    header, raw_meta, data_start = read_header(body)
    meta = _parse_metadata(raw_meta)
    if expected is not None:
        _check_requested(meta, expected)
    if meta.num_examples <= 0:
        raise UpdateRejected("bad_num_examples", f"num_examples must be positive, got {meta.num_examples}")
    if max_examples is not None and meta.num_examples > max_examples:
        raise UpdateRejected("bad_num_examples", f"num_examples {meta.num_examples} exceeds the task's {max_examples}")
    if not (math.isfinite(meta.update_norm) and meta.update_norm >= 0 and math.isfinite(meta.clip_norm)):
        raise UpdateRejected("malformed_update", "update_norm and clip_norm must be finite")

    if meta.encoding == HADAMARD:
        _check_hadamard_header(header, raw_meta, meta, sum(s.size for s in specs))
    else:
        _check_weight_header(header, meta, specs)
    try:
        return meta, _st_load(body)
    except Exception as err:  # safetensors raises its own error types for truncated data
        raise UpdateRejected("malformed_update", f"tensor data is unreadable ({err})") from None


def _check_weight_header(header: dict, meta: UpdateMetadata, specs: list[WeightSpec]) -> None:
    """One tensor per weight, of its shape, in the encoding's dtype."""
    expected = {s.name: s for s in specs}
    names = set(header)
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise UpdateRejected("weight_mismatch", f"tensor names differ from the model's: missing {missing}, unexpected {extra}")
    want_dtype = _ST_DTYPES[meta.encoding]
    for name, info in header.items():
        spec = expected[name]
        if tuple(info["shape"]) != spec.shape:
            raise UpdateRejected("weight_mismatch", f"tensor {name!r} has shape {tuple(info['shape'])}, expected {spec.shape}")
        if info["dtype"] != want_dtype:
            raise UpdateRejected("weight_mismatch", f"tensor {name!r} is {info['dtype']}, but encoding {meta.encoding} needs {want_dtype}")
