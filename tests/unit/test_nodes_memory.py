"""nodes.memory: meminfo parsing and the documented reserve for model shards."""

from __future__ import annotations

from pathlib import Path

from nodes.memory import MiB, available_for_models, parse_meminfo, ram, reserve

FIXTURES = Path(__file__).parent / "fixtures" / "nodes"
GiB = 1 << 30


def test_captured_meminfo():
    assert ram(FIXTURES / "raspberry-pi-4") == (7998404 * 1024, 7495316 * 1024)


def test_old_kernels_without_memavailable():
    text = "MemTotal:  1000 kB\nMemFree:  200 kB\nBuffers:  50 kB\nCached:  300 kB\nSwapCached:  0 kB\n"
    assert parse_meminfo(text) == (1000 * 1024, 550 * 1024)


def test_missing_meminfo_is_zero(tmp_path):
    assert ram(tmp_path) == (0, 0)


def test_this_machine():
    total, available = ram()
    assert 0 < available <= total


def test_reserve_is_256_mib_or_ten_percent_whichever_larger():
    assert reserve(1 * GiB) == 256 * MiB
    assert reserve(32 * GiB) == int(32 * GiB * 0.1)


def test_memory_for_models():
    assert available_for_models(8 * GiB, 6 * GiB, "raspberry-pi") == 6 * GiB - int(8 * GiB * 0.1)
    assert available_for_models(1 * GiB, 200 * MiB, "termux-phone") == 0  # floored at 0
    assert available_for_models(64 * GiB, 60 * GiB, "openwrt-router") == 0  # routers never take shards
