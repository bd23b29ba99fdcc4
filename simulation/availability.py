"""When an emulated phone could train: a daily pattern of charging, idleness and Wi-Fi.

Production federated keyboards see most participation at night in each device's own time zone,
when phones sit idle on a charger on home Wi-Fi (Bonawitz et al., "Towards Federated Learning at
Scale", 2019, https://arxiv.org/abs/1902.01046, fig. 3; Hard et al., 2018,
https://arxiv.org/abs/1811.03604). This module draws such a pattern per device from a seed and
answers "what is this device's state at simulated time t" as a pure function, so the same fleet
behaves the same way in every run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedkb_core.protocol import DeviceState

DAY = 86_400.0
HOUR = 3_600.0


@dataclasses.dataclass(frozen=True)
class AvailabilityConfig:
    """Fleet-wide parameters of the daily pattern."""

    night_start_hour: tuple[float, float] = (21.0, 25.0)  # local time the phone goes on the charger
    night_hours: tuple[float, float] = (5.0, 9.0)  # how long it stays there
    skip_night_probability: float = 0.1  # some nights a phone is not charged at all
    day_charge_probability: float = 0.3  # a short top-up during the day (in use, so not idle)
    wifi_at_night_probability: float = 0.85  # the rest charge on mobile data: metered
    idle_fraction_of_night: float = 0.9  # checked phone at night: briefly not idle
    time_zones: tuple[float, ...] = (-8, -5, -3, 0, 1, 2, 3, 5.5, 8, 9, 10)  # UTC offsets, hours


@dataclasses.dataclass(frozen=True)
class DailyPattern:
    """One device's habits: its time zone and a seed for its day-to-day variation."""

    device_index: int
    utc_offset_hours: float
    seed: int

    def _day_draws(self, local_day: int) -> np.ndarray:
        # SeedSequence wants non-negative entropy; day -1 exists for zones west of UTC at t=0.
        rng = np.random.default_rng([self.seed, self.device_index, local_day + 1_000_000])
        return rng.random(8)

    def state_at(self, t: float, config: AvailabilityConfig) -> DeviceState:
        """The device's state at simulated UTC time t (seconds)."""
        local = t + self.utc_offset_hours * HOUR
        # A night window starting on local day d may run past midnight into day d+1, so look at
        # today's and yesterday's windows.
        for day in (math.floor(local / DAY), math.floor(local / DAY) - 1):
            u = self._day_draws(day)
            if u[0] < config.skip_night_probability:
                continue
            start = day * DAY + HOUR * (config.night_start_hour[0] + u[1] * (config.night_start_hour[1] - config.night_start_hour[0]))
            length = HOUR * (config.night_hours[0] + u[2] * (config.night_hours[1] - config.night_hours[0]))
            if start <= local < start + length:
                into = (local - start) / length
                # Idle except for a short check of the phone at a random point of the night.
                check_at = u[4]
                idle = not (abs(into - check_at) < (1.0 - config.idle_fraction_of_night) / 2)
                battery = min(100.0, 20.0 + 80.0 * u[5] + 60.0 * into * 2)
                return DeviceState(idle=idle, charging=True, unmetered=bool(u[3] < config.wifi_at_night_probability),
                                   battery=round(battery, 1))
        day = math.floor(local / DAY)
        u = self._day_draws(day)
        hour = (local - day * DAY) / HOUR
        top_up_start = 12.0 + 6.0 * u[6]
        charging = bool(u[7] < config.day_charge_probability and top_up_start <= hour < top_up_start + 1.0)
        battery = max(5.0, 95.0 - 5.0 * max(0.0, hour - 7.0))
        return DeviceState(idle=False, charging=charging, unmetered=False, battery=round(battery, 1))


def draw_fleet(num_devices: int, *, seed: int, config: AvailabilityConfig | None = None) -> list[DailyPattern]:
    """Assign each device a time zone and a seed, reproducibly."""
    config = config or AvailabilityConfig()
    rng = np.random.default_rng(seed)
    zones = rng.choice(np.array(config.time_zones, dtype=float), size=num_devices)
    return [DailyPattern(device_index=i, utc_offset_hours=float(z), seed=seed) for i, z in enumerate(zones)]

