"""One round of our stack (real server over HTTP, LiteRT on the devices) equals one TFF round.

Same initial weights, clients, windows, batch order and hyperparameters, with a clip norm small
enough that clipping changes some updates: if the new global weights agree, our weighted FedAvg
and clipping are right. Also checks TFF leaves no worker_binary child behind.
"""

import time

import numpy as np
import pytest

from datasets.prepared import load_prepared
from fedkb_core.clipping import global_norm
from model.weights import load_weights
from simulation.device_job import DeviceJob, client_windows, run_device_job
from simulation.fleet import FleetConfig, ServerProcess
from simulation.tff_backend import client_batches, one_round
from simulation.tff_cleanup import stop_tff_workers, tff_worker_children
from tests.fixtures_edge import enrolled_with_task
from tests.fixtures_model import *  # noqa: F401,F403

pytest.importorskip("tensorflow_federated")

CLIENTS = 3
SEED = 11


@pytest.mark.parametrize("optimizer", [dict(server_optimizer="sgd", server_lr=1.0),  # plain FedAvg
                                       dict(server_optimizer="adam", server_lr=0.01)])  # FedAdam
def test_one_round_matches_tff(optimizer, tiny_model, tiny_data, tiny_config, tmp_path):
    data = load_prepared(tiny_data)
    client_ids = sorted(data.train)[:CLIENTS]
    fleet = FleetConfig(clients=CLIENTS, clients_per_round=CLIENTS, min_clients=CLIENTS, device_lr=0.5,
                        max_examples=12, clip_norm=0.05, workers=1, **optimizer)
    initial = load_weights(tiny_model / "weights.safetensors", tiny_config)

    # Our stack: real `fedkb serve`, each device runs the LiteRT job and uploads over HTTP.
    server = ServerProcess(state=tmp_path / "server", init_model=tiny_model, log_path=tmp_path / "server.log",
                           config=fleet)
    try:
        enrolled = [enrolled_with_task(server.url, server.secret) for _ in client_ids]
        results = [run_device_job(DeviceJob(server.url, d.device_id, d.token, t, data.train[c],
                                            str(tmp_path / "cache"), seed=SEED + i))
                   for i, ((d, t), c) in enumerate(zip(enrolled, client_ids, strict=True))]
        assert [r.status for r in results] == ["accepted"] * CLIENTS
        assert any(r.update_norm > fleet.clip_norm for r in results), "clipping must be exercised"
        deadline = time.monotonic() + 60
        while server.status()["model_version"] < 2:
            assert time.monotonic() < deadline, "no version 2"
            time.sleep(0.05)
        ours = load_weights(tmp_path / "server" / "models" / "2" / "weights.safetensors", tiny_config)
        # What devices download computes with those weights (the server rewrote the flatbuffer).
        from edge_runtime.litert_model import TrainableModel

        served = TrainableModel(tmp_path / "server" / "models" / "2").get_weights()
        for name in ours:
            np.testing.assert_array_equal(served[name], ours[name], err_msg=name)
    finally:
        server.stop()

    # TFF: the same clients' windows and batches, from the same initial weights.
    client_data = []
    for i, c in enumerate(client_ids):
        windows = client_windows(data.train[c], seq_len=tiny_config.seq_len, max_examples=fleet.max_examples,
                                 seed=SEED + i)
        client_data.append(client_batches(windows, batch_size=tiny_config.batch_size, epochs=1, seed=SEED + i))
    theirs = one_round(model=tiny_config, fleet=fleet, weights=initial, client_data=client_data)

    moved = global_norm({k: ours[k] - initial[k] for k in ours})
    assert moved > 1e-3, "the round must change the model"
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=2e-6, err_msg=name)
    # TFF keeps its C++ worker until its context goes; the cleanup must end it and leave TFF usable.
    assert tff_worker_children(), "TFF should have started a worker_binary child"
    stop_tff_workers()
    assert tff_worker_children() == []
    again = one_round(model=tiny_config, fleet=fleet, weights=initial, client_data=client_data)
    np.testing.assert_allclose(again["output_bias"], theirs["output_bias"], atol=1e-6)
    stop_tff_workers()
    assert tff_worker_children() == []

