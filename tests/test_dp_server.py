"""A real server running DP-FedAvg rounds: unit weights over the fixed denominator, the adaptive
clip norm carried into the next round's tasks and across a restart, the device's pre-clip norm
counted, and the settings frozen on the round record for the accountant."""

from __future__ import annotations

import numpy as np
import requests
from safetensors.numpy import load_file

from aggregator.adaptive_clipping import next_clip_norm, unclipped_fraction
from aggregator.dp import DPGaussianSum
from aggregator.fedavg import WeightedSum
from fedkb_core.clipping import clip_by_global_norm, global_norm
from tests.fixtures_aggregator import (ADMIN, TINY_SHAPES, Device, make_server, random_deltas,  # noqa: F401
                                       status, wait_for, weights_model)

DP = dict(goal_clients=4, min_clients=2, dp_noise_multiplier=0.0, server_optimizer="sgd", server_lr=1.0)


def _run_round(server, deltas_list, *, reported=None, end=False):
    """Devices take tasks and upload; returns the round's task (as the devices saw it)."""
    tasks = []
    for i, deltas in enumerate(deltas_list):
        device = Device(server.url)
        assert device.enroll().status_code == 201
        task = device.task()
        tasks.append(task)
        # A real device clips to the task's norm and reports the norm before (edge_runtime).
        clipped, norm = clip_by_global_norm(deltas, task.clip_norm)
        meta = {"update_norm": norm if reported is None else reported[i]}
        r = device.upload(task.round_id, device.body(task, clipped, num_examples=3 + 15 * i, **meta))
        assert r.status_code == 200, r.text
    if end:
        r = requests.post(f"{server.url}/v1/admin/rounds/current/end", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
    return tasks[0]


def _version(server, v: int) -> dict:
    wait_for(lambda: status(server.url)["model_version"] == v, what=f"version {v}")
    return load_file(server.state.config.state_dir / "models" / str(v) / "weights.safetensors")


def test_a_short_dp_round_divides_the_unit_weight_sum_by_the_goal(make_server, weights_model):
    server = make_server(weights_model, clip_norm=0.5, **DP)
    updates = [random_deltas(TINY_SHAPES, 10 + i, scale=s) for i, s in enumerate((0.01, 0.3, 0.02))]
    task = _run_round(server, updates, end=True)  # 3 of the goal's 4, closed at the deadline
    w2 = _version(server, 2)
    expected = DPGaussianSum(WeightedSum(TINY_SHAPES), clip_norm=0.5, noise_multiplier=0.0, denominator=4)
    for deltas in updates:
        expected.add(deltas, 1)
    mean = expected.release(None)
    w1 = load_file(weights_model / "weights.safetensors")
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + mean[k], rtol=1e-5, atol=1e-6)
    last = status(server.url)["last_round"]
    assert (task.clip_norm, last["dp_noise_multiplier"], last["dp_update_noise_multiplier"], last["dp_denominator"],
            last["clip_norm"]) == (0.5, 0.0, 0.0, 4, 0.5)
    assert last["total_examples"] == 3  # unit weights: one per update, no example counts released
    assert last["dp_next_clip_norm"] is None  # fixed clipping


def test_adaptive_clip_norms_reach_the_next_rounds_tasks_and_survive_a_restart(make_server, weights_model, tmp_path):
    state = tmp_path / "dp-state"
    settings = dict(clip_norm=0.1, dp_adaptive_clipping=True, dp_target_quantile=0.5, dp_clip_learning_rate=0.5, **DP)
    server = make_server(weights_model, state_dir=state, **settings)
    rng = np.random.default_rng(0)
    clip, seen = 0.1, []
    for rnd in range(3):
        updates = [random_deltas(TINY_SHAPES, 100 * rnd + i, scale=float(rng.uniform(0.005, 0.05))) for i in range(4)]
        # Each device reports its norm before it clipped; the third claims one above any clip, so it
        # counts as clipped although what the server receives fits under C.
        reported = [None, None, 10.0, None]
        task = _run_round(server, updates, reported=[global_norm(d) if r is None else r
                                                     for d, r in zip(updates, reported)])
        assert task.clip_norm == clip  # the norm the previous round chose
        seen.append(task.clip_norm)
        _version(server, rnd + 2)
        unclipped = sum(global_norm(d) <= clip and r is None for d, r in zip(updates, reported))
        clip = next_clip_norm(clip, unclipped_fraction(unclipped, 4, expected=4, stddev=0.0, rng=None),
                              target_quantile=0.5, learning_rate=0.5)
        assert status(server.url)["last_round"]["dp_next_clip_norm"] == clip
        if rnd == 1:  # restart on the same state: the sequence goes on from the database
            server.stop()
            server = make_server(weights_model, state_dir=state, **settings)
    assert len(set(seen)) == 3
    assert wait_for(lambda: (r := status(server.url)["round"]) and r["id"] == 4 and r)["clip_norm"] == clip
