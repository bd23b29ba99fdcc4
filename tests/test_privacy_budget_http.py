"""ε spent, over HTTP, against a real server: status, public status, /metrics, and the target ε.

The expected figures are computed here with dp_accounting directly (the Poisson-subsampled
Gaussian composed k times at q = goal / N and δ = 1/N^1.1), not through fedkb's accountant: the
server must stop opening rounds at exactly the count that this independent computation allows.
"""

from __future__ import annotations

import logging
import sqlite3

import dp_accounting
import pytest
import requests
from dp_accounting.rdp import rdp_privacy_accountant

from aggregator.app import create_app
from aggregator.config import ConfigError
from aggregator.db import DB_FILE
from tests.fixtures_aggregator import (ADMIN, TINY_SHAPES, Device, ServerThread, make_server,  # noqa: F401
                                       random_deltas, server_overrides, status, wait_for, weights_model)

Z, GOAL, N = 1.0, 3, 30
DELTA = N ** -1.1


def _epsilon(rounds: int) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(GOAL / N, dp_accounting.GaussianDpEvent(Z)), rounds))
    return accountant.get_epsilon(DELTA)


def _dp(**extra) -> dict:
    return dict(goal_clients=GOAL, min_clients=GOAL, dp_noise_multiplier=Z, dp_population=N, **extra)


def _run_round(url: str, seed: int) -> None:
    """GOAL fresh devices upload to the open round; wait until its version is published."""
    wait_for(lambda: (status(url)["round"] or {}).get("state") == "open", what="a round to open")
    before = status(url)["model_version"]
    for i in range(GOAL):
        device = Device(url)
        assert device.enroll().status_code == 201
        task = device.task()
        assert device.upload(task.round_id, device.body(task, random_deltas(TINY_SHAPES, seed * 10 + i))).status_code == 200
    wait_for(lambda: status(url)["model_version"] > before, what="the round's version to be published")


@pytest.fixture
def worker_warnings():
    """The worker's warnings, as records (the server's own handler writes them to stderr)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("aggregator.worker")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _closed(url: str) -> int:
    return sum(r["state"] == "closed" for r in status(url)["rounds"])


def test_rounds_stop_opening_at_the_count_the_target_epsilon_allows(make_server, weights_model, worker_warnings):
    allowed = 3
    target = (_epsilon(allowed) + _epsilon(allowed + 1)) / 2  # 3 rounds fit, a 4th would not
    srv = make_server(weights_model, **_dp(dp_target_epsilon=target))
    for k in range(1, allowed + 1):
        _run_round(srv.url, k)
        spent = status(srv.url)["privacy"]["spent"]
        assert spent["rounds"] == k and spent["epsilon"] == pytest.approx(_epsilon(k), rel=1e-9)

    final = wait_for(lambda: (s := status(srv.url))["privacy"]["budget"]["state"] == "spent" and s, what="the budget")
    assert final["round"] is None and _closed(srv.url) == allowed
    budget = final["privacy"]["budget"]
    assert budget["target_epsilon"] == target and budget["next_round_epsilon"] == pytest.approx(_epsilon(allowed + 1))
    assert "privacy budget spent" in budget["message"] and "no round opens" in budget["message"]
    spent = final["privacy"]["spent"]
    assert (spent["delta"], spent["noise_multiplier"], spent["clip_norm"], spent["mechanism"]) == \
        (pytest.approx(DELTA), Z, 1.0, "dp-fedavg")
    assert spent["epsilon_without_amplification"] > spent["epsilon"] and f"q = {GOAL}/{N}" in spent["sampling"]

    # Devices are told to wait; no round opens however long the worker runs.
    device = Device(srv.url)
    device.enroll()
    reply = device.checkin().json()
    assert reply["action"] == "wait" and reply["reason"] == "no_open_round"
    assert srv.state.worker.run_once() is False and status(srv.url)["round"] is None
    logged = [r for r in worker_warnings if "privacy budget spent" in r.getMessage()]
    assert len(logged) == 1  # said once, not on every pass
    assert logged[0].next_round_epsilon == pytest.approx(_epsilon(allowed + 1))

    # Anyone may read what was spent; Prometheus gets the gauges.
    public = requests.get(f"{srv.url}/v1/status").json()["privacy"]
    assert public["spent"]["epsilon"] == pytest.approx(_epsilon(allowed)) and public["budget"]["state"] == "spent"
    assert public["spent"] == {k: v for k, v in spent.items() if k != "clip_norm"}  # the clip norm is the operator's
    metrics = requests.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("fedkb_privacy_")}
    assert gauges["fedkb_privacy_epsilon"] == pytest.approx(_epsilon(allowed))
    assert gauges["fedkb_privacy_delta"] == pytest.approx(DELTA)
    assert gauges["fedkb_privacy_epsilon_without_amplification"] == pytest.approx(spent["epsilon_without_amplification"])


def test_a_target_already_spent_is_refused_at_start_and_a_larger_one_resumes(make_server, weights_model, tmp_path):
    state = tmp_path / "state"
    srv = ServerThread(server_overrides(state, weights_model, **_dp()))
    try:
        for k in (1, 2):
            _run_round(srv.url, k)
    finally:
        srv.stop()
    rounds_before = _round_rows(state)

    with pytest.raises(ConfigError, match="is already spent: the 2 rounds released reach epsilon"):
        create_app(server_overrides(state, weights_model, **_dp(dp_target_epsilon=_epsilon(2) * 0.9)))
    with pytest.raises(ConfigError, match="below the epsilon of a single round"):
        create_app(server_overrides(tmp_path / "fresh", weights_model, **_dp(dp_target_epsilon=_epsilon(1) * 0.9)))
    with pytest.raises(ConfigError, match="needs dp_population"):
        create_app(server_overrides(tmp_path / "fresh2", weights_model, dp_noise_multiplier=Z, dp_target_epsilon=5.0))
    assert _round_rows(state) == rounds_before  # a refused start changes nothing

    # A budget with room for exactly one more round: it opens, closes, and none after it.
    resumed = make_server(weights_model, state_dir=state, **_dp(dp_target_epsilon=(_epsilon(3) + _epsilon(4)) / 2))
    _run_round(resumed.url, 3)
    wait_for(lambda: status(resumed.url)["privacy"]["budget"]["state"] == "spent", what="the budget")
    assert _closed(resumed.url) == 3 and status(resumed.url)["round"] is None


def test_without_dp_status_has_no_privacy_and_metrics_no_epsilon(make_server, weights_model):
    srv = make_server(weights_model)
    assert status(srv.url)["privacy"] is None and requests.get(f"{srv.url}/v1/status").json()["privacy"] is None
    metrics = requests.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert "fedkb_privacy_" not in metrics and "fedkb_rounds" in metrics


def _round_rows(state) -> list:
    with sqlite3.connect(state / DB_FILE) as conn:
        return conn.execute("SELECT id, state, published_version FROM rounds ORDER BY id").fetchall()
