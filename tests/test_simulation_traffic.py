"""What the emulated phones move over HTTP, as report.json counts it and as the wire carried it.

A real `fedkb serve` behind a `RecordingProxy` that only the phones talk to (the fleet's own
status calls and evaluation downloads go to the server directly, `ServerAccess.operator_url`):
the report's per-round byte and request counts, summed, are what the proxy saw pass, body byte
for body byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets.prepared import load_prepared
from model.evaluation import EvalConfig
from simulation.availability import AvailabilityConfig
from simulation.fleet import FleetConfig, ServerAccess, ServerProcess, run_fleet
from tests.fixtures_edge import RecordingProxy
from tests.fixtures_model import *  # noqa: F401,F403

# Every night lasts (almost) a whole day, on Wi-Fi and idle: every device can train every round.
ALWAYS_NIGHT = AvailabilityConfig(night_hours=(23.9, 23.95), skip_night_probability=0.0,
                                  wifi_at_night_probability=1.0, idle_fraction_of_night=1.0)
ENROLLMENT = {("POST", "/v1/devices"), ("GET", "/v1/models/signing-key")}  # before round 1: in no round


@pytest.fixture
def fleet_run(tiny_model, tiny_data, tmp_path):
    """Three rounds of four phones (two per round) through the proxy: (records, exchanges)."""
    config = FleetConfig(clients=4, clients_per_round=2, min_clients=2, rounds=3, workers=1, max_examples=16,
                         job_minutes=0.0, availability=ALWAYS_NIGHT, eval=EvalConfig(max_windows=16, recall_samples=5))
    server = ServerProcess(state=tmp_path / "server", init_model=tiny_model, log_path=tmp_path / "server.log",
                           config=config)
    proxy = RecordingProxy(server.url)
    try:
        access = ServerAccess(proxy.url, server.secret, server.admin, operator_url=server.url)
        records = run_fleet(data=load_prepared(tiny_data), model_dir=None, out=tmp_path / "out", config=config,
                            server=access, progress=False)
        exchanges = proxy.exchanges()
    finally:
        proxy.stop()
        server.stop()
    return records, exchanges


def test_the_reports_bytes_are_what_the_phones_moved_over_the_wire(fleet_run):
    records, exchanges = fleet_run
    assert [r.model_version for r in records] == [1, 2, 3, 4] and all(r.clients == 2 for r in records[1:])
    rounds = [e for e in exchanges if (e.request.method, e.request.path) not in ENROLLMENT]
    late = [e for e in rounds if e.status == 409]  # over-selected: the round had closed (`round_closed`)
    assert all(e.status in (200, 304) for e in rounds if e not in late)
    assert all(e.request.path.endswith("/updates") and b"round_closed" in e.body for e in late)
    assert sum(r.traffic["requests"] for r in records) == len(rounds)
    assert sum(r.bytes_uploaded for r in records) == sum(len(e.request.body) for e in rounds)
    assert sum(r.bytes_downloaded for r in records) == sum(len(e.body) for e in rounds)
    for r in records[1:]:
        t = r.traffic
        assert t["bytes_uploaded"]["total"] == r.bytes_uploaded and t["bytes_downloaded"]["total"] == r.bytes_downloaded
        assert t["devices"] >= r.clients and t["requests"] >= 2 * t["devices"]  # a check-in each, and more
        for key in ("bytes_uploaded", "bytes_downloaded"):
            assert t[key]["max"] * t["devices"] >= t[key]["total"] >= t[key]["max"] >= t[key]["mean"] > 0
    updates = [e for e in rounds if e.request.path.endswith("/updates")]
    assert len(updates) == sum(r.participation.completed + r.participation.late for r in records)
    assert sum(r.bytes_uploaded for r in records) > sum(len(e.request.body) for e in updates)  # and check-ins
    assert records[0].traffic["devices"] == 0 and records[0].bytes_downloaded == 0  # round 0: no phone yet

    # What the phones fetched: no inference model (they only train), each version's trainable model
    # once per phone that trained on it, the tokenizer once per phone (later versions link it).
    paths = [e.request.path for e in rounds if e.request.method == "GET"]
    assert not [p for p in paths if p.endswith("/inference.tflite")]
    trainables = [p for p in paths if p.endswith("/trainable.tflite")]
    assert len(trainables) == len(updates)  # one per job: a phone trains on each version once at most
    trained = {_authorization(e.request.head) for e in updates}
    assert len([p for p in paths if p.endswith("/tokenizer.model")]) == len(trained) > 1


def _authorization(head: bytes) -> bytes:
    (line,) = [line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization:")]
    return line
