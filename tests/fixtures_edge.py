"""Fixtures for the edge runtime tests: one tiny real model, device states, a faulty network.

Import into a test module with `from tests.fixtures_edge import *`. The model is converted once
per test session even when several modules import the fixture (a module-level cache), because a
conversion costs ~12 s on two cores. `FaultProxy` is a real HTTP proxy on loopback between a
device and a real server that can answer 503, drop a connection after the server has the
request, or corrupt a file in transit. `RecordingProxy` is a TCP relay that keeps every byte a
device sends.
"""

from __future__ import annotations

import dataclasses
import http.server
import itertools
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import SAMPLE_LINES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EDGE_TINY = dict(embed_dim=8, lstm_units=16, batch_size=4, seq_len=6)
_BUILT: dict[str, Path] = {}

__all__ = ["edge_model", "edge_model_copy", "user_lines", "text_file", "FaultProxy", "state", "ALL_MET",
           "SAMPLE_LINES", "bump_version", "proxy", "Typist", "RecordingProxy", "HttpRequest",
           "shakespeare_edge_model", "PRIVATE_MESSAGES", "HttpExchange", "retrained"]


def state(**changes):
    """A DeviceState meeting every condition, with some changed."""
    from fedkb_core.protocol import DeviceState

    return dataclasses.replace(DeviceState(idle=True, charging=True, unmetered=True, battery=90.0), **changes)


ALL_MET = dict(idle=True, charging=True, unmetered=True, battery=90.0)

# What a user might type and must never see on the wire (no word of ≥ 4 letters here occurs in
# the protocol's own vocabulary: headers, JSON keys, tensor names; "rent" would, in "recurrent").
PRIVATE_MESSAGES = [
    "my pin is 4197", "the bank code for my account is swordfish", "meet me outside the pharmacy at noon",
    "doctor hernandez called about the biopsy", "my new address is 22 juniper lane",
    "dont tell anyone about the surprise party", "the wifi password is marmalade", "love you see you tonight",
    "remember to pay the plumber on friday", "i think my landlord reads my mail", "the alarm code is 8 3 5 1",
    "call grandma on sunday",
]


def enrolled_with_task(url: str, secret: str):
    """Enroll a device through the edge runtime's client and check in for a task: (credentials, task JSON)."""
    from edge_runtime.client import ServerClient
    from fedkb_core.protocol import to_json

    client = ServerClient(url)
    try:
        credentials = client.enroll(secret)
        answer = client.checkin(state(), None)
    finally:
        client.close()
    assert answer.action == "train", answer
    return credentials, to_json(answer.task)


@pytest.fixture(scope="session")
def edge_model(tmp_path_factory) -> Path:
    """A real exported version-1 folder (trainable + inference TFLite, tokenizer, manifest).

    The tiny model of tests.fixtures_model (EDGE_TINY is its TINY, on the same 12-client corpus
    with a 60-piece vocabulary): one export serves both."""
    from tests.fixtures_model import TINY, build_tiny_model

    assert EDGE_TINY == TINY
    return build_tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def shakespeare_edge_model(tmp_path_factory, shakespeare_prepared) -> Path:
    """The tiny model exported with the real Shakespeare tokenizer (1000 pieces, words among
    them): a device's typed words are then a small part of the vocabulary, as on a phone."""
    if "shakespeare" not in _BUILT:
        from datasets.prepared import load_prepared
        from export.pipeline import export_model
        from model.config import ModelConfig

        config = ModelConfig(vocab_size=load_prepared(shakespeare_prepared).vocab_size, **EDGE_TINY)
        out = tmp_path_factory.mktemp("shakespeare_edge_model") / "v1"
        export_model(tokenizer_path=shakespeare_prepared / "tokenizer.model", out_dir=out, config=config)
        _BUILT["shakespeare"] = out
    return _BUILT["shakespeare"]


@pytest.fixture(scope="session")
def retrained(edge_model, tmp_path_factory):
    """Version 2 with other weights, published the way the server publishes (both TFLite files'
    weights rewritten, the tokenizer unchanged)."""
    import numpy as np
    from safetensors.numpy import load_file

    from aggregator.model_store import ModelStore as ServerModelStore
    from aggregator.publish import publish_version

    root = tmp_path_factory.mktemp("retrained") / "models"
    shutil.copytree(edge_model, root / "1")
    weights = load_file(str(edge_model / "weights.safetensors"))
    rng = np.random.default_rng(0)
    publish_version(ServerModelStore(root), parent=1, version=2,
                    weights={k: v + rng.normal(scale=0.5, size=v.shape).astype(np.float32) for k, v in weights.items()})
    return root / "2"


def bump_version(source: Path, dest: Path, version: int) -> Path:
    """The same files relabelled as another version (only manifest.json changes)."""
    from fedkb_core.manifest import load_manifest, write_manifest

    shutil.copytree(source, dest)
    manifest = load_manifest(source)
    write_manifest(dest, dataclasses.replace(manifest, version=version, parent_version=manifest.version))
    return dest


@pytest.fixture
def edge_model_copy(edge_model, tmp_path) -> Path:
    """A private copy of the model folder that a test may damage."""
    return Path(shutil.copytree(edge_model, tmp_path / "model_copy"))


@pytest.fixture
def user_lines() -> list[str]:
    return [f"{line} again {i}" for i in range(3) for line in SAMPLE_LINES]


@pytest.fixture
def text_file(tmp_path, user_lines) -> Path:
    path = tmp_path / "typed.txt"
    path.write_text("\n".join(user_lines) + "\n")
    return path


def loopback_http(handle: Callable[[http.server.BaseHTTPRequestHandler, str], None]):
    """A threaded HTTP/1.1 server on 127.0.0.1 calling `handle(handler, method)` for GET and
    POST, serving in a daemon thread: (server, url). Stop it with shutdown() and server_close()."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            handle(self, "GET")

        def do_POST(self):
            handle(self, "POST")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class FaultProxy:
    """A loopback HTTP proxy in front of `upstream` that injects faults on request.

    Attributes (set them from the test):
        fail_uploads: answer 503 to this many upload POSTs without forwarding them.
        drop_after_forward: forward this many upload POSTs, then close the connection without
            an answer (the server has the update; the device never hears back).
        corrupt: path suffixes whose response body gets one byte flipped.
        rewrite: path suffix -> function of the body returning the body to send instead.
        pad: path suffix -> bytes to append to the body, sent chunked (no Content-Length) so the
            client only learns the size by reading; `padded` records (path, bytes sent, whether
            the whole body went out) once the client has read it all or hung up.
        cut: path suffix -> after how many body bytes the connection breaks (once per suffix:
            the whole Content-Length is announced, then the proxy hangs up).
    Counters: `requests` (every path seen, in order), `ranges` (each request's Range header or
    None), `delivered` (path -> body bytes written to the client), `uploads_forwarded`.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.fail_uploads = 0
        self.drop_after_forward = 0
        self.corrupt: set[str] = set()
        self.rewrite: dict[str, Callable[[bytes], bytes]] = {}
        self.pad: dict[str, int] = {}
        self.padded: list[tuple[str, int, bool]] = []
        self.cut: dict[str, int] = {}
        self.requests: list[str] = []
        self.ranges: list[str | None] = []
        self.delivered: dict[str, int] = {}
        self.uploads_forwarded = 0
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._server, self.url = loopback_http(self._handle)

    def _handle(self, handler, method: str) -> None:
        path = handler.path
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0)) if method == "POST" else None
        is_upload = method == "POST" and path.endswith("/updates")
        with self._lock:
            self.requests.append(f"{method} {path}")
            self.ranges.append(handler.headers.get("Range"))
            cut = next((self.cut.pop(suffix) for suffix in list(self.cut) if path.endswith(suffix)), None)
            inject_503 = is_upload and self.fail_uploads > 0
            if inject_503:
                self.fail_uploads -= 1
            drop = is_upload and not inject_503 and self.drop_after_forward > 0
            if drop:
                self.drop_after_forward -= 1
        if inject_503:
            return self._reply(handler, 503, b'{"error": "unavailable", "message": "injected"}',
                               {"Content-Type": "application/json"})
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() in ("authorization", "content-type", "range", "if-range", "if-none-match")}
        upstream = self._http.request(method, self.upstream + path, data=body, headers=headers, timeout=30)
        if is_upload:
            with self._lock:
                self.uploads_forwarded += 1
        if drop:
            handler.close_connection = True
            handler.connection.shutdown(2)  # the answer is lost on the way back
            return None
        content = upstream.content
        if any(path.endswith(suffix) for suffix in self.corrupt) and content:
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        for suffix, change in self.rewrite.items():
            if path.endswith(suffix):
                content = change(content)
        keep = {k: v for k, v in upstream.headers.items()
                if k.lower() in ("content-type", "etag", "retry-after", "content-range")}
        padding = next((n for suffix, n in self.pad.items() if path.endswith(suffix)), 0)
        if padding:
            return self._reply_padded(handler, path, upstream.status_code, content, padding, keep)
        if cut is not None:
            handler.send_response(upstream.status_code)
            for k, v in {**keep, "Content-Length": str(len(content))}.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(content[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)  # the transfer breaks off here
            return self._count(path, cut)
        self._reply(handler, upstream.status_code, content, keep)
        return self._count(path, len(content))

    def _count(self, path: str, sent: int) -> None:
        with self._lock:
            self.delivered[path] = self.delivered.get(path, 0) + sent

    def _reply_padded(self, handler, path: str, status: int, body: bytes, padding: int, headers: dict) -> None:
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        block, sent, whole = b"\0" * (1 << 20), 0, False
        try:
            pads = (block[:min(len(block), padding - i)] for i in range(0, padding, len(block)))
            for chunk in itertools.chain([body], pads):
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            handler.wfile.write(b"0\r\n\r\n")
            whole = True
        except OSError:  # the client hung up
            handler.close_connection = True
        with self._lock:
            self.padded.append((path, sent, whole))

    @staticmethod
    def _reply(handler, status: int, body: bytes, headers: dict) -> None:
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def uploads_seen(self) -> int:
        return sum(1 for r in self.requests if r.startswith("POST") and r.endswith("/updates"))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    head: bytes  # request line and headers, as sent
    body: bytes


@dataclasses.dataclass(frozen=True)
class HttpExchange:
    """One request and the answer to it, as they went over the wire."""

    request: HttpRequest
    status: int
    headers: dict  # lower-cased names
    body: bytes  # the response body (de-chunked)


class RecordingProxy:
    """A loopback TCP relay in front of `upstream` that keeps every byte either side sends.

    It relays bytes, not HTTP messages, so what it records is exactly what left the client:
    request lines, headers, bodies, every retry. `sent()` gives each connection's bytes in
    order; `requests()` splits them into HTTP requests (Content-Length framing, which is all
    the device's client uses); `exchanges()` pairs each with the response the server sent
    (Content-Length or chunked framing; none for 304)."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self._target = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sent: list[bytearray] = []
        self._received: list[bytearray] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # stopped
                return
            upstream = socket.create_connection(self._target)
            record, answers = bytearray(), bytearray()
            with self._lock:
                self._sent.append(record)
                self._received.append(answers)
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, answers), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if record is not None:
                    with self._lock:
                        record += data
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def sent(self) -> list[bytes]:
        """The bytes the client sent, one entry per connection."""
        with self._lock:
            return [bytes(r) for r in self._sent]

    def requests(self) -> list[HttpRequest]:
        return [request for stream in self.sent() for request in _requests_in(stream)]

    def exchanges(self) -> list[HttpExchange]:
        """Every request with the answer the server sent to it, connection by connection."""
        with self._lock:
            streams = [(bytes(a), bytes(b)) for a, b in zip(self._sent, self._received, strict=True)]
        found = []
        for sent, received in streams:
            at = 0
            for request in _requests_in(sent):
                if at >= len(received):
                    break  # no answer (yet)
                status, headers, body, at = _response_at(received, at)
                found.append(HttpExchange(request, status, headers, body))
        return found

    def stop(self) -> None:
        with self._lock:
            for s in [self._listener, *self._sockets]:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked in accept / recv
                except OSError:
                    pass
                s.close()


def _head_at(stream: bytes, at: int) -> tuple[list[str], dict, int]:
    end = stream.index(b"\r\n\r\n", at) + 4
    lines = stream[at:end].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return lines, headers, end


def _requests_in(stream: bytes) -> list[HttpRequest]:
    found, at = [], 0
    while at < len(stream):
        lines, headers, end = _head_at(stream, at)
        assert "transfer-encoding" not in headers, "a chunked request: extend the parser"
        length = int(headers.get("content-length", 0))
        method, path, _ = lines[0].split(" ", 2)
        found.append(HttpRequest(method, path, stream[at:end], stream[end:end + length]))
        at = end + length
    return found


def _response_at(stream: bytes, at: int) -> tuple[int, dict, bytes, int]:
    """(status, headers, body, where the next response starts) of the response at `at`."""
    lines, headers, end = _head_at(stream, at)
    status = int(lines[0].split(" ", 2)[1])
    if status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", end
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size_end = stream.index(b"\r\n", end)
            size = int(stream[end:size_end].split(b";")[0], 16)
            body += stream[size_end + 2:size_end + 2 + size]
            end = size_end + 2 + size + 2
            if size == 0:
                return status, headers, bytes(body), end
    length = int(headers.get("content-length", 0))
    return status, headers, stream[end:end + length], end + length


@pytest.fixture
def proxy(server):
    """A FaultProxy in front of the test module's `server` fixture."""
    p = FaultProxy(server.url)
    yield p
    p.stop()


class Typist:
    """A keyboard thread that keeps asking for suggestions (resetting after each) until stopped.

    Every answer lands in `results`, any exception in `errors` (a failure while a model swap is
    under way is a bug). Use as a context manager; `wait_for_more(n)` blocks until n more answers.
    """

    def __init__(self, suggest: Callable[[], list[str]], reset: Callable[[], None]):
        self.results: list[list[str]] = []
        self.errors: list[BaseException] = []
        self._suggest, self._reset = suggest, reset
        self._served = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._type, daemon=True)

    def _type(self) -> None:
        while not self._stop.is_set():
            try:
                words = self._suggest()
                self._reset()
            except Exception as err:  # noqa: BLE001 (recorded for the test to assert on)
                self.errors.append(err)
                return
            with self._served:
                self.results.append(words)
                self._served.notify_all()

    def wait_for_more(self, n: int = 1, timeout: float = 30.0) -> None:
        with self._served:
            seen = len(self.results)
            assert self._served.wait_for(lambda: len(self.results) >= seen + n or self.errors, timeout=timeout)

    def __enter__(self) -> "Typist":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
