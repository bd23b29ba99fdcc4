"""Fixtures for the aggregator tests: model folders, a real server on loopback, a device client.

Register with `pytest_plugins = ["tests.fixtures_aggregator"]` in tests/conftest.py, or import the
fixtures in a test module. Everything runs over real HTTP on 127.0.0.1 against real SQLite files
in tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from fedkb_core.manifest import FileEntry, Manifest, sha256_file, write_manifest
from fedkb_core.protocol import RoundTask
from fedkb_core.wire import UpdateMetadata, WeightSpec, encode_update

SECRET = "enroll-secret-for-tests"
ADMIN = "admin-token-for-tests"
TINY_SHAPES = {"embedding": (16, 4), "lstm/kernel": (4, 8), "dense/bias": (16,)}
REPO = Path(__file__).resolve().parents[1]


def make_weights_model(out: Path, shapes: dict[str, tuple[int, ...]] = TINY_SHAPES, *, version: int = 1,
                       seed: int = 0) -> Path:
    """A model folder without TFLite files: tokenizer + manifest + weights.safetensors.

    Enough for everything but the TFLite rewrite (the server then publishes weights only).
    """
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, str(out / "weights.safetensors"))
    (out / "tokenizer.model").write_bytes(b"not a real sentencepiece model")
    sha = sha256_file(out / "tokenizer.model")
    write_manifest(out, Manifest(
        version=version, parent_version=None, created="2024-01-01T00:00:00+00:00",
        files={"tokenizer.model": FileEntry(sha256=sha, bytes=(out / "tokenizer.model").stat().st_size)},
        tokenizer_sha256=sha, vocab_size=16, batch_size=2, seq_len=4,
        weights=tuple(WeightSpec(k, tuple(s)) for k, s in shapes.items())))
    return out


class ServerThread:
    """`create_app(overrides)` served by Werkzeug on an ephemeral loopback port in a thread."""

    def __init__(self, overrides: dict):
        from werkzeug.serving import make_server

        from aggregator.app import create_app
        from aggregator.server_errors import JsonErrorRequestHandler

        self.app = create_app(overrides)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=JsonErrorRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def state(self):
        return self.app.extensions["fedkb"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.state.worker.stop()
        self.state.commits.close()


class Device:
    """A minimal device speaking the HTTP API (the edge runtime's job, reduced to what tests need)."""

    def __init__(self, url: str, session: requests.Session | None = None):
        self.url = url
        self.http = session or requests.Session()
        self.device_id: str | None = None
        self.token: str | None = None

    def enroll(self, secret: str = SECRET) -> requests.Response:
        r = self.http.post(f"{self.url}/v1/devices", json={"enrollment_secret": secret, "platform": "test"})
        if r.status_code == 201:
            self.device_id, self.token = r.json()["device_id"], r.json()["token"]
        return r

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def checkin(self, model_version: int | None = None) -> requests.Response:
        state = {"idle": True, "charging": True, "unmetered": True, "battery": 90.0}
        return self.http.post(f"{self.url}/v1/checkin", json={"model_version": model_version, "state": state},
                              headers=self.headers)

    def task(self, wait: float = 10.0) -> RoundTask:
        """Check in for a task; while no round is open yet (the worker opens one a pass after the
        server starts or a round closes, later under load), check in again for up to `wait` s."""
        deadline = time.monotonic() + wait
        r = self.checkin()
        while r.status_code == 200 and r.json().get("reason") == "no_open_round" and time.monotonic() < deadline:
            time.sleep(0.05)
            r = self.checkin()
        assert r.status_code == 200 and r.json()["action"] == "train", r.text
        return RoundTask.from_json(r.json()["task"])

    def body(self, task: RoundTask, deltas: dict, num_examples: int = 10, **meta) -> bytes:
        fields = dict(round_id=task.round_id, model_version=task.model_version, device_id=self.device_id,
                      num_examples=num_examples, clip_norm=task.clip_norm, update_norm=0.0, encoding="float32")
        fields.update(meta)
        return encode_update(deltas, UpdateMetadata(**fields))

    def upload(self, round_id: int, body: bytes, headers: dict | None = None) -> requests.Response:
        return self.http.post(f"{self.url}/v1/rounds/{round_id}/updates", data=body,
                              headers={**self.headers, "Content-Type": "application/octet-stream", **(headers or {})})


def random_deltas(shapes: dict, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def status(url: str) -> dict:
    """The operator's full status (`/v1/admin/status`)."""
    r = requests.get(f"{url}/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def server_overrides(state_dir: Path, init_model: Path, **overrides) -> dict:
    # Plain FedAvg (server SGD at 1.0), so a test can check the published weights against
    # w + mean delta; tests of FedAdam (the default) ask for it.
    base = dict(testing=True, state_dir=state_dir, init_model=init_model, enrollment_secret=SECRET,
                admin_token=ADMIN, min_clients=2, goal_clients=3, round_timeout=60.0, clip_norm=1.0,
                server_optimizer="sgd", retry_after=5.0, worker_interval=0.05, checkpoint_interval=0.0,
                log_json=True)
    base.update(overrides)
    return base


@pytest.fixture
def weights_model(tmp_path) -> Path:
    return make_weights_model(tmp_path / "model")


@pytest.fixture
def make_server(tmp_path):
    """Factory: `make_server(init_model, **config overrides)` → a running ServerThread (stopped after)."""
    servers = []

    def _make(init_model: Path, state_dir: Path | None = None, **overrides) -> ServerThread:
        s = ServerThread(server_overrides(state_dir or tmp_path / f"state{len(servers)}", init_model, **overrides))
        servers.append(s)
        return s

    yield _make
    for s in servers:
        s.stop()


class ServeProcess:
    """A real `fedkb serve` subprocess (so it can be killed with SIGKILL), by default gunicorn: a
    master and its worker processes, in a process group of their own."""

    def __init__(self, state_dir: Path, init_model: Path | None, *args: str, log: Path, port: int | None = None,
                 cwd: Path = REPO, env: dict | None = None):
        """`env`: FEDKB_* variables instead of the test secrets (which then come from `args`)."""
        import socket

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fedkb", "serve", "--state", str(state_dir), "--port", str(self.port), *args]
        if init_model is not None:
            cmd += ["--init-model", str(init_model)]
        fedkb_env = {"FEDKB_ENROLLMENT_SECRET": SECRET, "FEDKB_ADMIN_TOKEN": ADMIN} if env is None else env
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDKB_")}, **fedkb_env}
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._up, timeout=60, what=f"fedkb serve on port {self.port} (log {log})")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"fedkb serve exited with {self.proc.returncode}; see {self.log.name}")
        try:
            return requests.get(f"{self.url}/v1/status", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def kill9(self) -> None:
        """SIGKILL to the whole group, as a crash or the OOM killer takes the machine's server: a
        worker orphaned by its killed master would otherwise finish its work and hold the port."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
