"""The SecAgg messages both sides share over HTTP: the task's `secagg` object, `SecAggStatus`, and
the masked upload's wire format (fedkb_core/secagg/masked_wire.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from fedkb_core import bitpack
from fedkb_core.protocol import ProtocolError, RoundTask, SecAggTask, to_json
from fedkb_core.secagg.masked_wire import MASKED, MASKED_TAIL, decode_masked, encode_masked
from fedkb_core.secagg.messages import SecAggStatus, ShareInbox
from fedkb_core.update_encoding import SECAGG, UpdateEncoding
from fedkb_core.wire import UpdateRejected

TASK = dict(round_id=3, model_version=2, learning_rate=1.0, epochs=1, batch_size=8, max_examples=64, clip_norm=1.0,
            deadline=1e9, encoding=SECAGG, update_bits=12, rotation_seed=5)


def test_a_secagg_task_round_trips_and_older_tasks_have_none():
    task = RoundTask(**TASK, secagg=SecAggTask(modulus_bits=17, unit_weights=True))
    body = json.loads(json.dumps(to_json(task)))
    assert RoundTask.from_json(body) == task
    assert RoundTask.from_json({k: v for k, v in body.items() if k != "secagg"}).secagg is None
    for bad in ({"modulus_bits": 33}, {"modulus_bits": 0}, {"modulus_bits": "17"}, {"unit_weights": True},
                {"modulus_bits": 17, "count_unclipped": 1}):
        with pytest.raises(ProtocolError, match="task.secagg"):
            RoundTask.from_json({**body, "secagg": bad})


def test_secagg_bits_are_checked_as_the_encoding_s_own():
    assert UpdateEncoding(SECAGG, 12, 5).problems() == []
    assert "2..24" in UpdateEncoding(SECAGG, 1, 5).problems()[0]
    assert "2..24" in UpdateEncoding(SECAGG, 25, 5).problems()[0]
    assert "rotation seed" in UpdateEncoding(SECAGG, 12, None).problems()[0]


def test_a_status_carries_exactly_the_payload_its_action_needs():
    inbox = ShareInbox(round_id=3, boxes={"dev-a": b"\x01" * 80})
    status = SecAggStatus(round_id=3, stage="input", action="upload", inbox=inbox)
    assert SecAggStatus.from_json(json.loads(json.dumps(status.to_json()))) == status
    waiting = SecAggStatus(round_id=3, stage="sharing", action="wait", retry_after=2.0)
    assert SecAggStatus.from_json(waiting.to_json()) == waiting
    for bad, message in [
        (dict(stage="input", action="upload"), "'inbox' comes with action 'upload'"),
        (dict(stage="input", action="wait", retry_after=1.0, inbox=inbox), "'inbox' comes with action 'upload'"),
        (dict(stage="input", action="wait"), "retry_after"),
        (dict(stage="done", action="wait", retry_after=1.0), "stage must be one of"),
        (dict(stage="input", action="explode"), "action must be one of"),
        (dict(stage="input", action="upload", inbox=ShareInbox(round_id=4, boxes={})), "for round 4"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            SecAggStatus(round_id=3, **bad)


def _values(n=1003, bits=32, seed=0):
    return np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.uint64).astype(np.uint32)


TAIL = 2


def test_a_masked_upload_round_trips_its_bodys_low_r_bits_and_its_tail_whole():
    """The device masks modulo 2^32; the body travels as its values' low r bits (the same values
    modulo 2^r, which is all the sum needs), the tail as whole 32-bit words."""
    values = _values()
    body = encode_masked(values, 17, tail_length=TAIL, round_id=3, device_id="dev-a", model_version=2)
    upload = decode_masked(body, modulus_bits=17, vector_length=values.size, tail_length=TAIL)
    assert upload.values.dtype == np.uint32 and upload.values.size == values.size
    np.testing.assert_array_equal(upload.values[:-TAIL], values[:-TAIL] & ((1 << 17) - 1))
    np.testing.assert_array_equal(upload.values[-TAIL:], values[-TAIL:])
    assert int(values[-TAIL:].max()) >= 1 << 17  # the tail kept bits the body would have lost
    assert (upload.round_id, upload.model_version, upload.device_id) == (3, 2, "dev-a")
    overhead = len(body) - bitpack.packed_size(values.size - TAIL, 17) - 4 * TAIL
    assert overhead < 450  # the header is all the overhead
    for tail in (-1, values.size, 1.0):
        with pytest.raises(ValueError, match="tail_length"):
            encode_masked(values, 17, tail_length=tail, round_id=3, device_id="dev-a", model_version=2)


def _body(values, bits, tail=TAIL, **meta):
    fields = {"round_id": "3", "model_version": "2", "device_id": "dev-a", "encoding": SECAGG,
              "modulus_bits": str(bits), "vector_length": str(values.size), "tail_length": str(tail)}
    fields.update(meta)
    fields = {k: v for k, v in fields.items() if v is not None}
    return st_save({MASKED: bitpack.pack(values[:-tail] & ((1 << bits) - 1), bits),
                    MASKED_TAIL: np.frombuffer(values[-tail:].astype("<u4").tobytes(), np.uint8).copy()},
                   metadata=fields)


@pytest.mark.parametrize("meta,code", [
    (dict(encoding="float32"), "encoding_mismatch"),
    (dict(modulus_bits="18"), "bits_mismatch"),
    (dict(vector_length="1002"), "length_mismatch"),
    (dict(tail_length="1"), "length_mismatch"),
    (dict(tail_length=None), "malformed_update"),
    (dict(round_id="03"), "malformed_update"),
    (dict(num_examples="64"), "malformed_update"),  # a masked upload says nothing about its device's data
    (dict(update_norm="0.5"), "malformed_update"),
    (dict(device_id=None), "malformed_update"),
])
def test_a_masked_upload_that_does_not_fit_the_round_is_refused_from_its_header(meta, code):
    values = _values()
    with pytest.raises(UpdateRejected) as err:
        decode_masked(_body(values, 17, **meta), modulus_bits=17, vector_length=values.size, tail_length=TAIL)
    assert err.value.code == code


def test_tensors_other_than_the_packed_body_and_the_tail_are_refused():
    values = _values()
    packed = bitpack.pack(values[:-TAIL] & ((1 << 17) - 1), 17)
    tail = np.frombuffer(values[-TAIL:].astype("<u4").tobytes(), np.uint8).copy()
    meta = {"round_id": "3", "model_version": "2", "device_id": "dev-a", "encoding": SECAGG, "modulus_bits": "17",
            "vector_length": str(values.size), "tail_length": str(TAIL)}
    for tensors in ({MASKED: packed[:-1], MASKED_TAIL: tail}, {MASKED: packed, MASKED_TAIL: tail[:-1]},
                    {MASKED: packed.view(np.uint8).astype(np.uint16), MASKED_TAIL: tail},
                    {MASKED: packed, MASKED_TAIL: tail, "extra": np.zeros(1, np.uint8)}, {MASKED: packed},
                    {"other": packed, MASKED_TAIL: tail}):
        with pytest.raises(UpdateRejected) as err:
            decode_masked(st_save(tensors, metadata=meta), modulus_bits=17, vector_length=values.size,
                          tail_length=TAIL)
        assert err.value.code == "weight_mismatch"
    spare = packed.copy()
    spare[-1] |= 0x80  # 1001 × 17 bits leave the last byte's top bits unused
    with pytest.raises(UpdateRejected) as err:
        decode_masked(st_save({MASKED: spare, MASKED_TAIL: tail}, metadata=meta), modulus_bits=17,
                      vector_length=values.size, tail_length=TAIL)
    assert err.value.code == "malformed_update"


def test_a_masked_upload_cut_short_is_malformed_not_an_internal_error():
    values = _values()
    body = encode_masked(values, 17, tail_length=TAIL, round_id=3, device_id="dev-a", model_version=2)
    with pytest.raises(UpdateRejected) as err:
        decode_masked(body[:-100], modulus_bits=17, vector_length=values.size, tail_length=TAIL)
    assert err.value.code == "malformed_update" and "unreadable" in err.value.message
