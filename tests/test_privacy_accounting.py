"""The privacy accountant against second implementations.

DP-FedAvg's ε (dp_accounting's RDP accountant over its default orders) is checked against
tensorflow_privacy's DP-SGD accounting (its own order grid; since 0.9 it calls dp_accounting's RDP
code, so it checks our use of the library: the event, q, the count), against the integer-order
closed form of the Poisson-subsampled Gaussian's RDP written out below from the papers (an
independent implementation), and against dp_accounting's PLD accountant (another method: tighter).
DP-FTRL's tree sensitivity is checked against tensorflow_privacy's tree-aggregation accountant and
against brute force over every placement; the zCDP-to-(ε, δ) conversion against dp_accounting's
PLD of the same Gaussian and tensorflow_privacy's conversion.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import sys

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from fedkb_core import privacy_accounting as pa

_TFP_LOADED = "tensorflow_privacy" in sys.modules
sys.skip_tf_privacy_import = True  # tensorflow_privacy's analysis modules, without TensorFlow
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as tfp_sgd  # noqa: E402
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant as tfp_tree  # noqa: E402

# The flag leaves an empty `tensorflow_privacy` package behind; forget it, so a later test's
# `import tensorflow_federated` (which needs the whole package) imports it for real.
del sys.skip_tf_privacy_import
if not _TFP_LOADED:
    del sys.modules["tensorflow_privacy"]

# (expected cohort, population): fedkb's Shakespeare fleet at 20 and 100 per round, and Gboard's scale.
COHORTS = [(20, 846), (100, 846), (1000, 10 ** 6)]
GRID = [(z, c, n, k, d) for z in (1.0, 1.5, 3.0) for c, n in COHORTS for k in (1, 10, 300)
        for d in (1e-5, pa.default_delta(n))]


# The integer orders among the library's: the closed form checks a subset, so it may only be higher.
INTEGER_ORDERS = [int(a) for a in DEFAULT_RDP_ORDERS if a == int(a) and a <= 256]


def _tfp_epsilon(z: float, q: float, k: int, delta: float) -> float:
    # tensorflow_privacy counts ceil(epochs / q) steps: epochs a little under k·q gives exactly k.
    return tfp_sgd._compute_dp_sgd_example_privacy(
        num_epochs=(k - 0.5) * q, noise_multiplier=z, example_delta=delta, used_microbatching=False,
        poisson_subsampling_probability=q, accountant_type=tfp_sgd.AccountantType.RDP)


def _integer_order_epsilon(z: float, q: float, k: int, delta: float) -> float:
    """RDP of k Poisson-subsampled Gaussians at integer orders α (Mironov, Talwar & Zhang 2019, §3.3):
    A_α = Σ_j C(α, j) (1−q)^(α−j) q^j exp((j² − j) / 2z²), RDP = k ln(A_α) / (α − 1); then
    ε = RDP + ln(1 − 1/α) − (ln δ + ln α) / (α − 1) (Canonne, Kamath & Steinke 2020, Prop. 12)."""
    best = math.inf
    for a in INTEGER_ORDERS:
        terms = [math.lgamma(a + 1) - math.lgamma(j + 1) - math.lgamma(a - j + 1)
                 + (a - j) * math.log1p(-q) + j * math.log(q) + (j * j - j) / (2 * z * z) for j in range(a + 1)]
        top = max(terms)
        log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        best = min(best, k * log_a / (a - 1) + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return max(0.0, best)


@pytest.mark.parametrize("z,cohort,population,rounds,delta", GRID)
def test_dp_fedavg_epsilon_agrees_with_tensorflow_privacy_and_the_integer_order_closed_form(
        z, cohort, population, rounds, delta):
    spent = pa.dp_fedavg_spent(noise_multiplier=z, clip_norm=0.5, expected_cohort=cohort, population=population,
                               rounds=rounds, delta=delta)
    q = cohort / population
    tfp = _tfp_epsilon(z, q, rounds, delta)
    closed = _integer_order_epsilon(z, q, rounds, delta)
    # Both check fewer orders than dp_accounting's defaults, so they may only be higher, and not by much.
    assert spent.epsilon <= tfp * (1 + 1e-9) and tfp <= spent.epsilon * 1.03, (spent.epsilon, tfp)
    assert spent.epsilon <= closed * (1 + 1e-9) and closed <= spent.epsilon * 1.06, (spent.epsilon, closed)
    assert spent.epsilon_without_amplification == pytest.approx(_tfp_epsilon(z, 1.0, rounds, delta), rel=0.03)
    assert spent.epsilon < spent.epsilon_without_amplification
    assert (spent.delta, spent.noise_multiplier, spent.clip_norm, spent.rounds) == (delta, z, 0.5, rounds)
    assert spent.mechanism == "dp-fedavg" and "rdp" in spent.accountant
    assert f"q = {cohort}/{population}" in spent.sampling and "Poisson" in spent.sampling


@pytest.mark.parametrize("z,cohort,population,rounds", [(1.0, 20, 846, 50), (0.7, 100, 846, 10), (0.8, 20, 846, 200)])
def test_dp_fedavg_rdp_epsilon_bounds_the_tighter_pld_accountant(z, cohort, population, rounds):
    """PLD accounting is tight up to its discretization: RDP's figure must be above it, and near it."""
    delta = pa.default_delta(population)
    rdp = pa.dp_fedavg_spent(noise_multiplier=z, clip_norm=1.0, expected_cohort=cohort, population=population,
                             rounds=rounds).epsilon
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(cohort / population, dp_accounting.GaussianDpEvent(z)), rounds))
    tight = pld.get_epsilon(delta)
    assert tight <= rdp <= 1.6 * tight, (tight, rdp)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_delta_defaults_to_one_over_n_to_the_1_1():
    def eps(z, k):
        return pa.dp_fedavg_spent(noise_multiplier=z, clip_norm=1.0, expected_cohort=20, population=846,
                                  rounds=k).epsilon
    assert 0 < eps(1.0, 1) < eps(1.0, 2) < eps(1.0, 20)
    assert eps(2.0, 20) < eps(1.0, 20) < eps(0.5, 20)
    spent = pa.dp_fedavg_spent(noise_multiplier=1.0, clip_norm=1.0, expected_cohort=20, population=846, rounds=3)
    assert spent.delta == pytest.approx(846 ** -1.1) and spent.delta < 1 / 846
    assert pa.dp_fedavg_spent(noise_multiplier=1.0, clip_norm=1.0, expected_cohort=20, population=846,
                              rounds=0).epsilon == 0.0


def test_zero_noise_has_no_bound_and_its_json_says_null():
    spent = pa.dp_fedavg_spent(noise_multiplier=0.0, clip_norm=1.0, expected_cohort=20, population=846, rounds=1)
    assert spent.epsilon == math.inf
    record = json.loads(json.dumps(spent.as_json(), allow_nan=False))
    assert record["epsilon"] is None and record["epsilon_without_amplification"] is None
    assert set(record) >= {"epsilon", "delta", "noise_multiplier", "clip_norm", "mechanism", "accountant",
                           "sampling", "epsilon_without_amplification"}


@pytest.mark.parametrize("rho", [0.05, 0.2, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-10])
def test_zcdp_conversion_is_the_exact_gaussian_one_and_tighter_than_the_standard_bound(rho, delta):
    eps = pa.gaussian_zcdp_epsilon(rho, delta)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * rho)))
    assert eps == pytest.approx(pld.get_epsilon(delta), rel=1e-3)
    assert eps == pytest.approx(tfp_tree._gaussian_zcdp_to_epsilon(rho, delta), rel=1e-6)
    assert eps < rho + 2 * math.sqrt(rho * math.log(1 / delta))


def _brute_force_square_sum(leaves: int, participations: int, min_separation: int) -> int:
    """Every placement of up to `participations` leaves, `min_separation` between two, over the tree's nodes."""
    nodes, start = [], 0
    while start < leaves:  # tree aggregation's nodes: every dyadic block inside the leftmost complete subtrees
        size = 1 << ((leaves - start).bit_length() - 1)
        nodes += [(s, s + w) for w in (1 << h for h in range(size.bit_length())) for s in range(start, start + size, w)]
        start += size
    best = 0
    for n in range(1, participations + 1):
        for placed in itertools.combinations(range(leaves), n):
            if all(b - a - 1 >= min_separation for a, b in zip(placed, placed[1:])):
                best = max(best, sum(sum(lo <= p < hi for p in placed) ** 2 for lo, hi in nodes))
    return best


@pytest.mark.parametrize("leaves,min_separation", [(1, 0), (5, 0), (8, 1), (11, 2), (13, 3), (16, 4), (12, 0)])
def test_tree_sensitivity_matches_brute_force_and_tensorflow_privacy(leaves, min_separation):
    participations = pa.max_participations(leaves, min_separation)
    ours = pa.tree_sensitivity_square_sum(leaves, participations, min_separation)
    assert ours == _brute_force_square_sum(leaves, participations, min_separation)
    assert ours == tfp_tree._max_tree_sensitivity_square_sum(participations, min_separation, leaves)


@pytest.mark.parametrize("rounds,min_separation", [(64, 3), (100, 9), (300, 29), (333, 6), (40, 0)])
def test_dp_ftrl_rho_of_one_tree_matches_tensorflow_privacy(rounds, min_separation):
    z = 1.3
    ours = pa.dp_ftrl_rho(z, rounds, min_separation)
    theirs = tfp_tree.compute_zcdp_single_tree(z, rounds, pa.max_participations(rounds, min_separation),
                                               min_separation)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours > pa.max_participations(rounds, min_separation) / (2 * z * z)  # a participation hits several nodes


def test_dp_ftrl_once_per_restarted_tree_matches_tensorflow_privacys_tree_restart():
    """A device once per tree (separation = tree length): each tree costs its depth, as in TreeRestart."""
    z, rounds, every = 2.0, 100, 16
    assert pa.tree_sizes(rounds, every) == [16] * 6 + [4]
    assert pa.tree_sizes(rounds, every, restart_warmup=5) == [5] + [16] * 5 + [15]
    for warmup in (0, 5):
        steps = pa.tree_sizes(rounds, every, warmup)
        ours = pa.dp_ftrl_rho(z, rounds, min_separation=every - 1, restart_period=every, restart_warmup=warmup)
        assert ours == pytest.approx(tfp_tree.compute_rdp_tree_restart(z, steps, 3.0) / 3.0, rel=1e-12)


def test_dp_ftrl_spent_reports_rho_and_the_separation_it_assumes():
    spent = pa.dp_ftrl_spent(noise_multiplier=4.0, clip_norm=1.0, rounds=200, min_separation=19, population=10 ** 6)
    assert spent.zcdp_rho == pytest.approx(tfp_tree.compute_zcdp_single_tree(4.0, 200, 10, 19))
    assert spent.epsilon == pytest.approx(tfp_tree._gaussian_zcdp_to_epsilon(spent.zcdp_rho, 1e-6 ** 1.1), rel=1e-6)
    assert spent.epsilon == spent.epsilon_without_amplification
    assert spent.mechanism == "dp-ftrl" and "at least 19 other releases" in spent.sampling


def test_rounds_within_a_target_is_the_last_round_at_or_under_it():
    @functools.cache  # a pure function of k, 0.1 s a call: the search and the scans share its values
    def eps(k):
        return pa.rdp_epsilon(1.0, 100 / 846, k, 1e-5)
    for target in (eps(1) / 2, eps(1), 3.0, 5.0):
        allowed = pa.rounds_within(target, eps)
        scan = 0
        while eps(scan + 1) <= target:
            scan += 1
        assert allowed == scan


def test_rounds_released_with_different_settings_compose_and_one_without_noise_has_no_bound():
    def spent(releases):
        return pa.dp_fedavg_spent_over(releases, clip_norm=1.0, population=846, noise_multiplier=1.0,
                                       expected_cohort=20)
    mixed = spent({(1.0, 20): 10, (2.0, 100): 5})
    # RDP adds up order by order: the mix lies between its parts and their (looser) ε sum.
    part_a = pa.rdp_epsilon(1.0, 20 / 846, 10, mixed.delta)
    part_b = pa.rdp_epsilon(2.0, 100 / 846, 5, mixed.delta)
    assert max(part_a, part_b) < mixed.epsilon < part_a + part_b
    assert mixed.rounds == 15
    assert spent({(1.0, 20): 10, (None, 20): 1}).epsilon == math.inf
    assert spent({}).epsilon == 0.0
