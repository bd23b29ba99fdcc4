"""User-level DP-FedAvg's aggregate (aggregator/dp.py): with Z = 0 it is TFF's
`DifferentiallyPrivateFactory.gaussian_fixed`; with Z > 0 its noise has stddev Z·C/goal on the
mean; one user moves the release by at most C/goal, whatever their example count."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from aggregator.dp import DPGaussianSum, UPDATE_NOISE, new_noise_seed, noise_generator
from aggregator.fedavg import WeightedSum
from fedkb_core.clipping import global_norm

SHAPES = collections.OrderedDict([("dense/bias", (16,)), ("embedding", (16, 4)), ("lstm/kernel", (4, 8))])


def _updates(count: int, seed: int = 0) -> list[tuple[dict, int]]:
    """Updates of very different norms (some far above the clip) and example counts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        scale = [0.02, 0.1, 0.5, 2.0][i % 4]
        out.append(({k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()},
                    int(rng.integers(1, 64))))
    return out


def _dp_sum(updates, *, clip: float, z: float, goal: int) -> DPGaussianSum:
    total = DPGaussianSum(WeightedSum(SHAPES), clip_norm=clip, noise_multiplier=z, denominator=goal)
    for deltas, n in updates:
        total.add(deltas, n)
    return total


def test_with_no_noise_the_release_equals_tffs_gaussian_fixed():
    pytest.importorskip("tensorflow_federated")
    import tensorflow_federated as tff

    from simulation.tff_cleanup import stop_tff_workers

    goal, clip = 8, 0.6
    updates = _updates(6)  # fewer than the goal: the denominator stays the goal
    assert any(global_norm(d) > clip for d, _ in updates) and any(global_norm(d) < clip for d, _ in updates)
    ours = _dp_sum(updates, clip=clip, z=0.0, goal=goal).release(noise_generator(new_noise_seed(), UPDATE_NOISE))
    try:
        value_type = tff.types.StructWithPythonType(
            [(k, tff.types.TensorType(np.float32, s)) for k, s in SHAPES.items()], collections.OrderedDict)
        process = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=0.0, clients_per_round=goal, clip=clip).create(value_type)
        theirs = process.next(process.initialize(), [collections.OrderedDict(d) for d, _ in updates]).result
        theirs = {k: np.asarray(v) for k, v in theirs.items()}
    finally:
        stop_tff_workers()
    for name in SHAPES:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    # And neither is the example-weighted mean (the weights were not all equal).
    weighted = sum(n * d["embedding"] * min(1, clip / global_norm(d)) for d, n in updates) / sum(n for _, n in updates)
    assert not np.allclose(ours["embedding"], weighted, atol=1e-4)


def test_the_noise_on_the_mean_has_stddev_z_c_over_goal():
    shapes = {"w": (200_000,)}
    goal, clip, z = 10, 0.5, 1.3
    rng = np.random.default_rng(1)
    total = DPGaussianSum(WeightedSum(shapes), clip_norm=clip, noise_multiplier=z, denominator=goal)
    plain = DPGaussianSum(WeightedSum(shapes), clip_norm=clip, noise_multiplier=0.0, denominator=goal)
    for _ in range(7):
        deltas = {"w": (0.01 * rng.normal(size=shapes["w"])).astype(np.float32)}
        total.add(deltas, 5)
        plain.add(deltas, 5)
    noise = (total.release(noise_generator(new_noise_seed(), UPDATE_NOISE))["w"].astype(np.float64)
             - plain.release(noise_generator(new_noise_seed(), UPDATE_NOISE))["w"])
    d, sigma = noise.size, z * clip / goal
    # The sample stddev of d normal draws has stddev ~ sigma / sqrt(2d); the mean ~ sigma / sqrt(d).
    assert abs(noise.std() - sigma) < 5 * sigma / math.sqrt(2 * d), (noise.std(), sigma)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(d)
    # The released sum itself was left alone: a second release with the same seed is the same.
    seed = new_noise_seed()
    np.testing.assert_array_equal(total.release(noise_generator(seed, UPDATE_NOISE))["w"],
                                  total.release(noise_generator(seed, UPDATE_NOISE))["w"])
    assert not np.array_equal(total.release(noise_generator(seed, UPDATE_NOISE))["w"],
                              total.release(noise_generator(new_noise_seed(), UPDATE_NOISE))["w"])


def test_one_user_moves_the_release_by_at_most_c_over_goal_whatever_their_example_count():
    goal, clip = 5, 0.3
    others = _updates(4, seed=2)
    rng = np.random.default_rng(3)
    user = {k: (5.0 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}  # norm >> C
    with_user = _dp_sum(others + [(user, 10_000)], clip=clip, z=0.0, goal=goal)
    without = _dp_sum(others, clip=clip, z=0.0, goal=goal)
    seed = new_noise_seed()
    a, b = (s.release(noise_generator(seed, UPDATE_NOISE)) for s in (with_user, without))
    moved = math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in SHAPES))
    assert moved == pytest.approx(clip / goal, rel=1e-5)  # exactly C/goal: clipped to C, weight 1
    assert with_user.total.total_examples == 5  # unit weights: example counts are not summed


def test_seeds_come_from_the_os_csprng_and_are_never_repeated():
    seeds = {new_noise_seed() for _ in range(1000)}
    assert len(seeds) == 1000 and all(len(s) == 32 for s in seeds)
    a, b = noise_generator("ab" * 16, UPDATE_NOISE), noise_generator("ab" * 16, UPDATE_NOISE)
    assert a.standard_normal() == b.standard_normal()  # the seed alone determines the draws
    assert noise_generator("ab" * 16, 1).standard_normal() != noise_generator("ab" * 16, 0).standard_normal()


def test_bad_dp_sums_are_refused():
    with pytest.raises(ValueError, match="noise multiplier"):
        DPGaussianSum(WeightedSum(SHAPES), clip_norm=1.0, noise_multiplier=-1.0, denominator=3)
    with pytest.raises(ValueError, match="denominator"):
        DPGaussianSum(WeightedSum(SHAPES), clip_norm=1.0, noise_multiplier=1.0, denominator=0)
    with pytest.raises(ValueError, match="clip_norm"):
        DPGaussianSum(WeightedSum(SHAPES), clip_norm=0.0, noise_multiplier=1.0, denominator=3)
