"""Attack: a refused upload claims an absurd Content-Length (issue 13, item 1).

The rejection counter once added the byte count the client *claimed* before any body was read:
one claim of 2^63 - 1 made SQLite's SUM() overflow, and `/v1/status` and `/metrics` answered 500
for good, across restarts. Against a real `fedkb serve`: refused requests add only what was
actually read, the reads survive a restart, and a database already holding such values (written
before the fix) still reads.
"""

from __future__ import annotations

import json
import socket
import sqlite3

import requests

from aggregator.db import COUNTER_CAP, DB_FILE
from tests.fixtures_aggregator import ADMIN, Device, ServeProcess, make_weights_model, status

CLAIMS = (9223372036854775807, 10 ** 18, 99999999999999999999999)


def _post_claiming(url: str, path: str, token: str, claimed_length: int) -> tuple[int, dict]:
    """POST headers that claim `claimed_length` body bytes, send none, and read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {claimed_length}\r\n"
                      "Connection: close\r\n\r\n").encode())
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _reads(url: str) -> tuple[dict, str]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    s, m = (requests.get(f"{url}/v1/admin/status", headers=admin, timeout=10),
            requests.get(f"{url}/metrics", headers=admin, timeout=10))
    assert s.status_code == 200, s.text
    assert m.status_code == 200, m.text
    return s.json(), m.text


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_claimed_lengths_of_refused_uploads_are_not_counted_and_reads_survive_a_restart(tmp_path):
    model, state = make_weights_model(tmp_path / "model"), tmp_path / "state"
    server = ServeProcess(state, model, log=tmp_path / "serve1.log")
    try:
        fresh = Device(server.url)  # enrolled, but holds no task: its uploads are 403 no_task
        assert fresh.enroll().status_code == 201
        before = status(server.url)["totals"]["bytes_received"]
        for claim in CLAIMS:
            code, body = _post_claiming(server.url, "/v1/rounds/1/updates", f"{fresh.device_id}.forged", claim)
            assert (code, body["error"]) == (401, "unauthorized")
            code, body = _post_claiming(server.url, "/v1/rounds/1/updates", fresh.token, claim)
            assert (code, body["error"]) == (403, "no_task")
        after, metrics = _reads(server.url)
        assert after["totals"]["bytes_received"] == before  # nothing was read of any of them
        assert after["rejected_total"] == {"unauthorized": len(CLAIMS), "no_task": len(CLAIMS)}
        assert _metric(metrics, "fedkb_bytes_received_total") == before
    finally:
        server.stop()

    server = ServeProcess(state, None, log=tmp_path / "serve2.log")
    try:
        again, _ = _reads(server.url)
        assert again["totals"] == after["totals"] and again["rejected_total"] == after["rejected_total"]
    finally:
        server.stop()

    # A database the old code poisoned: two counters at 2^63 - 1 whose SUM() overflows.
    conn = sqlite3.connect(state / DB_FILE)
    with conn:
        conn.executemany("INSERT OR REPLACE INTO rejections (round_id, reason, count, bytes) VALUES (?, ?, ?, ?)",
                         [(1, "unauthorized", 9223372036854775807, 9223372036854775807),
                          (0, "unauthorized", 9223372036854775807, 9223372036854775807)])
    conn.close()
    server = ServeProcess(state, None, log=tmp_path / "serve3.log")
    try:
        poisoned, metrics = _reads(server.url)
        assert poisoned["totals"]["bytes_received"] == COUNTER_CAP
        assert poisoned["rejected_total"]["unauthorized"] == COUNTER_CAP
        code, _ = _post_claiming(server.url, "/v1/rounds/1/updates", f"{fresh.device_id}.forged", CLAIMS[0])
        assert code == 401  # counting onto a saturated counter is no error either
        later, metrics = _reads(server.url)
        assert later["totals"]["bytes_received"] == COUNTER_CAP
        assert _metric(metrics, "fedkb_bytes_received_total") == float(COUNTER_CAP)
    finally:
        server.stop()
