"""The aggregation maths against hand-checked numbers and a plain numpy reference."""

import numpy as np
import pytest

from aggregator.fedavg import ClippedSum, EmptyAggregate, WeightedSum, aggregate, server_step

SHAPES = {"w": (3, 4), "b": (4,)}


def _updates(count, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [({k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()},
             int(rng.integers(1, 500))) for _ in range(count)]


def test_weighted_mean_by_hand():
    # Prepare
    results = [({"x": np.array([1.0, 2.0], np.float32)}, 1), ({"x": np.array([4.0, 8.0], np.float32)}, 3)]
    total = WeightedSum({"x": (2,)})
    # Execute
    for deltas, n in results:
        total.add(deltas, n)
    # Assert: (1·[1,2] + 3·[4,8]) / 4 = [3.25, 6.5]
    np.testing.assert_allclose(total.mean()["x"], [3.25, 6.5])
    np.testing.assert_allclose(aggregate(results)["x"], [3.25, 6.5])
    assert (total.total_examples, total.count) == (4, 2)


def test_streaming_sum_matches_numpy_reference_on_random_updates():
    updates = _updates(50, seed=1)
    total = WeightedSum(SHAPES)
    for deltas, n in updates:
        total.add(deltas, n)
    ns = np.array([n for _, n in updates], np.float64)
    for name in SHAPES:
        stacked = np.stack([d[name].astype(np.float64) for d, _ in updates])
        reference = np.tensordot(ns, stacked, axes=1) / ns.sum()
        np.testing.assert_allclose(total.mean()[name], reference, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(aggregate(updates)[name], reference, rtol=1e-6, atol=1e-7)


def test_clipped_sum_matches_reference_clipping():
    updates = _updates(20, seed=2, scale=0.5)
    clip_norm = 1.5
    clipped = ClippedSum(WeightedSum(SHAPES), clip_norm)
    norms = [clipped.add(d, n) for d, n in updates]

    reference_terms, total_n = {k: np.zeros(s) for k, s in SHAPES.items()}, 0
    for (deltas, n), norm in zip(updates, norms, strict=True):
        flat = np.concatenate([deltas[k].astype(np.float64).ravel() for k in SHAPES])
        assert norm == pytest.approx(np.linalg.norm(flat))
        scale = min(1.0, clip_norm / np.linalg.norm(flat))
        for k in SHAPES:
            reference_terms[k] += n * scale * deltas[k].astype(np.float64)
        total_n += n
    assert any(n > clip_norm for n in norms) and any(n <= clip_norm for n in norms)
    for k in SHAPES:
        np.testing.assert_allclose(clipped.mean()[k], reference_terms[k] / total_n, rtol=1e-5, atol=1e-7)


def test_one_device_cannot_dominate_after_clipping():
    honest = {"w": np.full(SHAPES["w"], 0.01, np.float32), "b": np.zeros(4, np.float32)}
    hostile = {"w": np.full(SHAPES["w"], 1e6, np.float32), "b": np.zeros(4, np.float32)}
    clipped = ClippedSum(WeightedSum(SHAPES), 1.0)
    clipped.add(honest, 10)
    clipped.add(hostile, 10)
    assert np.linalg.norm(clipped.mean()["w"]) <= 1.0


def test_restore_continues_the_same_sum():
    updates = _updates(10, seed=3)
    whole = WeightedSum(SHAPES)
    for d, n in updates:
        whole.add(d, n)
    half = WeightedSum(SHAPES)
    for d, n in updates[:4]:
        half.add(d, n)
    resumed = WeightedSum.restore(half.weighted_sum, total_examples=half.total_examples, count=half.count)
    for d, n in updates[4:]:
        resumed.add(d, n)
    for k in SHAPES:
        np.testing.assert_array_equal(resumed.weighted_sum[k], whole.weighted_sum[k])
    assert (resumed.total_examples, resumed.count) == (whole.total_examples, whole.count)


def test_server_step_sgd_and_momentum_by_hand():
    w = {"x": np.array([1.0, 1.0], np.float32)}
    d = {"x": np.array([0.5, -1.0], np.float32)}
    plain = server_step(w, d)
    np.testing.assert_allclose(plain.weights["x"], [1.5, 0.0])  # η = 1: w + Δ̄
    half = server_step(w, d, server_lr=0.5)
    np.testing.assert_allclose(half.weights["x"], [1.25, 0.5])
    first = server_step(w, d, server_lr=1.0, momentum=0.9, velocity=None)
    second = server_step(first.weights, d, server_lr=1.0, momentum=0.9, velocity=first.velocity)
    np.testing.assert_allclose(second.velocity["x"], [0.95, -1.9])  # 0.9·Δ + Δ
    np.testing.assert_allclose(second.weights["x"], [1.5 + 0.95, 0.0 - 1.9])


@pytest.mark.parametrize("call, error", [
    (lambda: WeightedSum(SHAPES).mean(), EmptyAggregate),
    (lambda: aggregate([]), EmptyAggregate),
    (lambda: WeightedSum(SHAPES).add({"w": np.zeros((3, 4))}, 1), ValueError),
    (lambda: WeightedSum(SHAPES).add({k: np.zeros(s) for k, s in SHAPES.items()}, 0), ValueError),
    (lambda: ClippedSum(WeightedSum(SHAPES), 0.0), ValueError),
    (lambda: server_step({"x": np.zeros(2)}, {"y": np.zeros(2)}), ValueError),
    (lambda: server_step({"x": np.zeros(2)}, {"x": np.zeros(3)}), ValueError),
])
def test_preconditions_are_checked(call, error):
    with pytest.raises(error):
        call()
