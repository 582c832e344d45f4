"""RAM, and how much of it a node can give to model shards.

The reserve rule: a node keeps back max(256 MiB, 10% of total RAM) for the OS, the daemon and
its Raft journal, so

    memory_available_for_models = max(0, available RAM - max(256 MiB, total RAM // 10))

OpenWrt routers report 0 whatever their RAM: they are witnesses and never take model shards.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from nodes.device_class import NO_MODEL_CLASSES
from nodes.probe import is_live, read_text

MiB = 1 << 20
RESERVE_MIN_BYTES = 256 * MiB
RESERVE_FRACTION = 0.10


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) in bytes from /proc/meminfo text; MemFree+Buffers+Cached on old kernels."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        parts = value.split()
        if sep and parts and parts[0].isdigit():
            kib[key.strip()] = int(parts[0])
    total = kib.get("MemTotal", 0)
    if "MemAvailable" in kib:
        available = kib["MemAvailable"]
    else:
        available = kib.get("MemFree", 0) + kib.get("Buffers", 0) + kib.get("Cached", 0)
    return total * 1024, min(available, total) * 1024


def ram(root: Path = Path("/")) -> tuple[int, int]:
    """(total, available) bytes: psutil on this machine, proc/meminfo of a captured one, else (0, 0)."""
    if is_live(root):
        mem = psutil.virtual_memory()
        return int(mem.total), int(mem.available)
    text = read_text(root, "proc/meminfo")
    return parse_meminfo(text) if text else (0, 0)


def reserve(total: int) -> int:
    return max(RESERVE_MIN_BYTES, int(total * RESERVE_FRACTION))


def available_for_models(total: int, available: int, device_class: str) -> int:
    if device_class in NO_MODEL_CLASSES:
        return 0
    return max(0, available - reserve(total))
