"""Attack: a hostile server's replies must never crash, stall or misuse a real `fedkb device`.

Each test runs the real CLI against `HostileServer` on loopback. The device must refuse every
task outside its own bounds before any work, never upload a non-finite update, clamp the
retry-after it is given, and keep cycling whatever the server sends: one log line per problem,
no traceback, exit status 0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load

from fedkb_core.signing import ManifestSigner
from tests.fixtures_edge import edge_model, text_file, user_lines  # noqa: F401
from tests.fixtures_hostile import HostileServer, Reply, Step, run_device, task, wait

ALL_MET = "charging=1,idle=1,unmetered=1,battery=90"


@pytest.fixture
def signer():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return ManifestSigner(Ed25519PrivateKey.generate())


@pytest.fixture
def hostile(edge_model, signer):
    servers = []

    def _start(script) -> HostileServer:
        servers.append(HostileServer({1: edge_model}, signer, script))
        return servers[-1]

    yield _start
    for s in servers:
        s.stop()


def _limits(tmp_path, **values) -> str:
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_hostile_checkin_replies_are_refused_and_the_loop_goes_on(hostile, text_file, tmp_path):
    script = [
        Step(1, Reply(200, b"{not json")),  # not JSON
        Step(1, Reply(200, b"[" * 50_000)),  # nested past Python's recursion limit
        Step(1, Reply(200, json.dumps(task(learning_rate=math.nan)).encode())),  # NaN: not a finite number
        Step(1, task(clip_norm=-1.0)),
        Step(1, task(clip_norm=0.0)),
        Step(1, task(encoding="bfloat7")),  # unknown: refused before training, not after
        Step(1, task(max_examples=0)),
        Step(1, task(epochs=10 ** 6)),  # exhausted a 3 GB memory cap in 19 s before
        Step(1, task(learning_rate=1e30)),  # trained and uploaded an all-NaN update before
        Step(1, task(epochs=40)),  # within max_epochs, but more steps than max_steps on this text
        Step(1, task(round_id=10 ** 30)),  # past SQLite's integers: the protocol refuses it as it parses
        Step(1, task(batch_size=5)),  # not the model's static batch size
        Step(1, wait(retry_after=1e300)),  # crashed the wait before
        Step(1, wait(retry_after=-5.0)),  # gave 200 check-ins in 2.9 s before
        Step(1, task()),  # a good task at last: trained and uploaded
    ]
    server = hostile(script)
    limits = _limits(tmp_path, min_retry_after=0.3, max_retry_after=0.5, max_steps=60)
    run = run_device(server.url, tmp_path / "phone", "--state", ALL_MET, "--text", str(text_file), "--poll", "0.01",
                     "--cycles", str(len(script)), "--limits", limits, "--format", "json")
    cycles = run.reports
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    got = [(c["action"], c.get("reasons", [None])[0]) for c in cycles]
    assert got[-1] == ("accepted", None), cycles[-1].get("message")
    refused = ("refused", "task_out_of_bounds")
    assert got == [("error", "bad_reply"), ("error", "bad_reply"), ("error", "bad_reply"), refused, refused, refused,
                   refused, refused, refused, refused, ("error", "bad_reply"), refused, ("wait", "no_open_round"),
                   ("wait", "no_open_round"), ("accepted", None)], got
    messages = [c.get("message", "") for c in cycles]
    for i, words in [(3, "clip_norm -1.0"), (4, "clip_norm 0.0"), (5, "encoding 'bfloat7'"), (6, "max_examples 0"),
                     (7, "epochs 1000000"), (8, "learning_rate 1e+30"), (9, "steps, more than the 60"),
                     (10, "round_id"), (11, "batch size 5")]:
        assert words in messages[i], (i, messages[i])
    assert [c["retry_after"] for c in cycles[12:14]] == [0.5, 0.3]  # clamped to [min, max]
    assert run.seconds < 60, run.seconds  # epochs 10^6 was refused, not run

    # Exactly one update went out, the good task's, and it is finite.
    (body,) = server.uploads
    assert all(np.isfinite(t).all() for t in load(body).values())
    assert len(server.requested("POST /v1/checkin")) == len(script)  # one check-in per cycle, no more
    # Every refusal is one warning line, not a traceback.
    assert sum("WARNING" in line and "task refused" in line for line in run.stderr.splitlines()) == 8


def test_a_non_finite_update_is_never_uploaded(hostile, text_file, tmp_path):
    """With the bound on the learning rate opened up, 1e30 trains to NaN: the device keeps it."""
    server = hostile([Step(1, task(learning_rate=1e30))])
    limits = _limits(tmp_path, max_learning_rate=1e31)
    run = run_device(server.url, tmp_path / "phone", "--state", ALL_MET, "--text", str(text_file), "--once",
                     "--limits", limits, "--format", "json")
    (report,) = run.reports
    assert (report["action"], report["reasons"]) == ("not_finite", ["non_finite_update"]), report
    assert report["steps"] > 0  # it did train
    assert server.uploads == [] and server.requested("POST /v1/rounds") == []
    assert not any((tmp_path / "phone" / "outbox").glob("*.safetensors"))


@pytest.mark.parametrize("enrollment, words", [
    (Reply(200, b"<html>gateway</html>"), "not JSON"),
    (Reply(200, b'{"device_id": "d1"}'), "no valid device_id and token"),
    ({"device_id": "d1", "token": "t\r\nX-Injected: 1"}, "no valid device_id and token"),
    (Reply(200, b"[" * 50_000), "not JSON"),
])
def test_a_hostile_enrollment_answer_is_one_clear_error(hostile, tmp_path, enrollment, words):
    server = hostile([Step(1, wait())])
    server.enrollment = enrollment
    run = run_device(server.url, tmp_path / "phone", "--state", ALL_MET, "--once")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stderr.startswith("fedkb device: error: "), run.stderr[-3000:]
    assert words in run.stderr
    assert not (tmp_path / "phone" / "credentials.json").exists()
