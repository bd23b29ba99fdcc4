"""DP-FTRL as a server mode (`--dp-mechanism ftrl`) on a real server over HTTP: the published
versions are the DP-FTRL models of the rounds' clipped unit-weight sums (noise off, with momentum
and tree restarts carried from version to version); with the noise on, a server stopped and
started mid-stream publishes exactly the uninterrupted tree's models (same noise, no fresh draw);
the minimum separation keeps a device out of the next round."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import requests
from safetensors.numpy import load_file

from aggregator.ftrl import DpFtrl, FtrlConfig
from aggregator.tree_aggregation import TreeConfig, TreeState
from fedkb_core.clipping import clip_by_global_norm
from tests.fixtures_aggregator import (TINY_SHAPES, Device, ServerThread, random_deltas, server_overrides, status,
                                       wait_for)
from tests.fixtures_aggregator import make_server, weights_model  # noqa: F401

NAMES = sorted(TINY_SHAPES)
FTRL = dict(goal_clients=2, min_clients=2, server_optimizer="sgd", server_lr=0.5, server_momentum=0.9,
            dp_mechanism="ftrl", clip_norm=1.0)


def _flat(tensors):
    return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in NAMES])


def _run_round(server, version, seeds):
    """Two fresh devices upload; return the round's clipped sum (unit weights) once v+1 is out."""
    wait_for(lambda: (status(server.url).get("round") or {}).get("state") == "open", what="an open round")
    total = 0.0
    for i, seed in enumerate(seeds):
        device = Device(server.url)
        assert device.enroll().status_code == 201
        task = device.task()
        deltas = random_deltas(TINY_SHAPES, seed, scale=0.2)  # norm ~2: clipped to 1
        r = device.upload(task.round_id, device.body(task, deltas, num_examples=3 + 40 * i))
        assert r.status_code == 200, r.text
        total = total + _flat(clip_by_global_norm(deltas, 1.0)[0])
    wait_for(lambda: status(server.url)["model_version"] == version + 1, what=f"version {version + 1}")
    return total


def _published(server, version):
    return load_file(server.state.config.state_dir / "models" / str(version) / "weights.safetensors")


def test_noise_off_versions_are_dp_ftrl_with_momentum_and_restarts(make_server, weights_model):  # noqa: F811
    server = make_server(weights_model, dp_noise_multiplier=0.0, dp_tree_restart_period=2, **FTRL)
    expected = DpFtrl(TreeConfig(0.0, restart_period=2), FtrlConfig(0.5, 0.9, denominator=2.0),
                      _flat(load_file(weights_model / "weights.safetensors")), tree_state=TreeState(seed=0))
    for version in range(1, 5):
        clipped_sum = _run_round(server, version, (10 * version, 10 * version + 1))
        np.testing.assert_allclose(_flat(_published(server, version + 1)), expected.round(clipped_sum),
                                   rtol=1e-5, atol=1e-6, err_msg=f"version {version + 1}")
    # The state holds the noiseless running sum: it stays on the server, never among the files served.
    assert requests.get(f"{server.url}/v1/models/5/optimizer.safetensors").status_code == 404
    state = load_file(server.state.config.state_dir / "models" / "5" / "optimizer.safetensors")
    assert state["dp_ftrl/tree"].tolist() == [2, 0, 4]  # two restarts; the next release is leaf 0 of tree 2
    conn = sqlite3.connect(server.state.config.state_dir / "fedkb.sqlite")
    try:  # both finished trees' seeds are forgotten; tree 2's is drawn at its first release
        assert conn.execute("SELECT tree_index FROM dp_tree_seeds").fetchall() == []
    finally:
        conn.close()


def test_a_server_restart_mid_stream_publishes_the_uninterrupted_trees_noise(tmp_path, weights_model):  # noqa: F811
    overrides = server_overrides(tmp_path / "state", weights_model, dp_noise_multiplier=0.7, **FTRL)
    sums, server = [], ServerThread(overrides)
    try:
        for version in (1, 2):
            sums.append(_run_round(server, version, (version, 100 + version)))
    finally:
        server.stop()
    server = ServerThread(overrides)  # same state folder: the tree continues from version 3's state
    try:
        for version in (3, 4):
            sums.append(_run_round(server, version, (version, 100 + version)))
        published = [_flat(_published(server, v)) for v in (2, 3, 4, 5)]
    finally:
        server.stop()
    conn = sqlite3.connect(tmp_path / "state" / "fedkb.sqlite")
    try:
        (seed,), = conn.execute("SELECT seed FROM dp_tree_seeds WHERE tree_index = 0").fetchall()
    finally:
        conn.close()

    straight = DpFtrl(TreeConfig(0.7 * 1.0, efficient=True), FtrlConfig(0.5, 0.9, denominator=2.0),
                      _flat(load_file(weights_model / "weights.safetensors")), tree_state=TreeState(int(seed, 16)))
    noiseless = DpFtrl(TreeConfig(0.0), FtrlConfig(0.5, 0.9, denominator=2.0),
                       _flat(load_file(weights_model / "weights.safetensors")), tree_state=TreeState(0))
    for i, (clipped_sum, got) in enumerate(zip(sums, published)):
        np.testing.assert_allclose(got, straight.round(clipped_sum), rtol=1e-5, atol=1e-6, err_msg=f"release {i}")
        noise = got - noiseless.round(clipped_sum)
        assert np.std(noise) > 0.05  # the noise is really there (std 0.35·(momentum terms) per release)


def test_min_separation_keeps_a_device_out_of_the_next_release_and_the_account_uses_it(
        make_server, weights_model):  # noqa: F811
    from fedkb_core.privacy_accounting import dp_ftrl_spent

    server = make_server(weights_model, dp_noise_multiplier=1.0, dp_min_separation=1, dp_population=10,
                         **{**FTRL, "goal_clients": 1, "min_clients": 1})
    alice, bob = Device(server.url), Device(server.url)
    assert alice.enroll().status_code == 201 and bob.enroll().status_code == 201
    # (who trains, who was in the release just before and is refused): alice may come back after one
    # release without her, bob never gets two releases in a row.
    for version, (trainer, refused) in enumerate(((alice, None), (bob, alice), (alice, bob)), start=1):
        wait_for(lambda: (status(server.url).get("round") or {}).get("state") == "open", what="an open round")
        if refused is not None:
            r = refused.checkin()
            assert r.json()["action"] == "wait" and r.json()["reason"] == "min_separation", r.text
        task = trainer.task()
        assert trainer.upload(task.round_id, trainer.body(task, random_deltas(TINY_SHAPES, version))).status_code == 200
        wait_for(lambda: status(server.url)["model_version"] == version + 1, what=f"version {version + 1}")
    spent = status(server.url)["privacy"]["spent"]
    expected = dp_ftrl_spent(noise_multiplier=1.0, clip_norm=1.0, rounds=3, min_separation=1, population=10)
    assert spent["mechanism"] == "dp-ftrl" and spent["accountant"] == expected.accountant
    assert spent["epsilon"] == pytest.approx(expected.epsilon) and spent["rounds"] == 3


@pytest.mark.parametrize("overrides, message", [
    ({"dp_mechanism": "ftrl", "dp_noise_multiplier": 1.0, "server_optimizer": "adam"}, "set server_optimizer sgd"),
    ({"dp_mechanism": "ftrl"}, "dp_mechanism ftrl needs differential privacy on"),
    ({"dp_mechanism": "tree", "dp_noise_multiplier": 1.0}, "dp_mechanism must be fedavg or ftrl"),
    ({"dp_min_separation": 2, "dp_noise_multiplier": 1.0}, "dp_min_separation applies to dp_mechanism ftrl only"),
    ({"dp_mechanism": "ftrl", "dp_noise_multiplier": 1.0, "server_optimizer": "sgd", "dp_min_separation": -1},
     "dp_min_separation must be an integer >= 0"),
    ({"dp_mechanism": "ftrl", "dp_noise_multiplier": 1.0, "server_optimizer": "sgd", "dp_tree_restart_period": 0},
     "dp_tree_restart_period must be an integer >= 1"),
    ({"dp_mechanism": "ftrl", "dp_noise_multiplier": 1.0, "server_optimizer": "sgd", "dp_adaptive_clipping": True},
     "dp_adaptive_clipping is not supported with dp_mechanism ftrl"),
])
def test_settings_dp_ftrl_cannot_honour_are_refused_at_start(tmp_path, overrides, message):
    from aggregator.config import AggregatorConfig, ConfigError

    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(state_dir=tmp_path, enrollment_secret="s", admin_token="a", **overrides)
