"""Publish new weights into existing .tflite files without running the converter.

Only weights change between model versions, so a new version's .tflite file is the parent's
bytes with some constant buffers overwritten (same sizes, so every flatbuffer offset stays
valid) and, for dynamic-range-quantized tensors, their int8 data and float scale vectors
recomputed in numpy the way the converter computes them (symmetric, max|w|/127, round half away
from zero, zero point 0, per-tensor or per-channel as in the original).

Two phases:
  * export time, once per converted graph: `map_weights(model, sentinels)` finds which tensors
    hold which weight (or a value the converter folded out of several weights, see `Derived`), in
    which layout and quantization. The exporter converts with *sentinel* weights (distinct
    random values per weight) so the match is unambiguous and nothing is folded away or
    de-duplicated because a weight happened to be zero or equal to another constant. The result
    is a small JSON-able `RewriteMap` the exporter stores in the manifest.
  * publish time: `rewrite(model, rmap, weights)` → new bytes. numpy + the `flatbuffers`
    runtime only (no TensorFlow import; ~ms for the flatbuffer part).

`read_weights(model, rmap)` reads the weights back (exact for float tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flatbuffers
import numpy as np
from flatbuffers.table import Table

# ---------------------------------------------------------------------------------------------
# Derived values: constants the converter computes from several weights (constant folding).
# Which ones a graph has is a property of the model's code, so the rules live beside the model
# (`model/derived.py`); callers pass them in as `derived={name: Derived(...)}`.

@dataclasses.dataclass(frozen=True)
class Derived:
    inputs: tuple[str, ...]
    fn: Callable[..., np.ndarray]


# ---------------------------------------------------------------------------------------------
# Minimal read access to the TFLite schema (tensorflow/lite/schema/schema.fbs), by field slot.
# vtable offset of field k is 4 + 2 k.

_MODEL_SUBGRAPHS, _MODEL_BUFFERS = 8, 12
_SUBGRAPH_TENSORS = 4
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME, _TENSOR_QUANT = 4, 6, 8, 10, 12
_QUANT_MIN, _QUANT_MAX, _QUANT_SCALE, _QUANT_ZERO_POINT, _QUANT_DIM = 4, 6, 8, 10, 16
_BUFFER_DATA, _BUFFER_OFFSET = 4, 6
_TFLITE_TYPES = {0: np.float32, 2: np.int32, 9: np.int8}  # TensorType enum values we touch


def _root(buf) -> Table:
    return Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))


def _table_vector(tab: Table, slot: int) -> list[Table]:
    o = tab.Offset(slot)
    if not o:
        return []
    start = tab.Vector(o)
    return [Table(tab.Bytes, tab.Indirect(start + 4 * j)) for j in range(tab.VectorLen(o))]


def _sub_table(tab: Table, slot: int) -> Table | None:
    o = tab.Offset(slot)
    return Table(tab.Bytes, tab.Indirect(tab.Pos + o)) if o else None


def _scalar(tab: Table, slot: int, flags, default=0):
    o = tab.Offset(slot)
    return tab.Get(flags, tab.Pos + o) if o else default


def _vector_span(tab: Table | None, slot: int, itemsize: int) -> tuple[int, int]:
    """(byte position, number of items) of a scalar vector field; (0, 0) if absent."""
    if tab is None:
        return 0, 0
    o = tab.Offset(slot)
    return (tab.Vector(o), tab.VectorLen(o)) if o else (0, 0)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    subgraph: int
    index: int
    name: str
    shape: tuple[int, ...]
    tflite_type: int
    buffer: int
    data_pos: int  # byte position of the buffer's data in the file (0 = no data)
    data_len: int
    scale_pos: int  # byte position of quantization.scale floats (0 = not quantized)
    scale_len: int
    quant_dim: int
    has_min_max: bool


def _tensor_info(buf, si: int, ti: int, tensor: Table, buffers: list[Table]) -> TensorInfo:
    bpos, blen = _vector_span(tensor, _TENSOR_SHAPE, 4)
    shape = tuple(int(x) for x in np.frombuffer(buf, np.int32, blen, bpos)) if blen else ()
    bidx = _scalar(tensor, _TENSOR_BUFFER, flatbuffers.number_types.Uint32Flags)
    buffer = buffers[bidx]
    if _scalar(buffer, _BUFFER_OFFSET, flatbuffers.number_types.Uint64Flags) > 1:
        raise ValueError("model stores buffers outside the flatbuffer (>2 GB layout); not supported")
    dpos, dlen = _vector_span(buffer, _BUFFER_DATA, 1)
    q = _sub_table(tensor, _TENSOR_QUANT)
    spos, slen = _vector_span(q, _QUANT_SCALE, 4)
    name_off = tensor.Offset(_TENSOR_NAME)
    name = tensor.String(tensor.Pos + name_off).decode() if name_off else ""
    return TensorInfo(
        subgraph=si, index=ti, name=name, shape=shape,
        tflite_type=_scalar(tensor, _TENSOR_TYPE, flatbuffers.number_types.Int8Flags),
        buffer=bidx, data_pos=dpos, data_len=dlen, scale_pos=spos, scale_len=slen,
        quant_dim=_scalar(q, _QUANT_DIM, flatbuffers.number_types.Int32Flags) if q is not None else 0,
        has_min_max=q is not None and bool(q.Offset(_QUANT_MIN) or q.Offset(_QUANT_MAX)))


def scan_tensors(buf) -> list[TensorInfo]:
    """Every tensor of every subgraph (export time; a few ms for thousands of tensors)."""
    model = _root(buf)
    buffers = _table_vector(model, _MODEL_BUFFERS)
    return [_tensor_info(buf, si, ti, t, buffers)
            for si, sg in enumerate(_table_vector(model, _MODEL_SUBGRAPHS))
            for ti, t in enumerate(_table_vector(sg, _SUBGRAPH_TENSORS))]


def tensor_at(buf, subgraph: int, index: int) -> TensorInfo:
    """One tensor, found directly by position (publish time; microseconds)."""
    model = _root(buf)
    sg = _table_vector(model, _MODEL_SUBGRAPHS)[subgraph]
    o = sg.Offset(_SUBGRAPH_TENSORS)
    tensor = Table(buf, sg.Indirect(sg.Vector(o) + 4 * index))
    return _tensor_info(buf, subgraph, index, tensor, _table_vector(model, _MODEL_BUFFERS))


# ---------------------------------------------------------------------------------------------
# Quantization as the converter does it for dynamic-range (weight-only) int8.

def quantize_symmetric(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales as TF 2.14's dynamic-range quantizer makes them.

    scale = max|x| / 127 (per slice along `axis`, or per tensor if axis is None), stored as
    float32; q = round_half_away_from_zero(x * (127 / max|x|)) computed in float64, clipped to
    ±127, zero point 0. The float64 product matters: float32 x / scale or x * (127 / max) differ
    from the converter in ~1 element per million (values within an ulp of a .5 tie).
    """
    x64 = np.asarray(x, np.float32).astype(np.float64)
    if axis is None:
        amax = np.abs(x64).max(keepdims=True).reshape(1)
        bshape = (1,) * x64.ndim
    else:
        amax = np.abs(x64).max(axis=tuple(d for d in range(x64.ndim) if d != axis))
        bshape = [1] * x64.ndim
        bshape[axis] = -1
    safe = np.where(amax == 0, 127.0, amax)  # all-zero slice: q = 0, scale 1 (any scale works)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    y = x64 * (127.0 / safe).reshape(bshape)
    q = np.clip(np.trunc(y + np.copysign(0.5, y)), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or scale.size == 1:
        return q.astype(np.float32) * scale.reshape(())
    bshape = [1] * q.ndim
    bshape[axis] = -1
    return q.astype(np.float32) * scale.reshape(bshape)


# ---------------------------------------------------------------------------------------------
# The map: which tensors carry which weight.

@dataclasses.dataclass(frozen=True)
class Binding:
    subgraph: int
    tensor: int
    source: str  # a weight name, or the name of a `Derived` rule
    transpose: bool  # the tensor holds source.T (FULLY_CONNECTED weights are [out, in])
    shape: tuple[int, ...]  # the tensor's shape (checked at publish time)
    quantized: bool  # int8 data with float scales
    quant_axis: int | None  # per-channel axis, None = per-tensor
    scale_followers: tuple[tuple[int, int], ...] = ()  # (subgraph, tensor) that must carry the same scales

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["scale_followers"] = [list(x) for x in self.scale_followers]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Binding":
        return cls(**{**d, "shape": tuple(d["shape"]),
                      "scale_followers": tuple(tuple(x) for x in d["scale_followers"])})


@dataclasses.dataclass(frozen=True)
class RewriteMap:
    bindings: tuple[Binding, ...]

    def to_json(self) -> dict:
        return {"format": 1, "bindings": [b.to_json() for b in self.bindings]}

    @classmethod
    def from_json(cls, d: dict) -> "RewriteMap":
        if d.get("format") != 1:
            raise ValueError(f"unknown rewrite map format {d.get('format')!r}")
        return cls(tuple(Binding.from_json(b) for b in d["bindings"]))


def _tensor_array(buf, t: TensorInfo) -> np.ndarray:
    dtype = _TFLITE_TYPES[t.tflite_type]
    return np.frombuffer(buf, dtype, t.data_len // np.dtype(dtype).itemsize, t.data_pos).reshape(t.shape)


def _scales(buf, t: TensorInfo) -> np.ndarray:
    return np.frombuffer(buf, np.float32, t.scale_len, t.scale_pos)


def _sources(weights: dict[str, np.ndarray], derived: dict) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    for name, d in derived.items():
        if all(i in out for i in d.inputs):
            out[name] = np.asarray(d.fn(*(out[i] for i in d.inputs)), np.float32)
    return out


def map_weights(model: bytes, sentinels: dict[str, np.ndarray], *, derived: dict[str, Derived],
                required: tuple[str, ...] | None = None) -> RewriteMap:
    """Find the tensors holding each sentinel weight (export time).

    Raises:
        ValueError: a required weight is carried by no tensor (the converter folded it into
            something not listed in `derived`), a buffer is shared between a weight and another
            tensor, or a large constant is left that looks derived from weights but is unmapped.
    """
    buf = bytes(model)
    for name, v in sentinels.items():
        flat = np.asarray(v).reshape(-1)
        if flat.size > 1 and np.unique(flat).size < flat.size // 2:
            raise ValueError(f"sentinel {name!r} is not distinct enough (use random values)")
    sources = _sources(sentinels, derived)
    tensors = scan_tensors(buf)
    by_key = {(t.subgraph, t.index): t for t in tensors}
    bindings: list[Binding] = []
    unmatched_suspicious = []
    for t in tensors:
        if not t.data_len or t.tflite_type not in (0, 9):
            continue
        data = _tensor_array(buf, t)
        hit = None
        for name, src in sources.items():
            for transpose in (False, True):
                cand = src.T if transpose else src
                if cand.shape != t.shape or (transpose and src.ndim != 2):
                    continue
                if t.tflite_type == 0:  # float32: bit-exact for weights, float tolerance if folded
                    ok = np.array_equal(data, cand) if name in sentinels else np.allclose(data, cand, rtol=1e-5, atol=1e-6)
                    qaxis = None
                else:  # int8 with scales
                    sc = _scales(buf, t)
                    qaxis = None if sc.size == 1 else t.quant_dim
                    want_q, want_s = quantize_symmetric(cand, qaxis)
                    ok = sc.size == want_s.size and np.allclose(sc, want_s, rtol=1e-5) and \
                        np.abs(data.astype(np.int32) - want_q).max() <= 1
                    if ok and not (np.array_equal(sc, want_s) and np.array_equal(data, want_q)):
                        raise ValueError(f"tensor {t.name!r} holds {name} quantized differently from "
                                         "quantize_symmetric (converter changed its scheme?)")
                if ok:
                    if hit is not None:
                        raise ValueError(f"tensor {t.name!r} matches both {hit[0]} and {name}: sentinels not distinct")
                    hit = (name, transpose, qaxis)
        if hit is None:
            flat = data.reshape(-1)
            if flat.size >= 16 and not np.all(flat == flat[0]):
                unmatched_suspicious.append(t)
            continue
        if t.has_min_max:
            raise ValueError(f"tensor {t.name!r}: quantization min/max present; not supported")
        bindings.append(Binding(t.subgraph, t.index, hit[0], hit[1], t.shape, t.tflite_type == 9, hit[2]))

    # A bound buffer must be referenced by bound tensors of one source only: the converter
    # de-duplicates equal constants, so a weight equal to some other constant (zeros!) shares
    # its buffer, and rewriting it would change that constant too.
    source_of = {(b.subgraph, b.tensor): (b.source, b.transpose) for b in bindings}
    users: dict[int, set] = {}
    for t in tensors:
        users.setdefault(t.buffer, set()).add(source_of.get((t.subgraph, t.index), ("<not a weight>", t.name)))
    for b in bindings:
        u = users[by_key[(b.subgraph, b.tensor)].buffer]
        if len(u) != 1:
            raise ValueError(f"the buffer of {b.source} is shared with {sorted(map(str, u))}; "
                             "convert with distinct sentinel weights")

    # Non-constant tensors carrying a quantized weight's scales (e.g. GATHER's int8 output
    # feeding DEQUANTIZE): they must be updated with it. Sentinel scales are unique floats.
    bound = {(b.subgraph, b.tensor) for b in bindings}
    for i, b in enumerate(bindings):
        if not b.quantized:
            continue
        mine = by_key[(b.subgraph, b.tensor)]
        sc = _scales(buf, mine)
        followers = tuple((t.subgraph, t.index) for t in tensors
                          if (t.subgraph, t.index) not in bound and t.scale_len == sc.size
                          and np.array_equal(_scales(buf, t), sc))
        bindings[i] = dataclasses.replace(b, scale_followers=followers)

    covered = {w for b in bindings for w in (derived[b.source].inputs if b.source in derived else (b.source,))}
    missing = set(required if required is not None else sentinels) - covered
    if missing:
        raise ValueError(f"weights {sorted(missing)} are in no tensor (folded by the converter?); "
                         f"unmapped constants: {[(t.name, t.shape) for t in unmatched_suspicious]}")
    if unmatched_suspicious:
        raise ValueError(f"constants that may be folded from weights: {[(t.name, t.shape) for t in unmatched_suspicious]}")
    return RewriteMap(tuple(bindings))


# ---------------------------------------------------------------------------------------------
# Publish time.

def rewrite(model: bytes, rmap: RewriteMap, weights: dict[str, np.ndarray], *, derived: dict[str, Derived]) -> bytes:
    """The model's bytes with every bound tensor recomputed from `weights`.

    Raises:
        ValueError: a weight is missing or has the wrong shape, or the file does not have the
            layout the map was made for.
    """
    out = bytearray(model)
    needed = {b.source for b in rmap.bindings}
    sources = _sources({k: v for k, v in weights.items()}, {k: f for k, f in derived.items() if k in needed})
    for b in rmap.bindings:
        if b.source not in sources:
            raise ValueError(f"no value for {b.source!r}")
        t = tensor_at(out, b.subgraph, b.tensor)
        src = sources[b.source]
        value = src.T if b.transpose else src
        if t.shape != b.shape or value.shape != b.shape:
            raise ValueError(f"{b.source}: tensor ({b.subgraph},{b.tensor}) has shape {t.shape}, "
                             f"map says {b.shape}, value is {value.shape}")
        if b.quantized:
            q, scale = quantize_symmetric(value, b.quant_axis)
            data = np.ascontiguousarray(q).tobytes()
            if t.scale_len != scale.size:
                raise ValueError(f"{b.source}: {t.scale_len} scales in file, {scale.size} computed")
            for si, ti in ((b.subgraph, b.tensor), *b.scale_followers):
                f = tensor_at(out, si, ti)
                out[f.scale_pos:f.scale_pos + 4 * f.scale_len] = scale.astype("<f4").tobytes()
        else:
            data = np.ascontiguousarray(value, "<f4").tobytes()
        if len(data) != t.data_len:
            raise ValueError(f"{b.source}: {len(data)} bytes for a {t.data_len}-byte buffer")
        out[t.data_pos:t.data_pos + t.data_len] = data
    return bytes(out)


def read_weights(model: bytes, rmap: RewriteMap, *, derived: dict[str, Derived]) -> dict[str, np.ndarray]:
    """Plain weights back out of a file (float tensors exact, int8 dequantized); float preferred."""
    out: dict[str, np.ndarray] = {}
    for b in sorted(rmap.bindings, key=lambda b: b.quantized):  # float tensors first
        if b.source in out or b.source in derived:
            continue
        t = tensor_at(model, b.subgraph, b.tensor)
        a = _tensor_array(model, t)
        if b.quantized:
            a = dequantize(a, _scales(model, t), b.quant_axis)
        out[b.source] = np.array(a.T if b.transpose else a, np.float32)
    return out
