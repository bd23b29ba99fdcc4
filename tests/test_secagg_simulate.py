"""`fedkb simulate --secure-aggregation` on the tiny setup: a real `fedkb serve --secure-aggregation`,
every emulated phone running every stage of every round with its own participant folder in its
home (simulation/secagg_round.py), the model published each round, and report.json counting the
phones at each stage consistently with what the server aggregated.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import simulation.fleet
from fedkb.cli import build_parser
from fedkb.commands.simulate import fleet_config_from_args
from fedkb_core.errors import FedkbError
from model.config import ModelConfig
from model.evaluation import EvalConfig
from simulation.availability import AvailabilityConfig
from simulation.device_job import JobResult
from simulation.fleet import FleetConfig, serve_arguments
from simulation.run import simulate
from tests.fixtures_model import TINY, tiny_config, tiny_data, tiny_model  # noqa: F401  (session fixtures)
from tests.test_simulation_fleet import ALWAYS_NIGHT

CLIENTS, GOAL, ROUNDS = 6, 4, 2  # over-selection 1.3: up to six tasks; the input stage closes at four uploads


def test_simulate_with_secure_aggregation_publishes_every_round_and_counts_every_stage(tiny_data, tiny_model,
                                                                                         tiny_config, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_model, out / "initial_model")  # the export simulate would make: spare its seconds
    fleet = FleetConfig(clients=CLIENTS, clients_per_round=GOAL, rounds=ROUNDS, workers=1, max_examples=16,
                        job_minutes=0.0, seed=0, secure_aggregation=True, eval=EvalConfig(seq_len=6, max_windows=16,
                                                                                          recall_samples=10),
                        availability=AvailabilityConfig(**ALWAYS_NIGHT))
    report = simulate(dataset="tiny", data_dir=tiny_data, out=out, fleet=fleet,
                      model=ModelConfig(vocab_size=tiny_config.vocab_size, **TINY), progress=False)

    assert report["summary"]["final_model_version"] == ROUNDS + 1, report["summary"]
    assert report["config"]["fleet"]["secure_aggregation"] is True
    assert report["rounds"][0]["secagg"] is None  # the initial model
    homes = sorted((out / "device_cache" / "homes").iterdir())
    assert len(homes) == CLIENTS
    tasks = math.ceil(GOAL * 1.3)  # the server's over-selection: six tasks a round
    for record in report["rounds"][1:]:
        s, participation = record["secagg"], record["participation"]
        assert s["selected"] == participation["selected"] == min(participation["eligible"], tasks), (s, participation)
        assert s["advertised"] == s["shared"] == s["selected"] > GOAL, s
        # The input stage closes at the goal: the over-selected phones come too late and drop out
        # (their next status says so: they do not even train).
        assert s["uploaded"] == s["unmasked"] == s["done"] == record["clients"] == participation["completed"] == GOAL, s
        assert s["dropped"] == {"advertising": 0, "sharing": 0, "input": s["selected"] - GOAL, "unmasking": 0}, s
        assert s["refused"] == {} and s["failed"] == 0 and s["abandoned"] is None, s
        # A round with fewer phones than tasks (one of the six is not eligible under this seed) never
        # fills, so the fleet ends advertising once they all advertised; every other stage closed by
        # itself once every phone that could act had acted.
        assert s["stages_ended_by_fleet"] == ([] if s["selected"] == tasks else ["advertising"]), s
        for stage in ("keys", "shares", "encode", "mask", "unmask"):
            assert s["cpu_ms"][stage]["total"] > 0 and s["cpu_ms"][stage]["max"] >= s["cpu_ms"][stage]["mean"] > 0, \
                (stage, s["cpu_ms"])
        # Every phone's SecAgg traffic is counted: keys, shares, inbox, upload, unmask, status requests.
        assert record["traffic"]["devices"] == s["selected"] and record["bytes_uploaded"] > 0, record["traffic"]
        assert record["examples"] > 0 and record["steps"] > 0
    # The grid as the server recorded it: the first round calibrates on the fixed 12-bit grid (r = 12 +
    # ceil(log2 6)), the next is tuned at 8 bits per value; on this tiny model no block overflowed.
    assert [r["secagg"]["grid"] for r in report["rounds"][1:]] == [
        {"modulus_bits": 15, "calibration": True, "blocks_left_out": []},
        {"modulus_bits": 8, "calibration": False, "blocks_left_out": []}]
    took_part = 0
    for home in homes:  # every phone forgot its rounds' secrets and encoded inputs
        left = sorted(p.name for p in (home / "secagg").iterdir()) if (home / "secagg").is_dir() else []
        assert left in ([], ["left.json", "seen-keys.json"]), (home, left)
        took_part += bool(left)
    assert took_part == max(r["secagg"]["selected"] for r in report["rounds"][1:])
    assert json.loads((out / "report.json").read_text())["rounds"][-1]["secagg"] == report["rounds"][-1]["secagg"]


def test_a_phone_that_dies_before_its_upload_leaves_the_fleet_to_end_input_and_the_round_still_publishes(
        tiny_data, tiny_model, tiny_config, tmp_path, monkeypatch):
    real_job, jobs = simulation.fleet.run_device_job, []

    def dies_first(job):  # workers=1: the jobs run in this process; the first phone's dies at once
        jobs.append(job.home)
        return JobResult(None, "dropped") if len(jobs) == 1 else real_job(job)

    monkeypatch.setattr(simulation.fleet, "run_device_job", dies_first)
    out = tmp_path / "run"
    shutil.copytree(tiny_model, out / "initial_model")
    fleet = FleetConfig(clients=CLIENTS, clients_per_round=GOAL, over_selection=1.0, rounds=1, workers=1,
                        max_examples=16, job_minutes=0.0, seed=0, secure_aggregation=True,
                        eval=EvalConfig(seq_len=6, max_windows=16, recall_samples=10),
                        availability=AvailabilityConfig(**ALWAYS_NIGHT))
    report = simulate(dataset="tiny", data_dir=tiny_data, out=out, fleet=fleet,
                      model=ModelConfig(vocab_size=tiny_config.vocab_size, **TINY), progress=False)
    (record,) = report["rounds"][1:]
    s = record["secagg"]
    assert record["model_version"] == 2 and record["clients"] == GOAL - 1, record
    assert s["selected"] == s["advertised"] == s["shared"] == GOAL, s  # the round filled: advertising closed itself
    # Input could not complete without the dead phone: the fleet ended it; its neighbours then gave
    # the shares of its mask key, and the others' inputs were unmasked.
    assert s["uploaded"] == s["unmasked"] == GOAL - 1, s
    assert s["dropped"] == {"advertising": 0, "sharing": 0, "input": 1, "unmasking": 0}, s
    assert s["stages_ended_by_fleet"] == ["input"] and s["abandoned"] is None, s
    assert s["done"] == GOAL, s  # the dead phone too, when it next asked: the round is over, forget it
    dead = Path(jobs[0]) / "secagg"
    assert sorted(p.name for p in dead.iterdir()) == ["left.json", "seen-keys.json"]


def _fleet(tmp_path, *argv):
    return fleet_config_from_args(build_parser().parse_args(["simulate", "--out", str(tmp_path / "sim"), *argv]))


def test_simulate_passes_its_secure_aggregation_settings_to_the_server(tmp_path):
    fleet = _fleet(tmp_path, "--clients", "40", "--clients-per-round", "10", "--secure-aggregation",
                   "--secagg-tolerated-dropout", "0.3", "--secagg-degree", "8", "--secagg-stage-timeout", "30")
    assert (fleet.secure_aggregation, fleet.secagg_tolerated_dropout, fleet.secagg_degree,
            fleet.secagg_stage_timeout) == (True, 0.3, 8, 30.0)
    assert (fleet.update_encoding, fleet.update_bits) == ("secagg", 8)  # the tuned grid (no DP)
    args = serve_arguments(fleet)
    for flag, value in (("--secagg-tolerated-dropout", "0.3"), ("--secagg-degree", "8"),
                        ("--secagg-stage-timeout", "30.0"), ("--update-encoding", "secagg")):
        assert args[args.index(flag) + 1] == value
    assert "--secure-aggregation" in args
    plain = serve_arguments(_fleet(tmp_path))
    assert not [a for a in plain if a.startswith("--secagg") or a == "--secure-aggregation"]


@pytest.mark.parametrize("argv, message", [
    (("--secure-aggregation", "--backend", "tff"), "--secure-aggregation runs on --backend fedkb only"),
    (("--secure-aggregation", "--update-encoding", "hadamard"), "cannot be used with it"),
    (("--secure-aggregation", "--clients-per-round", "2", "--clients", "10"), "min_clients >= 2"),
])
def test_simulate_refuses_secure_aggregation_settings_it_cannot_run(tmp_path, argv, message):
    with pytest.raises(FedkbError, match=message):
        _fleet(tmp_path, *argv)
