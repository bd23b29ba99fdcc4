"""JSON messages between device and server: round trips and precise errors."""

import pytest

from fedkb_core.protocol import (CheckinRequest, CheckinResponse, DeviceState, EnrollRequest, ProtocolError, RoundTask,
                            to_json)

TASK = RoundTask(round_id=4, model_version=3, learning_rate=0.5, epochs=1, batch_size=16, max_examples=800,
                 clip_norm=1.0, deadline=1_800_000_000.0)


def test_checkin_round_trip():
    request = CheckinRequest(model_version=3, state=DeviceState(idle=True, charging=True, unmetered=True, battery=80.0))
    assert CheckinRequest.from_json(to_json(request)) == request
    assert CheckinRequest.from_json({"state": to_json(request.state)}).model_version is None


@pytest.mark.parametrize("response", [CheckinResponse("train", task=TASK),
                                      CheckinResponse("wait", retry_after=12.5, reason="round_full")])
def test_checkin_response_round_trip(response):
    assert CheckinResponse.from_json(to_json(response)) == response


def test_integers_are_accepted_where_floats_are_expected():
    body = to_json(TASK) | {"learning_rate": 1, "deadline": 1_800_000_000}
    assert RoundTask.from_json(body).learning_rate == 1.0


@pytest.mark.parametrize(
    "parse, body, message",
    [
        (EnrollRequest.from_json, {}, "missing field 'enrollment_secret'"),
        (EnrollRequest.from_json, [], "expected a JSON object"),
        (CheckinRequest.from_json, {"state": {"idle": 1, "charging": True, "unmetered": True, "battery": 5}},
         "field 'idle' must be bool"),
        (CheckinRequest.from_json, {"state": {"idle": True, "charging": True, "unmetered": True, "battery": 101}},
         "battery must be within 0..100"),
        (CheckinRequest.from_json, {"model_version": "3", "state": {}}, "field 'model_version' must be int"),
        (RoundTask.from_json, to_json(TASK) | {"epochs": True}, "field 'epochs' must be int"),
        (RoundTask.from_json, to_json(TASK) | {"clip_norm": float("nan")}, "must be finite"),
        (CheckinResponse.from_json, {"action": "dance"}, "unknown action 'dance'"),
    ],
)
def test_bad_messages_name_the_field(parse, body, message):
    with pytest.raises(ProtocolError, match=message):
        parse(body)
