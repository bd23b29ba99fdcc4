"""A private round is released with one noise draw, even across kill -9 between the draw and the
publication: the seed is committed before the draw and reused after a restart.

A real `fedkb serve` (gunicorn) runs with the test hook FEDKB_TEST_CRASH_AFTER_NOISE=1
(aggregator/worker.py), which SIGKILLs its whole process group right after the round's noise was
drawn, before anything is published; the restarted server must publish exactly what the persisted
seed gives for the known updates.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import requests
from safetensors.numpy import load_file

from aggregator.adaptive_clipping import next_clip_norm, unclipped_fraction, update_noise_multiplier
from aggregator.dp import COUNT_NOISE, UPDATE_NOISE, DPGaussianSum, noise_generator
from aggregator.fedavg import WeightedSum
from aggregator.worker import CRASH_AFTER_NOISE
from fedkb_core.clipping import global_norm
from tests.fixtures_aggregator import (ADMIN, SECRET, TINY_SHAPES, Device, ServeProcess, make_weights_model,
                                       random_deltas, status, wait_for)

ARGS = ("--goal-clients", "3", "--min-clients", "2", "--round-timeout", "120", "--clip-norm", "1.0",
        "--server-optimizer", "sgd",  # plain FedAvg at lr 1: the new version is w + the released mean
        "--dp-noise-multiplier", "0.5", "--dp-adaptive-clipping", "--dp-clipped-count-stddev", "1.0")


def _seed(state) -> str | None:
    conn = sqlite3.connect(state / "fedkb.sqlite")
    try:
        row = conn.execute("SELECT seed FROM dp_noise_seeds WHERE round_id = 1").fetchone()
    finally:
        conn.close()
    return None if row is None else row[0]


def test_kill9_between_the_noise_draw_and_publishing_republishes_the_same_noise(tmp_path):
    model = make_weights_model(tmp_path / "model", seed=5)
    state = tmp_path / "state"
    env = {"FEDKB_ENROLLMENT_SECRET": SECRET, "FEDKB_ADMIN_TOKEN": ADMIN}
    updates = [random_deltas(TINY_SHAPES, 200 + i, scale=s) for i, s in enumerate((0.02, 0.3, 0.05))]
    norms = [global_norm(d) for d in updates]
    assert sorted(n <= 1.0 for n in norms) == [False, True, True]  # one is clipped, two are not

    # Process 1: three updates close the round; the hook kills the server right after the draw.
    server = ServeProcess(state, model, *ARGS, log=tmp_path / "serve1.log", env={**env, CRASH_AFTER_NOISE: "1"})
    try:
        for i, deltas in enumerate(updates):
            device = Device(server.url)
            assert device.enroll().status_code == 201
            task = device.task()
            assert task.clip_norm == 1.0
            r = device.upload(task.round_id, device.body(task, deltas, num_examples=5 + 20 * i))
            assert r.status_code == 200, r.text
        server.proc.wait(60)  # the hook's SIGKILL
        assert server.proc.returncode == -9
    finally:
        server.stop()
    seed = _seed(state)
    assert seed is not None and len(seed) == 32  # committed before the draw
    assert not (state / "models" / "2").exists()  # nothing was released

    # Process 2: recovers, draws nothing new, publishes version 2 from the persisted seed.
    server = ServeProcess(state, None, *ARGS, log=tmp_path / "serve2.log", env=env, port=server.port)
    try:
        s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and s, what="version 2")
        round2 = wait_for(lambda: (r := status(server.url)["round"]) and r["id"] == 2 and r, what="round 2")
        round1 = status(server.url)["last_round"]
        assert round1["id"] == 1 and round1["published_version"] == 2
        public = requests.get(f"{server.url}/v1/status", timeout=10).text
    finally:
        server.stop()

    # The expected release, rebuilt from the known updates and the persisted seed.
    z_delta = update_noise_multiplier(0.5, 1.0)
    total = DPGaussianSum(WeightedSum(TINY_SHAPES), clip_norm=1.0, noise_multiplier=z_delta, denominator=3)
    for deltas in updates:
        total.add(deltas, 1)
    expected_mean = total.release(noise_generator(seed, UPDATE_NOISE))
    w1 = load_file(model / "weights.safetensors")
    w2 = load_file(state / "models" / "2" / "weights.safetensors")
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + expected_mean[k], rtol=1e-6, atol=1e-6)
    # The noise is really there: the noise-free mean is far from what was published.
    plain = DPGaussianSum(WeightedSum(TINY_SHAPES), clip_norm=1.0, noise_multiplier=0.0, denominator=3)
    for deltas in updates:
        plain.add(deltas, 1)
    noise = np.concatenate([(w2[k] - w1[k] - plain.release(None)[k]).ravel() for k in TINY_SHAPES])
    assert 0.5 < noise.std() / (z_delta * 1.0 / 3) < 1.5

    # The adaptive clip: the count noise came from the same seed, and round 2 clips at the result.
    fraction = unclipped_fraction(2, 3, expected=3, stddev=1.0, rng=noise_generator(seed, COUNT_NOISE))
    clip2 = next_clip_norm(1.0, fraction, target_quantile=0.5, learning_rate=0.2)
    assert round1["dp_unclipped_fraction"] == fraction and round1["dp_next_clip_norm"] == clip2
    assert round2["clip_norm"] == clip2 and round2["dp_noise_multiplier"] == 0.5
    assert round1["dp_update_noise_multiplier"] == z_delta and round1["dp_denominator"] == 3

    # Released: the seed is gone (with it and the model the noise could be subtracted), and never shown.
    assert _seed(state) is None
    assert seed not in public and seed not in str(s)
