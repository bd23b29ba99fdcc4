"""Minimum separation between a device's contributions: the gate the server applies at check-in,
the audit of a recorded history, and the participation bound it gives tensorflow_privacy's tree
accountant (checked against the accountant's own feasibility rule)."""

from __future__ import annotations

import itertools

import pytest

from aggregator.min_separation import MinSeparation


def test_a_new_device_may_contribute_at_once():
    assert MinSeparation(3).first_allowed([]) == 0
    assert MinSeparation(3).allows([], 0)


def test_a_device_waits_s_releases_after_its_last_contribution():
    gate = MinSeparation(2)
    assert [r for r in range(10) if gate.allows([1, 4], r)] == [7, 8, 9]  # 5 and 6 lie between
    assert MinSeparation(0).allows([4], 5) and not MinSeparation(0).allows([4], 4)


def test_greedy_enforcement_never_produces_a_violation():
    """A device that checks in for every release and is admitted whenever the gate allows."""
    for s in range(4):
        gate, history = MinSeparation(s), []
        for release in range(40):
            if gate.allows(history, release):
                history.append(release)
        assert gate.violations(history) == []
        assert len(history) == gate.max_participations(40)  # the bound is reached, not exceeded
        assert all(y - x == s + 1 for x, y in zip(history, history[1:]))


def test_violations_lists_the_pairs_that_are_too_close():
    assert MinSeparation(2).violations([9, 0, 3, 5]) == [(3, 5)]
    assert MinSeparation(2).violations([0, 3, 6]) == []


@pytest.mark.parametrize("s", [0, 1, 3])
@pytest.mark.parametrize("releases", [1, 5, 8, 13])
def test_max_participations_is_the_largest_feasible_count(s, releases):
    gate = MinSeparation(s)
    best = max(len(c) for k in range(releases + 1) for c in itertools.combinations(range(releases), k)
               if not gate.violations(c))
    assert gate.max_participations(releases) == best


def test_max_participations_is_where_the_tree_accountant_saturates():
    """tensorflow_privacy lowers a participation count the separation makes impossible to the
    feasible maximum; that maximum is ours: one fewer costs less, more costs the same."""
    pytest.importorskip("tensorflow_privacy")
    from tensorflow_privacy.privacy.analysis.tree_aggregation_accountant import compute_zcdp_single_tree

    for s, steps in ((0, 8), (1, 8), (3, 13), (2, 32)):
        k = MinSeparation(s).max_participations(steps)
        at_k = compute_zcdp_single_tree(1.0, steps, k, s)
        assert compute_zcdp_single_tree(1.0, steps, k - 1, s) < at_k
        assert compute_zcdp_single_tree(1.0, steps, k + 1, s) == at_k == compute_zcdp_single_tree(1.0, steps, k + 5, s)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_min_separation_rejects_a_non_integer_or_negative_value(bad):
    with pytest.raises(ValueError, match="min separation must be an integer >= 0"):
        MinSeparation(bad)
