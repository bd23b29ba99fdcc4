"""Where the device's conditions come from: idle, charging, unmetered network, battery level.

`DeviceStateProvider` is the one interface the scheduler reads. Two implementations:

* `LinuxDeviceState` reads the host: power supplies under /sys/class/power_supply, user idle
  time from X11 (`xprintidle`) or from terminal access times (what `w` reports), and the
  default route's interface for the network. A machine without a battery (a desktop on mains)
  counts as charging at 100 %; a machine without an interactive user counts as idle.
* `ScriptedDeviceState` answers from a script (a fixed state, a timeline, or a function of
  time), for tests and fleet emulation.

The state type is `fedkb_core.protocol.DeviceState`, the same one a check-in sends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from fedkb_core.errors import FedkbError
from fedkb_core.protocol import DeviceState

__all__ = ["DeviceState", "DeviceStateProvider", "LinuxDeviceState", "ScriptedDeviceState", "parse_state_spec"]


@runtime_checkable
class DeviceStateProvider(Protocol):
    """Anything that can say what state the device is in right now."""

    def current(self) -> DeviceState:
        """The state now; must be cheap (the scheduler asks before every training step)."""


# ---------------------------------------------------------------------------------------------
# Scripted state (tests, emulation, `fedkb device --state ...`).

class ScriptedDeviceState:
    """A state that follows a script of time.

    Args:
        script: a `DeviceState` (constant), a sequence of `(seconds_from_start, DeviceState)`
            steps (each holds until the next; the first must start at 0), or a function
            `f(seconds_from_start) -> DeviceState`.
        clock: monotonic seconds (injectable so tests can step time by hand).

    Raises:
        ValueError: an empty timeline, or one that does not start at 0 or is not sorted.
    """

    def __init__(self, script: DeviceState | Sequence[tuple[float, DeviceState]] | Callable[[float], DeviceState],
                 *, clock: Callable[[], float] = time.monotonic):
        if isinstance(script, DeviceState):
            state = script
            self._fn = lambda _t: state
        elif callable(script):
            self._fn = script
        else:
            steps = [(float(t), s) for t, s in script]
            if not steps or steps[0][0] != 0.0:
                raise ValueError("a timeline needs a first step at time 0")
            if any(b[0] < a[0] for a, b in zip(steps, steps[1:])):
                raise ValueError("timeline steps must be in time order")
            self._fn = lambda t: next(s for start, s in reversed(steps) if start <= t)
        self._clock = clock
        self._start = clock()
        self.calls = 0  # how often the state was read (tests check the scheduler polls per step)

    def current(self) -> DeviceState:
        self.calls += 1
        return self._fn(self._clock() - self._start)

    @classmethod
    def sequence(cls, states: Sequence[DeviceState]) -> "ScriptedDeviceState":
        """Answer the given states one per read, then keep the last (deterministic per step)."""
        states = list(states)
        if not states:
            raise ValueError("need at least one state")
        reads = iter(range(1 << 62))
        return cls(lambda _t: states[min(next(reads), len(states) - 1)])


_SPEC_KEYS = {"idle": bool, "charging": bool, "unmetered": bool, "battery": float}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_state_spec(spec: str, *, base: DeviceState | None = None) -> DeviceState:
    """Parse `charging=1,idle=1,unmetered=1,battery=90` (keys not given come from `base`,
    by default a device that meets every condition).

    Raises:
        FedkbError: an unknown key, a value that is not a boolean/number, or battery outside 0..100.
    """
    values = dict(idle=True, charging=True, unmetered=True, battery=100.0)
    if base is not None:
        values.update(idle=base.idle, charging=base.charging, unmetered=base.unmetered, battery=base.battery)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, raw = part.partition("=")
        key, raw = key.strip().lower(), raw.strip().lower()
        if not sep or key not in _SPEC_KEYS:
            raise FedkbError(f"--state: {part!r} is not KEY=VALUE with KEY one of {', '.join(_SPEC_KEYS)}")
        if _SPEC_KEYS[key] is bool:
            if raw not in _TRUE + _FALSE:
                raise FedkbError(f"--state: {key}={raw!r} must be 1/0, true/false, yes/no or on/off")
            values[key] = raw in _TRUE
        else:
            try:
                values[key] = float(raw)
            except ValueError:
                raise FedkbError(f"--state: battery={raw!r} is not a number") from None
            if not 0.0 <= values[key] <= 100.0:
                raise FedkbError(f"--state: battery must be within 0..100, got {raw}")
    return DeviceState(**values)


# ---------------------------------------------------------------------------------------------
# The real host (Linux).

_CELLULAR_PREFIXES = ("ww", "rmnet", "ppp", "wwan", "usb", "cdc-wdm")  # modems, tethering


class LinuxDeviceState:
    """The host's state, read from /sys and /proc on every call (a few file reads).

    Args:
        power_supply: the power supply class folder (a tmp_path tree in tests).
        net_root: /sys/class/net, for telling cellular from Wi-Fi/Ethernet.
        proc_route: /proc/net/route, for the default route's interface.
        idle_after: seconds without user input after which the user counts as away.
        tty_root: where terminal devices live (their access time is the last keystroke).
        use_xprintidle: ask X11 (via `xprintidle`) when a display is set and the tool exists.
    """

    def __init__(self, *, power_supply: Path = Path("/sys/class/power_supply"), net_root: Path = Path("/sys/class/net"),
                 proc_route: Path = Path("/proc/net/route"), idle_after: float = 300.0, tty_root: Path = Path("/dev"),
                 use_xprintidle: bool = True, clock: Callable[[], float] = time.time):
        self.power_supply, self.net_root, self.proc_route = Path(power_supply), Path(net_root), Path(proc_route)
        self.idle_after, self.tty_root, self._clock = idle_after, Path(tty_root), clock
        self._xprintidle = shutil.which("xprintidle") if use_xprintidle and os.environ.get("DISPLAY") else None

    def current(self) -> DeviceState:
        charging, battery = self.power()
        return DeviceState(idle=self.user_idle_seconds() >= self.idle_after, charging=charging,
                           unmetered=self.unmetered(), battery=battery)

    # Power. ------------------------------------------------------------------------------
    def power(self) -> tuple[bool, float]:
        """(charging, battery percent). No battery: on mains, 100 %."""
        mains_online, batteries = [], []
        for supply in sorted(self.power_supply.glob("*")) if self.power_supply.is_dir() else []:
            kind = _read(supply / "type")
            if kind == "Battery" and _read(supply / "present", "1") != "0":
                batteries.append(supply)
            elif kind in ("Mains", "USB", "USB_C", "USB_PD", "Wireless"):
                mains_online.append(_read(supply / "online", "0") == "1")
        if not batteries:
            # A desktop, a server, a VM: it runs on mains (unless a mains supply says it is off,
            # as a UPS on battery would).
            return (any(mains_online) if mains_online else True), 100.0
        levels, statuses = [], []
        for supply in batteries:
            statuses.append(_read(supply / "status", "Unknown"))
            try:
                levels.append(float(_read(supply / "capacity")))
            except ValueError:
                pass
        # "Full" and "Not charging" (held at a charge limit) both mean plugged in.
        charging = any(mains_online) or any(s in ("Charging", "Full", "Not charging") for s in statuses)
        battery = min(100.0, max(0.0, sum(levels) / len(levels))) if levels else 100.0
        return charging, battery

    # User idle. ----------------------------------------------------------------------------
    def user_idle_seconds(self) -> float:
        """Seconds since the user last typed or moved the pointer; infinity without a user."""
        if self._xprintidle:
            try:
                out = subprocess.run([self._xprintidle], capture_output=True, text=True, timeout=2, check=True)
                return int(out.stdout.strip()) / 1000.0
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        # Terminal input updates the tty's access time: the idle column of `w`.
        times = []
        for pattern in ("pts/[0-9]*", "tty[0-9]*"):
            for tty in self.tty_root.glob(pattern):
                try:
                    times.append(tty.stat().st_atime)
                except OSError:
                    continue
        # Unused virtual consoles keep their boot-time atime; only recent ones say "a user".
        return max(0.0, self._clock() - max(times)) if times else float("inf")

    # Network. ------------------------------------------------------------------------------
    def unmetered(self) -> bool:
        """True unless the default route leaves through a cellular modem or tethering."""
        interface = self._default_interface()
        if interface is None:
            return False  # offline counts as "not on an unmetered network": nothing to upload on
        if (self.net_root / interface / "wireless").exists() or interface.startswith(("wl", "eth", "en")):
            return True
        return not interface.startswith(_CELLULAR_PREFIXES)

    def _default_interface(self) -> str | None:
        try:
            lines = self.proc_route.read_text().splitlines()[1:]
        except OSError:
            return "lo"  # no routing table to read (not Linux-like): assume a wired host
        for line in lines:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
        return None


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default
