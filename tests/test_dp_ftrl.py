"""DP-FTRL with momentum: with the noise off it follows TFF's tree-aggregation path (the
tensorflow_privacy `TreeResidualSumQuery` behind `DifferentiallyPrivateFactory.tree_aggregation`,
restarted by `RestartQuery`, normalized by the fixed denominator, then TFF's `build_sgdm` on the
server) model for model; with the noise on the model's noise has the tree's variance scaled by
η/m; a server restart mid-stream continues the same trees with the same noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aggregator.fedavg import server_step
from aggregator.ftrl import DpFtrl, FtrlConfig, FtrlState, ftrl_step
from aggregator.tree_aggregation import TreeConfig, TreeState, cumulative_noise_variance
from fedkb_core.clipping import clip_by_global_norm

SHAPES = {"a": (4, 3), "b": (5,)}
CLIP = 1.0


def _client_updates(round_, count=3):
    rng = np.random.default_rng(round_)
    # Norms from ~0.2 to ~3: some clients are clipped, some are not.
    return [{k: (rng.normal(size=s) * rng.uniform(0.05, 0.8)).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(count)]


def _flat(tensors):
    return np.concatenate([np.asarray(tensors[k], np.float64).ravel() for k in sorted(SHAPES)])


def _clipped_sum(updates):
    return sum(_flat(clip_by_global_norm(u, CLIP)[0]) for u in updates)


@pytest.mark.parametrize("efficient, momentum", [(False, 0.9), (True, 0.5), (True, 0.0)])
def test_noise_off_equals_tff_tree_aggregation_with_sgdm_and_restarts(efficient, momentum):
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")
    from tensorflow_privacy.privacy.dp_query import normalized_query, restart_query, tree_aggregation_query

    names, rounds, period, warmup, denominator, lr = sorted(SHAPES), 9, 4, 2, 3.0, 0.7
    specs = [tf.TensorSpec(SHAPES[n], tf.float32) for n in names]
    indicator = restart_query.PeriodicRoundRestartIndicator(period=period, warmup=warmup)
    query = normalized_query.NormalizedQuery(restart_query.RestartQuery(
        tree_aggregation_query.TreeResidualSumQuery.build_l2_gaussian_query(
            CLIP, 0.0, specs, noise_seed=1, use_efficient=efficient), indicator), denominator=denominator)
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=lr, momentum=momentum)
    weights0 = _client_updates(100, 1)[0]

    query_state, restart_state = query.initial_global_state(), indicator.initialize()
    opt_state = optimizer.initialize(specs)
    tff_w = [tf.constant(weights0[n]) for n in names]
    ours = DpFtrl(TreeConfig(stddev=0.0, efficient=efficient, restart_period=period, restart_warmup=warmup),
                  FtrlConfig(learning_rate=lr, momentum=momentum, denominator=denominator), _flat(weights0),
                  tree_state=TreeState(seed=5))
    restarted_rounds = []
    for round_ in range(rounds):
        updates = _client_updates(round_)
        params = query.derive_sample_params(query_state)
        sample = query.initial_sample_state(specs)
        for u in updates:
            sample = query.accumulate_record(params, sample, [tf.constant(u[n]) for n in names])
        residual_mean, query_state, _ = query.get_noised_result(sample, query_state)
        opt_state, tff_w = optimizer.next(opt_state, tff_w, [-r for r in residual_mean])
        restart, restart_state = indicator.next(restart_state)
        if bool(restart):  # DP-FTRLM's restart: a new tree and a fresh momentum from the current model
            opt_state = optimizer.initialize(specs)
            restarted_rounds.append(round_)

        np.testing.assert_allclose(ours.round(_clipped_sum(updates)), np.concatenate([w.numpy().ravel() for w in tff_w]),
                                   rtol=1e-5, atol=1e-5, err_msg=f"round {round_}")
    assert restarted_rounds == [1, 5] and ours.tree.state.tree_index == 2


def test_noise_off_equals_tff_differentially_private_factory_tree_aggregation():
    """The factory itself, run by TFF's runtime (no restarts: the factory has none), then build_sgdm."""
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")
    from simulation.tff_cleanup import stop_tff_workers

    dim, denominator, lr, momentum = sum(int(np.prod(s)) for s in SHAPES.values()), 3.0, 0.6, 0.9
    factory = tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
        noise_multiplier=0.0, clients_per_round=denominator, l2_norm_clip=CLIP,
        record_specs=tf.TensorSpec((dim,), tf.float32), noise_seed=1, use_efficient=True)
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=lr, momentum=momentum)
    weights0 = _flat(_client_updates(100, 1)[0]).astype(np.float32)
    ours = DpFtrl(TreeConfig(stddev=0.0, efficient=True), FtrlConfig(lr, momentum, denominator), weights0)
    try:
        process = factory.create(tff.TensorType(np.float32, (dim,)))
        agg_state, opt_state = process.initialize(), optimizer.initialize(tf.TensorSpec((dim,), tf.float32))
        tff_w = tf.constant(weights0)
        for round_ in range(6):
            updates = _client_updates(round_)
            output = process.next(agg_state, [_flat(u).astype(np.float32) for u in updates])
            agg_state = output.state
            opt_state, tff_w = optimizer.next(opt_state, tff_w, -tf.constant(output.result))
            np.testing.assert_allclose(ours.round(_clipped_sum(updates)), tff_w.numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"round {round_}")
    finally:
        stop_tff_workers()


def test_zero_momentum_is_server_sgd_on_the_fixed_denominator_mean():
    weights0, denominator, lr = _client_updates(50, 1)[0], 4.0, 0.5
    ftrl = DpFtrl(TreeConfig(stddev=0.0), FtrlConfig(learning_rate=lr, denominator=denominator), _flat(weights0))
    expected = weights0
    for round_ in range(5):
        updates = _client_updates(round_)
        got = ftrl.round(_clipped_sum(updates))
        mean = {k: sum(clip_by_global_norm(u, CLIP)[0][k] for u in updates) / denominator for k in SHAPES}
        expected = server_step(expected, mean, server_lr=lr).weights
        np.testing.assert_allclose(got, _flat(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("efficient", [False, True])
def test_the_models_noise_is_the_tree_noise_scaled_by_lr_over_denominator(efficient):
    dim, rounds, sigma, lr, denominator = 30_000, 6, 0.8, 0.5, 4.0
    for t in (2, 3, 5):  # releases covered by 2, 1, 2 nodes
        errors = []
        for seed in range(3):
            ftrl = DpFtrl(TreeConfig(stddev=sigma, efficient=efficient), FtrlConfig(learning_rate=lr, denominator=denominator),
                          np.zeros(dim), tree_state=TreeState(seed=seed))
            models = [ftrl.round(np.ones(dim)) for _ in range(rounds)]
            errors.append(models[t] - lr * (t + 1) * np.ones(dim) / denominator)  # minus the noiseless model
        errors = np.concatenate(errors)
        theory = (lr / denominator) ** 2 * cumulative_noise_variance(t, sigma, efficient=efficient)
        assert abs(float(np.mean(errors ** 2)) / theory - 1) < 5 * math.sqrt(2 / errors.size), t


def test_a_server_restart_mid_stream_continues_with_the_same_noise():
    dim, config = 40, TreeConfig(stddev=0.3, efficient=True, restart_period=3)
    ftrl_config = FtrlConfig(learning_rate=0.4, momentum=0.8, denominator=2.0)
    sums = np.random.default_rng(1).normal(size=(8, dim))
    straight = DpFtrl(config, ftrl_config, np.zeros(dim))
    expected = [straight.round(s) for s in sums]

    resumed = DpFtrl(config, ftrl_config, np.zeros(dim), tree_state=TreeState(seed=straight.tree.state.seed))
    for i, s in enumerate(sums):
        if i in (2, 4):  # persisted: the tree's JSON and three vectors; everything else is rebuilt
            persisted = (json.dumps(resumed.tree.state.to_json()), resumed.tree.running_sum.copy(),
                         resumed.ftrl.anchor.copy(), resumed.ftrl.momentum_buffer.copy())
            resumed = DpFtrl(config, ftrl_config, np.zeros(dim), tree_state=TreeState.from_json(json.loads(persisted[0])),
                             running_sum=persisted[1], ftrl_state=FtrlState(persisted[2], persisted[3]))
        np.testing.assert_array_equal(resumed.round(s), expected[i])


def test_restart_reanchors_at_the_current_model_and_zeroes_the_momentum():
    ftrl = DpFtrl(TreeConfig(stddev=0.0, restart_period=2), FtrlConfig(learning_rate=1.0, momentum=0.9), np.zeros(2))
    ftrl.round(np.ones(2))
    after_restart = ftrl.round(np.ones(2))
    np.testing.assert_allclose(ftrl.ftrl.anchor, after_restart)
    np.testing.assert_array_equal(ftrl.ftrl.momentum_buffer, np.zeros(2))
    np.testing.assert_array_equal(ftrl.tree.running_sum, np.zeros(2))


def test_ftrl_step_is_anchor_plus_lr_times_the_momentum_of_prefix_sums():
    state = FtrlState.anchored_at(np.array([1.0]))
    w1, state = ftrl_step(state, np.array([2.0]), FtrlConfig(learning_rate=0.5, momentum=0.5))
    w2, state = ftrl_step(state, np.array([3.0]), FtrlConfig(learning_rate=0.5, momentum=0.5))
    assert (w1[0], w2[0]) == (1.0 + 0.5 * 2.0, 1.0 + 0.5 * (0.5 * 2.0 + 3.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"learning_rate": 1.0, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"learning_rate": 1.0, "denominator": 0.0}, "denominator must be positive"),
])
def test_ftrl_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FtrlConfig(**kwargs)
