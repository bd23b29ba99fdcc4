"""Eligibility policy and device state: every condition, the Linux reader, the scripted one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_runtime import eligibility as el
from edge_runtime.device_state import DeviceStateProvider, LinuxDeviceState, ScriptedDeviceState, parse_state_spec
from fedkb_core.errors import FedkbError
from tests.fixtures_edge import state

POLICY = el.EligibilityPolicy()


# Eligibility -------------------------------------------------------------------------------

def test_defaults_are_gboards_conditions():
    assert (POLICY.require_idle, POLICY.require_charging, POLICY.require_unmetered) == (True, True, True)
    assert POLICY.min_battery == 20.0 and POLICY.min_new_examples == 10


def test_all_met_is_eligible():
    verdict = el.check(state(), POLICY, new_examples=10)
    assert verdict and verdict.reasons == ()


@pytest.mark.parametrize("changes, reason", [
    (dict(idle=False), el.NOT_IDLE),
    (dict(charging=False), el.NOT_CHARGING),
    (dict(unmetered=False), el.METERED),
    (dict(battery=19.9), el.LOW_BATTERY),
])
def test_each_condition_alone_blocks(changes, reason):
    assert el.check(state(**changes), POLICY, new_examples=100).reasons == (reason,)
    assert el.can_continue(state(**changes), POLICY).reasons == (reason,)


def test_battery_threshold_is_inclusive():
    assert el.can_continue(state(battery=20.0), POLICY)


def test_every_failing_reason_is_reported_in_order():
    verdict = el.check(state(idle=False, charging=False, unmetered=False, battery=5.0), POLICY, new_examples=0)
    assert verdict.reasons == (el.NOT_IDLE, el.NOT_CHARGING, el.METERED, el.LOW_BATTERY, el.FEW_EXAMPLES)


def test_new_examples_gate_start_but_not_continuation():
    assert el.check(state(), POLICY, new_examples=9).reasons == (el.FEW_EXAMPLES,)
    assert el.can_continue(state(), POLICY)


@pytest.mark.parametrize("flag, changes", [
    ("require_idle", dict(idle=False)),
    ("require_charging", dict(charging=False)),
    ("require_unmetered", dict(unmetered=False)),
])
def test_each_requirement_can_be_switched_off(flag, changes):
    policy = el.EligibilityPolicy(**{flag: False})
    assert el.check(state(**changes), policy, new_examples=10)


@pytest.mark.parametrize("kwargs", [dict(min_battery=-1), dict(min_battery=101), dict(min_new_examples=-1),
                                    dict(min_battery=float("nan"))])
def test_policy_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        el.EligibilityPolicy(**kwargs)


# Scripted state ----------------------------------------------------------------------------

def test_scripted_timeline_follows_the_clock():
    now = [0.0]
    scripted = ScriptedDeviceState([(0, state()), (10, state(charging=False)), (20, state())], clock=lambda: now[0])
    assert isinstance(scripted, DeviceStateProvider)
    seen = []
    for t in (0, 9.9, 10, 15, 20, 99):
        now[0] = t
        seen.append(scripted.current().charging)
    assert seen == [True, True, False, False, True, True]


def test_scripted_function_and_sequence():
    assert ScriptedDeviceState(lambda t: state(battery=42.0)).current().battery == 42.0
    seq = ScriptedDeviceState.sequence([state(), state(idle=False)])
    assert [seq.current().idle for _ in range(4)] == [True, False, False, False]
    assert seq.calls == 4


@pytest.mark.parametrize("timeline", [[], [(5, None)], [(0, None), (10, None), (5, None)]])
def test_scripted_timeline_must_start_at_zero_in_order(timeline):
    with pytest.raises(ValueError):
        ScriptedDeviceState([(t, state()) for t, _ in timeline])


def test_parse_state_spec():
    assert parse_state_spec("charging=1,idle=1,unmetered=1,battery=90") == state()
    assert parse_state_spec("charging=0") == state(charging=False, battery=100.0)
    assert parse_state_spec(" idle = no , battery=15.5 ") == state(idle=False, battery=15.5)
    assert parse_state_spec("") == state(battery=100.0)


@pytest.mark.parametrize("spec", ["charging", "wifi=1", "idle=maybe", "battery=full", "battery=120"])
def test_parse_state_spec_errors(spec):
    with pytest.raises(FedkbError, match="--state"):
        parse_state_spec(spec)


# Linux state from a sysfs-shaped tree --------------------------------------------------------

def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


def _route(path: Path, default_iface: str | None) -> Path:
    lines = ["Iface\tDestination\tGateway\tFlags", "lo\t0000007F\t00000000\t0001"]
    if default_iface:
        lines.append(f"{default_iface}\t00000000\t0102A8C0\t0003")
    path.write_text("\n".join(lines) + "\n")
    return path


def _linux(tmp_path, *, iface="eth0", **kwargs) -> LinuxDeviceState:
    (tmp_path / "ps").mkdir(exist_ok=True)
    (tmp_path / "net").mkdir(exist_ok=True)
    (tmp_path / "dev").mkdir(exist_ok=True)
    return LinuxDeviceState(power_supply=tmp_path / "ps", net_root=tmp_path / "net",
                            proc_route=_route(tmp_path / "route", iface), tty_root=tmp_path / "dev",
                            use_xprintidle=False, **kwargs)


def test_desktop_without_battery_counts_as_charging_full(tmp_path):
    reader = _linux(tmp_path)
    assert reader.power() == (True, 100.0)
    _supply(tmp_path / "ps", "AC", type="Mains", online="1")
    assert reader.power() == (True, 100.0)


def test_mains_off_without_battery_is_not_charging(tmp_path):
    reader = _linux(tmp_path)
    _supply(tmp_path / "ps", "ADP0", type="Mains", online="0")
    assert reader.power() == (False, 100.0)


@pytest.mark.parametrize("ac_online, status, charging", [
    ("0", "Discharging", False), ("1", "Discharging", True), ("0", "Charging", True), ("0", "Full", True),
    ("0", "Not charging", True),
])
def test_laptop_battery(tmp_path, ac_online, status, charging):
    reader = _linux(tmp_path)
    _supply(tmp_path / "ps", "AC", type="Mains", online=ac_online)
    _supply(tmp_path / "ps", "BAT0", type="Battery", status=status, capacity="57", present="1")
    assert reader.power() == (charging, 57.0)


def test_two_batteries_average(tmp_path):
    reader = _linux(tmp_path)
    _supply(tmp_path / "ps", "BAT0", type="Battery", status="Discharging", capacity="40")
    _supply(tmp_path / "ps", "BAT1", type="Battery", status="Discharging", capacity="80")
    assert reader.power() == (False, 60.0)


@pytest.mark.parametrize("iface, wireless, unmetered", [
    ("eth0", False, True), ("enp3s0", False, True), ("wlan0", True, True), ("wwan0", False, False),
    ("ppp0", False, False), ("rmnet_data0", False, False), (None, False, False),
])
def test_network(tmp_path, iface, wireless, unmetered):
    reader = _linux(tmp_path, iface=iface)
    if iface and wireless:
        (tmp_path / "net" / iface / "wireless").mkdir(parents=True)
    assert reader.unmetered() is unmetered


def test_user_idle_from_terminal_activity(tmp_path):
    now = time.time()
    reader = _linux(tmp_path, idle_after=300, clock=lambda: now)
    assert reader.user_idle_seconds() == float("inf")  # no terminals: nobody is there
    assert reader.current().idle
    (tmp_path / "dev" / "pts").mkdir()
    tty = tmp_path / "dev" / "pts" / "0"
    tty.write_text("")
    os.utime(tty, (now - 30, now - 30))
    assert reader.user_idle_seconds() == pytest.approx(30, abs=1)
    assert not reader.current().idle
    os.utime(tty, (now - 600, now - 600))
    assert reader.current().idle


def test_the_real_host_gives_a_valid_state():
    current = LinuxDeviceState().current()
    assert 0.0 <= current.battery <= 100.0
