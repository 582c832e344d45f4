"""The local device profile recorded with each member in the replicated Raft state.

`local_profile()` is a plain JSON-serialisable dict:

    device_class   "raspberry-pi" | "termux-phone" | "openwrt-router" | "desktop" | "server"
    board          the machine's own name (device tree, OpenWrt sysinfo, DMI), or None
    system         platform.system(): "Linux", "Darwin", ...
    arch           normalised platform.machine(): "x86_64", "aarch64", "armv7l", "mips", ...
    cpu_model      e.g. "AMD Ryzen 7 5800X 8-Core Processor", "Cortex-A72", or None
    cpu_features   llama.cpp-relevant features, e.g. ["avx", "avx2", "fma", "f16c"] (see nodes.cpu)
    cores          logical CPUs
    ram_total      bytes
    ram_available  bytes
    memory_available_for_models   bytes a model shard may use (see nodes.memory for the reserve)
    gpus           [{"vendor": "nvidia"|"amd"|"apple", "name": str, "memory_total": bytes}, ...]
    battery        {"percent": float, "charging": bool | None} or None
    speed          nodes.speed's benchmark in ops/s (higher is faster), measured once per process
    memory_budget  (local_profile, only when capped) the most bytes this node gives to models (its config)

`probe()` builds the same dict from any root, environ and command runner, so tests can point it at
captured fixtures; `device_class(root, environ)` is re-exported here for existing callers.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes import cpu, gpus, markers, memory
from nodes.battery import Sensors, battery
from nodes.device_class import device_class
from nodes.probe import Runner, run_command
from nodes.speed import measured_speed

__all__ = ["PROFILE_KEYS", "device_class", "local_profile", "probe"]

PROFILE_KEYS = ("device_class", "board", "system", "arch", "cpu_model", "cpu_features", "cores",
                "ram_total", "ram_available", "memory_available_for_models", "gpus", "battery", "speed")


def probe(root: Path = Path("/"), environ: Mapping[str, str] | None = None, run: Runner = run_command, *,
          machine: str | None = None, system: str | None = None, sensors: Sensors | None = None,
          speed: float | None = None) -> dict[str, Any]:
    """The profile of this machine, or of the captured machine under `root`.

    `machine` and `system` default to platform.machine()/system() (pass them for a captured root);
    `sensors` stands in for psutil.sensors_battery; `speed` defaults to the cached benchmark.
    """
    root = Path(root)
    env = os.environ if environ is None else environ
    machine = platform.machine() if machine is None else machine
    system = platform.system() if system is None else system

    blocks = cpu.read_cpuinfo(root)
    darwin = system == "Darwin" and not blocks  # macOS has no /proc: ask sysctl instead
    features = cpu.darwin_features(run) if darwin else cpu.features(blocks)
    model = cpu.darwin_model_name(run) if darwin else cpu.model_name(blocks)
    cores = cpu.logical_cores(root, blocks)
    ram_total, ram_available = memory.ram(root)
    power = battery(root, env, run, sensors)
    klass = device_class(root, env, cores=cores, has_battery=power is not None, system=system)
    return {
        "device_class": klass,
        "board": markers.board(root),
        "system": system,
        "arch": cpu.normalise_arch(machine),
        "cpu_model": model,
        "cpu_features": features,
        "cores": cores,
        "ram_total": ram_total,
        "ram_available": ram_available,
        "memory_available_for_models": memory.available_for_models(ram_total, ram_available, klass),
        "gpus": gpus.gpus(run, system, ram_total),
        "battery": power,
        "speed": measured_speed() if speed is None else float(speed),
    }


def local_profile(memory_budget: int = 0) -> dict[str, Any]:
    """This machine's profile (the benchmark runs on the first call only), with the most memory (bytes) it gives
    to models when capped (`memory_budget`, node.memory_budget_mib; 0: no cap, and no key): placement uses the
    lower of it and what is free."""
    profile = probe()
    return {**profile, "memory_budget": memory_budget} if memory_budget > 0 else profile
