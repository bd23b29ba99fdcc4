"""A DP-FTRL release survives kill -9 between computing its noise and publishing it: the tree's
seed is committed before the draw, the restarted server recomputes the same release from the
parent version's state, and the next release continues the same tree.

A real `fedkb serve` (gunicorn) runs with the test hook FEDKB_TEST_CRASH_AFTER_NOISE=1
(aggregator/worker.py), which SIGKILLs its process group right after the release was computed.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import requests
from safetensors.numpy import load_file

from aggregator.ftrl import DpFtrl, FtrlConfig
from aggregator.tree_aggregation import TreeConfig, TreeState
from aggregator.worker import CRASH_AFTER_NOISE
from fedkb_core.clipping import clip_by_global_norm
from tests.fixtures_aggregator import (ADMIN, SECRET, TINY_SHAPES, Device, ServeProcess, make_weights_model,
                                       random_deltas, status, wait_for)

ARGS = ("--goal-clients", "2", "--min-clients", "2", "--round-timeout", "120", "--clip-norm", "1.0",
        "--server-optimizer", "sgd", "--server-lr", "0.5", "--server-momentum", "0.9",
        "--dp-mechanism", "ftrl", "--dp-noise-multiplier", "0.8")
NAMES = sorted(TINY_SHAPES)


def _flat(tensors):
    return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in NAMES])


def _tree_seed(state) -> str | None:
    conn = sqlite3.connect(state / "fedkb.sqlite")
    try:
        row = conn.execute("SELECT seed FROM dp_tree_seeds WHERE tree_index = 0").fetchone()
    finally:
        conn.close()
    return None if row is None else row[0]


def _upload_round(server, updates):
    for deltas in updates:
        device = Device(server.url)
        assert device.enroll().status_code == 201
        task = device.task()
        r = device.upload(task.round_id, device.body(task, deltas))
        assert r.status_code == 200, r.text


def test_kill9_after_the_release_is_computed_republishes_it_and_the_tree_continues(tmp_path):
    model = make_weights_model(tmp_path / "model", seed=3)
    state = tmp_path / "state"
    env = {"FEDKB_ENROLLMENT_SECRET": SECRET, "FEDKB_ADMIN_TOKEN": ADMIN}
    rounds = [[random_deltas(TINY_SHAPES, 10 * r + i, scale=0.2) for i in range(2)] for r in range(2)]

    server = ServeProcess(state, model, *ARGS, log=tmp_path / "serve1.log", env={**env, CRASH_AFTER_NOISE: "1"})
    try:
        _upload_round(server, rounds[0])
        server.proc.wait(60)  # the hook's SIGKILL
        assert server.proc.returncode == -9
    finally:
        server.stop()
    seed = _tree_seed(state)
    assert seed is not None and len(seed) == 32  # committed before the draw
    assert not (state / "models" / "2").exists()  # nothing was released

    server = ServeProcess(state, None, *ARGS, log=tmp_path / "serve2.log", env=env, port=server.port)
    try:
        wait_for(lambda: status(server.url)["model_version"] == 2, what="version 2")
        wait_for(lambda: (status(server.url).get("round") or {}).get("state") == "open", what="round 2 open")
        _upload_round(server, rounds[1])
        wait_for(lambda: status(server.url)["model_version"] == 3, what="version 3")
        public = requests.get(f"{server.url}/v1/status", timeout=10).text + str(status(server.url))
    finally:
        server.stop()
    assert _tree_seed(state) == seed and seed not in public  # the same tree, its seed never shown

    straight = DpFtrl(TreeConfig(0.8 * 1.0, efficient=True), FtrlConfig(0.5, 0.9, denominator=2.0),
                      _flat(load_file(model / "weights.safetensors")), tree_state=TreeState(int(seed, 16)))
    noiseless = DpFtrl(TreeConfig(0.0), FtrlConfig(0.5, 0.9, denominator=2.0),
                       _flat(load_file(model / "weights.safetensors")), tree_state=TreeState(0))
    for version, updates in zip((2, 3), rounds):
        clipped_sum = sum(_flat(clip_by_global_norm(d, 1.0)[0]) for d in updates)
        published = _flat(load_file(state / "models" / str(version) / "weights.safetensors"))
        np.testing.assert_allclose(published, straight.round(clipped_sum), rtol=1e-5, atol=1e-6,
                                   err_msg=f"version {version}")
        assert np.std(published - noiseless.round(clipped_sum)) > 0.05  # the noise is really there
