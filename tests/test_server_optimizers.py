"""The server optimizers against TFF's own: FedAdam equals `tff.learning.optimizers.build_adam`
applied to the pseudo-gradient −Δ̄, step after step; the state survives a save/load between
rounds as it does between published versions; a real server publishes FedAdam's weights."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load, save

from aggregator.fedavg import ADAM_STEP, adam_step, server_step
from tests.fixtures_aggregator import make_server, weights_model  # noqa: F401

SHAPES = {"a": (5, 3), "b": (7,)}


def _deltas(seed):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 10.0 ** rng.uniform(-3, -1)).astype(np.float32) for k, s in SHAPES.items()}


def test_fedadam_matches_tff_build_adam_over_rounds():
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")

    weights = _deltas(0)
    names = sorted(SHAPES)
    opt = tff.learning.optimizers.build_adam(learning_rate=0.01, beta_1=0.9, beta_2=0.99, epsilon=1e-3)
    tff_state = opt.initialize(tuple(tf.TensorSpec(SHAPES[n], tf.float32) for n in names))
    tff_w = tuple(tf.constant(weights[n]) for n in names)
    ours, state = dict(weights), None
    for round_ in range(1, 5):
        delta = _deltas(round_)
        tff_state, tff_w = opt.next(tff_state, tff_w, tuple(tf.constant(-delta[n]) for n in names))
        step = adam_step(ours, delta, server_lr=0.01, state=state)
        ours, state = step.weights, load(save(step.velocity))  # as the version folder keeps it
        for n, w in zip(names, tff_w, strict=True):
            np.testing.assert_allclose(ours[n], w.numpy(), rtol=1e-5, atol=1e-7, err_msg=f"round {round_} {n}")
    assert int(state[ADAM_STEP][0]) == 4


def test_fedadam_steps_are_about_lr_whatever_the_update_scale():
    weights = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for scale in (1e-4, 1.0):
        delta = {k: np.full(s, scale, np.float32) for k, s in SHAPES.items()}
        moved = adam_step(weights, delta, server_lr=0.01, epsilon=1e-8).weights
        assert all(np.allclose(v, 0.01, rtol=1e-3) for v in moved.values()), scale  # moves along +Δ̄
    plain = server_step(weights, {k: np.full(s, 1e-4, np.float32) for k, s in SHAPES.items()}).weights
    assert all(np.allclose(v, 1e-4) for v in plain.values())


def test_server_publishes_fedadam_weights_and_carries_its_state(make_server, weights_model):  # noqa: F811
    from safetensors.numpy import load_file

    from aggregator.fedavg import ClippedSum, WeightedSum
    from tests.fixtures_aggregator import TINY_SHAPES, Device, random_deltas, status, wait_for

    server = make_server(weights_model, goal_clients=2, min_clients=2, server_optimizer="adam", server_lr=0.05)
    models = server.state.config.state_dir / "models"
    expected, state = load_file(weights_model / "weights.safetensors"), None
    for round_ in (1, 2):
        wait_for(lambda: ((status(server.url).get("round") or {}).get("state") == "open"), what="an open round")
        devices = [Device(server.url) for _ in range(2)]
        reference = ClippedSum(WeightedSum(TINY_SHAPES), 1.0)
        for i, d in enumerate(devices):
            assert d.enroll().status_code == 201
            task = d.task()
            deltas, n = random_deltas(TINY_SHAPES, 10 * round_ + i, scale=0.3), 5 + i
            reference.add(deltas, n)
            assert d.upload(task.round_id, d.body(task, deltas, num_examples=n)).status_code == 200
        wait_for(lambda: status(server.url)["model_version"] == round_ + 1, what=f"version {round_ + 1}")
        step = adam_step(expected, reference.mean(), server_lr=0.05, state=state)
        expected, state = step.weights, step.velocity
        published = load_file(models / str(round_ + 1) / "weights.safetensors")
        for k in TINY_SHAPES:
            np.testing.assert_allclose(published[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=f"round {round_} {k}")


def test_unknown_server_optimizer_is_refused(tmp_path):
    from aggregator.config import AggregatorConfig, ConfigError, load_config

    # The constructor validates (there is no separate validate step), and so does every layer.
    with pytest.raises(ConfigError, match="server_optimizer must be sgd or adam, got 'adagrad'"):
        AggregatorConfig(state_dir=tmp_path, server_optimizer="adagrad", enrollment_secret="s", admin_token="a")
    with pytest.raises(ConfigError, match="server_optimizer must be sgd or adam, got 'adagrad'"):
        load_config(environ={"FEDKB_SERVER_OPTIMIZER": "adagrad", "FEDKB_TESTING": "1"})
    AggregatorConfig(state_dir=tmp_path, server_optimizer="sgd", enrollment_secret="s", admin_token="a")  # constructs


@pytest.mark.parametrize("optimizer, server_lr", [("adam", 0.03), ("sgd", 1.0)])
def test_server_lr_defaults_to_the_optimizers_own(tmp_path, optimizer, server_lr):
    from aggregator.config import load_config

    config = load_config(environ={"FEDKB_TESTING": "1"}, overrides={"server_optimizer": optimizer})
    assert config.server_lr == server_lr
    explicit = load_config(environ={"FEDKB_TESTING": "1", "FEDKB_SERVER_LR": "0.2"},
                           overrides={"server_optimizer": optimizer})
    assert explicit.server_lr == 0.2


def test_momentum_is_refused_with_adam(tmp_path):
    from aggregator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="server_momentum applies to server_optimizer sgd"):
        load_config(environ={"FEDKB_TESTING": "1"}, overrides={"server_momentum": 0.9})
    assert load_config(environ={"FEDKB_TESTING": "1"},
                       overrides={"server_momentum": 0.9, "server_optimizer": "sgd"}).server_momentum == 0.9
