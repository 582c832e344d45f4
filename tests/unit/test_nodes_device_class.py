"""nodes.device_class: the documented rules, marker by marker, on roots built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.device_class import DEVICE_CLASSES, device_class
from nodes.markers import board

FIXTURES = Path(__file__).parent / "fixtures" / "nodes"


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def classify(root: Path, environ=None, **kw) -> str:
    kw.setdefault("has_battery", False)
    kw.setdefault("system", "Linux")
    return device_class(root, {} if environ is None else environ, **kw)


@pytest.mark.parametrize("name, klass", [
    ("raspberry-pi-4", "raspberry-pi"), ("raspberry-pi-5", "raspberry-pi"), ("termux-phone", "termux-phone"),
    ("openwrt-router", "openwrt-router"), ("x86-desktop", "desktop"), ("x86-server", "server"),
])
def test_captured_platforms(name, klass):
    assert device_class(FIXTURES / name, {}) == klass


def test_openwrt_marker_wins_over_termux_and_pi(tmp_path):
    write(tmp_path, "etc/openwrt_release", "DISTRIB_ID='OpenWrt'\n")
    write(tmp_path, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.5\x00")
    assert classify(tmp_path, {"TERMUX_VERSION": "0.118.1"}) == "openwrt-router"


def test_termux_by_variable_or_by_directory(tmp_path):
    assert classify(tmp_path, {"TERMUX_VERSION": "0.118.1"}) == "termux-phone"
    (tmp_path / "data/data/com.termux").mkdir(parents=True)
    assert classify(tmp_path, {}) == "termux-phone"


def test_pi_by_either_device_tree_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "proc/device-tree/model", b"Raspberry Pi Zero 2 W Rev 1.0\x00")
    write(b, "sys/firmware/devicetree/base/model", b"Raspberry Pi Compute Module 4 Rev 1.1\x00")
    assert classify(a) == classify(b) == "raspberry-pi"


def test_other_device_tree_boards_are_not_pis(tmp_path):
    write(tmp_path, "proc/device-tree/model", b"Radxa ROCK 5B\x00")
    assert classify(tmp_path, cores=8) == "desktop"
    assert board(tmp_path) == "Radxa ROCK 5B"


@pytest.mark.parametrize("chassis, cores, klass", [
    ("23", 2, "server"),     # rack mount, whatever its core count
    ("17", 4, "server"),     # main server chassis
    ("28", 8, "server"),     # blade
    ("3", 64, "desktop"),    # a desktop chassis wins over a high core count
    ("7", 32, "desktop"),    # tower
    ("10", 16, "desktop"),   # notebook
    ("1", 16, "server"),     # "other" (virtual machines): by core count
    ("1", 15, "desktop"),
    ("2", 32, "server"),     # "unknown"
    ("garbage", 4, "desktop"),
])
def test_server_or_desktop_by_chassis_then_cores(tmp_path, chassis, cores, klass):
    write(tmp_path, "sys/class/dmi/id/chassis_type", chassis + "\n")
    assert classify(tmp_path, cores=cores) == klass


def test_no_dmi_means_by_core_count(tmp_path):
    assert classify(tmp_path, cores=16) == "server"
    assert classify(tmp_path, cores=4) == "desktop"


def test_a_battery_means_desktop(tmp_path):
    write(tmp_path, "sys/class/dmi/id/chassis_type", "23\n")
    assert classify(tmp_path, cores=32, has_battery=True) == "desktop"


def test_a_mac_is_a_desktop(tmp_path):
    assert classify(tmp_path, cores=24, system="Darwin") == "desktop"


def test_core_count_of_a_captured_root_comes_from_its_cpuinfo(tmp_path):
    write(tmp_path, "proc/cpuinfo", "".join(f"processor\t: {i}\n\n" for i in range(16)))
    assert device_class(tmp_path, {}) == "server"


def test_this_machine():
    assert device_class() in DEVICE_CLASSES


def test_board_names(tmp_path):
    assert board(FIXTURES / "x86-server") == "Dell Inc. PowerEdge R640"
    assert board(FIXTURES / "openwrt-router") == "Xiaomi Mi Router 3G"
    assert board(tmp_path) is None
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "System manufacturer\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "System Product Name\n")
    assert board(tmp_path) is None  # firmware placeholders are not names
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "LENOVO\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "LENOVO ThinkCentre M720q\n")
    assert board(tmp_path) == "LENOVO ThinkCentre M720q"
