"""GPUs, each as {"vendor", "name", "memory_total"} (memory_total in bytes, 0 when not reported).

- NVIDIA: `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` (one line per
  GPU, memory in MiB).
- AMD: `rocm-smi --showproductname --showmeminfo vram --json` (an object per "cardN"; key spelling
  differs between ROCm releases, e.g. "Card series" / "Card Series", and some print warnings
  before the JSON, so both are tolerated).
- Apple Silicon: on Darwin, `sysctl -n machdep.cpu.brand_string` starting "Apple"; its memory is
  unified, so the GPU's memory_total is the machine's total RAM.

A missing tool, a failing or timed-out command, or output that does not parse gives no GPUs
from that vendor, never an exception.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from nodes.probe import Runner, call, run_command

MiB = 1 << 20
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")
ROCM_SMI = ("rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json")
APPLE_BRAND = ("sysctl", "-n", "machdep.cpu.brand_string")

_UNITS = {"b": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": MiB, "mib": MiB, "gb": 1 << 30, "gib": 1 << 30}
_AMD_NAME_KEYS = ("card series", "market name", "device name", "card model", "card sku", "gfx version")
_UNKNOWN = {"", "n/a", "na", "unknown", "not supported", "[n/a]", "[not supported]"}


def _gpu(vendor: str, name: str, memory_total: int) -> dict[str, Any]:
    return {"vendor": vendor, "name": name, "memory_total": int(memory_total)}


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    gpus = []
    for line in text.splitlines():
        name, sep, memory = line.strip().rpartition(",")
        name, memory = name.strip(), memory.strip()
        if not sep or not name:
            continue
        try:
            mib = float(memory)
        except ValueError:
            if not memory.startswith("["):  # not a GPU row (an error message, a header)
                continue
            mib = 0.0  # "[N/A]", "[Not Supported]"
        if not math.isfinite(mib) or mib < 0:
            mib = 0.0
        gpus.append(_gpu("nvidia", name, mib * MiB))
    return gpus


def _first_json_object(text: str) -> Any:
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    return value


def _bytes(key: str, value: Any) -> int:
    """A rocm-smi memory figure in bytes; the unit comes from the key ("(B)", "(MiB)") or the value."""
    unit = re.search(r"\(([kmg]i?b|b)\)", key.lower())
    match = re.match(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]i?b|b)?\s*$", str(value).lower())
    if not match:
        return 0
    scale = _UNITS[match.group(2) or (unit.group(1) if unit else "b")]
    return int(float(match.group(1)) * scale)


def _card_index(key: str) -> int:
    digits = re.sub(r"\D", "", key)
    return int(digits) if digits else 1 << 30


def parse_rocm_smi(text: str) -> list[dict[str, Any]]:
    data = _first_json_object(text)
    if not isinstance(data, dict):
        return []
    gpus = []
    for card in sorted((k for k, v in data.items() if k.lower().startswith("card") and isinstance(v, dict)),
                       key=_card_index):
        fields = {str(k).strip().lower(): (str(k), v) for k, v in data[card].items()}
        name = next((str(fields[k][1]).strip() for k in _AMD_NAME_KEYS
                     if k in fields and str(fields[k][1]).strip().lower() not in _UNKNOWN), "AMD GPU")
        memory = next((_bytes(*fields[k]) for k in fields
                       if k.startswith("vram total") and "used" not in k), 0)
        gpus.append(_gpu("amd", name, memory))
    return gpus


def nvidia(run: Runner = run_command) -> list[dict[str, Any]]:
    out = call(run, NVIDIA_SMI)
    return parse_nvidia_smi(out) if out else []


def amd(run: Runner = run_command) -> list[dict[str, Any]]:
    out = call(run, ROCM_SMI)
    return parse_rocm_smi(out) if out else []


def apple(run: Runner = run_command, system: str = "", ram_total: int = 0) -> list[dict[str, Any]]:
    if system != "Darwin":
        return []
    brand = (call(run, APPLE_BRAND) or "").strip()
    return [_gpu("apple", brand, ram_total)] if brand.startswith("Apple") else []


def gpus(run: Runner = run_command, system: str = "", ram_total: int = 0) -> list[dict[str, Any]]:
    """Every GPU the vendors' tools report, NVIDIA first, then AMD, then Apple."""
    return nvidia(run) + amd(run) + apple(run, system, ram_total)
