"""Attack: an accepted blob damaged on disk before it was folded (issue 13, item 6).

Such a blob passed validation but no longer decodes; re-raising on every worker pass would block
its round for good. Against a real `fedkb serve`: the blob is quarantined (kept aside in the state
folder, counted as rejected `unfoldable`), the round reopens for the update it lost, closes when
another arrives, and publishes the exact FedAvg of the updates that remain.
"""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file

from aggregator.fedavg import ClippedSum, WeightedSum
from tests.fixtures_aggregator import TINY_SHAPES, Device, ServeProcess, make_weights_model, random_deltas, status, wait_for


def test_a_damaged_accepted_blob_is_quarantined_and_the_round_still_publishes(tmp_path):
    model, state = make_weights_model(tmp_path / "model", seed=3), tmp_path / "state"
    accept_only = tmp_path / "accept_only.json"
    accept_only.write_text(json.dumps({"background_worker": False}))
    args = ("--goal-clients", "3", "--min-clients", "2", "--round-timeout", "120", "--clip-norm", "1.0",
            "--server-optimizer", "sgd")  # plain FedAvg: the new version is w + mean delta

    # Process 1 opens round 1 and hands out four tasks; process 2 accepts three updates (the goal:
    # the round is closing) but folds none.
    server = ServeProcess(state, model, *args, log=tmp_path / "serve1.log")
    try:
        devices = [Device(server.url) for _ in range(4)]
        for d in devices:
            assert d.enroll().status_code == 201
        tasks = [d.task() for d in devices]
    finally:
        server.stop()
    server = ServeProcess(state, None, "--config", str(accept_only), *args, log=tmp_path / "serve2.log")
    try:
        for d in devices:
            d.url = server.url
        updates = [(random_deltas(TINY_SHAPES, 10 + i, scale=0.3), 5 + 3 * i) for i in range(4)]
        for d, t, (deltas, n) in list(zip(devices, tasks, updates))[:3]:
            r = d.upload(t.round_id, d.body(t, deltas, num_examples=n))
            assert r.status_code == 200, r.text
        assert status(server.url)["round"]["state"] == "closing"
    finally:
        server.stop()

    # The disk damages device 0's blob: its tensor data is cut off halfway.
    (blob,) = (state / "inbox" / "1").glob(f"{devices[0].device_id}-*.safetensors")
    raw = blob.read_bytes()
    blob.write_bytes(raw[: len(raw) // 2])

    # Process 3 folds: the damaged blob is set aside and the round goes on.
    server = ServeProcess(state, None, *args, log=tmp_path / "serve3.log")
    try:
        for d in devices:
            d.url = server.url
        s = wait_for(lambda: (s := status(server.url))["round"]["rejected"].get("unfoldable") and s,
                     timeout=30, what="the damaged blob quarantined")
        assert s["round"]["state"] == "open" and s["round"]["accepted"] == 2 and s["model_version"] == 1
        assert s["rejected_total"] == {"unfoldable": 1} and not s["worker"]["last_error"]
        (kept,) = (state / "quarantine" / "1").iterdir()
        assert kept.read_bytes() == raw[: len(raw) // 2] and not blob.exists()

        d, t, (deltas, n) = devices[3], tasks[3], updates[3]
        assert d.upload(t.round_id, d.body(t, deltas, num_examples=n)).status_code == 200
        # Publishing version 2 and opening round 2 are two steps; wait for the second.
        s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and (s["round"] or {}).get("id") == 2
                     and s, timeout=30, what="version 2 published and round 2 open")
        assert s["versions"][0]["num_clients"] == 3 and s["round"]["state"] == "open"
        assert {r["id"]: r["state"] for r in s["rounds"]}[1] == "closed"
    finally:
        server.stop()

    reference = ClippedSum(WeightedSum(TINY_SHAPES), 1.0)
    for deltas, n in updates[1:]:
        reference.add(deltas, n)
    w1, w2 = load_file(model / "weights.safetensors"), load_file(state / "models" / "2" / "weights.safetensors")
    mean = reference.mean()
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + mean[k], rtol=1e-5, atol=1e-6)
