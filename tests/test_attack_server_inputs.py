"""Attack: authenticated input that once gave 500, and loosely parsed numbers (issue 13, items 2, 3).

Against a real `fedkb serve` over HTTP, a device that holds a task sends: a tensor shape that is an
int or null, a tensor named twice, `num_examples` spelled " 7 ", "1_0", "١٢" or "+5"; it posts to a
round id no SQLite integer can be and checks in with a 400-digit battery; the operator posts an
evaluation of 10^400 and one for version 10^30. Each gets a 4xx JSON answer with a stable code, each
upload is counted as a rejection under its code, and the device's honest update is accepted after.
"""

from __future__ import annotations

import json
import struct

import pytest
import requests

from tests.fixtures_aggregator import ADMIN, TINY_SHAPES, Device, ServeProcess, make_weights_model, random_deltas, status


def _edit_header(body: bytes, edit) -> bytes:
    """The body with its safetensors header JSON *text* edited (to write what json.dumps cannot)."""
    (n,) = struct.unpack("<Q", body[:8])
    text = body[8: 8 + n].decode().rstrip()
    edited = edit(text)
    assert edited != text, "the edit did not apply"
    return struct.pack("<Q", len(edited.encode())) + edited.encode() + body[8 + n:]


def _shape(value: str):
    return lambda text: text.replace('"shape":[16]', f'"shape":{value}', 1)


def _tensor_twice(text: str) -> str:
    header = json.loads(text)
    return text[:-1] + f', "dense/bias": {json.dumps(header["dense/bias"])}}}'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    process = ServeProcess(tmp / "state", make_weights_model(tmp / "model"), "--goal-clients", "3",
                           log=tmp / "serve.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def holder(server):
    device = Device(server.url)
    assert device.enroll().status_code == 201
    return device, device.task()


UPLOADS = [  # (name, body from (device, task), expected code)
    ("shape is an int", lambda d, t: _edit_header(d.body(t, random_deltas(TINY_SHAPES, 1)), _shape("768000")),
     "malformed_update"),
    ("shape is null", lambda d, t: _edit_header(d.body(t, random_deltas(TINY_SHAPES, 1)), _shape("null")),
     "malformed_update"),
    ("tensor named twice", lambda d, t: _edit_header(d.body(t, random_deltas(TINY_SHAPES, 1)), _tensor_twice),
     "malformed_update"),
    *[(f"num_examples {s!r}", lambda d, t, s=s: d.body(t, random_deltas(TINY_SHAPES, 1), num_examples=s),
       "bad_num_examples") for s in (" 7 ", "1_0", "١٢", "+5")],
]


def test_hostile_authenticated_input_gets_4xx_json_and_is_counted(server, holder):
    device, task = holder
    answers = {}
    for name, make_body, code in UPLOADS:
        r = device.upload(task.round_id, make_body(device, task))
        answers[name] = (r.status_code, r.json()["error"])
        assert answers[name] == (400, code), (name, r.text)

    r = device.upload(99999999999999999999, device.body(task, random_deltas(TINY_SHAPES, 2)))
    assert (r.status_code, r.json()["error"]) == (404, "unknown_round"), r.text

    state = {"idle": True, "charging": True, "unmetered": True, "battery": 10 ** 400}
    r = requests.post(f"{server.url}/v1/checkin", json={"model_version": None, "state": state}, headers=device.headers)
    assert (r.status_code, r.json()["error"]) == (400, "bad_request") and "battery" in r.json()["message"], r.text
    r = requests.post(f"{server.url}/v1/checkin", json={"model_version": 10 ** 30, "state": state | {"battery": 5}},
                      headers=device.headers)
    assert (r.status_code, r.json()["error"]) == (400, "bad_request"), r.text

    admin = {"Authorization": f"Bearer {ADMIN}"}
    for body in ({"model_version": 1, "eval": {"loss": 10 ** 400}}, {"model_version": 10 ** 30, "eval": {"loss": 1}}):
        r = requests.post(f"{server.url}/v1/admin/evaluations", json=body, headers=admin)
        assert (r.status_code, r.json()["error"]) == (400, "bad_request"), r.text

    s = status(server.url)
    assert s["round"]["rejected"] == {"malformed_update": 3, "bad_num_examples": 4}
    assert s["rejected_total"] == {"malformed_update": 3, "bad_num_examples": 4, "unknown_round": 1}
    assert s["round"]["accepted"] == 0 and s["versions"][0]["eval"] is None  # nothing of it was kept

    # The same device's honest update goes through after all of that.
    r = device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, 3), num_examples=7))
    assert r.status_code == 200 and not r.json()["duplicate"], r.text
    assert status(server.url)["round"]["accepted"] == 1
