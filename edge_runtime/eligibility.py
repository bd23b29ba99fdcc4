"""Whether this device may train now: a pure policy over its state and its data.

Gboard trains only when the phone is idle, charging and on an unmetered network, so that
learning never costs the user battery, data or a sluggish keyboard (Hard et al., 2018,
"Federated Learning for Mobile Keyboard Prediction", https://arxiv.org/abs/1811.03604, §3;
Bonawitz et al., 2019, "Towards Federated Learning at Scale: System Design",
https://arxiv.org/abs/1902.01046, §3). Those three conditions are the defaults here.

The papers publish no battery threshold (a charging phone is charging). We require
`min_battery = 20` % as well: a phone that has just been plugged in with an almost empty battery
should spend the charger's power on charging. It is Android JobScheduler's "battery not low"
constraint (the system's low-battery level is 15 %) with a margin. Work is batched: a job starts
only when at least `min_new_examples` messages arrived since the last one, so a device does not
wake up to train on the same text again.

Two checks: `check` decides whether a job may *start*; `can_continue` decides whether a running
job may take its next step (new examples do not matter once it runs).
"""

from __future__ import annotations

import dataclasses
import math

from fedkb_core.protocol import DeviceState

# Reason codes, stable for logs and reports.
NOT_IDLE, NOT_CHARGING, METERED, LOW_BATTERY, FEW_EXAMPLES = (
    "not_idle", "not_charging", "metered_network", "low_battery", "too_few_new_examples")


@dataclasses.dataclass(frozen=True)
class EligibilityPolicy:
    """The conditions a device must meet to train; defaults are the production ones.

    Raises:
        ValueError: min_battery outside 0..100 or a negative min_new_examples.
    """

    require_idle: bool = True
    require_charging: bool = True
    require_unmetered: bool = True
    min_battery: float = 20.0  # percent; see the module docstring for why 20
    min_new_examples: int = 10  # typed messages since the last job

    def __post_init__(self):
        if not (math.isfinite(self.min_battery) and 0.0 <= self.min_battery <= 100.0):
            raise ValueError(f"min_battery must be within 0..100, got {self.min_battery}")
        if self.min_new_examples < 0:
            raise ValueError(f"min_new_examples must be >= 0, got {self.min_new_examples}")


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """The verdict and, when it is no, every reason (not just the first)."""

    eligible: bool
    reasons: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.eligible


def state_reasons(state: DeviceState, policy: EligibilityPolicy) -> tuple[str, ...]:
    """The device-state conditions that fail, in a fixed order."""
    reasons = []
    if policy.require_idle and not state.idle:
        reasons.append(NOT_IDLE)
    if policy.require_charging and not state.charging:
        reasons.append(NOT_CHARGING)
    if policy.require_unmetered and not state.unmetered:
        reasons.append(METERED)
    if state.battery < policy.min_battery:
        reasons.append(LOW_BATTERY)
    return tuple(reasons)


def can_continue(state: DeviceState, policy: EligibilityPolicy) -> Eligibility:
    """May a running job take its next step? (The state conditions only.)"""
    reasons = state_reasons(state, policy)
    return Eligibility(not reasons, reasons)


def check(state: DeviceState, policy: EligibilityPolicy, *, new_examples: int) -> Eligibility:
    """May a new job start? The state conditions and enough new examples."""
    reasons = state_reasons(state, policy)
    if new_examples < policy.min_new_examples:
        reasons += (FEW_EXAMPLES,)
    return Eligibility(not reasons, reasons)
