"""Slow and idle clients do not stop the production server answering others (issue 13, item 4).

The attack: more connections than the server has request threads, each sending its request a
header line at a time (slowloris), or headers then a trickle of body, or nothing at all. A real
`fedkb serve` (gunicorn, fedkb's buffering worker, 2 workers x 2 threads as in the report) on
127.0.0.1 must still answer a probe promptly, and close the slow connections at their deadline with
a JSON 408. Deadlines are short here (2 s) so the test takes seconds.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import requests

from tests.fixtures_aggregator import SECRET, ServeProcess, make_weights_model

ATTACKERS = 6  # of each kind; the server has 2 x 2 = 4 request threads
HEADER_TIMEOUT = 2.0


class Trickler(threading.Thread):
    """One hostile connection: sends `head` (all at once), then `trickle` one byte every `every` s."""

    def __init__(self, port: int, head: bytes, trickle: bytes, every: float = 0.3):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.head, self.trickle, self.every = head, trickle, every
        self.stop = threading.Event()
        self.reply = b""
        self.closed_at: float | None = None

    def run(self):
        try:
            self.sock.sendall(self.head)
            for byte in self.trickle:
                if self.stop.wait(self.every):
                    return
                self.sock.sendall(bytes([byte]))
        except OSError:  # the server closed the connection under us: the point
            pass
        finally:
            self._read_reply()

    def _read_reply(self):
        self.sock.settimeout(5)
        try:
            while chunk := self.sock.recv(4096):
                self.reply += chunk
        except OSError:
            pass
        self.closed_at = time.monotonic()
        self.sock.close()


def _probe(url: str) -> float:
    started = time.monotonic()
    r = requests.get(f"{url}/v1/status", timeout=10, headers={"Connection": "close"})
    assert r.status_code == 200
    return time.monotonic() - started


def test_slow_and_idle_connections_do_not_stall_the_server(tmp_path):
    model = make_weights_model(tmp_path / "model")
    server = ServeProcess(tmp_path / "state", model, "--workers", "2", "--threads", "2",
                          "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(HEADER_TIMEOUT),
                          log=tmp_path / "serve.log")
    attackers: list[Trickler] = []
    try:
        slow_headers = b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\n"
        endless = b"X-Slow: a\r\n" * 100
        body_head = (b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        for _ in range(ATTACKERS):
            attackers.append(Trickler(server.port, slow_headers, endless))  # slowloris
            attackers.append(Trickler(server.port, body_head, b" " * 1000))  # slow body
            attackers.append(Trickler(server.port, b"", b"", every=30))  # idle: connects, says nothing
        for a in attackers:
            a.start()
        time.sleep(0.5)  # every attacker is connected and has begun
        probes = [_probe(server.url) for _ in range(3)]
        assert max(probes) < 1.5, f"probe latencies {probes} with {len(attackers)} slow connections open"

        for a in attackers:
            a.join(timeout=HEADER_TIMEOUT + 8)
        assert all(not a.is_alive() for a in attackers), "a slow connection was never closed"
        for a in attackers:
            held = a.closed_at - started
            assert held < HEADER_TIMEOUT + 3, f"a slow connection was held {held:.1f} s"
            status_line, _, rest = a.reply.partition(b"\r\n")
            assert status_line == b"HTTP/1.1 408 Request Timeout", a.reply[:200]
            assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
        assert max(_probe(server.url) for _ in range(2)) < 1.5  # and afterwards
    finally:
        for a in attackers:
            a.stop.set()
        server.stop()


def test_a_request_sent_in_pieces_within_the_deadline_is_served(tmp_path):
    """The deadline is for the whole request, not each read: a client that is slow but in time,
    and an upload-sized body collected across many reads, are served normally."""
    model = make_weights_model(tmp_path / "model")
    server = ServeProcess(tmp_path / "state", model, "--header-timeout", "3", log=tmp_path / "serve.log")
    try:
        body = json.dumps({"enrollment_secret": SECRET, "platform": "pieces"}).encode() + b" " * 300_000
        head = (f"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for i in range(0, len(head), 10):
                sock.sendall(head[i:i + 10])
                time.sleep(0.02)
            for i in range(0, len(body), 65536):
                sock.sendall(body[i:i + 65536])
                time.sleep(0.05)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status_line, _, rest = reply.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 201 CREATED", reply[:300]  # the app parsed the whole body
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["device_id"]
    finally:
        server.stop()
