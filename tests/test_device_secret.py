"""`fedkb device` takes the fleet secret from a file or the environment, never needing it on the
command line; a bad secret file is a one-line error before anything is sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from edge_runtime.device import CREDENTIALS_FILE
from tests.fixtures_aggregator import REPO, SECRET, make_server, weights_model  # noqa: F401


def _device(url, home, *args, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDKB_")}
    # charging=0: the device enrolls, then finds itself ineligible and sends nothing more.
    cmd = [sys.executable, "-m", "fedkb", "device", "--server", url, "--home", str(home), "--state", "charging=0",
           "--once", *args]
    return subprocess.run(cmd, cwd=REPO, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=120)


def _token_works(url, home) -> bool:
    """The device's saved credentials are accepted by the server (it enrolled with the secret)."""
    credentials = json.loads((home / CREDENTIALS_FILE).read_text())
    r = requests.post(f"{url}/v1/checkin", headers={"Authorization": f"Bearer {credentials['token']}"},
                      json={"model_version": None, "state": {"idle": False, "charging": False, "unmetered": False,
                                                              "battery": 50.0}}, timeout=10)
    return r.status_code == 200


@pytest.mark.parametrize("how", ["flag", "env_file", "env"])
def test_device_enrolls_with_the_secret_from_a_file_or_the_environment(make_server, weights_model, tmp_path, how):  # noqa: F811
    server = make_server(weights_model)
    secret = tmp_path / "fleet-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    args, env = {"flag": (("--enrollment-secret-file", str(secret)), {}),
                 "env_file": ((), {"FEDKB_ENROLLMENT_SECRET_FILE": str(secret)}),
                 "env": ((), {"FEDKB_ENROLLMENT_SECRET": SECRET})}[how]
    out = _device(server.url, tmp_path / "home", *args, env=env)
    assert out.returncode == 0, out.stderr
    assert _token_works(server.url, tmp_path / "home")
    assert "warning" not in out.stderr


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("\n", "empty")])
def test_a_bad_secret_file_is_a_one_line_error_and_nothing_is_sent(make_server, weights_model, tmp_path,  # noqa: F811
                                                                  content, message):
    server = make_server(weights_model)
    secret = tmp_path / "fleet-secret"
    if content is not None:
        secret.write_text(content)
    out = _device(server.url, tmp_path / "home", "--enrollment-secret-file", str(secret))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"enrollment secret file {secret}: {message}" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "home" / CREDENTIALS_FILE).exists()


def test_the_old_flag_still_works_with_a_warning(make_server, weights_model, tmp_path):  # noqa: F811
    server = make_server(weights_model)
    out = _device(server.url, tmp_path / "home", "--enrollment-secret", SECRET)
    assert out.returncode == 0, out.stderr
    assert "--enrollment-secret puts the secret in every user's `ps`" in out.stderr
    assert _token_works(server.url, tmp_path / "home")
