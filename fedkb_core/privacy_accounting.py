"""How much privacy a deployment has spent: (ε, δ) after k rounds, with the assumption it rests on.

Two mechanisms, two accountants:

* DP-FedAvg (McMahan et al. 2018): every round releases the noised sum of clipped updates, a
  Gaussian mechanism of noise multiplier Z. Its ε uses Google's `dp_accounting` RDP accountant with
  amplification by Poisson sampling at q = expected cohort / population. fedkb's server does not
  sample: it takes the devices that check in. So the amplified ε holds only if devices' presence is
  as random as Poisson sampling, and every result also carries the ε without amplification (q = 1:
  every device in every round), which holds whatever the participation pattern.
* DP-FTRL (Kairouz et al. 2021): tree aggregation releases prefix sums, each tree node noised with
  Z·C. Between two contributions of a device lie at least s other releases (the minimum separation
  s, in tensorflow_privacy's convention: y − x − 1 for releases x < y; the server enforces it), so
  it contributes at most ceil(T / (s + 1)) times to a tree of T releases; the worst case over those
  placements of the sum of squared node sensitivities S gives ρ = S / (2Z²)-zCDP per tree (Appendix
  D of Kairouz et al.; one participation alone touches every level of the tree, so S is several
  times the participation count), summed over the trees between restarts,
  converted to (ε, δ) exactly, since a composition of Gaussian mechanisms is one Gaussian
  mechanism with μ = √(2ρ) (Balle & Wang 2018, "Improving the Gaussian Mechanism").

δ defaults to 1/N^1.1 for a population of N devices: below 1/N, as a meaningful δ must be.
Pure functions: the edge runtime never imports this module; the server and the simulator do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping


DP_FEDAVG, DP_FTRL = "dp-fedavg", "dp-ftrl"
RDP_ACCOUNTANT = "rdp (dp_accounting RdpAccountant, Poisson-subsampled Gaussian)"
ZCDP_ACCOUNTANT = "zcdp (tree-aggregation sensitivity, exact Gaussian conversion to (ε, δ))"


@dataclasses.dataclass(frozen=True)
class PrivacySpent:
    """ε at δ after `rounds` released rounds, and what that figure assumes.

    `epsilon` is math.inf when nothing bounds it (Z = 0); `as_json` writes it as null.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    mechanism: str
    accountant: str
    sampling: str  # the assumption `epsilon` rests on, in words
    epsilon_without_amplification: float
    rounds: int
    zcdp_rho: float | None = None  # DP-FTRL only

    def as_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("epsilon", "epsilon_without_amplification", "zcdp_rho"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


def default_delta(population: int) -> float:
    """1/N^1.1: a δ below the 1/N at which 'leak one device's data entirely' would satisfy DP."""
    return 1.0 / population ** 1.1


# DP-FedAvg: RDP of the Poisson-subsampled Gaussian, composed over rounds.

def rdp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """ε at δ of `rounds` Gaussian mechanisms of multiplier Z, each on a Poisson sample at rate q."""
    return rdp_epsilon_of({(noise_multiplier, sampling_rate): rounds}, delta)


def rdp_epsilon_of(releases: Mapping[tuple[float | None, float], int], delta: float) -> float:
    """ε at δ of a composition: {(Z, q): how many rounds released with them}; Z None or 0 is no bound."""
    releases = {key: n for key, n in releases.items() if n > 0}
    if not releases:
        return 0.0
    if any(not z for z, _ in releases):
        return math.inf
    # Imported here, not at the top: dp_accounting takes a third of a second to import (its PLD
    # package), which every `fedkb serve` start paid whether or not DP was on.
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    for (z, q), count in releases.items():
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return float(accountant.get_epsilon(delta))


def dp_fedavg_spent(*, noise_multiplier: float, clip_norm: float, expected_cohort: int, population: int,
                    rounds: int, delta: float | None = None) -> PrivacySpent:
    """ε after `rounds` rounds of DP-FedAvg, amplified by Poisson sampling at q = cohort / N."""
    return dp_fedavg_spent_over({(noise_multiplier, expected_cohort): rounds}, clip_norm=clip_norm,
                                population=population, delta=delta, noise_multiplier=noise_multiplier,
                                expected_cohort=expected_cohort)


def dp_fedavg_spent_over(releases: Mapping[tuple[float | None, int], int], *, clip_norm: float, population: int,
                         noise_multiplier: float, expected_cohort: int, delta: float | None = None) -> PrivacySpent:
    """ε after the released rounds {(Z, expected cohort): count} (Z None: a round released without
    noise, which no ε bounds); `noise_multiplier` and `expected_cohort` are the current settings."""
    delta = default_delta(population) if delta is None else delta
    amplified = {(z, min(1.0, cohort / population)): n for (z, cohort), n in releases.items()}
    unamplified = {(z, 1.0): n for (z, _), n in releases.items()}
    epsilon, without = rdp_epsilon_of(amplified, delta), rdp_epsilon_of(unamplified, delta)
    q = min(1.0, expected_cohort / population)
    sampling = (f"Poisson sampling: each of N = {population} devices takes part in each round independently with "
                f"probability q = {expected_cohort}/{population} = {q:.4g} (expected cohort / population). The "
                f"server does not sample, it takes the devices that check in, so this holds only if their presence "
                f"is that random; with no amplification (every device in every round) ε = {_fmt(without)}")
    return PrivacySpent(epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                        mechanism=DP_FEDAVG, accountant=RDP_ACCOUNTANT, sampling=sampling,
                        epsilon_without_amplification=without, rounds=sum(releases.values()))


# DP-FTRL: zCDP of tree aggregation with a minimum separation between a device's participations.

def max_participations(releases: int, min_separation: int) -> int:
    """At most ceil(T / (s + 1)) contributions to T releases with s other releases between any two."""
    return math.ceil(releases / (min_separation + 1)) if releases > 0 else 0


def tree_sensitivity_square_sum(leaves: int, participations: int, min_separation: int) -> int:
    """The worst case, over a device's placements, of Σ over tree nodes of (its participations under the node)².

    One tree over `leaves` releases (the leftmost complete binary subtrees, as tree aggregation
    builds them), at most `participations` placements with at least `min_separation` leaves between
    two. The dynamic program of Kairouz et al. 2021, Appendix D.2 (tensorflow_privacy's
    `_max_tree_sensitivity_square_sum` is the reference the tests check it against, with brute force).
    """
    gap = min_separation
    best = [_tree_sum(n, gap, 0, gap, leaves) for n in range(1, participations + 1)]
    return max([b for b in best if b is not None], default=0)


@functools.lru_cache(maxsize=None)
def _tree_sum(n: int, gap: int, start: int, end: int, size: int) -> int | None:
    """Worst Σ c² for n placements in `size` leaves, the first not before leaf `start`, with `end`
    leaves after the subtree also free of placements (None: n placements do not fit)."""
    if start + (gap + 1) * n > size + end:
        return None
    if n == 0:
        return 0
    if size == 1:
        return 1
    left_size = 1 << (size.bit_length() - 1)
    total = 0
    if left_size == size:  # a complete subtree: its root holds all n
        total = n * n
        left_size //= 2
    best = None
    for right_n in range(n + 1):
        for right_start in range(gap + 1):
            left = _tree_sum(n - right_n, gap, start, right_start, left_size)
            if left is None:
                continue
            right = _tree_sum(right_n, gap, right_start, end, size - left_size)
            if right is not None and (best is None or left + right > best):
                best = left + right
    return None if best is None else total + best


def tree_sizes(releases: int, restart_period: int | None = None, restart_warmup: int = 0) -> list[int]:
    """The leaf counts of the trees `releases` releases fill, the tree restarting after release number
    k (counted from 1) whenever k mod period == warmup (tensorflow_privacy's
    `PeriodicRoundRestartIndicator`; None: one tree)."""
    if not restart_period:
        return [releases] if releases > 0 else []
    first = restart_warmup or restart_period
    sizes = [min(first, releases)] if releases > 0 else []
    left = releases - first
    while left > 0:
        sizes.append(min(restart_period, left))
        left -= restart_period
    return sizes


def dp_ftrl_rho(noise_multiplier: float, releases: int, min_separation: int, restart_period: int | None = None,
                restart_warmup: int = 0) -> float:
    """ρ-zCDP of `releases` releases of tree aggregation with per-node noise multiplier Z.

    Trees compose: ρ adds up over them, each counted with its own worst case (an upper bound, since a
    device's placements in consecutive trees also obey the separation).
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    squares = sum(tree_sensitivity_square_sum(leaves, max_participations(leaves, min_separation), min_separation)
                  for leaves in tree_sizes(releases, restart_period, restart_warmup))
    return squares / (2.0 * noise_multiplier ** 2)


def gaussian_zcdp_epsilon(rho: float, delta: float) -> float:
    """The exact ε at δ of a Gaussian mechanism that is ρ-zCDP (μ = √(2ρ), Balle & Wang 2018, Theorem 8).

    Tighter than ρ + 2√(ρ ln(1/δ)), which bounds every ρ-zCDP mechanism; valid here because the ρ
    comes from Gaussian noise only.
    """
    if rho == 0:
        return 0.0
    if not math.isfinite(rho):
        return math.inf
    mu = math.sqrt(2.0 * rho)

    def delta_at(eps: float) -> float:
        return _normal_cdf(mu / 2 - eps / mu) - math.exp(eps) * _normal_cdf(-mu / 2 - eps / mu)

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_at(mid) <= delta else (mid, hi)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi


def dp_ftrl_spent(*, noise_multiplier: float, clip_norm: float, rounds: int, min_separation: int, population: int,
                  delta: float | None = None, restart_period: int | None = None,
                  restart_warmup: int = 0) -> PrivacySpent:
    """ε after `rounds` releases of DP-FTRL with a server-enforced minimum separation (no sampling assumed)."""
    delta = default_delta(population) if delta is None else delta
    rho = dp_ftrl_rho(noise_multiplier, rounds, min_separation, restart_period, restart_warmup)
    epsilon = gaussian_zcdp_epsilon(rho, delta)
    trees = len(tree_sizes(rounds, restart_period, restart_warmup))
    sampling = (f"No sampling assumed: at least {min_separation} other releases between two contributions of a "
                f"device (enforced by the server), so at most ceil(T / {min_separation + 1}) contributions to a "
                f"tree of T releases; {rounds} releases in {trees} tree(s); ρ = {_fmt(rho)}-zCDP")
    return PrivacySpent(epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                        mechanism=DP_FTRL, accountant=ZCDP_ACCOUNTANT, sampling=sampling,
                        epsilon_without_amplification=epsilon, rounds=rounds, zcdp_rho=rho)


def rounds_within(target_epsilon: float, epsilon_after, *, limit: int = 1 << 20) -> int:
    """The most rounds k whose ε, `epsilon_after(k)` (non-decreasing in k), stays at or below the target."""
    if epsilon_after(1) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi < limit and epsilon_after(hi) <= target_epsilon:
        lo, hi = hi, hi * 2
    if epsilon_after(hi) <= target_epsilon:
        return hi  # the search's cap
    while hi - lo > 1:  # ε(lo) <= target < ε(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon_after(mid) <= target_epsilon else (lo, mid)
    return lo


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _fmt(value: float) -> str:
    return "unbounded" if not math.isfinite(value) else f"{value:.4g}"
