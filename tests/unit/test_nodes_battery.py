"""nodes.battery: psutil's battery, or termux-battery-status on Termux; None where there is none."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest

from nodes.battery import battery, parse_termux_battery_status

FIXTURES = Path(__file__).parent / "fixtures" / "nodes"
TERMUX = FIXTURES / "termux-phone"
sbattery = namedtuple("sbattery", "percent secsleft power_plugged")  # psutil's shape


def no_sensors():
    return None


class Runner:
    def __init__(self, output=None):
        self.output, self.calls = output, []

    def __call__(self, argv):
        self.calls.append(list(argv))
        return self.output


def test_psutil_battery(tmp_path):
    assert battery(tmp_path, {}, Runner(), lambda: sbattery(87.5, 3600, False)) == {"percent": 87.5,
                                                                                    "charging": False}
    assert battery(tmp_path, {}, Runner(), lambda: sbattery(100, -2, True)) == {"percent": 100.0, "charging": True}
    assert battery(tmp_path, {}, Runner(), lambda: sbattery(40.0, -1, None)) == {"percent": 40.0, "charging": None}


def test_no_battery(tmp_path):
    run = Runner("{}")
    assert battery(tmp_path, {}, run, no_sensors) is None
    assert run.calls == []  # termux-battery-status is only asked on Termux


def test_psutil_failing_is_no_battery(tmp_path):
    def broken():
        raise OSError("no /sys/class/power_supply")

    assert battery(tmp_path, {}, Runner(), broken) is None


def test_termux_battery_status():
    run = Runner((TERMUX / "commands" / "termux-battery-status.json").read_text())
    assert battery(TERMUX, {"TERMUX_VERSION": "0.118.1"}, run, no_sensors) == {"percent": 64.0, "charging": True}
    assert run.calls == [["termux-battery-status"]]


@pytest.mark.parametrize("status, expected", [
    ({"health": "GOOD", "percentage": 31, "plugged": "UNPLUGGED", "status": "DISCHARGING", "temperature": 27.5},
     {"percent": 31.0, "charging": False}),
    ({"health": "GOOD", "percentage": 100, "plugged": "PLUGGED_AC", "status": "FULL"},
     {"percent": 100.0, "charging": True}),
    ({"health": "GOOD", "percentage": 55, "status": "CHARGING"}, {"percent": 55.0, "charging": True}),  # old termux-api
    ({"level": 3, "scale": 4, "status": "UNKNOWN"}, {"percent": 75.0, "charging": None}),
    ({"present": False, "percentage": 0, "plugged": "PLUGGED_USB"}, None),
    ({"health": "GOOD"}, None),
])
def test_termux_battery_status_variations(status, expected):
    assert parse_termux_battery_status(json.dumps(status)) == expected


def test_termux_without_the_api_falls_back_to_psutil():
    env = {"TERMUX_VERSION": "0.118.1"}
    assert battery(TERMUX, env, Runner(None), lambda: sbattery(12, 60, False)) == {"percent": 12.0, "charging": False}
    assert battery(TERMUX, env, Runner("Termux:API is not installed"), no_sensors) is None

    def raising(argv):
        raise TimeoutError(argv)

    assert battery(TERMUX, env, raising, no_sensors) is None


def test_this_machine():
    found = battery()
    assert found is None or (set(found) == {"percent", "charging"} and 0 <= found["percent"] <= 100)


def test_odd_values_never_reach_the_replicated_state(tmp_path):
    assert parse_termux_battery_status('{"percentage": NaN, "plugged": "UNPLUGGED"}') is None
    assert parse_termux_battery_status('{"percentage": "64"}') is None
    assert parse_termux_battery_status('{"level": 200, "scale": 255}') == {"percent": 78.4, "charging": None}
    assert parse_termux_battery_status('{"level": 5, "scale": 0}') is None
    assert parse_termux_battery_status("[]") is None
    assert battery(tmp_path, {}, Runner(), lambda: sbattery(float("nan"), 0, True)) is None
    assert battery(tmp_path, {}, Runner(), lambda: sbattery(100.4, 0, True)) == {"percent": 100.0, "charging": True}
