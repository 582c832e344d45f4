"""The CPU: architecture, the features llama.cpp cares about, model name and logical cores.

Features come from /proc/cpuinfo: the `flags` line on x86, the `Features` line on ARM (both the
aarch64 names and the 32-bit ones). Only features that change which llama.cpp kernels run are
reported, under one canonical name each, in a fixed order:

    x86: avx avx2 avx512f avx512_vnni avx512_bf16 avx_vnni fma f16c amx_int8
    ARM: neon (asimd) fp16 (asimdhp) dotprod (asimddp) i8mm sve sve2

On a big.LITTLE phone every core's line is read and only features every core has are kept.
On Darwin, where there is no /proc, the same names come from `sysctl hw.optional`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nodes.probe import Runner, call, is_live, read_text

_ARCH_ALIASES = {
    "amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "em64t": "x86_64",
    "i386": "i686", "i486": "i686", "i586": "i686", "x86": "i686", "i86pc": "i686",
    "arm64": "aarch64", "armv8-a": "aarch64",
    "armv7": "armv7l", "armv7a": "armv7l", "armv7hl": "armv7l", "armv7-a": "armv7l",
    "armv6": "armv6l", "armv6hl": "armv6l",
    "ppc64el": "ppc64le", "powerpc64le": "ppc64le",
}

# cpuinfo token -> canonical name, and the order canonical names are reported in.
_FEATURE_NAMES = {
    "avx": "avx", "avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni", "fma": "fma", "f16c": "f16c",
    "amx_int8": "amx_int8",
    "neon": "neon", "asimd": "neon", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm",
    "sve": "sve", "sve2": "sve2",
}
FEATURE_ORDER = ("avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "fma", "f16c",
                 "amx_int8", "neon", "fp16", "dotprod", "i8mm", "sve", "sve2")

# `sysctl hw.optional` keys on macOS -> canonical name.
_DARWIN_FEATURES = {
    "hw.optional.avx1_0": "avx", "hw.optional.avx2_0": "avx2", "hw.optional.avx512f": "avx512f",
    "hw.optional.fma": "fma", "hw.optional.neon": "neon", "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.neon_fp16": "fp16", "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_SVE": "sve",
}

# "CPU part" of ARM Ltd's own cores (CPU implementer 0x41), as Linux reports them.
_ARM_PARTS = {
    0xb76: "ARM1176", 0xc07: "Cortex-A7", 0xc08: "Cortex-A8", 0xc09: "Cortex-A9",
    0xc0d: "Cortex-A12", 0xc0e: "Cortex-A17", 0xc0f: "Cortex-A15",
    0xd01: "Cortex-A32", 0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55",
    0xd06: "Cortex-A65", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72", 0xd09: "Cortex-A73",
    0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76", 0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77",
    0xd0e: "Cortex-A76AE", 0xd40: "Neoverse-V1", 0xd41: "Cortex-A78", 0xd42: "Cortex-A78AE",
    0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2",
    0xd49: "Neoverse-N2", 0xd4a: "Neoverse-E1", 0xd4b: "Cortex-A78C", 0xd4c: "Cortex-X1C",
    0xd4d: "Cortex-A715", 0xd4e: "Cortex-X3", 0xd4f: "Neoverse-V2", 0xd80: "Cortex-A520",
    0xd81: "Cortex-A720", 0xd82: "Cortex-X4", 0xd84: "Neoverse-V3", 0xd85: "Cortex-X925",
    0xd87: "Cortex-A725",
}

_MODEL_KEYS = ("model name", "cpu model", "Processor", "cpu")


def normalise_arch(machine: str) -> str:
    """platform.machine() spelled one way per architecture: x86_64, i686, aarch64, armv7l, ..."""
    m = (machine or "").strip().lower()
    if not m:
        return "unknown"
    return _ARCH_ALIASES.get(m, m)


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as a list of blocks (one per processor, plus any trailing board block)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        blocks.append(current)
    return blocks


def read_cpuinfo(root: Path = Path("/")) -> list[dict[str, str]]:
    text = read_text(root, "proc/cpuinfo")
    return parse_cpuinfo(text) if text else []


def features(blocks: list[dict[str, str]]) -> list[str]:
    """The llama.cpp-relevant features every processor in `blocks` has, in FEATURE_ORDER."""
    common: set[str] | None = None
    for block in blocks:
        line = block.get("flags", block.get("Features"))
        if line is None:
            continue
        names = {_FEATURE_NAMES[t] for t in line.split() if t in _FEATURE_NAMES}
        common = names if common is None else common & names
    return [f for f in FEATURE_ORDER if f in (common or ())]


def darwin_features(run: Runner) -> list[str]:
    out = call(run, ["sysctl", "hw.optional"]) or ""
    found = set()
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() == "1" and key.strip() in _DARWIN_FEATURES:
            found.add(_DARWIN_FEATURES[key.strip()])
    return [f for f in FEATURE_ORDER if f in found]


def model_name(blocks: list[dict[str, str]]) -> str | None:
    """The CPU's name: ARM cores by their part number, others by cpuinfo's own name field.

    Heterogeneous ARM SoCs give each distinct core in order, e.g. "Cortex-A55 + Cortex-A78".
    """
    arm: list[str] = []
    for block in blocks:
        if block.get("CPU implementer", "").lower() != "0x41":
            continue
        try:
            name = _ARM_PARTS.get(int(block.get("CPU part", ""), 16))
        except ValueError:
            name = None
        if name and name not in arm:
            arm.append(name)
    if arm:
        return " + ".join(arm)
    for block in blocks:
        for key in _MODEL_KEYS:
            value = block.get(key, "").strip()
            if value:
                return re.sub(r"\s+", " ", value)
    return None


def darwin_model_name(run: Runner) -> str | None:
    out = (call(run, ["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip()
    return out or None


def logical_cores(root: Path = Path("/"), blocks: list[dict[str, str]] | None = None) -> int:
    """Logical CPUs: os.cpu_count() on this machine, the `processor` entries of a captured one."""
    if is_live(root):
        return os.cpu_count() or 1
    blocks = read_cpuinfo(root) if blocks is None else blocks
    return max(1, sum(1 for b in blocks if "processor" in b))
