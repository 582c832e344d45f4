"""nodes.cpu: architecture names, llama.cpp-relevant features, CPU model names and core counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.cpu import (
    darwin_features,
    darwin_model_name,
    features,
    logical_cores,
    model_name,
    normalise_arch,
    parse_cpuinfo,
    read_cpuinfo,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nodes"

ARMV7_PI3 = """\
processor	: 0
model name	: ARMv7 Processor rev 4 (v7l)
BogoMIPS	: 38.40
Features	: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer	: 0x41
CPU architecture: 7
CPU variant	: 0x0
CPU part	: 0xd03
CPU revision	: 4

Hardware	: BCM2835
Revision	: a02082
Serial		: 00000000c1a2b3d4
Model		: Raspberry Pi 3 Model B Rev 1.2
"""

GRAVITON3 = """\
processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 1
"""


@pytest.mark.parametrize("machine, arch", [
    ("x86_64", "x86_64"), ("AMD64", "x86_64"), ("amd64", "x86_64"), ("i686", "i686"), ("i386", "i686"),
    ("aarch64", "aarch64"), ("arm64", "aarch64"), ("ARM64", "aarch64"), ("armv7l", "armv7l"),
    ("armv7", "armv7l"), ("armv6l", "armv6l"), ("armv8l", "armv8l"), ("mips", "mips"), ("riscv64", "riscv64"),
    ("ppc64le", "ppc64le"), ("", "unknown"),
])
def test_architectures_have_one_name_each(machine, arch):
    assert normalise_arch(machine) == arch


def test_x86_features_come_from_flags_not_vmx_flags():
    blocks = read_cpuinfo(FIXTURES / "x86-server")
    assert "vmx flags" in blocks[0]
    assert features(blocks) == ["avx", "avx2", "avx512f", "avx512_vnni", "fma", "f16c"]


def test_arm_features_are_canonical_names():
    assert features(read_cpuinfo(FIXTURES / "raspberry-pi-4")) == ["neon"]
    assert features(parse_cpuinfo(ARMV7_PI3)) == ["neon"]
    assert features(parse_cpuinfo(GRAVITON3)) == ["neon", "fp16", "dotprod", "i8mm", "sve"]


def test_features_are_those_every_core_has():
    little = GRAVITON3.replace(" i8mm", "").replace("processor\t: 0", "processor\t: 1")
    assert features(parse_cpuinfo(GRAVITON3 + "\n" + little)) == ["neon", "fp16", "dotprod", "sve"]


def test_no_cpuinfo_means_no_features_and_no_model(tmp_path):
    assert read_cpuinfo(tmp_path) == []
    assert features([]) == []
    assert model_name([]) is None


def test_model_names():
    assert model_name(read_cpuinfo(FIXTURES / "raspberry-pi-5")) == "Cortex-A76"
    assert model_name(parse_cpuinfo(ARMV7_PI3)) == "Cortex-A53"  # the part, not "ARMv7 Processor rev 4"
    assert model_name(read_cpuinfo(FIXTURES / "openwrt-router")) == "MIPS 1004Kc V2.15"
    assert model_name(parse_cpuinfo("processor\t: 0\nCPU implementer\t: 0x51\nCPU part\t: 0x801\n"
                                    "Processor\t: AArch64 Processor rev 4 (aarch64)\n")) == \
        "AArch64 Processor rev 4 (aarch64)"


def test_logical_cores_of_captured_machines_count_processors():
    assert logical_cores(FIXTURES / "termux-phone") == 8
    assert logical_cores(FIXTURES / "raspberry-pi-4") == 4  # the trailing Hardware/Model block is not a core
    assert logical_cores(Path("/")) >= 1


def test_darwin_features_and_model_from_sysctl():
    outputs = {"sysctl hw.optional": (FIXTURES / "apple-m2" / "sysctl-hw-optional.txt").read_text(),
               "sysctl -n machdep.cpu.brand_string": (FIXTURES / "apple-m2" / "sysctl-brand-string.txt").read_text()}

    def run(argv):
        return outputs.get(" ".join(argv))

    assert darwin_features(run) == ["neon", "fp16", "dotprod", "i8mm"]
    assert darwin_model_name(run) == "Apple M2 Pro"
    assert darwin_features(lambda argv: None) == []
    assert darwin_model_name(lambda argv: None) is None
