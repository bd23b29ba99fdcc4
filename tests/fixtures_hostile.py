"""A hostile (or broken) fedkb server on loopback, and a way to run a real `fedkb device` at it.

`HostileServer` speaks the device's HTTP API from scripted replies: it serves model versions
from folders the test prepared (a real exported model, or one a test broke on purpose), signs
their manifests with its own Ed25519 key (as a real server does; a hostile server that has the
fleet's key is the worst case), and answers each check-in with the next step of a script. Any
reply can be replaced by raw bytes, a wrong status, or an endless body that counts how much
of it the device read before it hung up.

`run_device` starts `fedkb device` as a subprocess under a small wrapper that reports the
child's peak RSS, so a test can bound memory as well as time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedkb_core.signing import ManifestSigner
from tests.fixtures_aggregator import REPO, SECRET
from tests.fixtures_edge import loopback_http

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Reply:
    """A raw reply: status, body, headers."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()  # more headers (a Content-Length here replaces the body's)


@dataclasses.dataclass(frozen=True)
class Endless:
    """A chunked body of `prefix` then `fill` repeated up to `limit` bytes (the attack size)."""

    prefix: bytes = b""
    fill: bytes = b" "
    limit: int = 200 * MiB
    status: int = 200


@dataclasses.dataclass(frozen=True)
class Step:
    """One check-in's worth of script: what `latest` is, and the check-in answer."""

    latest: int
    checkin: Any  # a dict (JSON), or Reply / Endless / bytes


def task(**changes) -> dict:
    """A valid check-in answer with a task for version 1 of the tiny edge model, with changes."""
    body = dict(round_id=1, model_version=1, learning_rate=0.5, epochs=1, batch_size=4, max_examples=1000,
                clip_norm=1.0, deadline=time.time() + 600, encoding="float32")
    body.update(changes)
    return {"action": "train", "task": body}


def wait(retry_after: float = 0.01, reason: str = "no_open_round") -> dict:
    return {"action": "wait", "retry_after": retry_after, "reason": reason}


class HostileServer:
    """Scripted fedkb API on 127.0.0.1.

    Args:
        versions: version number -> folder holding manifest.json and the files it lists.
        signer: signs every served manifest (None: no manifest.sig at all, 404).
        script: the check-in steps, one per check-in (the last one repeats).

    Attributes (set from the test): `overrides` ("GET /v1/models/2/trainable.tflite" -> a
    reply), `enrollment` (the enrollment answer). Records: `requests` (every "METHOD path"),
    `uploads` (bodies), `sent` (path -> body bytes written for Endless replies).
    """

    def __init__(self, versions: dict[int, Path], signer: ManifestSigner | None, script: list[Step]):
        self.versions, self.signer, self.script = dict(versions), signer, list(script)
        self.overrides: dict[str, Any] = {}
        self.enrollment: Any = {"device_id": "d0123456789abcdef", "token": "d0123456789abcdef.s3cr3t"}
        self.requests: list[str] = []
        self.uploads: list[bytes] = []
        self.sent: dict[str, int] = {}
        self._step = 0
        self._lock = threading.Lock()
        self._server, self.url = loopback_http(self._handle)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requested(self, prefix: str) -> list[str]:
        return [r for r in self.requests if r.startswith(prefix)]

    # Routing ----------------------------------------------------------------------------------
    def _handle(self, handler, method: str) -> None:
        path = handler.path
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0)) if method == "POST" else b""
        key = f"{method} {path}"
        with self._lock:
            self.requests.append(key)
            step = self.script[min(self._step, len(self.script) - 1)]
            if key == "POST /v1/checkin":
                self._step += 1
        if key in self.overrides:
            return self._send(handler, path, self.overrides[key])
        if key == "POST /v1/devices":
            return self._send(handler, path, self.enrollment)
        if key == "POST /v1/checkin":
            return self._send(handler, path, step.checkin)
        if method == "POST" and re.fullmatch(r"/v1/rounds/\d+/updates", path):
            self.uploads.append(body)
            return self._send(handler, path, {"status": "accepted", "update_id": len(self.uploads)})
        if key == "GET /v1/models/signing-key":
            if self.signer is None:
                return self._send(handler, path, Reply(404, b'{"error": "not_found", "message": "none"}'))
            return self._send(handler, path, Reply(200, self.signer.public_pem(), "application/x-pem-file"))
        if key == "GET /v1/models/latest":
            return self._send(handler, path, Reply(200, self._manifest(step.latest)))
        match = re.fullmatch(r"GET /v1/models/(\d+)/([^/]+)", key)
        if match and int(match[1]) in self.versions:
            version, name = int(match[1]), match[2]
            if name == "manifest.json":
                return self._send(handler, path, Reply(200, self._manifest(version)))
            if name == "manifest.sig" and self.signer is not None:
                return self._send(handler, path, Reply(200, self.signer.sign(self._manifest(version)).to_bytes()))
            file = self.versions[version] / name
            if name != "manifest.sig" and file.is_file():
                return self._send(handler, path, Reply(200, file.read_bytes(), "application/octet-stream"))
        return self._send(handler, path, Reply(404, b'{"error": "not_found", "message": "no such thing"}'))

    def _manifest(self, version: int) -> bytes:
        return (self.versions[version] / "manifest.json").read_bytes()

    def _send(self, handler, path: str, reply: Any) -> None:
        if isinstance(reply, (dict, list)):
            reply = Reply(200, json.dumps(reply).encode())
        elif isinstance(reply, bytes):
            reply = Reply(200, reply)
        if isinstance(reply, Endless):
            return self._send_endless(handler, path, reply)
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        extra = dict(reply.headers)
        handler.send_header("Content-Length", extra.pop("Content-Length", str(len(reply.body))))
        for name, value in extra.items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            handler.wfile.write(reply.body)
        except OSError:
            handler.close_connection = True

    def _send_endless(self, handler, path: str, reply: Endless) -> None:
        handler.send_response(reply.status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        block, sent = reply.fill * max(1, (1 << 16) // len(reply.fill)), 0
        try:
            chunk = reply.prefix
            while sent < reply.limit:
                if chunk:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                chunk = block
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:  # the device hung up: what we want
            pass
        handler.close_connection = True
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + sent


_PEAK_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
sys.stderr.write("\\nPEAK_RSS_KB=%d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


@dataclasses.dataclass
class DeviceRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float

    @property
    def reports(self) -> list[dict]:
        """The cycle reports of a `--format json` run (asserting it ended cleanly)."""
        assert self.returncode == 0, self.stderr[-3000:]
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def run_device(url: str, home: Path, *args: str, timeout: float = 120) -> DeviceRun:
    """`fedkb device --server url --home home ARGS` (secret from the environment), measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDKB_")}
    env["FEDKB_ENROLLMENT_SECRET"] = SECRET
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, sys.executable, "-m", "fedkb", "device", "--server", url,
           "--home", str(home), *args]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start
    stderr, _, peak = out.stderr.rpartition("PEAK_RSS_KB=")
    return DeviceRun(out.returncode, out.stdout, stderr, seconds, int(peak.strip() or 0) / 1024)


def home_bytes(home: Path) -> int:
    """Bytes of every file under the device's home (what it wrote to disk)."""
    return sum(p.stat().st_size for p in Path(home).rglob("*") if p.is_file())
