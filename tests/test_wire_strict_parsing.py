"""Strict parsing of what a device sends: one spelling per number, one entry per tensor name.

Python's `int()` and `float()` accept spellings a device never writes (" 7 ", "1_0", "+5",
Arabic-Indic "١٢", "nan"), and `json.loads` keeps the last of two equal keys; a second parser of
the same bytes (safetensors, another language's JSON) could read something else. These are the
pure functions both sides share (`fedkb_core.wire`, `fedkb_core.protocol`).
"""

import json
import struct

import numpy as np
import pytest

from fedkb_core.protocol import INT64_MAX, CheckinRequest, EvaluationRequest, ProtocolError, json_float
from fedkb_core.wire import (UpdateMetadata, UpdateRejected, WeightSpec, decode_update, encode_update, parse_decimal,
                             parse_float, read_header)

SPECS = [WeightSpec("a", (2, 3)), WeightSpec("b", (4,))]


def _body(**meta) -> bytes:
    rng = np.random.default_rng(0)
    deltas = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    fields = dict(round_id=3, model_version=2, device_id="dev-1", num_examples=40, clip_norm=1.0, update_norm=0.5,
                  encoding="float32")
    fields.update(meta)
    return encode_update(deltas, UpdateMetadata(**fields))


def _rewrite_header(body: bytes, edit_text) -> bytes:
    """The body with its header JSON text edited as a string (to write what json.dumps cannot)."""
    (n,) = struct.unpack("<Q", body[:8])
    text = body[8: 8 + n].decode().rstrip()
    edited = edit_text(text)
    assert edited != text, "the edit did not apply"
    raw = edited.encode()
    return struct.pack("<Q", len(raw)) + raw + body[8 + n:]


@pytest.mark.parametrize("text, value", [("0", 0), ("7", 7), ("10", 10), ("9223372036854775807", INT64_MAX)])
def test_parse_decimal_takes_the_canonical_form(text, value):
    assert parse_decimal(text) == value


@pytest.mark.parametrize("text", [" 7 ", "7 ", "1_0", "١٢", "+5", "-5", "007", "", "0x10", "1e3", "7.0",
                                  "9223372036854775808", "1" * 5000, 7, None])
def test_parse_decimal_refuses_every_other_spelling(text):
    with pytest.raises(ValueError):
        parse_decimal(text)


@pytest.mark.parametrize("value", [0.0, 0.5, -1.25, 1e-05, 3.4e+38, 123456.789, 1.0])
def test_parse_float_reads_what_repr_writes(value):
    assert parse_float(repr(value)) == value == parse_float(str(value))


@pytest.mark.parametrize("text", [" 1.0", "1_0.0", "+1.0", "١.٥", "nan", "inf", "-inf", "1e999", ".5", "5.", "",
                                  "0x1p3", 1.0])
def test_parse_float_refuses_every_other_spelling(text):
    with pytest.raises(ValueError):
        parse_float(text)


@pytest.mark.parametrize("spelling", [" 7 ", "1_0", "١٢", "+5", "07"])
def test_decode_update_refuses_loose_num_examples(spelling):
    with pytest.raises(UpdateRejected) as err:
        decode_update(_body(num_examples=spelling), SPECS, max_examples=1000)
    assert err.value.code == "bad_num_examples"


@pytest.mark.parametrize("field, spelling", [("round_id", " 3"), ("model_version", "+2"), ("clip_norm", "1_0.0"),
                                             ("update_norm", "nan")])
def test_decode_update_refuses_loose_numbers_in_other_fields(field, spelling):
    with pytest.raises(UpdateRejected) as err:
        decode_update(_body(**{field: spelling}), SPECS)
    assert err.value.code == "malformed_update"


def test_a_tensor_named_twice_is_refused_although_json_would_keep_the_last():
    body = _body()
    entry = json.dumps(read_header(body)[0]["b"])
    twice = _rewrite_header(body, lambda text: text[:-1] + f', "b": {entry}}}')
    assert json.loads(twice[8: 8 + struct.unpack("<Q", twice[:8])[0]])["b"] == json.loads(entry)  # last wins in json
    with pytest.raises(UpdateRejected) as err:
        decode_update(twice, SPECS)
    assert err.value.code == "malformed_update" and "'b' twice" in err.value.message


def test_a_metadata_key_named_twice_is_refused():
    twice = _rewrite_header(_body(), lambda text: text.replace('"__metadata__":{', '"__metadata__":{"num_examples":"1",', 1))
    with pytest.raises(UpdateRejected, match="twice"):
        decode_update(twice, SPECS)


@pytest.mark.parametrize("shape", ["768000", "null", '"2,3"', "[2, 3.0]", "[2, -3]", "[true, 3]", "{}"])
def test_a_shape_that_is_not_a_list_of_sizes_is_malformed_not_a_crash(shape):
    bad = _rewrite_header(_body(), lambda text: text.replace('"shape":[2,3]', f'"shape":{shape}', 1))
    with pytest.raises(UpdateRejected) as err:
        decode_update(bad, SPECS)
    assert err.value.code == "malformed_update"


@pytest.mark.parametrize("edit", [lambda t: t.replace('"dtype":"F32"', '"dtype":7', 1),
                                  lambda t: t.replace('"data_offsets":[0,24]', '"data_offsets":[0]', 1),
                                  lambda t: t.replace('"encoding":"float32"', '"encoding":5', 1),
                                  lambda t: t[:-1] + ', "c": NaN}'])
def test_other_ill_typed_header_entries_are_malformed(edit):
    bad = _rewrite_header(_body(), edit)
    with pytest.raises(UpdateRejected) as err:
        read_header(bad)
    assert err.value.code == "malformed_update"


def test_json_float_has_no_overflow():
    assert json_float(10 ** 400) is None and json_float(float("inf")) is None and json_float(True) is None
    assert json_float(3) == 3.0 and json_float(-0.5) == -0.5


def test_a_battery_of_400_digits_is_a_protocol_error():
    state = {"idle": True, "charging": True, "unmetered": True, "battery": 10 ** 400}
    with pytest.raises(ProtocolError, match="battery"):
        CheckinRequest.from_json({"state": state})


def test_integers_beyond_int64_are_protocol_errors():
    state = {"idle": True, "charging": True, "unmetered": True, "battery": 50}
    with pytest.raises(ProtocolError, match="model_version"):
        CheckinRequest.from_json({"model_version": 10 ** 30, "state": state})


@pytest.mark.parametrize("body", [{"model_version": 10 ** 30, "eval": {"loss": 1.0}},
                                  {"model_version": 1, "eval": {"loss": 10 ** 400}},
                                  {"model_version": 1, "eval": {"loss": "1.0"}},
                                  {"model_version": 1, "eval": {"x" * 101: 1.0}},
                                  {"model_version": 1, "eval": []}])
def test_evaluation_requests_are_bounded(body):
    with pytest.raises(ProtocolError):
        EvaluationRequest.from_json(body)


def test_an_evaluation_keeps_its_numbers():
    assert EvaluationRequest.from_json({"model_version": 2, "eval": {"loss": 2.5, "n": 1000}}).eval == {"loss": 2.5,
                                                                                                         "n": 1000}
