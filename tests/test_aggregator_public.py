"""What anyone can read from a running server, and how every answer looks, over real HTTP.

Unauthenticated readers get liveness, the current version and the open round's timing, never
paths, norms, device counts or exception text; the admin token shows the rest. Every answer, the
HTTP servers' own refusals (a 200 KB header, an endless request line) included, is JSON with the
security headers, on Werkzeug's thread server and on gunicorn (`fedkb serve --workers 2`).
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import requests

from aggregator.headers import SECURITY_HEADERS
from tests.fixtures_aggregator import (ADMIN, SECRET, TINY_SHAPES, Device, ServeProcess, make_server,  # noqa: F401
                                       random_deltas, server_overrides, status, wait_for, weights_model)

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def upload_updates(url: str, count: int) -> None:
    """`count` fresh devices each take a task of the open round and upload an accepted update."""
    for seed in range(count):
        device = Device(url)
        assert device.enroll().status_code == 201
        task = device.task()
        assert device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, seed))).status_code == 200
    wait_for(lambda: status(url)["round"]["folded"] >= count, what=f"{count} updates folded")


def break_the_worker(srv, seed: int = 99) -> str:
    """Make the folding worker fail for real (its checkpoint folder is a file) and return its error."""
    sums = srv.state.config.state_dir / "sums"
    shutil.rmtree(sums, ignore_errors=True)
    sums.write_text("not a folder")
    device = Device(srv.url)
    device.enroll()
    task = device.task()
    assert device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, seed))).status_code == 200
    return wait_for(lambda: status(srv.url)["worker"]["last_error"], what="the worker pass to fail")


def repair_the_worker(srv) -> None:
    """Undo `break_the_worker`: the next pass checkpoints again and the error clears."""
    (srv.state.config.state_dir / "sums").unlink()
    wait_for(lambda: status(srv.url)["worker"]["last_error"] is None, what="the worker to recover")


@pytest.fixture
def busy_server(make_server, weights_model):
    """A server whose open round holds two accepted updates."""
    srv = make_server(weights_model, goal_clients=4, min_clients=2)
    upload_updates(srv.url, 2)
    return srv


def _assert_secure_headers(response):
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.request.method, response.url, name)
    csp = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp and "script-src 'self'" in csp


def test_public_status_shows_no_paths_norms_counts_or_errors(busy_server):
    srv = busy_server
    error = break_the_worker(srv)
    detail = status(srv.url)
    norms = detail["update_norms"]["norms"]
    assert len(norms) == 3 and detail["totals"]["devices"] == 3 and detail["config"]["state_dir"] == str(
        srv.state.config.state_dir) and str(srv.state.config.state_dir) in error

    r = requests.get(f"{srv.url}/v1/status")
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    public = r.json()
    assert set(public) == {"time", "model_version", "round", "versions", "privacy", "secure_aggregation"}
    assert public["privacy"] is None  # DP off (tests/test_privacy_budget_http.py: with DP on)
    assert public["secure_aggregation"] is False  # tests/test_secagg_server.py: on
    assert set(public["round"]) == {"id", "state", "model_version", "opened_at", "deadline"}
    assert public["round"]["id"] == detail["round"]["id"] and public["model_version"] == 1
    assert [set(v) for v in public["versions"]] == [{"version", "parent_version", "round_id", "created_at"}]
    text = r.text
    assert status(srv.url)["worker"]["last_error"] == error  # still failing while the public view was read
    for leak in (str(srv.state.config.state_dir), str(srv.state.config.init_model), error, "Error",
                 *(json.dumps(n) for n in norms), "devices", "accepted", "assigned", "rejected", "clip_norm", "eval"):
        assert leak not in text, leak
    repair_the_worker(srv)


def test_operator_status_and_metrics_need_the_admin_token(busy_server):
    url = busy_server.url
    for path in ("/v1/admin/status", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {ADMIN}"}):
            r = requests.get(f"{url}{path}", headers=headers)
            assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), (path, headers)
            assert "fedkb_" not in r.text and "update_norms" not in r.text
    r = requests.get(f"{url}/metrics", headers=ADMIN_HEADERS)
    assert r.status_code == 200 and "fedkb_updates_accepted_total 2.0" in r.text and "fedkb_round_accepted_updates 2.0" in r.text
    r = requests.get(f"{url}/v1/admin/status", headers=ADMIN_HEADERS)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    assert r.json()["round"]["accepted"] == 2 and "enrollment_secret" not in r.text and SECRET not in r.text


def test_every_answer_carries_the_security_headers_and_errors_are_json(busy_server):
    url = busy_server.url
    device = Device(url)
    device.enroll()
    ok = [requests.get(f"{url}/"), requests.get(f"{url}/static/dashboard.js"), requests.get(f"{url}/static/dashboard.css"),
          requests.get(f"{url}/v1/status"), requests.get(f"{url}/v1/models/latest"),
          requests.get(f"{url}/v1/models/1/tokenizer.model")]
    assert [r.status_code for r in ok] == [200] * len(ok)
    assert ok[0].headers["Content-Type"].startswith("text/html") and ok[1].headers["Content-Type"].startswith(
        "text/javascript")
    refused = {
        404: requests.get(f"{url}/no/such/page"),
        405: requests.get(f"{url}/v1/admin/evaluations", headers=ADMIN_HEADERS),
        401: requests.get(f"{url}/metrics"),
        413: requests.post(f"{url}/v1/checkin", data=b"x" * (busy_server.app.config["MAX_CONTENT_LENGTH"] + 1),
                           headers={**device.headers, "Content-Type": "application/json"}),
    }
    for code, r in refused.items():
        assert r.status_code == code and r.headers["Content-Type"] == "application/json", (code, r.text[:200])
        assert set(r.json()) == {"error", "message"} and r.json()["error"]
    for r in ok + list(refused.values()):
        _assert_secure_headers(r)


def test_an_unexpected_failure_is_json_500_without_its_text(weights_model, tmp_path):
    """A route that raises (as a bug would) answers the stable 500 body, not the exception's text."""
    from werkzeug.serving import make_server as werkzeug_server

    from aggregator.app import create_app
    from aggregator.server_errors import JsonErrorRequestHandler

    app = create_app(server_overrides(tmp_path / "state", weights_model, background_worker=False))

    @app.get("/boom")
    def _boom():
        raise RuntimeError("secret detail from /var/lib/fedkb")

    server = werkzeug_server("127.0.0.1", 0, app, threaded=True, request_handler=JsonErrorRequestHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        r = requests.get(f"http://127.0.0.1:{server.server_port}/boom")
    finally:
        server.shutdown()
        server.server_close()
        app.extensions["fedkb"].commits.close()
    assert r.status_code == 500 and r.json() == {"error": "internal_error",
                                                  "message": "the server failed to handle this request"}
    assert "secret detail" not in r.text
    _assert_secure_headers(r)


def _assert_refused_in_json(url: str, server: str):
    big_header = requests.get(f"{url}/v1/status", headers={"X-Filler": "a" * 200_000})
    long_line = requests.get(f"{url}/v1/models/" + "x" * 70_000)
    for r, code, error in ((big_header, 431, "request_header_fields_too_large"), (long_line, 414, "uri_too_long")):
        assert r.status_code == code and r.headers["Content-Type"] == "application/json", (server, r.text[:300])
        body = r.json()
        assert body["error"] == error and body["message"] and "<" not in r.text, (server, body)
        _assert_secure_headers(r)
    assert requests.get(f"{url}/v1/status").status_code == 200  # and the server goes on answering


def test_werkzeug_answers_an_oversize_header_in_json(make_server, weights_model):
    _assert_refused_in_json(make_server(weights_model).url, "werkzeug")


def test_gunicorn_answers_an_oversize_header_in_json(weights_model, tmp_path):
    server = ServeProcess(tmp_path / "state", weights_model, "--workers", "2", "--threads", "2", log=tmp_path / "serve.log")
    try:
        _assert_refused_in_json(server.url, "gunicorn")
    finally:
        server.stop()
    assert "Invalid request from ip=127.0.0.1" in (tmp_path / "serve.log").read_text()  # gunicorn still logs it


def test_a_failing_worker_backs_off_instead_of_retrying_on_every_upload(busy_server, caplog):
    """A broken disk or database must not be retried (and logged with a traceback) once per
    request: uploads wake the worker, but after a failure it waits, doubling the wait each time."""
    import logging
    import math
    import time

    from aggregator.worker import MAX_RETRY_DELAY, retry_delay

    srv = busy_server
    caplog.set_level(logging.INFO, logger="aggregator.worker")
    break_the_worker(srv)
    start = time.monotonic()
    while time.monotonic() - start < 2.0:  # far more wake-ups than an upload storm would give
        srv.state.worker.wake()
        time.sleep(0.005)
    failed = [r for r in caplog.records if "worker pass failed" in r.getMessage()]
    # The k-th failure comes at least interval * (2^(k-1) - 1) s after the first (the waits before
    # it add up to that), so in T s there are at most 1 + log2(T / interval + 1) of them.
    interval, span = srv.state.config.worker_interval, time.time() - failed[0].created
    assert 1 <= len(failed) <= 1 + math.log2(span / interval + 1), [r.getMessage() for r in failed]
    assert sum(r.exc_info is not None for r in failed) == 1  # one traceback, then one line each
    repair_the_worker(srv)
    assert any("succeeded after" in r.getMessage() for r in caplog.records)
    assert [retry_delay(n, 0.2) for n in (1, 2, 3)] == [0.2, 0.4, 0.8] and retry_delay(50, 0.2) == MAX_RETRY_DELAY
