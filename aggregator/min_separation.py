"""The minimum separation between one device's contributions, counted in releases.

DP-FTRL's privacy comes from the tree's sensitivity to a device that contributes to at most
k of the T releases of a tree, any two of them with at least s other releases in between
(Kairouz et al., 2021, §4; tensorflow_privacy's `compute_zcdp_single_tree(noise_multiplier,
total_steps, max_participation, min_separation)` uses the same s: "y − x − 1" for contributions
at releases x < y). Cross-device participation is not uniform sampling, so the server has to
*enforce* s rather than assume it: a device whose last contribution went into release x may be
given a task only for a round whose release will be number x + s + 1 or later.

Counting is in releases, not round ids: an abandoned round releases nothing, so it must not count
towards the gap (two contributions around it are adjacent leaves of the tree). A device's
history is the releases whose sums included its update; a task it never reported is no
contribution. Pure functions, no database.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from fedkb_core.privacy_accounting import max_participations


@dataclasses.dataclass(frozen=True)
class MinSeparation:
    """s: the fewest releases between two contributions of one device (0: every round allowed)."""

    releases_between: int

    def __post_init__(self):
        if isinstance(self.releases_between, bool) or not isinstance(self.releases_between, int) \
                or self.releases_between < 0:
            raise ValueError(f"min separation must be an integer >= 0, got {self.releases_between!r}")

    def first_allowed(self, history: Iterable[int]) -> int:
        """The first release number this device may contribute to (0 for a device never seen)."""
        last = max(history, default=None)
        return 0 if last is None else last + self.releases_between + 1

    def allows(self, history: Iterable[int], upcoming_release: int) -> bool:
        """Whether a device with this history may contribute to release `upcoming_release`."""
        return upcoming_release >= self.first_allowed(history)

    def violations(self, history: Iterable[int]) -> list[tuple[int, int]]:
        """Consecutive contributions closer than allowed (the audit of a recorded history)."""
        ordered = sorted(history)
        return [(x, y) for x, y in zip(ordered, ordered[1:]) if y - x - 1 < self.releases_between]

    def max_participations(self, releases: int) -> int:
        """The most contributions one device can make to `releases` consecutive releases: k for the
        accountant (ceil(T / (s + 1)))."""
        if releases < 0:
            raise ValueError(f"releases must be >= 0, got {releases}")
        return max_participations(releases, self.releases_between)
