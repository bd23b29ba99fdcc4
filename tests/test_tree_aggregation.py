"""Tree-aggregation noise: the nodes it sums, its structure against tensorflow_privacy's
`TreeAggregator`/`EfficientTreeAggregator` under restarts, its variance against the theory over
many seeds, and its re-derivation from the persisted state (no fresh draws after a restart)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aggregator.tree_aggregation import (TreeAggregator, TreeConfig, TreeNoise, TreeState, covering_nodes,
                                         cumulative_noise_variance, seeded_node_noise)


@pytest.mark.parametrize("step", range(0, 70))
def test_covering_nodes_tile_the_prefix_with_popcount_nodes(step):
    nodes = covering_nodes(step)
    rounds = [r for level, pos in nodes for r in range(pos << level, (pos + 1) << level)]
    assert rounds == list(range(step + 1))  # disjoint, in order, exactly [0, step]
    assert len(nodes) == bin(step + 1).count("1")


def test_covering_nodes_rejects_a_negative_step():
    with pytest.raises(ValueError, match="step must be >= 0"):
        covering_nodes(-1)


class _OneHotNodes:
    """Gives every distinct node (tree, level, position) its own basis vector, so the Gram matrix
    of the released noises is their covariance structure whatever the draw order."""

    def __init__(self, dim):
        self.dim, self.index = dim, {}

    def for_state(self, state):
        def draw(level, position):
            key = (state.tree_index, level, position)
            self.index.setdefault(key, len(self.index))
            return np.eye(self.dim)[self.index[key]]
        return draw


def _tfp_residual_noises(rounds, dim, *, efficient, period, warmup):
    """Noise of tensorflow_privacy's `RestartQuery(TreeResidualSumQuery)` on zero records: the
    residuals n_t − n_{t−1} of the tree noise, with one basis vector per generator draw."""
    tf = pytest.importorskip("tensorflow")
    from tensorflow_privacy.privacy.dp_query import restart_query, tree_aggregation, tree_aggregation_query

    class OneHotDraws(tree_aggregation.ValueGenerator):
        def initialize(self):
            return tf.constant(0)

        def next(self, state):
            return [tf.one_hot(state, dim)], state + 1

    specs = [tf.TensorSpec((dim,), tf.float32)]
    inner = tree_aggregation_query.TreeResidualSumQuery(specs, OneHotDraws(), lambda r, c: r, 1.0,
                                                         use_efficient=efficient)
    query = restart_query.RestartQuery(
        inner, restart_query.PeriodicRoundRestartIndicator(period=period, warmup=warmup or None))
    state, out = query.initial_global_state(), []
    for _ in range(rounds):
        noise, state, _ = query.get_noised_result([tf.zeros(dim)], state)
        out.append(noise[0].numpy().astype(np.float64))
    return np.array(out)


@pytest.mark.parametrize("efficient", [False, True])
def test_noise_structure_equals_tensorflow_privacy_tree_with_restarts(efficient):
    rounds, dim, period, warmup = 13, 64, 5, 3  # restarts after releases 3, 8, 13: trees of 3, 5, 5
    theirs = _tfp_residual_noises(rounds, dim, efficient=efficient, period=period, warmup=warmup)

    nodes = _OneHotNodes(dim)
    tree = TreeAggregator(TreeConfig(stddev=1.0, efficient=efficient, restart_period=period, restart_warmup=warmup),
                          dim, TreeState(seed=1), node_noise_for=nodes.for_state)
    ours, previous, restarts = [], np.zeros(dim), []
    for _ in range(rounds):
        released, restarted = tree.release(np.zeros(dim))
        ours.append(released - previous)  # the residual, as TFP's query releases it
        previous = np.zeros(dim) if restarted else released
        restarts.append(restarted)
    ours = np.array(ours)

    assert [i + 1 for i, r in enumerate(restarts) if r] == [3, 8, 13]
    np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-6)
    assert np.abs(ours @ ours.T).sum() > rounds  # not trivially zero: releases share nodes


@pytest.mark.parametrize("efficient", [False, True])
def test_cumulative_noise_variance_matches_the_tree_theory(efficient):
    steps, dim, seeds, sigma = 16, 4000, 12, 0.7
    draws = np.array([[TreeNoise(seeded_node_noise(seed, 0, dim, sigma), efficient=efficient).cumulative(t)
                       for t in range(steps)] for seed in range(seeds)]).transpose(1, 0, 2).reshape(steps, -1)
    n = draws.shape[1]
    for t in range(steps):
        theory = cumulative_noise_variance(t, sigma, efficient=efficient)
        measured = float(np.mean(draws[t] ** 2))  # mean zero by construction; E[x²] = variance
        # The sample mean of n squared normals has relative standard deviation sqrt(2/n).
        assert abs(measured / theory - 1.0) < 5 * math.sqrt(2.0 / n), (t, measured, theory)
    assert abs(float(np.mean(draws))) < 5 * math.sqrt(draws.var() / draws.size)
    plain = [cumulative_noise_variance(t, 1.0) for t in range(steps)]
    assert plain[6] == 3 and plain[7] == 1 and plain[14] == 4  # popcount(t + 1)
    if efficient:  # Honaker's estimator is never worse than the plain tree
        assert all(cumulative_noise_variance(t, 1.0, efficient=True) <= p for t, p in zip(range(steps), plain))


def test_releases_at_different_steps_share_exactly_their_common_nodes():
    """Cov(noise_s, noise_t) = σ²·|nodes(s) ∩ nodes(t)|, measured over coordinates of one seed."""
    dim, sigma = 200_000, 1.0
    noise = TreeNoise(seeded_node_noise(7, 0, dim, sigma))
    released = {t: noise.cumulative(t) for t in range(8)}
    for s in range(8):
        for t in range(s + 1, 8):
            shared = len(set(covering_nodes(s)) & set(covering_nodes(t)))
            cov = float(np.mean(released[s] * released[t]))
            assert abs(cov - shared * sigma ** 2) < 6 * math.sqrt((1 + shared ** 2) / dim), (s, t, cov, shared)


def test_tree_state_round_trips_json_and_rederives_the_same_noise():
    config = TreeConfig(stddev=0.5, efficient=True, restart_period=4)
    rng = np.random.default_rng(0)
    sums = rng.normal(size=(9, 30))
    straight = TreeAggregator(config, 30, TreeState.fresh())
    first = [straight.release(s) for s in sums]

    resumed = TreeAggregator(config, 30, TreeState.from_json(json.loads(json.dumps(
        TreeState(seed=straight.state.seed).to_json()))))
    for i, s in enumerate(sums):
        if i == 6:  # a server restart: only the persisted state and running sum survive
            resumed = TreeAggregator(config, 30, TreeState.from_json(json.loads(json.dumps(resumed.state.to_json()))),
                                     running_sum=resumed.running_sum.copy())
        released, restarted = resumed.release(s)
        np.testing.assert_array_equal(released, first[i][0])
        assert restarted == first[i][1]
    assert straight.state == resumed.state and straight.state.tree_index == 2


def test_other_seeds_and_other_trees_give_independent_noise():
    dim = 50_000
    base = TreeNoise(seeded_node_noise(11, 0, dim, 1.0)).cumulative(0)
    for other in (TreeNoise(seeded_node_noise(12, 0, dim, 1.0)), TreeNoise(seeded_node_noise(11, 1, dim, 1.0))):
        corr = float(np.corrcoef(base, other.cumulative(0))[0, 1])
        assert abs(corr) < 5 / math.sqrt(dim)
    np.testing.assert_array_equal(base, TreeNoise(seeded_node_noise(11, 0, dim, 1.0)).cumulative(0))


@pytest.mark.parametrize("period, warmup", [(None, 0), (1, 0), (4, 0), (5, 3), (7, 1)])
def test_restarts_make_the_trees_the_accountant_charges_for(period, warmup):
    from fedkb_core.privacy_accounting import tree_sizes

    tree, sizes, leaves = TreeAggregator(TreeConfig(0.0, restart_period=period, restart_warmup=warmup), 1,
                                         TreeState(seed=1)), [], 0
    for _ in range(23):
        leaves += 1
        if tree.release(np.zeros(1))[1]:
            sizes.append(leaves)
            leaves = 0
    assert sizes + ([leaves] if leaves else []) == tree_sizes(23, period, warmup)


def test_noise_off_releases_exact_prefix_sums_restarting_from_zero():
    sums = np.arange(12.0).reshape(6, 2)
    tree = TreeAggregator(TreeConfig(stddev=0.0, restart_period=4), 2, TreeState(seed=3))
    released = [tree.release(s)[0] for s in sums]
    np.testing.assert_array_equal(released[3], sums[:4].sum(axis=0))
    np.testing.assert_array_equal(released[5], sums[4:6].sum(axis=0))


@pytest.mark.parametrize("kwargs, message", [
    ({"stddev": -1.0}, "stddev must be >= 0"),
    ({"stddev": float("nan")}, "stddev must be >= 0"),
    ({"stddev": 1.0, "restart_period": 0}, "restart_period must be >= 1"),
    ({"stddev": 1.0, "restart_period": 4, "restart_warmup": 4}, r"restart_warmup must be in \[1, 3\]"),
    ({"stddev": 1.0, "restart_warmup": 2}, "restart_warmup needs a restart_period"),
])
def test_tree_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeConfig(**kwargs)


@pytest.mark.parametrize("data", [{}, {"seed": "zz", "tree_index": 0, "step": 0, "releases": 0},
                                  {"seed": "01", "tree_index": -1, "step": 0, "releases": 0}])
def test_tree_state_rejects_a_damaged_record(data):
    with pytest.raises(ValueError, match="tree state"):
        TreeState.from_json(data)


def test_release_rejects_a_sum_of_the_wrong_shape():
    tree = TreeAggregator(TreeConfig(stddev=1.0), 3, TreeState(seed=1))
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        tree.release(np.zeros(4))
    assert tree.state.releases == 0  # nothing consumed
