"""The shared update wire format and L2 clipping, on small arrays checked by hand."""

import dataclasses
import json
import struct

import numpy as np
import pytest

from fedkb_core.clipping import clip_by_global_norm, global_norm
from fedkb_core.wire import UpdateMetadata, UpdateRejected, WeightSpec, decode_update, encode_update

SPECS = [WeightSpec("a", (2, 3)), WeightSpec("b", (4,))]


def _deltas(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}


def _meta(**kw):
    base = dict(round_id=3, model_version=2, device_id="dev-1", num_examples=40, clip_norm=1.0,
                update_norm=0.5, encoding="float32")
    base.update(kw)
    return UpdateMetadata(**base)


def test_global_norm_and_clip_by_hand():
    t = {"x": np.array([3.0, 0.0], np.float32), "y": np.array([[4.0]], np.float32)}
    assert global_norm(t) == pytest.approx(5.0)
    clipped, norm = clip_by_global_norm(t, 2.5)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["x"], [1.5, 0.0])
    np.testing.assert_allclose(clipped["y"], [[2.0]])
    same, _ = clip_by_global_norm(t, 10.0)
    np.testing.assert_array_equal(same["x"], t["x"])
    with pytest.raises(ValueError):
        clip_by_global_norm(t, 0.0)


@pytest.mark.parametrize("encoding, tolerance", [("float32", 0.0), ("float16", 2e-3)])
def test_round_trip_per_encoding(encoding, tolerance):
    deltas = _deltas()
    body = encode_update(deltas, _meta(encoding=encoding))
    update = decode_update(body, SPECS)
    assert update.metadata == _meta(encoding=encoding)
    for name, t in deltas.items():
        assert update.deltas[name].dtype == np.float32
        np.testing.assert_allclose(update.deltas[name], t, atol=tolerance * np.abs(t).max())


def test_compact_encodings_are_smaller():
    big = {"a": np.ones((256, 64), np.float32)}  # one rotation block exactly
    sizes = {e: len(encode_update(big, _meta(encoding=e))) for e in ("float32", "float16")}
    sizes["hadamard"] = len(encode_update(big, _meta(encoding="hadamard", update_bits=8, rotation_seed=1)))
    assert sizes["float16"] < 0.6 * sizes["float32"] and sizes["hadamard"] < 0.35 * sizes["float32"]


def _with_header(body: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + n :]


@pytest.mark.parametrize(
    "make_body, code",
    [
        (lambda: b"short", "malformed_update"),
        (lambda: struct.pack("<Q", 10**9) + b"{}", "malformed_update"),
        (lambda: struct.pack("<Q", 4) + b"nope", "malformed_update"),
        (lambda: encode_update({"a": _deltas()["a"]}, _meta()), "weight_mismatch"),
        (lambda: encode_update({**_deltas(), "c": np.zeros(1, np.float32)}, _meta()), "weight_mismatch"),
        (lambda: encode_update({"a": np.zeros((3, 2), np.float32), "b": _deltas()["b"]}, _meta()), "weight_mismatch"),
        (lambda: encode_update({**_deltas(), "b": np.array([1, np.nan, 0, 0], np.float32)}, _meta()), "non_finite"),
        (lambda: encode_update(_deltas(), _meta(num_examples=0)), "bad_num_examples"),
        (lambda: encode_update(_deltas(), _meta(num_examples=10**6)), "bad_num_examples"),
        (lambda: _with_header(encode_update(_deltas(), _meta()), lambda h: h["__metadata__"].pop("device_id")), "malformed_update"),
        (lambda: _with_header(encode_update(_deltas(), _meta()), lambda h: h["__metadata__"].update(encoding="bf16")), "bad_encoding"),
        (lambda: _with_header(encode_update(_deltas(), _meta()), lambda h: h["__metadata__"].update(round_id="x")), "malformed_update"),
        (lambda: _with_header(encode_update(_deltas(), _meta()), lambda h: h["__metadata__"].update(encoding="float16")), "weight_mismatch"),
        (lambda: encode_update(_deltas(), _meta())[:-8], "malformed_update"),
        (lambda: _with_header(encode_update(_deltas(), _meta()), lambda h: h["__metadata__"].update(encoding="int8")), "bad_encoding"),
    ],
)
def test_bad_bodies_are_rejected_with_a_stable_code(make_body, code):
    with pytest.raises(UpdateRejected) as err:
        decode_update(make_body(), SPECS, max_examples=1000)
    assert err.value.code == code and err.value.message


def test_metadata_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _meta().num_examples = 5
