"""`fedkb serve` as a command: help, fail-fast errors, and several gunicorn workers on one state."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import requests

from tests.fixtures_aggregator import (REPO, TINY_SHAPES, Device, ServeProcess, make_weights_model, random_deltas,
                                       status, wait_for)


def _fedkb(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fedkb", *args], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in (env or os.environ).items() if not k.startswith("FEDKB_")}, timeout=60)


def test_help_lists_every_setting():
    out = _fedkb("serve", "--help")
    assert out.returncode == 0
    for flag in ("--state", "--init-model", "--host", "--port", "--workers", "--config", "--min-clients",
                 "--goal-clients", "--round-timeout", "--clip-norm", "--server-lr", "--server-momentum", "--device-lr",
                 "--device-epochs", "--device-max-examples", "--enrollment-secret", "--admin-token",
                 "FEDKB_ENROLLMENT_SECRET"):
        assert flag in out.stdout


def test_missing_secrets_and_model_fail_in_one_line(tmp_path):
    out = _fedkb("serve", "--state", str(tmp_path / "s"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "enrollment_secret is not set" in out.stderr
    out = _fedkb("serve", "--state", str(tmp_path / "s"), "--enrollment-secret", "a", "--admin-token", "b")
    assert out.returncode == 2 and "holds no model yet" in out.stderr and "Traceback" not in out.stderr


def test_two_gunicorn_workers_share_one_state(tmp_path):
    model = make_weights_model(tmp_path / "model")
    server = ServeProcess(tmp_path / "state", model, "--workers", "2", "--threads", "4", "--goal-clients", "5",
                          log=tmp_path / "serve.log")
    try:
        devices = [Device(server.url) for _ in range(5)]
        for i, d in enumerate(devices):
            assert d.enroll().status_code == 201
            t = d.task()
            assert d.upload(t.round_id, d.body(t, random_deltas(TINY_SHAPES, i))).status_code == 200
        s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and s, what="version 2")
        assert s["versions"][0]["num_clients"] == 5
    finally:
        server.stop()


def test_relative_state_and_model_paths_serve_files(tmp_path):
    # Flask resolves relative send_file paths against the app package, not the working folder.
    make_weights_model(tmp_path / "model")
    server = ServeProcess(Path("state"), Path("model"), log=tmp_path / "serve.log", cwd=tmp_path)
    try:
        manifest = requests.get(f"{server.url}/v1/models/latest", timeout=10).json()
        for name, entry in manifest["files"].items():
            r = requests.get(f"{server.url}/v1/models/{manifest['version']}/{name}", timeout=10)
            assert r.status_code == 200, r.text
            assert hashlib.sha256(r.content).hexdigest() == entry["sha256"]
    finally:
        server.stop()
