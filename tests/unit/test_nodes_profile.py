"""nodes.profile: each captured platform profiles as what it is; this machine's profile is complete JSON;
importing nodes pulls in no model runtime."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nodes.speed
from nodes.cpu import normalise_arch
from nodes.device_class import DEVICE_CLASSES
from nodes.profile import PROFILE_KEYS, device_class, local_profile, probe
from tests.procs import REPO

FIXTURES = Path(__file__).parent / "fixtures" / "nodes"
GiB = 1 << 30


class CapturedRunner:
    """Answers a command with the output captured for it in the platform's capture.json; else None."""

    def __init__(self, platform_dir: Path, commands: dict[str, str]):
        self.dir, self.commands, self.calls = platform_dir, commands, []

    def __call__(self, argv):
        self.calls.append(list(argv))
        rel = self.commands.get(" ".join(argv))
        return (self.dir / rel).read_text() if rel else None


def profile_of(name: str) -> dict:
    root = FIXTURES / name
    capture = json.loads((root / "capture.json").read_text())
    run = CapturedRunner(root, capture["commands"])
    return probe(root, capture["environ"], run, machine=capture["machine"], system=capture["system"], speed=1.0)


EXPECTED = {
    "raspberry-pi-4": {
        "device_class": "raspberry-pi", "arch": "aarch64", "cpu_features": ["neon"], "cpu_model": "Cortex-A72",
        "cores": 4,
        "board": "Raspberry Pi 4 Model B Rev 1.4", "gpus": [], "battery": None, "ram_total": 7998404 * 1024},
    "raspberry-pi-5": {
        "device_class": "raspberry-pi", "arch": "aarch64", "cpu_features": ["neon", "fp16", "dotprod"],
        "cpu_model": "Cortex-A76", "cores": 4, "board": "Raspberry Pi 5 Model B Rev 1.0", "gpus": [], "battery": None},
    "termux-phone": {
        "device_class": "termux-phone", "arch": "aarch64", "cpu_features": ["neon", "fp16", "dotprod", "i8mm"],
        "cpu_model": "Cortex-A510 + Cortex-A715 + Cortex-A710 + Cortex-X3", "cores": 8, "gpus": [],
        "battery": {"percent": 64.0, "charging": True}},
    "openwrt-router": {
        "device_class": "openwrt-router", "arch": "mips", "cpu_features": [], "cpu_model": "MIPS 1004Kc V2.15",
        "cores": 4,
        "board": "Xiaomi Mi Router 3G", "gpus": [], "battery": None, "memory_available_for_models": 0},
    "x86-desktop": {
        "device_class": "desktop", "arch": "x86_64", "cpu_features": ["avx", "avx2", "fma", "f16c"],
        "cpu_model": "AMD Ryzen 7 5800X 8-Core Processor", "cores": 16, "battery": None,
        "board": "Micro-Star International Co., Ltd. MS-7C56",
        "gpus": [{"vendor": "nvidia", "name": "NVIDIA GeForce RTX 3060", "memory_total": 12288 << 20}]},
    "x86-server": {
        "device_class": "server", "arch": "x86_64",
        "cpu_features": ["avx", "avx2", "avx512f", "avx512_vnni", "fma", "f16c"],
        "cpu_model": "Intel(R) Xeon(R) Silver 4210R CPU @ 2.40GHz", "cores": 20, "battery": None,
        "board": "Dell Inc. PowerEdge R640",
        "gpus": [{"vendor": "nvidia", "name": "Tesla T4", "memory_total": 15360 << 20}] * 2},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_captured_platform_profiles_as_what_it_is(name):
    profile = profile_of(name)
    assert tuple(profile) == PROFILE_KEYS
    assert {k: profile[k] for k in EXPECTED[name]} == EXPECTED[name]
    json.dumps(profile)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_captured_platform_memory_for_models_follows_the_reserve_rule(name):
    p = profile_of(name)
    assert 0 < p["ram_available"] <= p["ram_total"]
    if p["device_class"] == "openwrt-router":
        assert p["memory_available_for_models"] == 0
    else:
        reserve = max(256 << 20, p["ram_total"] // 10)
        assert p["memory_available_for_models"] == pytest.approx(p["ram_available"] - reserve, abs=1)


def test_captured_machines_never_see_this_machines_battery_or_cores(monkeypatch):
    """A fixture root must not fall back to psutil/os of the machine running the tests."""
    import psutil

    monkeypatch.setattr(psutil, "sensors_battery", lambda: pytest.fail("psutil asked for a captured root"))
    assert profile_of("x86-server")["battery"] is None
    assert profile_of("x86-server")["cores"] == 20


def test_device_class_keeps_its_root_environ_signature():
    pi = FIXTURES / "raspberry-pi-4"
    assert device_class(pi, {}) == "raspberry-pi"
    assert device_class(FIXTURES / "x86-desktop", {"TERMUX_VERSION": "0.118.1"}) == "termux-phone"
    assert device_class() in DEVICE_CLASSES


def test_nothing_to_read_and_every_tool_failing_gives_an_empty_profile(tmp_path):
    def broken(argv):
        raise FileNotFoundError(argv[0])

    p = probe(tmp_path, {}, broken, machine="", system="Linux", speed=1.0)
    assert p == {"device_class": "desktop", "board": None, "system": "Linux", "arch": "unknown", "cpu_model": None,
                 "cpu_features": [], "cores": 1, "ram_total": 0, "ram_available": 0,
                 "memory_available_for_models": 0, "gpus": [], "battery": None, "speed": 1.0}


def test_this_machines_profile_is_complete_and_json():
    p = local_profile()
    assert tuple(p) == PROFILE_KEYS
    assert json.loads(json.dumps(p)) == p
    assert p["device_class"] in DEVICE_CLASSES
    assert p["arch"] == normalise_arch(platform.machine())
    assert p["system"] == platform.system()
    assert isinstance(p["cores"], int) and p["cores"] >= 1
    for key in ("ram_total", "ram_available", "memory_available_for_models"):
        assert isinstance(p[key], int) and p[key] >= 0, key
    assert 0 < p["ram_available"] <= p["ram_total"]
    assert p["memory_available_for_models"] <= p["ram_available"]
    assert isinstance(p["cpu_features"], list) and all(isinstance(f, str) for f in p["cpu_features"])
    assert p["cpu_model"] is None or isinstance(p["cpu_model"], str)
    assert p["board"] is None or isinstance(p["board"], str)
    assert isinstance(p["gpus"], list)
    for gpu in p["gpus"]:
        assert set(gpu) == {"vendor", "name", "memory_total"} and isinstance(gpu["memory_total"], int)
    assert p["battery"] is None or (set(p["battery"]) == {"percent", "charging"})
    assert isinstance(p["speed"], float) and p["speed"] > 0


def test_local_profile_runs_the_benchmark_once_per_process(monkeypatch):
    runs = []
    monkeypatch.setattr(nodes.speed, "benchmark", lambda: runs.append(1) or 1234.5)
    nodes.speed.measured_speed.cache_clear()
    try:
        assert local_profile()["speed"] == 1234.5
        assert local_profile()["speed"] == 1234.5
        assert runs == [1]
    finally:
        nodes.speed.measured_speed.cache_clear()


def test_local_profile_is_quick():
    nodes.speed.measured_speed.cache_clear()
    start = time.perf_counter()
    local_profile()
    # the benchmark's budget is 0.2 s; the probes are file reads and tools that are missing here
    # or answer within their 2 s timeout
    assert time.perf_counter() - start < 2 * 2.0 + 1.0


def test_importing_and_profiling_pulls_in_no_model_runtime_or_upper_layer():
    code = ("import sys, json, nodes, nodes.profile, nodes.cpu, nodes.gpus, nodes.battery, nodes.memory, "
            "nodes.device_class, nodes.markers, nodes.probe, nodes.speed; "
            "json.dumps(nodes.profile.local_profile()); "
            "bad = {'numpy', 'llama_cpp', 'grpc', 'onnxruntime', 'mesh', 'shards'} & set(sys.modules); "
            "print(*sorted(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nodes_imports_only_the_standard_library_and_psutil():
    """What a witness install has: nodes needs nothing beyond it (not even the other witness packages)."""
    import ast

    allowed = set(sys.stdlib_module_names) | {"psutil", "nodes", "__future__"}
    found = set()
    for path in (REPO / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(path.name, a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add((path.name, node.module.split(".")[0]))
    assert {(f, m) for f, m in found if m not in allowed} == set()
