"""The wire format for model updates: safetensors bytes, shared by device and server.

An update is `local_weights - global_weights` by weight name, with string metadata (round,
model version, device, number of examples, clip norm, update norm, encoding). safetensors
carries no pickle, so a hostile body can at worst be rejected. The header is parsed and checked
against the expected weight layout *before* any tensor data is read, and every rejection names
its reason with a stable code the server reports over HTTP.

Encodings: `float32` (exact), `float16` (half the bytes), `int8` (a quarter; symmetric per-tensor
scale carried in the metadata). Decoding always yields float32.
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

from fedkb_core.protocol import INT64_MAX

ENCODINGS = ("float32", "float16", "int8")
_ST_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8"}
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


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """A decoded, validated update: float32 deltas by weight name."""

    metadata: UpdateMetadata
    deltas: dict[str, np.ndarray]


def _quantize_int8(t: np.ndarray) -> tuple[np.ndarray, float]:
    peak = float(np.max(np.abs(t))) if t.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return np.clip(np.rint(t / scale), -127, 127).astype(np.int8), scale


def encode_update(deltas: dict[str, np.ndarray], metadata: UpdateMetadata) -> bytes:
    """Serialize deltas (float32 arrays by weight name) in the metadata's encoding."""
    if metadata.encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {metadata.encoding!r}; expected one of {ENCODINGS}")
    tensors, scales = {}, {}
    for name, t in deltas.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if metadata.encoding == "float16":
            tensors[name] = t.astype(np.float16)
        elif metadata.encoding == "int8":
            tensors[name], scales[name] = _quantize_int8(t)
        else:
            tensors[name] = t
    meta = {k: str(v) for k, v in dataclasses.asdict(metadata).items()}
    if scales:
        meta["int8_scales"] = json.dumps(scales)
    return _st_save(tensors, metadata=meta)


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


def _parse_metadata(raw: dict[str, str]) -> UpdateMetadata:
    fields = {f.name: f.type for f in dataclasses.fields(UpdateMetadata)}
    missing = [k for k in fields if k not in raw]
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
        )
    except (TypeError, ValueError) as err:
        raise UpdateRejected("malformed_update", f"metadata has a value of the wrong type ({err})") from None
    if meta.encoding not in ENCODINGS:
        raise UpdateRejected("bad_encoding", f"unknown encoding {meta.encoding!r}; expected one of {ENCODINGS}")
    return meta


def decode_update(body: bytes, specs: list[WeightSpec], *, max_examples: int | None = None) -> ClientUpdate:
    """Validate and decode an update against the expected weight layout.

    Raises:
        UpdateRejected: with code `malformed_update`, `bad_encoding`, `weight_mismatch`,
            `bad_num_examples` or `non_finite`.
    """
    header, raw_meta, data_start = read_header(body)
    meta = _parse_metadata(raw_meta)
    if meta.num_examples <= 0:
        raise UpdateRejected("bad_num_examples", f"num_examples must be positive, got {meta.num_examples}")
    if max_examples is not None and meta.num_examples > max_examples:
        raise UpdateRejected("bad_num_examples", f"num_examples {meta.num_examples} exceeds the task's {max_examples}")

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

    try:
        tensors = _st_load(body)
    except Exception as err:  # safetensors raises its own error types for truncated data
        raise UpdateRejected("malformed_update", f"tensor data is unreadable ({err})") from None

    scales = {}
    if meta.encoding == "int8":
        try:
            scales = {k: float(v) for k, v in json.loads(raw_meta.get("int8_scales", "")).items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise UpdateRejected("malformed_update", "int8 update lacks a valid int8_scales map") from None
        if set(scales) != names or not all(math.isfinite(s) and s > 0 for s in scales.values()):
            raise UpdateRejected("malformed_update", "int8_scales must give a positive finite scale for every tensor")
    deltas = {}
    for spec in specs:
        t = tensors[spec.name].astype(np.float32, copy=False)  # float32 arrays are already fresh copies
        if meta.encoding == "int8":
            t *= np.float32(scales[spec.name])
        if not np.all(np.isfinite(t)):
            raise UpdateRejected("non_finite", f"tensor {spec.name!r} contains NaN or infinity")
        deltas[spec.name] = t
    if not (math.isfinite(meta.update_norm) and meta.update_norm >= 0 and math.isfinite(meta.clip_norm)):
        raise UpdateRejected("malformed_update", "update_norm and clip_norm must be finite")
    return ClientUpdate(metadata=meta, deltas=deltas)
