"""The aggregation server over real HTTP on loopback, with real SQLite files in tmp_path."""

from __future__ import annotations

import hashlib
import json
import struct
import time

import numpy as np
import pytest
import requests
from safetensors.numpy import load_file

from aggregator.fedavg import ClippedSum, WeightedSum
from tests.fixtures_aggregator import (ADMIN, TINY_SHAPES, Device, make_server, random_deltas,  # noqa: F401
                                       status, wait_for, weights_model)


@pytest.fixture
def server(make_server, weights_model):
    return make_server(weights_model, goal_clients=3, min_clients=2)


def _enrolled(url, count):
    devices = [Device(url) for _ in range(count)]
    for d in devices:
        assert d.enroll().status_code == 201
    return devices


def _snapshot(srv) -> dict:
    """Everything an upload could change besides the rejection counters."""
    root = srv.state.config.state_dir
    s = status(srv.url)
    return {
        "round": {k: s["round"][k] for k in ("id", "state", "accepted", "assigned")},
        "versions": [v["version"] for v in s["versions"]],
        "inbox": sorted(str(p.relative_to(root)) for p in (root / "inbox").rglob("*") if p.is_file()),
        "sums": sorted(p.name for p in (root / "sums").glob("*")) if (root / "sums").exists() else [],
        "totals_accepted": s["totals"]["accepted"],
    }


# Enrollment and check-in.

@pytest.mark.parametrize("body, status_code, code", [
    ({"enrollment_secret": "wrong"}, 403, "bad_enrollment_secret"),
    ({"platform": "x"}, 400, "bad_request"),
    ({"enrollment_secret": 5}, 400, "bad_request"),
])
def test_enrollment_refusals(server, body, status_code, code):
    r = requests.post(f"{server.url}/v1/devices", json=body)
    assert (r.status_code, r.json()["error"]) == (status_code, code)
    assert status(server.url)["totals"]["devices"] == 0


def test_enrollment_gives_working_token_stored_hashed(server):
    (device,) = _enrolled(server.url, 1)
    assert device.checkin().status_code == 200
    import sqlite3

    conn = sqlite3.connect(server.state.config.state_dir / "fedkb.sqlite")
    (stored,) = conn.execute("SELECT token_hash FROM devices").fetchone()
    assert stored == hashlib.sha256(device.token.encode()).hexdigest() and device.token not in stored


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer dffff.forged"}])
def test_checkin_needs_a_valid_token(server, headers):
    r = requests.post(f"{server.url}/v1/checkin", json={"state": {}}, headers=headers)
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")


def test_checkin_assigns_until_over_selection_then_waits(server):
    devices = _enrolled(server.url, 6)  # goal 3 × 1.3 → 4 tasks
    answers = [d.checkin().json() for d in devices]
    assert [a["action"] for a in answers] == ["train"] * 4 + ["wait"] * 2
    task = answers[0]["task"]
    assert task["model_version"] == 1 and task["clip_norm"] == 1.0 and task["batch_size"] == 2
    assert task["deadline"] > time.time()
    for a in answers[4:]:
        assert a["reason"] == "round_full" and 5.0 * 0.75 <= a["retry_after"] <= 5.0 * 1.25
    assert devices[0].checkin().json()["task"] == task  # asking again returns the same task
    assert status(server.url)["round"]["assigned"] == 4
    bad = devices[5].http.post(f"{server.url}/v1/checkin", json={"state": {"idle": "yes"}}, headers=devices[5].headers)
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_request")


# Uploads.

def test_upload_accepted_and_identical_retry_counted_once(server):
    (device,) = _enrolled(server.url, 1)
    task = device.task()
    body = device.body(task, random_deltas(TINY_SHAPES, 0))
    first = device.upload(task.round_id, body)
    assert first.status_code == 200 and first.json()["status"] == "accepted" and not first.json()["duplicate"]
    again = device.upload(task.round_id, body)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["update_id"] == first.json()["update_id"]
    other = device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, 1)))
    assert (other.status_code, other.json()["error"]) == (409, "already_submitted")
    s = status(server.url)
    assert s["round"]["accepted_updates"] == 1 and s["totals"]["accepted"] == 1
    assert device.checkin().json()["reason"] == "already_submitted"


def _garbage_header(body: bytes) -> bytes:
    return struct.pack("<Q", 10) + b"not json!!" + body[18:]


def _bad_uploads():
    """(name, how to build the request from (device, task, good deltas)) → expected (status, code)."""
    shapes = dict(TINY_SHAPES)
    wrong_shape = {**{k: np.zeros(s, np.float32) for k, s in shapes.items()}, "embedding": np.zeros((3, 3), np.float32)}
    missing = {k: np.zeros(s, np.float32) for k, s in list(shapes.items())[:-1]}
    return [
        ("wrong token", lambda d, t, g: (t.round_id, d.body(t, g), {"Authorization": "Bearer x.y"}), 401, "unauthorized"),
        ("unknown round", lambda d, t, g: (999, d.body(t, g), {}), 404, "unknown_round"),
        ("wrong shape", lambda d, t, g: (t.round_id, d.body(t, wrong_shape), {}), 400, "weight_mismatch"),
        ("missing tensor", lambda d, t, g: (t.round_id, d.body(t, missing), {}), 400, "weight_mismatch"),
        ("nan", lambda d, t, g: (t.round_id, d.body(t, {**g, "dense/bias": np.full(16, np.nan, np.float32)}), {}),
         400, "non_finite"),
        ("inf", lambda d, t, g: (t.round_id, d.body(t, {**g, "dense/bias": np.full(16, np.inf, np.float32)}), {}),
         400, "non_finite"),
        ("zero examples", lambda d, t, g: (t.round_id, d.body(t, g, num_examples=0), {}), 400, "bad_num_examples"),
        ("negative examples", lambda d, t, g: (t.round_id, d.body(t, g, num_examples=-5), {}), 400, "bad_num_examples"),
        ("too many examples", lambda d, t, g: (t.round_id, d.body(t, g, num_examples=t.max_examples + 1), {}),
         400, "bad_num_examples"),
        ("garbage body", lambda d, t, g: (t.round_id, b"\x00garbage" * 10, {}), 400, "malformed_update"),
        ("garbage header", lambda d, t, g: (t.round_id, _garbage_header(d.body(t, g)), {}), 400, "malformed_update"),
        ("truncated", lambda d, t, g: (t.round_id, d.body(t, g)[:-7], {}), 400, "malformed_update"),
        ("oversized", lambda d, t, g: (t.round_id, b"\x00" * (2 << 20), {}), 413, "payload_too_large"),
        ("stale version", lambda d, t, g: (t.round_id, d.body(t, g, model_version=t.model_version - 1), {}),
         409, "stale_model_version"),
        ("other round in metadata", lambda d, t, g: (t.round_id, d.body(t, g, round_id=t.round_id + 1), {}),
         400, "round_mismatch"),
        ("other device in metadata", lambda d, t, g: (t.round_id, d.body(t, g, device_id="dother"), {}),
         400, "device_mismatch"),
        ("unknown encoding", lambda d, t, g: (t.round_id, _with_meta(d.body(t, g), encoding="bf16"), {}),
         400, "bad_encoding"),
    ]


def _with_meta(body: bytes, **meta) -> bytes:
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + n])
    header["__metadata__"].update(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + n:]


@pytest.fixture
def stepped_server(make_server, weights_model):
    """A server whose worker runs a pass only when the test calls `worker.run_once()`."""
    srv = make_server(weights_model, goal_clients=3, min_clients=2, background_worker=False)
    assert srv.state.worker.run_once()  # opens the first round
    return srv


@pytest.mark.parametrize("name, build, status_code, code", _bad_uploads(), ids=[c[0] for c in _bad_uploads()])
def test_bad_uploads_are_refused_with_their_code_and_change_nothing(stepped_server, name, build, status_code, code):
    server, worker = stepped_server, stepped_server.state.worker
    good_device, device = _enrolled(server.url, 2)
    task = good_device.task()
    assert good_device.upload(task.round_id, good_device.body(task, random_deltas(TINY_SHAPES, 7))).status_code == 200
    task = device.task()
    assert worker.run_once() and status(server.url)["round"]["folded"] == 1  # the pass folded the good update
    before = _snapshot(server)

    round_id, body, headers = build(device, task, random_deltas(TINY_SHAPES, 3))
    r = device.upload(round_id, body, headers)

    assert r.status_code == status_code, r.text
    assert r.json()["error"] == code and r.json()["message"]
    assert worker.run_once() is False  # the next pass finds nothing to fold, close or open
    assert _snapshot(server) == before
    s = status(server.url)
    rejected = s["round"]["rejected"] if round_id == task.round_id and code != "unauthorized" else s["rejected_total"]
    assert rejected.get(code) == 1
    # The refused device can still send a good update afterwards.
    if code not in ("unauthorized",):
        ok = device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, 3)))
        assert ok.status_code == 200, ok.text


def test_upload_without_task_is_refused(server):
    holder, stranger = _enrolled(server.url, 2)
    task = holder.task()
    r = stranger.upload(task.round_id, stranger.body(task, random_deltas(TINY_SHAPES, 0)))
    assert (r.status_code, r.json()["error"]) == (403, "no_task")
    assert status(server.url)["round"]["accepted"] == 0


def test_missing_content_length_is_refused(server):
    (device,) = _enrolled(server.url, 1)
    task = device.task()
    body = device.body(task, random_deltas(TINY_SHAPES, 0))
    r = device.http.post(f"{server.url}/v1/rounds/{task.round_id}/updates", data=iter([body]), headers=device.headers)
    assert r.status_code == 411 and r.json()["error"] == "length_required"


@pytest.mark.parametrize("method, path, status_code, code", [
    ("get", "/v1/nowhere", 404, "not_found"),
    ("get", "/v1/checkin", 405, "method_not_allowed"),
    ("get", "/v1/models/99/manifest.json", 404, "unknown_version"),
    ("get", "/v1/models/1/weights.safetensors", 404, "unknown_file"),
    ("get", "/v1/models/1/..%2Ffedkb.sqlite", 404, "not_found"),
    ("post", "/v1/admin/rounds/current/end", 401, "unauthorized"),
])
def test_http_errors_are_json(server, method, path, status_code, code):
    r = getattr(requests, method)(server.url + path)
    assert r.status_code == status_code and r.headers["Content-Type"] == "application/json"
    assert r.json()["error"] == code, r.text


# Rounds end to end.

def test_round_close_publishes_next_version_with_right_bytes(server, weights_model):
    devices = _enrolled(server.url, 4)
    tasks = [d.task() for d in devices[:3]]
    updates = [(random_deltas(TINY_SHAPES, i, scale=0.3), 10 * (i + 1)) for i in range(3)]
    for d, t, (deltas, n) in zip(devices[:3], tasks, updates, strict=True):
        assert d.upload(t.round_id, d.body(t, deltas, num_examples=n)).status_code == 200

    # Version 2 is published before the next round opens: wait for both.
    s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and (s["round"] or {}).get("id") == 2 and s,
                 what="version 2 published and round 2 open")
    (first,) = [r for r in s["rounds"] if r["id"] == tasks[0].round_id]
    assert first["state"] == "closed" and first["published_version"] == 2
    assert s["round"]["model_version"] == 2 and s["round"]["state"] == "open"
    assert devices[3].task().model_version == 2  # the next check-in sees the new version

    # The published weights are w + the example-weighted mean of the clipped updates.
    reference = ClippedSum(WeightedSum(TINY_SHAPES), 1.0)
    for deltas, n in updates:
        reference.add(deltas, n)
    w1 = load_file(weights_model / "weights.safetensors")
    w2 = load_file(server.state.config.state_dir / "models" / "2" / "weights.safetensors")
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + reference.mean()[k], rtol=1e-6, atol=1e-6)

    # The manifest and files are downloadable, with sha256 and ETag right.
    latest = requests.get(f"{server.url}/v1/models/latest")
    manifest = latest.json()
    assert manifest["version"] == 2 and manifest["parent_version"] == 1
    assert latest.headers["X-Model-Version"] == "2"
    for name, entry in manifest["files"].items():
        r = requests.get(f"{server.url}/v1/models/2/{name}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == entry["sha256"]
        assert r.headers["ETag"] == f'"{entry["sha256"]}"'
        cached = requests.get(f"{server.url}/v1/models/2/{name}", headers={"If-None-Match": r.headers["ETag"]})
        assert cached.status_code == 304
    # Uploads for the finished round are refused.
    late = devices[0].upload(tasks[0].round_id, devices[0].body(tasks[0], updates[0][0]))
    assert late.status_code == 200 and late.json()["duplicate"], late.text  # its own retry is still acknowledged
    t4 = tasks[0]
    r = devices[3].upload(t4.round_id, devices[3].body(t4, updates[0][0]))  # its task is for round 2
    assert (r.status_code, r.json()["error"]) == (403, "no_task"), r.text


def test_round_below_minimum_is_abandoned_at_deadline(make_server, weights_model):
    srv = make_server(weights_model, goal_clients=3, min_clients=2, round_timeout=3.0)  # room for a loaded machine
    (device,) = _enrolled(srv.url, 1)
    task = device.task()
    assert device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, 0))).status_code == 200
    s = wait_for(lambda: (s := status(srv.url))["last_round"] and (s["round"] or {}).get("state") == "open" and s,
                 timeout=20, what="the round to end and the next to open")
    (first,) = [r for r in s["rounds"] if r["id"] == task.round_id]
    assert first["state"] == "abandoned" and "minimum" in first["outcome"] and s["model_version"] == 1
    assert s["round"]["id"] > task.round_id and s["round"]["model_version"] == 1  # the next round is open
    assert s["last_round"]["state"] == "abandoned"
    late = device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, 1)))
    assert (late.status_code, late.json()["error"]) == (409, "already_submitted")
    assert not (srv.state.config.state_dir / "inbox" / str(task.round_id)).exists()
    metrics = requests.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert 'fedkb_rounds_total{outcome="abandoned"} 1.0' in metrics


def test_round_at_deadline_with_minimum_closes(make_server, weights_model):
    srv = make_server(weights_model, goal_clients=5, min_clients=2, round_timeout=30.0)
    devices = _enrolled(srv.url, 2)
    for i, d in enumerate(devices):
        t = d.task()
        assert d.upload(t.round_id, d.body(t, random_deltas(TINY_SHAPES, i))).status_code == 200
    r = requests.post(f"{srv.url}/v1/admin/rounds/current/end", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    s = wait_for(lambda: (s := status(srv.url))["model_version"] == 2 and s, what="version 2")
    assert s["last_round"]["state"] == "closed" and "deadline" in s["last_round"]["outcome"]


def test_operator_views(server):
    devices = _enrolled(server.url, 1)
    t = devices[0].task()
    devices[0].upload(t.round_id, devices[0].body(t, random_deltas(TINY_SHAPES, 0)))
    metrics = requests.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    for line in ("fedkb_updates_accepted_total 1.0", "fedkb_model_version 1.0", "fedkb_round_accepted_updates 1.0",
                 "fedkb_publish_seconds_bucket", 'fedkb_request_seconds_count{endpoint="upload"} 1.0'):
        assert line in metrics.text
    page, script = requests.get(f"{server.url}/"), requests.get(f"{server.url}/static/dashboard.js")
    assert page.status_code == 200 and "<svg" in page.text and "http" not in page.text  # nothing from elsewhere
    assert script.status_code == 200 and "/v1/status" in script.text and "http" not in \
        script.text.replace("http://www.w3.org", "")
    ev = requests.post(f"{server.url}/v1/admin/evaluations", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"model_version": 1, "eval": {"token_perplexity": 120.5, "top1": 0.12}})
    assert ev.status_code == 200
    assert status(server.url)["versions"][-1]["eval"] == {"token_perplexity": 120.5, "top1": 0.12}
    assert "secret" not in json.dumps(status(server.url)["config"])
