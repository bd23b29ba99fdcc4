"""`fedkb serve` as a command: help, fail-fast errors, gunicorn by default (several workers on one
state), Werkzeug with --dev, and secrets from files or the environment, never the command line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import requests

from fedkb_core.training_config import TRAINING
from tests.fixtures_aggregator import (ADMIN, REPO, SECRET, TINY_SHAPES, Device, ServeProcess, make_weights_model,
                                       random_deltas, status, wait_for)


def _fedkb(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fedkb", *args], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in (env or os.environ).items() if not k.startswith("FEDKB_")}, timeout=60)


def test_help_lists_every_setting_and_its_default():
    out = _fedkb("serve", "--help")
    assert out.returncode == 0
    for flag in ("--state", "--init-model", "--host", "--port", "--workers", "--dev", "--config", "--min-clients",
                 "--goal-clients", "--round-timeout", "--clip-norm", "--server-lr", "--server-momentum", "--device-lr",
                 "--device-epochs", "--device-max-examples", "--enrollment-secret-file", "--admin-token-file",
                 "--header-timeout", "--body-timeout", "--max-connections", "--keep-alive",
                 "FEDKB_ENROLLMENT_SECRET", "FEDKB_ADMIN_TOKEN"):
        assert flag in out.stdout, flag
    text = " ".join(out.stdout.split())
    assert f"accepted (default: {TRAINING.goal_clients})" in text
    assert f"(default: {TRAINING.device_max_examples})" in text and f"(default: {TRAINING.device_lr})" in text
    # No way to put a secret on the command line is advertised.
    assert "--enrollment-secret " not in out.stdout and "--admin-token " not in out.stdout
    assert "--enrollment-secret\n" not in out.stdout and "--admin-token\n" not in out.stdout


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_missing_secrets_and_model_fail_in_one_line(tmp_path):
    out = _fedkb("serve", "--state", str(tmp_path / "s"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "enrollment_secret is not set" in out.stderr and "--enrollment-secret-file" in out.stderr
    out = _fedkb("serve", "--state", str(tmp_path / "s"), "--enrollment-secret-file", str(tmp_path / "nothing"),
                 "--admin-token-file", str(_secret_file(tmp_path / "admin", "b")))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"enrollment_secret file {tmp_path / 'nothing'}: no such file" in out.stderr
    out = _fedkb("serve", "--state", str(tmp_path / "s"), "--enrollment-secret-file",
                 str(_secret_file(tmp_path / "enroll", "a")), "--admin-token-file", str(tmp_path / "admin"))
    assert out.returncode == 2 and "holds no model yet" in out.stderr and "Traceback" not in out.stderr


def test_the_old_secret_flags_still_work_with_a_warning(tmp_path):
    out = _fedkb("serve", "--state", str(tmp_path / "s"), "--enrollment-secret", "a", "--admin-token", "b")
    assert out.returncode == 2 and "holds no model yet" in out.stderr  # the secrets were accepted
    assert "--enrollment-secret puts the secret in every user's `ps`" in out.stderr
    assert "--admin-token puts the secret in every user's `ps`" in out.stderr


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_default_server_is_gunicorn_and_takes_its_secrets_from_files(tmp_path):
    model = make_weights_model(tmp_path / "model")
    enroll, admin = _secret_file(tmp_path / "enroll", SECRET), _secret_file(tmp_path / "admin", ADMIN)
    server = ServeProcess(tmp_path / "state", model, "--enrollment-secret-file", str(enroll),
                          "--admin-token-file", str(admin), log=tmp_path / "serve.log", env={})
    try:
        r = requests.get(f"{server.url}/v1/status", timeout=10)
        assert r.status_code == 200 and r.headers["Server"] == "gunicorn"
        (worker,) = _children(server.proc.pid)  # one master, one worker process it forked
        assert Path(f"/proc/{worker}/stat").read_text().split(")")[1].split()[1] == str(server.proc.pid)
        assert f"Booting worker with pid: {worker}" in Path(tmp_path / "serve.log").read_text()
        # The secrets work, and appear in no process's command line.
        assert Device(server.url).enroll(SECRET).status_code == 201
        operator = status(server.url)  # /v1/admin/status with the admin token from its file
        for pid in (server.proc.pid, worker):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert SECRET.encode() not in cmdline and ADMIN.encode() not in cmdline
        # The training defaults are the measured ones (fedkb_core/training_config.py).
        config = operator["config"]
        assert (config["server_optimizer"], config["server_lr"], config["device_lr"],
                config["device_max_examples"]) == ("adam", 0.03, 1.0, 64)
    finally:
        server.stop()


def test_dev_flag_runs_werkzeug_in_one_process(tmp_path):
    model = make_weights_model(tmp_path / "model")
    server = ServeProcess(tmp_path / "state", model, "--dev", log=tmp_path / "serve.log")
    try:
        r = requests.get(f"{server.url}/v1/status", timeout=10)
        assert r.status_code == 200 and r.headers["Server"].startswith("Werkzeug/")
        assert _children(server.proc.pid) == []
    finally:
        server.stop()
    out = _fedkb("serve", "--state", str(tmp_path / "s"), "--dev", "--workers", "2")
    assert out.returncode == 2 and "--dev runs one process" in out.stderr


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
