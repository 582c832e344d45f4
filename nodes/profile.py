"""The local device profile recorded with each member.

Device class comes from the platform's own markers; `root` lets tests point the probes at a
directory of captured marker files instead of the real filesystem.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil


def device_class(root: Path = Path("/"), environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if (root / "etc/openwrt_release").exists():
        return "openwrt-router"
    if "TERMUX_VERSION" in env or (root / "data/data/com.termux").exists():
        return "termux-phone"
    model = root / "proc/device-tree/model"
    if model.exists() and "raspberry pi" in model.read_text(errors="replace").lower():
        return "raspberry-pi"
    cores = os.cpu_count() or 1
    return "server" if cores >= 16 and not psutil.sensors_battery() else "desktop"


def local_profile() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    return {
        "ram_total": mem.total,
        "ram_available": mem.available,
        "cores": os.cpu_count() or 1,
        "arch": platform.machine(),
        "system": platform.system(),
        "device_class": device_class(),
    }
