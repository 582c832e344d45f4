"""The battery, where there is one: {"percent": float, "charging": bool | None}, else None.

"charging" means on external power (psutil's `power_plugged`); None when the source cannot tell.

On Termux, `termux-battery-status` (the termux-api package, talking to the Termux:API app) is asked
first, as Android usually hides /sys/class/power_supply from apps; psutil.sensors_battery() is the
source everywhere else, and the fallback on Termux. On a captured root (tests) psutil is not asked
unless a `sensors` callable is passed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from nodes.markers import is_termux
from nodes.probe import Runner, call, is_live, run_command

TERMUX_BATTERY_STATUS = ("termux-battery-status",)
Sensors = Callable[[], Any]


def _no_battery() -> None:
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _percent(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else round(min(100.0, max(0.0, number)), 1)


def default_sensors(root: Path) -> Sensors:
    """psutil.sensors_battery on this machine; nothing on a captured root."""
    if is_live(root):
        return getattr(psutil, "sensors_battery", _no_battery)
    return _no_battery


def from_psutil(sensors: Sensors) -> dict[str, Any] | None:
    try:
        state = sensors()
    except Exception:  # noqa: BLE001 - psutil raises on some platforms/sandboxes; no battery is the honest answer
        return None
    percent = _percent(getattr(state, "percent", None))
    if percent is None:
        return None
    plugged = getattr(state, "power_plugged", None)
    return {"percent": percent, "charging": None if plugged is None else bool(plugged)}


def parse_termux_battery_status(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("present") is False:
        return None
    percent = _percent(data.get("percentage"))
    level, scale = _number(data.get("level")), _number(data.get("scale"))
    if percent is None and level is not None and scale:
        percent = _percent(100.0 * level / scale)
    if percent is None:
        return None
    plugged = str(data.get("plugged") or "").upper()
    status = str(data.get("status") or "").upper()
    if plugged:
        charging: bool | None = plugged != "UNPLUGGED"
    elif status in ("CHARGING", "FULL"):
        charging = True
    elif status == "DISCHARGING":
        charging = False
    else:
        charging = None
    return {"percent": percent, "charging": charging}


def battery(root: Path = Path("/"), environ: Mapping[str, str] | None = None, run: Runner = run_command,
            sensors: Sensors | None = None) -> dict[str, Any] | None:
    env = os.environ if environ is None else environ
    if is_termux(root, env):
        out = call(run, TERMUX_BATTERY_STATUS)
        found = parse_termux_battery_status(out) if out else None
        if found is not None:
            return found
    return from_psutil(default_sensors(root) if sensors is None else sensors)
