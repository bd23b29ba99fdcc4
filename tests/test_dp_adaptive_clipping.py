"""Adaptive clipping (aggregator/adaptive_clipping.py): with the noise off, the same clip norms
round after round as TFF's `DifferentiallyPrivateFactory.gaussian_adaptive` (and the same
releases); with the noise on, C settles at the target quantile of the true norm distribution."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from aggregator.adaptive_clipping import next_clip_norm, unclipped_fraction, update_noise_multiplier
from aggregator.dp import COUNT_NOISE, UPDATE_NOISE, DPGaussianSum, new_noise_seed, noise_generator
from aggregator.fedavg import WeightedSum
from fedkb_core.clipping import global_norm

SHAPES = collections.OrderedDict([("dense/bias", (16,)), ("embedding", (16, 4))])


def _round_updates(rng, count: int) -> list[dict]:
    """Updates whose norms spread over two orders of magnitude, around 1."""
    out = []
    for _ in range(count):
        direction = {k: rng.normal(size=s) for k, s in SHAPES.items()}
        norm = float(np.exp(rng.normal(0.0, 1.0)))
        scale = norm / global_norm(direction)
        out.append({k: (scale * v).astype(np.float32) for k, v in direction.items()})
    return out


def _fedkb_round(updates, *, clip, goal, quantile, lr):
    """One round as the server runs it: DP sum at this clip, the count, the next clip."""
    total = DPGaussianSum(WeightedSum(SHAPES), clip_norm=clip, noise_multiplier=0.0, denominator=goal)
    unclipped = sum(total.add(d, 7) <= clip for d in updates)
    release = total.release(noise_generator(new_noise_seed(), UPDATE_NOISE))
    fraction = unclipped_fraction(unclipped, len(updates), expected=goal, stddev=0.0, rng=None)
    return release, next_clip_norm(clip, fraction, target_quantile=quantile, learning_rate=lr)


def test_with_the_noise_off_the_clip_norms_follow_tffs_gaussian_adaptive():
    pytest.importorskip("tensorflow_federated")
    import tensorflow_federated as tff

    from simulation.tff_cleanup import stop_tff_workers

    goal, clip, quantile, lr = 6, 0.05, 0.7, 0.3
    rng = np.random.default_rng(4)
    rounds = [_round_updates(rng, count) for count in (6, 6, 5, 6, 4, 6, 6, 6)]  # some short of the goal
    ours, releases = [], []
    for updates in rounds:
        release, clip = _fedkb_round(updates, clip=clip, goal=goal, quantile=quantile, lr=lr)
        ours.append(clip)
        releases.append(release)
    try:
        value_type = tff.types.StructWithPythonType(
            [(k, tff.types.TensorType(np.float32, s)) for k, s in SHAPES.items()], collections.OrderedDict)
        process = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise_multiplier=0.0, clients_per_round=goal, initial_l2_norm_clip=0.05,
            target_unclipped_quantile=quantile, learning_rate=lr, clipped_count_stddev=0.0).create(value_type)
        state, theirs, their_releases = process.initialize(), [], []
        for updates in rounds:
            out = process.next(state, [collections.OrderedDict(d) for d in updates])
            state = out.state
            theirs.append(float(out.measurements["dp_query_metrics"]["clip"]))
            their_releases.append({k: np.asarray(v) for k, v in out.result.items()})
    finally:
        stop_tff_workers()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[-1] > 4 * 0.05  # it moved: from far below the norms towards their 0.7 quantile
    for mine, tffs in zip(releases, their_releases):
        for name in SHAPES:
            np.testing.assert_allclose(mine[name], tffs[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_with_noise_the_clip_norm_converges_to_the_target_quantile(quantile):
    goal, rounds = 100, 400
    sigma_b = goal / 20  # the default
    rng = np.random.default_rng(5)
    count_noise = noise_generator(new_noise_seed(), COUNT_NOISE)
    clip, clips = 0.01, []  # two orders of magnitude below the norms
    for _ in range(rounds):
        norms = np.exp(rng.normal(0.0, 0.5, size=goal))  # lognormal: median 1
        fraction = unclipped_fraction(int(np.sum(norms <= clip)), goal, expected=goal, stddev=sigma_b, rng=count_noise)
        clip = next_clip_norm(clip, fraction, target_quantile=quantile, learning_rate=0.2)
        clips.append(clip)
    true_quantile = float(np.exp(0.5 * _normal_ppf(quantile)))
    settled = np.array(clips[200:])
    assert abs(np.median(settled) / true_quantile - 1) < 0.05, (np.median(settled), true_quantile)
    # And in the quantile's own terms: the fraction of the distribution under the settled norms.
    fractions = _normal_cdf(np.log(settled) / 0.5)
    assert abs(float(np.mean(fractions)) - quantile) < 0.03


def _normal_cdf(x):
    from math import erf, sqrt

    return np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))))(x)


def _normal_ppf(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def test_the_update_noise_keeps_the_total_noise_multiplier():
    z, sigma_b = 1.0, 1.0  # goal 20: sigma_b = 1
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta > z and z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    assert update_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="clipped-count stddev above 1.0"):
        update_noise_multiplier(2.0, 1.0)


def test_more_unclipped_updates_than_the_target_shrink_the_clip_and_fewer_grow_it():
    # Andrew et al.'s sign: C <- C exp(-lr (b - gamma)). (Flower's wrapper, read in issue 14, inverts it.)
    assert next_clip_norm(1.0, 0.9, target_quantile=0.5, learning_rate=0.2) < 1.0
    assert next_clip_norm(1.0, 0.1, target_quantile=0.5, learning_rate=0.2) > 1.0
    assert unclipped_fraction(10, 10, expected=10, stddev=0.0, rng=None) == 1.0
    assert unclipped_fraction(0, 4, expected=10, stddev=0.0, rng=None) == pytest.approx(0.3)  # centred, fixed denominator
