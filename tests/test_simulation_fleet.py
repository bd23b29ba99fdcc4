"""Fleet emulation: devices that are the real edge runtime, and `fedkb simulate` end to end.

A real `fedkb serve` process, each emulated phone the edge runtime's own `Device` cycle with
LiteRT training, the scheduler reading each device's simulated daily state before every step.
The fleet knows its server only over HTTP: a test traces every file the fleet's processes touch
and finds none of the server's. The CLI tests run the installed entry point on a tiny model so a
whole simulation takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datasets.prepared import load_prepared
from datasets.windows import make_windows
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.eligibility import can_continue
from edge_runtime.litert_model import TrainableCache
from edge_runtime.model_store import ModelStore
from edge_runtime.trainer import TrainingJob
from fedkb_core.manifest import TRAINABLE_FILE, FileEntry, load_manifest, write_manifest
from fedkb_core.protocol import RoundTask, to_json
from simulation.availability import HOUR, AvailabilityConfig, DailyPattern
from simulation.device_job import ALWAYS_ELIGIBLE, DeviceJob, emulated_device, job_steps, run_device_job
from simulation.fleet import POLICY, FleetConfig, ServerProcess
from tests.conftest import write_jsonl
from tests.fixtures_model import *  # noqa: F401,F403
from tests.fixtures_model import seed_initial_model

JOB_SECONDS = 2 * HOUR
AVAILABILITY = AvailabilityConfig()


def _find_time(pattern: DailyPattern, *, stays: bool) -> float:
    """A simulated time when the device is eligible and, `stays` or not, still is after the job."""
    for t in np.arange(0, 10 * 24 * HOUR, 600.0):
        ok = [can_continue(pattern.state_at(t + f * JOB_SECONDS, AVAILABILITY), POLICY).eligible
              for f in np.linspace(0, 1, 9)]
        if ok[0] and (all(ok) if stays else not ok[4]):  # not stays: gone by mid-job
            return float(t)
    raise AssertionError("no such time in ten simulated days")


@pytest.fixture
def server(tiny_model, tmp_path):
    fleet = FleetConfig(clients=2, clients_per_round=2, min_clients=2, max_examples=40, workers=1)
    server = ServerProcess(state=tmp_path / "server", init_model=tiny_model, log_path=tmp_path / "server.log",
                           config=fleet)
    yield server
    server.stop()


def test_device_whose_night_ends_mid_job_drops_out_and_one_that_stays_uploads(server, tiny_model, tiny_data, tmp_path):
    tokens = next(iter(load_prepared(tiny_data).train.values()))
    pattern = DailyPattern(device_index=3, utc_offset_hours=1.0, seed=7)
    store = ModelStore(tmp_path / "fleet_models")
    results, homes = {}, {}
    for stays in (False, True):
        homes[stays] = tmp_path / "homes" / str(stays)
        device = emulated_device(server.url, homes[stays], tokens, state=ScriptedDeviceState(ALWAYS_ELIGIBLE),
                                 models=store)
        try:
            device.ensure_enrolled(server.secret)
            task = device.request_task()  # a phone that only trains fetches its model with the task
        finally:
            device.close()
        assert isinstance(task, RoundTask), task
        assert store.current_version is None
        steps = job_steps(tokens, seq_len=load_manifest(tiny_model).seq_len, task=task)
        results[stays] = run_device_job(DeviceJob(
            server.url, str(homes[stays]), to_json(task), tokens, str(tmp_path / "workers"), seed=1,
            pattern=pattern, availability=AVAILABILITY, sim_start=_find_time(pattern, stays=stays),
            job_seconds=JOB_SECONDS, steps=steps, policy=POLICY))
    dropped, finished = results[False], results[True]
    assert dropped.status == "dropped" and 0 < dropped.steps < finished.steps == steps, (dropped, finished)
    assert dropped.upload_bytes == 0
    assert (homes[False] / "job.safetensors").is_file(), "an interrupted device keeps its job to resume"
    assert finished.status == "accepted" and finished.upload_bytes > 0
    assert not (homes[True] / "outbox").exists() or not any((homes[True] / "outbox").iterdir())
    assert server.status()["round"]["accepted_updates"] == 1  # only the phone that stayed on its charger


def test_a_workers_devices_share_one_warm_interpreter_that_starts_every_job_from_the_versions_weights(
        tiny_model, tmp_path):
    cache = TrainableCache()
    model, weights = cache.load(tiny_model)
    task = RoundTask(round_id=1, model_version=1, learning_rate=1.0, epochs=1, batch_size=model.batch_size,
                     max_examples=8, clip_norm=1.0, deadline=float("inf"))
    windows = make_windows(np.arange(4, 60, dtype=np.int32), model.seq_len)
    job = TrainingJob(model, weights, windows, task, seed=0)
    for step in range(job.total_steps):  # one device's job trains the shared interpreter's weights away
        job.run_step(step)
    again, weights_again = cache.load(tiny_model)
    assert again is model and cache.loads == 1
    for name, value in weights.items():  # the next device starts from the version's weights, not those
        np.testing.assert_array_equal(weights_again[name], value)
    assert any(not np.array_equal(model.get_weights()[k], weights[k]) for k in weights)
    copy = shutil.copytree(tiny_model, tmp_path / "another_device" / "v1")
    assert cache.load(copy)[0] is model and cache.loads == 1  # another device's copy of the same file
    other = shutil.copytree(tiny_model, tmp_path / "v2")
    manifest = load_manifest(other)
    write_manifest(other, dataclasses.replace(manifest, files={
        **manifest.files, TRAINABLE_FILE: FileEntry("0" * 64, manifest.files[TRAINABLE_FILE].bytes)}))
    assert cache.load(other)[0] is not model and cache.loads == 2  # another trainable file: another version


def _simulate(args, cwd, timeout=600):
    fedkb = Path(sys.executable).with_name("fedkb")
    return subprocess.run([str(fedkb), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--clients", "5", "--clients-per-round", "6"], "--clients-per-round (6) cannot exceed --clients (5)"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--dataset", "wikipedia"], "unknown dataset 'wikipedia'"),
    (["--server-momentum", "0.9"], "--server-momentum applies to --server-optimizer sgd"),
    (["--dataset", "jsonl:/nonexistent/users.jsonl"], "/nonexistent/users.jsonl"),
    (["--over-selection", "0.5"], "--over-selection must be at least 1.0, got 0.5"),
    (["--job-minutes", "-1"], "--job-minutes must not be negative, got -1.0"),
])
def test_bad_settings_fail_at_once_with_one_line(args, message, tmp_path):
    result = _simulate(["simulate", "--out", str(tmp_path / "out"), *args], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # progress logs may precede the error line
    assert last.startswith("fedkb simulate: error:") and message in last and "Traceback" not in result.stderr, \
        result.stderr


def test_unwritable_out_fails_at_once(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _simulate(["simulate", "--out", str(blocker / "out")], tmp_path, timeout=120)
    assert result.returncode == 2 and "cannot create the output folder" in result.stderr, result.stderr


TINY_FLAGS = ["--embed-dim", "8", "--lstm-units", "16", "--batch-size", "4", "--seq-len", "6", "--vocab-size", "60",
              "--max-examples", "16", "--eval-windows", "32", "--eval-words", "20"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "users.jsonl", clients=12, lines_per_client=10)


@pytest.fixture(scope="module")
def simulated(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    result = _simulate(["simulate", "--dataset", f"jsonl:{corpus}", "--out", str(out), "--clients", "8",
                        "--clients-per-round", "3", "--rounds", "3", "--workers", "2", "--round-hours", "0.5",
                        "--device-lr", "1.0", *TINY_FLAGS], out.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_simulate_writes_report_plot_and_summary(simulated):
    out, result = simulated
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds:
        assert {"round", "model_version", "clients", "eval", "participation"} <= set(r)
        assert {"token_perplexity", "word_perplexity", "top1", "top3"} <= set(r["eval"])
    completed = [r for r in rounds[1:] if r["clients"] > 0]
    assert completed, rounds
    # Every completed round publishes the next version; participation adds up.
    versions = [r["model_version"] for r in rounds]
    assert versions == sorted(versions) and versions[-1] == 1 + len(completed)
    for r in rounds[1:]:
        p = r["participation"]
        assert p["selected"] <= p["eligible"] and r["clients"] == p["completed"] <= p["selected"]
        assert p["completed"] + p["dropped"] + p["late"] + p["rejected"] <= p["selected"]
    assert rounds[-1]["eval"]["word_perplexity"] < rounds[0]["eval"]["word_perplexity"]
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert f"report: {out / 'report.json'}" in result.stdout and "word perplexity" in result.stdout


def test_tff_backend_writes_the_same_report_shape_and_leaves_no_worker(simulated, corpus, tmp_path):
    import psutil

    before = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "worker_binary"}
    out, _ = simulated
    tff_out = tmp_path / "tff"
    result = _simulate(["simulate", "--data", str(out / "data"), "--backend", "tff", "--out", str(tff_out),
                        "--clients", "8", "--clients-per-round", "3", "--rounds", "2", *TINY_FLAGS], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tff_out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert set(report["rounds"][1]["eval"]) == set(json.loads((out / "report.json").read_text())["rounds"][1]["eval"])
    after = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "worker_binary"}
    assert after <= before, "a TFF worker_binary outlived `fedkb simulate --backend tff`"


def test_a_rerun_into_the_same_folder_uses_no_stale_model_versions(simulated, corpus, tmp_path):
    # The new server numbers versions from 1 again: a device's cached "version 3" from the first
    # run must not be trained on in the second. The first run is `simulated` (device lr 1.0), its
    # folder copied as it was left: data, initial model, server state and the devices' caches.
    first, _ = simulated
    out = shutil.copytree(first, tmp_path / "run", symlinks=True)
    stale = {m: json.loads(m.read_text())["files"] for m in (out / "device_cache").glob("**/v*/manifest.json")}
    assert any(m.parent.name != "v1" for m in stale), "the first run's devices cached no trained version"
    args = ["simulate", "--dataset", f"jsonl:{corpus}", "--out", str(out), "--clients", "8", "--clients-per-round",
            "3", "--rounds", "3", "--workers", "1", "--round-hours", "0.5", *TINY_FLAGS]
    result = _simulate([*args, "--device-lr", "0.3"], tmp_path)  # different training, so the versions differ
    assert result.returncode == 0, result.stderr

    def served(manifest: Path) -> dict | None:  # the same version number's files on the new server
        path = out / "server" / "models" / manifest.parent.name[1:] / "manifest.json"
        return json.loads(path.read_text())["files"] if path.is_file() else None

    # Had the rerun kept them, the first run's versions would show: one of its numbers means other files now.
    assert any(files != served(m) for m, files in stale.items() if m.parent.name != "v1"), "the runs' versions agree"
    cached = sorted((out / "device_cache").glob("**/v*/manifest.json"))  # the fleet's and every worker's
    assert cached, "the devices cached no model version"
    for manifest in cached:
        assert json.loads(manifest.read_text())["files"] == served(manifest), manifest


_FLEET_SCRIPT = """
import json, os, sys
from pathlib import Path
from datasets.prepared import load_prepared
from model.evaluation import EvalConfig
from simulation.availability import AvailabilityConfig
from simulation.fleet import FleetConfig, ServerAccess, run_fleet

config = FleetConfig(**json.loads(sys.argv[3]), eval=EvalConfig(max_windows=32, recall_samples=10),
                     availability=AvailabilityConfig(**json.loads(sys.argv[4])))
server = ServerAccess(os.environ["SIM_URL"], os.environ["SIM_SECRET"], os.environ["SIM_ADMIN"])
records = run_fleet(data=load_prepared(sys.argv[1]), model_dir=None, out=Path(sys.argv[2]), config=config,
                    server=server, progress=False)
print(json.dumps([[r.model_version, r.clients, r.eval.token_perplexity] for r in records]))
"""
# Every night lasts (almost) a whole day, on Wi-Fi and idle: every device can train every round.
ALWAYS_NIGHT = dict(night_hours=[23.9, 23.95], skip_night_probability=0.0, wifi_at_night_probability=1.0,
                    idle_fraction_of_night=1.0)


def _paths_touched(trace: Path, cwd: Path) -> set[Path]:
    """Every path a traced process passed to a file system call (open, stat, exec, ...)."""
    paths = set()
    for line in trace.read_text(errors="replace").splitlines():
        for arg in re.findall(r'"((?:[^"\\]|\\.)*)"', line):
            if "/" in arg or arg.startswith("."):
                paths.add(Path(os.path.normpath(cwd / arg)))  # an absolute arg stays as it is
    return paths


def test_the_fleet_never_touches_the_servers_state_folder(tiny_model, tiny_data, tmp_path):
    """The server keeps its state in `out/server`, exactly where the fleet's output goes and
    where a fleet reading model files behind the server's back would look; strace follows the
    fleet's process and its device workers and lists every path they hand to the kernel."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (Debian package `strace`; `make system-tools` installs it)")
    probe = subprocess.run([strace, "-f", "-qq", "-e", "trace=%file", "-o", os.devnull, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}")
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    fleet = dict(clients=4, clients_per_round=2, min_clients=2, rounds=2, workers=2, max_examples=16, job_minutes=0.0)
    server = ServerProcess(state=out / "server", init_model=tiny_model, log_path=tmp_path / "server.log",
                           config=FleetConfig(**fleet))
    trace = tmp_path / "trace.txt"
    try:
        env = {**os.environ, "SIM_URL": server.url, "SIM_SECRET": server.secret, "SIM_ADMIN": server.admin}
        result = subprocess.run([strace, "-f", "-qq", "-s", "4096", "-e", "trace=%file", "-o", str(trace),
                                 sys.executable, "-c", _FLEET_SCRIPT, str(tiny_data), str(out), json.dumps(fleet),
                                 json.dumps(ALWAYS_NIGHT)], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        final = server.status()["model_version"]
    finally:
        server.stop()
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r[0] for r in records] == [1, 2, 3] == list(range(1, final + 1)) and [r[1] for r in records] == [0, 2, 2]

    touched = _paths_touched(trace, cwd)
    state = (out / "server").resolve()
    assert (state / "models" / "3").is_dir(), "the server published its versions in its state folder"
    # The trace saw the fleet at work (its own model store, a phone's downloaded version) ...
    assert any(p.name == "trainable.tflite" and "homes" in p.parts for p in touched), "the trace missed the phones"
    assert any(p.name == "manifest.json" and "fleet" in p.parts for p in touched)
    # ... and never a path in the server's state folder.
    assert not [p for p in touched if p == state or state in p.parents]

    # The fleet evaluated the versions the server published: the same numbers from the server's own weights.
    from datasets.tokenizer import load_tokenizer, word_start_table
    from model.evaluation import EvalConfig, evaluate_weights
    from model.weights import load_weights

    data = load_prepared(tiny_data)
    for version, _, token_perplexity in records:
        weights = load_weights(state / "models" / str(version) / "weights.safetensors")
        expected = evaluate_weights(weights, data.heldout, word_start_table(load_tokenizer(data.tokenizer_path)),
                                    EvalConfig(max_windows=32, recall_samples=10)).token_perplexity
        assert token_perplexity == pytest.approx(expected, rel=1e-6), version


def test_sigterm_stops_the_simulation_with_its_server_and_workers(simulated, tmp_path):
    """A supervisor's SIGTERM (systemd, a CI timeout, `kill`) must not orphan the `fedkb serve`
    the simulation started, nor its device worker processes."""
    import psutil

    out, _ = simulated
    run = tmp_path / "run"
    # The initial model `simulated` exported for the same data and flags: this run starts its
    # server without converting one again (seed_initial_model says why that is the same run).
    seed_initial_model(run, out / "initial_model")
    fedkb = Path(sys.executable).with_name("fedkb")
    sim = subprocess.Popen([str(fedkb), "simulate", "--data", str(out / "data"), "--out", str(run),
                            "--clients", "8", "--clients-per-round", "3", "--rounds", "500", "--workers", "2",
                            "--round-hours", "0.5", *TINY_FLAGS], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: list[psutil.Process] = []
    try:
        parent = psutil.Process(sim.pid)
        deadline = time.monotonic() + 240
        # Running: the server has started and answered, and the device workers exist.
        while time.monotonic() < deadline and sim.poll() is None:
            children = parent.children(recursive=True)
            serving = [c for c in children if "serve" in c.cmdline()]
            if serving and len(children) >= 3:  # the server and the pool's spawned workers
                break
            time.sleep(0.5)
        assert sim.poll() is None, sim.stderr.read()
        assert any("serve" in c.cmdline() for c in children), [c.cmdline() for c in children]
        while not (run / "server" / "models" / "2").is_dir():  # into the rounds: one has published a version
            assert sim.poll() is None, sim.stderr.read()
            assert time.monotonic() < deadline, "no round published a version"
            time.sleep(0.1)
        children = parent.children(recursive=True)
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=120) == 130
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # a failing run leaves nothing behind either
        for process in [*children, sim]:
            try:
                process.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
