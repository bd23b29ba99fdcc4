"""One round of our stack (real server over HTTP, LiteRT on the devices) equals one TFF round.

Our devices are the edge runtime's own `Device` cycle as the fleet runs it: the check-in here,
the task's work (model download into the model store, LiteRT training under the scheduler,
clipping, upload) through the fleet's job function. Same initial weights, clients, windows, batch
order and hyperparameters, with a clip norm small enough that clipping changes some updates: if
the new global weights agree, our weighted FedAvg and clipping are right. Also checks TFF leaves
no worker_binary child behind.
"""

import time

import numpy as np
import pytest

from datasets.prepared import load_prepared
from edge_runtime.client import ServerClient
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.litert_model import TrainableModel
from edge_runtime.model_store import ModelStore
from fedkb_core.clipping import global_norm
from fedkb_core.protocol import RoundTask, to_json
from model.weights import load_weights
from simulation.device_job import ALWAYS_ELIGIBLE, DeviceJob, client_windows, emulated_device, run_device_job
from simulation.fleet import FleetConfig, ServerProcess
from simulation.tff_backend import client_batches, one_round
from simulation.tff_cleanup import stop_tff_workers, tff_worker_children
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

    # Our stack: a real `fedkb serve`; each emulated device checks in, then runs its task's work.
    server = ServerProcess(state=tmp_path / "server", init_model=tiny_model, log_path=tmp_path / "server.log",
                           config=fleet)
    store = ModelStore(tmp_path / "fleet_models")
    try:
        results = []
        for i, c in enumerate(client_ids):
            home = tmp_path / "homes" / str(i)
            device = emulated_device(server.url, home, data.train[c], state=ScriptedDeviceState(ALWAYS_ELIGIBLE),
                                     models=store)
            try:
                device.ensure_enrolled(server.secret)
                task = device.request_task()
            finally:
                device.close()
            assert isinstance(task, RoundTask), task
            results.append(run_device_job(DeviceJob(server.url, str(home), to_json(task), data.train[c],
                                                    str(tmp_path / "workers"), seed=SEED + i)))
        assert [r.status for r in results] == ["accepted"] * CLIENTS, results
        assert any(r.update_norm > fleet.clip_norm for r in results), "clipping must be exercised"
        deadline = time.monotonic() + 60
        while server.status()["model_version"] < 2:
            assert time.monotonic() < deadline, "no version 2"
            time.sleep(0.05)
        ours = load_weights(tmp_path / "server" / "models" / "2" / "weights.safetensors", tiny_config)
        # What a device downloads computes with those weights (the server rewrote the
        # flatbuffer); the fleet evaluates exactly this.
        client = ServerClient(server.url)
        try:
            store.fetch(client, 2)
        finally:
            client.close()
        served = TrainableModel(store.version_dir(2)).get_weights()
        for name in ours:
            np.testing.assert_array_equal(served[name], ours[name], err_msg=name)
    finally:
        server.stop()

    # TFF: the same clients' windows and batches, from the same initial weights.
    client_data, sizes = [], []
    for i, c in enumerate(client_ids):
        windows = client_windows(data.train[c], seq_len=tiny_config.seq_len, max_examples=fleet.max_examples,
                                 seed=SEED + i)
        client_data.append(client_batches(windows, batch_size=tiny_config.batch_size, epochs=1, seed=SEED + i))
        sizes.append(len(windows))
    assert [(r.num_examples, r.steps) for r in results] == list(zip(sizes, map(len, client_data), strict=True))
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

