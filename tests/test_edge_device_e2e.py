"""End to end: the real `fedkb device` CLI against a real `fedkb serve`, both as subprocesses.

Every server is a fresh `fedkb serve` on its own state directory (it starts in well under a
second), with the tiny exported model and min-clients 1, so each test reads exact counts from
GET /v1/status. `FaultProxy` sits between device and server when a test needs a fault on the
wire. The last tests drive the `Device` class in-process, where the retry policy and the device
state script can be set (the CLI reads the host or a fixed `--state`).
"""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.client import RetryPolicy, ServerClient
from edge_runtime.device import CREDENTIALS_FILE, CycleReport, Device, DeviceConfig, next_delay
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.eligibility import EligibilityPolicy
from edge_runtime.version_check import SUGGESTION_FILES
from fedkb_core.durable import leftover_temps
from fedkb_core.manifest import load_manifest, verify_files
from tests.fixtures_aggregator import REPO, SECRET, ServeProcess, status, wait_for
from tests.fixtures_edge import FaultProxy, Typist, edge_model, state, text_file, user_lines  # noqa: F401

ALL_MET = "charging=1,idle=1,unmetered=1,battery=90"


@pytest.fixture
def serve(edge_model, tmp_path):
    """Factory: `serve(goal_clients)` → a running `fedkb serve` subprocess (stopped after the test)."""
    servers = []

    def _start(goal_clients: int = 5) -> ServeProcess:
        n = len(servers)
        server = ServeProcess(tmp_path / f"state{n}", edge_model, "--min-clients", "1", "--goal-clients",
                              str(goal_clients), "--round-timeout", "600", "--retry-after", "1",
                              log=tmp_path / f"serve{n}.log")
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture
def proxies():
    started = []

    def _start(upstream: str) -> FaultProxy:
        started.append(FaultProxy(upstream))
        return started[-1]

    yield _start
    for p in started:
        p.stop()


def fedkb_device(url: str, home: Path, *args: str, text: Path | None = None) -> subprocess.CompletedProcess:
    """Run `fedkb device` as a user would (enrollment secret from the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDKB_")}
    env["FEDKB_ENROLLMENT_SECRET"] = SECRET
    cmd = [sys.executable, "-m", "fedkb", "device", "--server", url, "--home", str(home), *args]
    if text is not None:
        cmd += ["--text", str(text)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def reports(out: subprocess.CompletedProcess) -> list[dict]:
    """The cycle reports a `--format json` run printed (one JSON object per line)."""
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def models_state(home: Path) -> dict:
    path = home / "models" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def no_leftovers(home: Path) -> bool:
    models = home / "models"
    return not leftover_temps(models)


# The CLI ----------------------------------------------------------------------------------

def test_ineligible_device_sends_nothing(serve, proxies, text_file, tmp_path):
    server = serve()
    proxy = proxies(server.url)
    home = tmp_path / "phone"
    (report,) = reports(fedkb_device(proxy.url, home, "--state", "charging=0", "--once", "--format", "json",
                                     text=text_file))
    assert report == {"action": "ineligible", "reasons": ["not_charging"]}
    enrolling = ["POST /v1/devices", "GET /v1/models/signing-key"]  # the id and token, the key to pin
    assert proxy.requests == enrolling  # then not a byte: no check-in, no download
    out = fedkb_device(proxy.url, home, "--state", "charging=1,idle=0,battery=5", "--once", text=text_file)
    assert (out.returncode, out.stdout) == (0, "ineligible (reasons=not_idle,low_battery)\n"), out.stderr[-2000:]
    assert proxy.requests == enrolling  # enrolled once; the second run sent nothing at all
    s = status(server.url)
    assert s["totals"]["accepted"] == 0 and s["round"]["assigned"] == 0
    assert models_state(home) == {} and not (home / "outbox").exists()


def test_eligible_device_gets_its_clipped_update_accepted(serve, text_file, user_lines, tmp_path):
    server = serve()
    home = tmp_path / "phone"
    (report,) = reports(fedkb_device(server.url, home, "--state", ALL_MET, "--once", "--format", "json",
                                     text=text_file))
    assert report["action"] == "accepted", report
    assert report["round_id"] == 1 and report["model_version"] == 1 and report["num_examples"] > 0
    s = status(server.url)
    assert s["round"]["accepted_updates"] == 1 and s["totals"]["accepted"] == 1
    (norm,) = s["update_norms"]["norms"]
    assert norm <= s["update_norms"]["clip_norm"] * (1 + 1e-5)  # clipped on the device
    assert report["update_norm"] >= norm * (1 - 1e-5)  # the device reports the norm before clipping
    assert models_state(home) == {"current": 1, "previous": None}
    assert not any((home / "outbox").glob("*")), "the outbox is cleared once the server has the update"

    # The typed text never left the device: no file of the server's state holds a typed line.
    state_files = [p for p in (tmp_path / "state0").rglob("*") if p.is_file()]
    assert state_files and not any(user_lines[0].encode() in p.read_bytes() for p in state_files)

    # Nothing new typed since: the next cycle stays quiet, and the count stays 1.
    (again,) = reports(fedkb_device(server.url, home, "--state", ALL_MET, "--once", "--format", "json"))
    assert again == {"action": "ineligible", "reasons": ["too_few_new_examples"]}
    assert status(server.url)["totals"]["accepted"] == 1


def test_corrupted_model_download_is_rejected_and_the_old_model_kept(serve, proxies, text_file, tmp_path):
    server = serve(goal_clients=1)  # one update closes a round and publishes the next version
    proxy = proxies(server.url)
    home = tmp_path / "phone"
    (first,) = reports(fedkb_device(server.url, home, "--state", ALL_MET, "--once", "--format", "json",
                                    text=text_file))
    assert first["action"] == "accepted" and first["model_version"] == 1
    wait_for(lambda: (s := status(server.url))["model_version"] == 2 and (s["round"] or {}).get("id") == 2,
             what="version 2 published and round 2 open")
    v1 = home / "models" / "v1"

    proxy.corrupt = {"trainable.tflite"}
    flags = ("--state", ALL_MET, "--min-new-examples", "0", "--once", "--format", "json")
    (rejected,) = reports(fedkb_device(proxy.url, home, *flags))
    assert rejected["action"] == "model_rejected" and rejected["model_version"] == 2, rejected
    assert "trainable.tflite" in rejected["reasons"][0]
    # The keyboard follows version 2 (its check-in fetched the inference model, intact), but the
    # corrupted trainable model never landed, and version 1 is whole.
    v2 = home / "models" / "v2"
    assert models_state(home) == {"current": 2, "previous": 1}
    assert not (v2 / "trainable.tflite").exists() and no_leftovers(home)
    verify_files(v2, load_manifest(v2), SUGGESTION_FILES)
    verify_files(v1, load_manifest(v1))
    assert status(server.url)["totals"]["accepted"] == 1  # nothing trained on a model that failed its check

    (fixed,) = reports(fedkb_device(server.url, home, *flags))  # a clean network: the same task now works
    assert fixed["action"] == "accepted" and fixed["model_version"] == 2, fixed
    assert models_state(home) == {"current": 2, "previous": 1}
    assert status(server.url)["totals"]["accepted"] == 2


def test_outage_during_upload_is_retried_and_counted_once(serve, proxies, text_file, tmp_path):
    server = serve()
    proxy = proxies(server.url)
    proxy.fail_uploads = 1  # the first attempt meets a 503
    proxy.drop_after_forward = 1  # the second reaches the server, but its answer is lost
    (report,) = reports(fedkb_device(proxy.url, tmp_path / "phone", "--state", ALL_MET, "--once", "--format", "json",
                                     text=text_file))
    # The third attempt is recognized as a repeat of the second.
    assert (report["action"], report["upload_attempts"]) == ("duplicate", 3), report
    assert (proxy.uploads_seen(), proxy.uploads_forwarded) == (3, 2)
    s = status(server.url)
    assert s["round"]["accepted_updates"] == 1 and s["totals"]["accepted"] == 1
    assert not any((tmp_path / "phone" / "outbox").glob("*"))


def test_forget_deletes_the_typed_text(serve, text_file, tmp_path):
    from edge_runtime.store import ExampleStore

    server = serve()
    home = tmp_path / "phone"
    reports(fedkb_device(server.url, home, "--state", "charging=0", "--once", "--format", "json", text=text_file))
    with ExampleStore(home / "examples.sqlite") as store:
        assert store.count() > 0
    out = fedkb_device(server.url, home, "--forget")
    assert out.returncode == 0 and "deleted" in out.stdout
    with ExampleStore(home / "examples.sqlite") as store:
        assert store.count() == 0
    assert text_file.read_text().splitlines()[0].encode() not in (home / "examples.sqlite").read_bytes()


def test_a_server_that_forgot_the_device_is_reported_not_fatal(serve, text_file, tmp_path):
    """A server whose state was reset answers 401: the device says so, tells the operator what to
    do, keeps its credentials (no silent re-enrollment) and, running long, keeps cycling."""
    old, reset = serve(), serve()  # `reset`: the same fleet's server after losing its state
    home = tmp_path / "phone"
    reports(fedkb_device(old.url, home, "--state", "charging=0", "--once", "--format", "json"))  # enrolls
    credentials = (home / CREDENTIALS_FILE).read_text()

    out = fedkb_device(reset.url, home, "--state", ALL_MET, "--once", text=text_file)
    assert out.returncode == 0 and out.stdout.startswith("error (reasons=unauthorized, message="), out.stderr[-2000:]
    assert f"delete {home / CREDENTIALS_FILE}" in out.stdout
    cycles = reports(fedkb_device(reset.url, home, "--state", ALL_MET, "--cycles", "2", "--poll", "0.01",
                                  "--format", "json"))
    assert [(c["action"], c["reasons"]) for c in cycles] == [("error", ["unauthorized"])] * 2  # it kept going
    assert (home / CREDENTIALS_FILE).read_text() == credentials
    assert status(reset.url)["totals"]["accepted"] == 0


@pytest.mark.parametrize("flags, message", [
    (("--server", "ftp://x"), "must be an http:// or https:// URL"),
    (("--threads", "0"), "--threads"),
    (("--cycles", "0"), "--cycles"),
    (("--state", "charging=maybe"), "--state"),
    (("--min-battery", "150"), "min_battery"),
    (("--poll", "1e300"), "--poll"),
    (("--limits", "/nonexistent/limits.json"), "--limits"),
    (("--model-signing-key", "/nonexistent/key.pem"), "cannot read the model signing key"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, message):
    args = ["--server", "http://127.0.0.1:9", "--home", str(tmp_path / "phone"), *flags]
    out = subprocess.run([sys.executable, "-m", "fedkb", "device", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("FEDKB_")})
    assert out.returncode == 2
    assert out.stderr.startswith("fedkb device: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "phone").exists()  # refused before anything was written


def test_help_names_every_flag():
    out = subprocess.run([sys.executable, "-m", "fedkb", "device", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--server", "--home", "--text", "--state", "--once", "--enrollment-secret", "--min-battery",
                 "--min-new-examples", "--threads", "--forget"):
        assert flag in out.stdout


# The Device in-process (scripted state, fast retries) -------------------------------------

def _device(url: str, home: Path, provider, **config) -> Device:
    client = ServerClient(url, retry=RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0), sleep=lambda s: None)
    device = Device(DeviceConfig(server_url=url, home=home, seed=5, **config), state=provider, client=client)
    device.ensure_enrolled(SECRET)
    return device


_renames: list[tuple[str, str]] | None = None


def _record_rename(event: str, args: tuple) -> None:
    if event == "os.rename" and _renames is not None:  # os.replace raises this audit event too
        _renames.append((os.fsdecode(args[0]), os.fsdecode(args[1])))


sys.addaudithook(_record_rename)  # audit hooks cannot be removed; it records only while _renames is set


def test_an_update_survives_a_long_outage_in_the_outbox(serve, proxies, text_file, tmp_path):
    global _renames
    server = serve()
    proxy = proxies(server.url)
    device = _device(proxy.url, tmp_path / "phone", ScriptedDeviceState(state()))
    outbox = tmp_path / "phone" / "outbox"
    try:
        device.import_text(text_file)
        proxy.fail_uploads = 2  # every attempt of this cycle fails
        _renames = []
        try:
            report = device.run_once()
            into_outbox = [Path(dst).name for _, dst in _renames if Path(dst).parent == outbox]
        finally:
            _renames = None
        assert report.action == "upload_failed" and report.round_id == 1
        # The body is in place before its record: a record never describes a body that is not there.
        assert into_outbox == ["1.safetensors", "1.json"]
        assert [p.name for p in outbox.glob("*.safetensors")] == ["1.safetensors"]
        assert status(server.url)["totals"]["accepted"] == 0

        before = len(proxy.requests)
        report = device.run_once()  # the network is back: the kept bytes go out, nothing is retrained
        assert (report.action, report.round_id) == ("accepted", 1), report
        assert [r for r in proxy.requests[before:] if "checkin" in r] == []  # this cycle's work was the upload
        assert not any((tmp_path / "phone" / "outbox").glob("*"))
        assert status(server.url)["totals"]["accepted"] == 1
        assert device.run_once().action == "ineligible"  # its examples count as trained now
    finally:
        device.close()


def test_interrupted_device_resumes_to_the_same_update(serve, text_file, tmp_path):
    server = serve()
    # Reads per cycle before training: may_start, can_run, check-in; then one per training step.
    interrupted = ScriptedDeviceState.sequence([state()] * (3 + 4) + [state(charging=False)])
    device = _device(server.url, tmp_path / "interrupted", interrupted)
    straight = _device(server.url, tmp_path / "straight", ScriptedDeviceState(state()))
    try:
        for d in (device, straight):
            d.import_text(text_file)
        report = device.run_once()
        assert (report.action, report.steps, report.reasons) == ("interrupted", 4, ("not_charging",))
        assert (tmp_path / "interrupted" / "job.safetensors").exists()
        assert status(server.url)["totals"]["accepted"] == 0

        device.state = device.scheduler.state = ScriptedDeviceState(state())  # plugged in again
        resumed = device.run_once()
        assert resumed.action == "accepted" and not (tmp_path / "interrupted" / "job.safetensors").exists()
        whole = straight.run_once()
        assert whole.action == "accepted"
        # Same seed, same text, same round: the resumed job's update is the uninterrupted one's.
        assert resumed.steps + 4 == whole.steps
        assert (resumed.update_norm, resumed.num_examples, resumed.mean_loss) == (
            whole.update_norm, whole.num_examples, whole.mean_loss)
        assert status(server.url)["totals"]["accepted"] == 2
    finally:
        device.close()
        straight.close()


def _interrupted_device(server, text_file, tmp_path):
    """A device whose first job was checkpointed mid-way (charging stopped after a few steps);
    it meets every condition again afterwards."""
    interrupted = ScriptedDeviceState.sequence([state()] * (3 + 2) + [state(charging=False)])
    device = _device(server.url, tmp_path / "phone", interrupted)
    device.import_text(text_file)
    assert device.run_once().action == "interrupted"
    device.state = device.scheduler.state = ScriptedDeviceState(state())
    return device


def test_a_resumed_job_marks_only_the_messages_it_trained_on(serve, text_file, tmp_path):
    device = _interrupted_device(serve(), text_file, tmp_path)
    try:
        typed_meanwhile = ["meet me at the station", "bring the thousand natural shocks", "see you soon"]
        for text in typed_meanwhile:  # the job never saw these
            device.examples.add(text)

        assert device.run_once().action == "accepted"
        assert device.examples.new_examples() == len(typed_meanwhile)  # still waiting for the next job
    finally:
        device.close()


def test_a_checkpoint_for_another_task_of_the_same_round_is_not_resumed(serve, text_file, tmp_path):
    device = _interrupted_device(serve(), text_file, tmp_path)
    try:
        # Same round, other deadline (say, the server re-issued the task): the job starts afresh.
        store = device.scheduler.checkpoints
        old = store.load()
        store.save(dataclasses.replace(old, key=dataclasses.replace(old.key, deadline=old.key.deadline + 1.0)))
        assert device.run_once().action == "accepted"
    finally:
        device.close()


@pytest.mark.parametrize("report, delay", [
    (CycleReport("error", ("unauthorized",)), 30.0),  # a refusal backs off like an outage
    (CycleReport("error", ("model_rejected",)), 30.0),
    (CycleReport("wait", ("server_unavailable",), retry_after=30.0), 30.0),
    (CycleReport("wait", retry_after=5.0), 5.0),  # the server's pace steering
    (CycleReport("ineligible", ("not_charging",)), 30.0),
    (CycleReport("accepted"), 1.0),
])
def test_the_next_cycle_waits_as_the_last_one_ended(report, delay):
    assert next_delay(report, poll_seconds=30.0) == delay


def test_suggestions_follow_the_model_the_device_fetches(serve, proxies, text_file, tmp_path):
    server = serve(goal_clients=1)  # one update closes a round and publishes the next version
    proxy = proxies(server.url)
    home, prefix = tmp_path / "phone", "to be or not to"
    config = dict(policy=EligibilityPolicy(min_new_examples=0))
    device = _device(proxy.url, home, ScriptedDeviceState(state()), **config)
    try:
        assert (device.suggest(prefix), device.suggester.version) == ([], None)  # no model yet: an empty strip
        device.import_text(text_file)
        assert device.run_once().action == "accepted"
        assert device.suggester.version == 1 and len(device.suggest(prefix)) == 3
        wait_for(lambda: (s := status(server.url))["model_version"] == 2 and (s["round"] or {}).get("id") == 2,
                 what="version 2 published and round 2 open")

        # The keyboard keeps asking on its own thread while a cycle fetches version 2 and trains on
        # it. The download of version 2's inference model is held (in the proxy) until the keyboard
        # has been served three more times, so those answers come while the swap is under way.
        during_swap: dict = {}
        with Typist(lambda: device.suggest(prefix), device.suggester.reset) as typist:
            def hold(body: bytes) -> bytes:
                served = len(typist.results)
                typist.wait_for_more(3)
                during_swap.update(served=typist.results[served:], suggester=device.suggester.version,
                                   staging=leftover_temps(home / "models"), installed=device.models.has_version(2))
                return body

            proxy.rewrite["/v1/models/2/inference.tflite"] = hold
            typist.wait_for_more()
            report = device.run_once()
        assert (report.action, report.model_version) == ("accepted", 2), report
        assert during_swap.get("staging") and not during_swap["installed"], during_swap  # mid-download
        assert during_swap["suggester"] == 1 and len(during_swap["served"]) >= 3
        assert all(len(w) == 3 for w in during_swap["served"]), during_swap  # served, from version 1
        assert (device.suggester.version, device.models.current_version) == (2, 2)
        assert typist.errors == [] and typist.results and all(len(w) == 3 for w in typist.results)  # never blank
        assert len(device.suggest(prefix)) == 3
    finally:
        device.close()

    restarted = _device(server.url, home, ScriptedDeviceState(state()), **config)
    try:  # a restarted device serves the installed version at once, before any cycle
        assert restarted.suggester.version == 2 and len(restarted.suggest(prefix)) == 3
    finally:
        restarted.close()
