"""A member's profile as the mesh records it: a typed, versioned record.

A member reports its profile (nodes/profile.py probes it) when it joins and whenever it restarts
(AddMember), and the facts that change while it runs (UpdateProfile: battery, free memory). On the wire
and in the journal it is a plain mapping with a `version`; `MemberProfile.from_wire` reads one into
this record. Reading is lenient on purpose: a profile is what a member says about itself, so a key this
version does not know is dropped (a newer member's profile still applies here), and a value of the wrong
type falls back to its default instead of rejecting the command: one odd fact must never stop a member
from joining or every node from applying the log.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

PROFILE_VERSION = 1
MAX_FEATURES = 512
MAX_GPUS = 16
MAX_TEXT = 256


@dataclass(frozen=True)
class Gpu:
    vendor: str = ""
    name: str = ""
    memory_total: int = 0  # bytes


@dataclass(frozen=True)
class Battery:
    percent: float | None = None  # 0-100
    charging: bool | None = None  # None: the device does not say


@dataclass(frozen=True)
class MemberProfile:
    version: int = PROFILE_VERSION
    device_class: str = "desktop"  # nodes/device_class.py DeviceClass
    board: str = ""
    system: str = ""
    arch: str = ""
    cpu_model: str = ""
    cpu_features: tuple[str, ...] = ()
    cores: int = 0  # logical
    ram_total: int = 0  # bytes
    ram_available: int = 0
    memory_available_for_models: int | None = None  # None: not measured (placement uses ram_available)
    gpus: tuple[Gpu, ...] = ()
    battery: Battery | None = None  # None: no battery
    speed: float = 0.0  # the local benchmark's score; higher is faster
    threads: int = 0  # the threads the member's shards decode with (0: not reported)
    parallel: int = 0  # the sequences each of its generating shards decodes at once (node.parallel; 0: not reported)
    memory_budget: int = 0  # bytes: the most it gives to models (node.memory_budget_mib); 0: no cap

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any] | None) -> MemberProfile:
        wire = wire if isinstance(wire, Mapping) else {}
        return cls(
            version=_int(wire.get("version"), PROFILE_VERSION),
            device_class=_text(wire.get("device_class"), "desktop") or "desktop",
            board=_text(wire.get("board")),
            system=_text(wire.get("system")),
            arch=_text(wire.get("arch")),
            cpu_model=_text(wire.get("cpu_model")),
            cpu_features=tuple(f for f in _items(wire.get("cpu_features"), MAX_FEATURES) if isinstance(f, str)),
            cores=_int(wire.get("cores")),
            ram_total=_int(wire.get("ram_total")),
            ram_available=_int(wire.get("ram_available")),
            memory_available_for_models=(None if wire.get("memory_available_for_models") is None
                                         else _int(wire.get("memory_available_for_models"))),
            gpus=tuple(_gpu(g) for g in _items(wire.get("gpus"), MAX_GPUS) if isinstance(g, Mapping)),
            battery=_battery(wire.get("battery")),
            speed=_float(wire.get("speed")) or 0.0,
            threads=_int(wire.get("threads")),
            parallel=_int(wire.get("parallel")),
            memory_budget=_int(wire.get("memory_budget")),
        )

    def to_wire(self) -> dict[str, Any]:
        """The plain mapping the journal, the control API and `meshctl status` carry."""
        wire = dataclasses.asdict(self)
        wire["cpu_features"] = list(self.cpu_features)
        wire["gpus"] = [dataclasses.asdict(g) for g in self.gpus]
        return wire

    def merged(self, facts: Mapping[str, Any]) -> MemberProfile:
        """This profile with `facts` (an UpdateProfile's fields) over it."""
        return MemberProfile.from_wire({**self.to_wire(), **facts})


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, float) and math.isfinite(value):
        return max(0, int(value))
    return max(0, value) if isinstance(value, int) else default


def _float(value: Any, default: float | None = 0.0) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def _text(value: Any, default: str = "") -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else default


def _items(value: Any, limit: int) -> tuple:
    return tuple(value[:limit]) if isinstance(value, (list, tuple)) else ()


def _gpu(wire: Mapping[str, Any]) -> Gpu:
    return Gpu(vendor=_text(wire.get("vendor")), name=_text(wire.get("name")),
               memory_total=_int(wire.get("memory_total")))


def _battery(wire: Any) -> Battery | None:
    if not isinstance(wire, Mapping):
        return None
    percent = wire.get("percent")
    charging = wire.get("charging")
    percent = _float(percent, None)  # not a number: as if the device gave no reading
    return Battery(percent=None if percent is None else min(100.0, max(0.0, percent)),
                   charging=charging if isinstance(charging, bool) else None)
