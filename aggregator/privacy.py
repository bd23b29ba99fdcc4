"""The privacy this server has spent, from the rounds it released, and the budget that stops rounds.

The accountant (fedkb_core/privacy_accounting.py) charges every closed round: a closed round
published a version computed from its updates, an abandoned one released nothing. Each round's
noise multiplier and fixed denominator are read from its own record (frozen when it opened), so a
restart with other settings composes correctly; a round closed without noise makes ε unbounded.

`--target-epsilon E`: a round opens only if ε after its release would still be at most E. The
check runs when the worker would open a round, so a server whose budget is spent keeps serving
its models and says why no round opens (status `privacy.budget`, and one warning in the log).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter

from fedkb_core.privacy_accounting import PrivacySpent, dp_fedavg_spent_over, dp_ftrl_spent

OPEN_BUDGET, SPENT_BUDGET = "open", "spent"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Whether one more round fits under the target ε (None: no target)."""

    target_epsilon: float | None
    next_round_epsilon: float | None  # ε after one more release at the current settings
    state: str  # OPEN_BUDGET or SPENT_BUDGET
    message: str

    @property
    def allows_a_round(self) -> bool:
        return self.state == OPEN_BUDGET


def _releases(conn) -> Counter:
    """{(Z or None, expected cohort): closed rounds released with them}."""
    rows = conn.execute("SELECT dp_noise_multiplier, COALESCE(dp_denominator, goal_clients) FROM rounds"
                        " WHERE state = 'closed'").fetchall()
    return Counter((row[0], row[1]) for row in rows)


def _spent(releases: Counter, config, clip_norm: float | None = None) -> PrivacySpent:
    if config.dp_mechanism == "ftrl":  # one tree stream at the deployment's settings, no sampling assumed
        noise = 0.0 if any(z is None for z, _ in releases) else config.dp_noise_multiplier  # unnoised: unbounded
        return _ftrl_spent_of(sum(releases.values()), clip_norm or config.clip_norm, config.dp_population, noise,
                              config.dp_min_separation, config.dp_delta, config.dp_tree_restart_period)
    return _spent_of(tuple(sorted(releases.items(), key=repr)), clip_norm or config.clip_norm, config.dp_population,
                     config.dp_noise_multiplier, config.goal_clients, config.dp_delta)


@functools.lru_cache(maxsize=64)
def _spent_of(releases: tuple, clip_norm: float, population: int, noise_multiplier: float, expected_cohort: int,
              delta: float | None) -> PrivacySpent:
    """Memoized: an account takes tens of ms, and status is polled (the dashboard, a fleet, Prometheus)
    far more often than a round closes."""
    return dp_fedavg_spent_over(dict(releases), clip_norm=clip_norm, population=population,
                                noise_multiplier=noise_multiplier, expected_cohort=expected_cohort, delta=delta)


@functools.lru_cache(maxsize=64)
def _ftrl_spent_of(rounds: int, clip_norm: float, population: int, noise_multiplier: float, min_separation: int,
                   delta: float | None, restart_period: int | None) -> PrivacySpent:
    return dp_ftrl_spent(noise_multiplier=noise_multiplier, clip_norm=clip_norm, rounds=rounds,
                         min_separation=min_separation, population=population, delta=delta,
                         restart_period=restart_period)


def accounted(config) -> bool:
    """Whether ε can be computed: DP on and the population N known."""
    return config.dp_enabled and config.dp_population is not None


def privacy_spent(conn, config) -> PrivacySpent | None:
    """ε after every round released so far (None when DP is off or N unknown), with the latest
    round's clip norm (adaptive clipping moves it)."""
    if not accounted(config):
        return None
    latest = conn.execute("SELECT clip_norm FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    return _spent(_releases(conn), config, latest[0] if latest else None)


def budget(conn, config) -> Budget:
    """Whether the next round's release keeps ε within `dp_target_epsilon`."""
    target = config.dp_target_epsilon
    if target is None or not accounted(config):
        return Budget(target, None, OPEN_BUDGET, "no target epsilon")
    releases = _releases(conn)
    now = _spent(releases, config).epsilon
    releases[(config.dp_noise_multiplier, config.goal_clients)] += 1
    after = _spent(releases, config).epsilon
    if after <= target:
        return Budget(target, after, OPEN_BUDGET, f"the next round brings epsilon from {_fmt(now)} to {_fmt(after)}, "
                                                  f"within the target {target:g}")
    return Budget(target, after, SPENT_BUDGET,
                  f"privacy budget spent: epsilon is {_fmt(now)} after {sum(releases.values()) - 1} rounds and the "
                  f"next round would bring it to {_fmt(after)}, past the target {target:g}; no round opens")


def start_problem(conn, config) -> str | None:
    """A target that is already spent, said at start (the released rounds exceed it, or one round would)."""
    target = config.dp_target_epsilon
    if target is None:
        return None
    if not accounted(config):
        return "dp_target_epsilon needs dp_population (the number of devices N) to compute epsilon"
    releases = _releases(conn)
    now = _spent(releases, config).epsilon
    if now > target:
        return (f"dp_target_epsilon {target:g} is already spent: the {sum(releases.values())} rounds released "
                f"reach epsilon {_fmt(now)}")
    if not releases and not budget(conn, config).allows_a_round:
        return (f"dp_target_epsilon {target:g} is below the epsilon of a single round "
                f"({_fmt(budget(conn, config).next_round_epsilon)}): no round could ever open")
    return None


def privacy_json(conn, config, *, public: bool = False) -> dict | None:
    """The status block: what was spent, under which assumption, and the budget (None when DP is off).

    The public one leaves out the clip norm, which ε does not depend on and which, with adaptive
    clipping, follows the fleet's update norms (the operator's status has it).
    """
    if not config.dp_enabled:
        return None
    spent = privacy_spent(conn, config)
    b = budget(conn, config)
    spent_json = spent.as_json() if spent else None
    if public and spent_json:
        del spent_json["clip_norm"]
    return {"spent": spent_json,
            "unaccounted": None if spent else "dp_population (N) is not set: epsilon cannot be computed",
            "budget": {"target_epsilon": b.target_epsilon, "next_round_epsilon": _finite(b.next_round_epsilon),
                       "state": b.state, "message": b.message}}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "unbounded"
