"""The platform's own marker files and variables, read under a root.

- OpenWrt: /etc/openwrt_release.
- Termux: the TERMUX_VERSION variable (set by the Termux app) or the /data/data/com.termux directory.
- Device tree: /proc/device-tree/model or /sys/firmware/devicetree/base/model (NUL-terminated),
  "Raspberry Pi 4 Model B Rev 1.4" on a Pi; most ARM and MIPS boards have one.
- DMI (x86): /sys/class/dmi/id/chassis_type (an SMBIOS chassis number), sys_vendor, product_name.
- OpenWrt also names its board in /tmp/sysinfo/model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from nodes.probe import exists, read_text

DEVICE_TREE_MODELS = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
_PLACEHOLDERS = {"", "to be filled by o.e.m.", "system product name", "default string", "not specified",
                 "not applicable", "none", "o.e.m.", "oem", "system manufacturer", "unknown", "n/a"}


def is_openwrt(root: Path) -> bool:
    return exists(root, "etc/openwrt_release")


def is_termux(root: Path, environ: Mapping[str, str]) -> bool:
    return "TERMUX_VERSION" in environ or exists(root, "data/data/com.termux")


def device_tree_model(root: Path) -> str | None:
    for path in DEVICE_TREE_MODELS:
        text = read_text(root, path)
        if text is not None:
            model = text.replace("\x00", "").strip()
            if model:
                return model
    return None


def is_raspberry_pi(root: Path) -> bool:
    return "raspberry pi" in (device_tree_model(root) or "").lower()


def chassis_type(root: Path) -> int | None:
    text = (read_text(root, "sys/class/dmi/id/chassis_type") or "").strip()
    return int(text) if text.isdigit() else None


def _dmi(root: Path, name: str) -> str:
    value = " ".join((read_text(root, f"sys/class/dmi/id/{name}") or "").split())
    return "" if value.lower() in _PLACEHOLDERS else value


def board(root: Path) -> str | None:
    """The machine's own name: its device-tree model, OpenWrt's sysinfo, or DMI vendor + product."""
    model = device_tree_model(root)
    if model:
        return model
    sysinfo = (read_text(root, "tmp/sysinfo/model") or "").strip()
    if sysinfo:
        return sysinfo
    vendor, product = _dmi(root, "sys_vendor"), _dmi(root, "product_name")
    if product and vendor and not product.lower().startswith(vendor.lower()):
        return f"{vendor} {product}"
    return product or vendor or None
