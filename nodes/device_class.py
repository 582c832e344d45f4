"""The device class: raspberry-pi, termux-phone, openwrt-router, desktop or server.

The first rule that holds decides:

1. /etc/openwrt_release exists                                   -> openwrt-router
2. TERMUX_VERSION is set, or /data/data/com.termux exists        -> termux-phone
3. the device-tree model contains "Raspberry Pi"                 -> raspberry-pi
4. a battery is present (a laptop, a handheld)                   -> desktop
5. DMI chassis_type is a server one: 17 main server, 23 rack mount,
   25 multi-system, 28 blade, 29 blade enclosure                 -> server
6. DMI chassis_type is a personal one: 3-4 desktop, 6-7 tower,
   8-10 and 14 portable/laptop/notebook, 11 handheld, 13 all-in-one,
   15 space-saving, 16 lunch box, 30-32 tablet/convertible/detachable,
   33 IoT gateway, 34 embedded PC, 35 mini PC, 36 stick PC        -> desktop
7. macOS (Darwin)                                                -> desktop
8. 16 or more logical cores                                      -> server
9. otherwise                                                     -> desktop

So a chassis that says what it is wins over the core count (a 16-thread tower is a desktop, a
4-core rack box a server); machines whose chassis says nothing useful (virtual machines report
1 "other", many boards 2 "unknown"), or that have no DMI, are sorted by core count.
OpenWrt comes before Termux and the Pi because a Pi running OpenWrt is a router in the mesh.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

from nodes import markers
from nodes.battery import default_sensors, from_psutil
from nodes.cpu import logical_cores
from nodes.probe import is_live


class DeviceClass(StrEnum):
    """Equal to its string: profiles in the Raft log carry the plain string."""
    RASPBERRY_PI = "raspberry-pi"
    TERMUX_PHONE = "termux-phone"
    OPENWRT_ROUTER = "openwrt-router"
    DESKTOP = "desktop"
    SERVER = "server"


DEVICE_CLASSES = tuple(DeviceClass)
NO_MODEL_CLASSES = frozenset({DeviceClass.OPENWRT_ROUTER})  # never hold a model: witnesses only
SERVER_CHASSIS = frozenset({17, 23, 25, 28, 29})
PERSONAL_CHASSIS = frozenset({3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 30, 31, 32, 33, 34, 35, 36})
SERVER_MIN_CORES = 16


def device_class(root: Path = Path("/"), environ: Mapping[str, str] | None = None, *,
                 cores: int | None = None, has_battery: bool | None = None, system: str | None = None) -> DeviceClass:
    """This machine's class (or, with `root`, a captured machine's) by the rules in the docstring.

    `cores`, `has_battery` and `system` default to what this machine says for the real root, and
    to what the files under a captured root say (no battery, the cpuinfo's core count, Linux).
    """
    env = os.environ if environ is None else environ
    root = Path(root)
    if markers.is_openwrt(root):
        return DeviceClass.OPENWRT_ROUTER
    if markers.is_termux(root, env):
        return DeviceClass.TERMUX_PHONE
    if markers.is_raspberry_pi(root):
        return DeviceClass.RASPBERRY_PI
    if has_battery is None:
        has_battery = from_psutil(default_sensors(root)) is not None
    if has_battery:
        return DeviceClass.DESKTOP
    chassis = markers.chassis_type(root)
    if chassis in SERVER_CHASSIS:
        return DeviceClass.SERVER
    if chassis in PERSONAL_CHASSIS:
        return DeviceClass.DESKTOP
    if system is None:
        system = platform.system() if is_live(root) else "Linux"
    if system == "Darwin":
        return DeviceClass.DESKTOP
    cores = logical_cores(root) if cores is None else cores
    return DeviceClass.SERVER if cores >= SERVER_MIN_CORES else DeviceClass.DESKTOP

