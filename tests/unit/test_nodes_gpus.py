"""nodes.gpus: NVIDIA, AMD and Apple GPUs from their tools' captured outputs; missing or failing tools give []."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nodes.gpus import (
    NVIDIA_SMI,
    ROCM_SMI,
    amd,
    apple,
    gpus,
    nvidia,
    parse_nvidia_smi,
    parse_rocm_smi,
)

GPUS = Path(__file__).parent / "fixtures" / "nodes" / "gpus"
MiB, GiB = 1 << 20, 1 << 30


class Runner:
    def __init__(self, **outputs: str):
        self.outputs = {k.replace("_", "-"): v for k, v in outputs.items()}
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        return self.outputs.get(argv[0])


def fixture(name: str) -> str:
    return (GPUS / name).read_text()


def test_nvidia_one_and_two_gpus():
    run = Runner(nvidia_smi=fixture("nvidia-smi-one-gpu.csv"))
    assert nvidia(run) == [{"vendor": "nvidia", "name": "NVIDIA GeForce RTX 3060", "memory_total": 12288 * MiB}]
    assert run.calls == [["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]]
    assert nvidia(Runner(nvidia_smi=fixture("nvidia-smi-two-gpus.csv"))) == \
        [{"vendor": "nvidia", "name": "Tesla T4", "memory_total": 15360 * MiB}] * 2


def test_nvidia_odd_rows():
    assert parse_nvidia_smi("NVIDIA GH200 480GB, [N/A]\n") == [{"vendor": "nvidia", "name": "NVIDIA GH200 480GB",
                                                                "memory_total": 0}]
    assert parse_nvidia_smi("Foo, Bar GPU, 4096\r\n\n") == [{"vendor": "nvidia", "name": "Foo, Bar GPU",
                                                              "memory_total": 4096 * MiB}]
    failed = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
              "latest NVIDIA driver is installed and running, then try again.\n")
    assert parse_nvidia_smi(failed) == []
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("Odd GPU, nan\nOdder GPU, -1\n") == [
        {"vendor": "nvidia", "name": "Odd GPU", "memory_total": 0},
        {"vendor": "nvidia", "name": "Odder GPU", "memory_total": 0}]


def test_rocm_smi_6():
    run = Runner(rocm_smi=fixture("rocm-smi-6.json"))
    assert amd(run) == [{"vendor": "amd", "name": "Radeon RX 7900 XTX", "memory_total": 25753026560},
                        {"vendor": "amd", "name": "Raphael", "memory_total": 512 * MiB}]
    assert run.calls == [list(ROCM_SMI)]


def test_rocm_smi_5_spelling_with_a_warning_first_and_a_system_entry():
    mi100 = {"vendor": "amd", "name": "Arcturus GL-XL [AMD Instinct MI100]", "memory_total": 34342961152}
    assert parse_rocm_smi(fixture("rocm-smi-5.json")) == [mi100, mi100]


def test_rocm_smi_tolerates_variations():
    text = ('{"card10": {"Card Series": "N/A", "Card Model": "0x73bf", "VRAM Total Memory (MiB)": "16368"},'
            ' "card2": {"GPU use (%)": "0"}}')
    assert parse_rocm_smi(text) == [{"vendor": "amd", "name": "AMD GPU", "memory_total": 0},
                                    {"vendor": "amd", "name": "0x73bf", "memory_total": 16368 * MiB}]
    assert parse_rocm_smi('{"card0": {"Card series": "Vega 20", "VRAM Total Memory (B)": 34342961152}}') == \
        [{"vendor": "amd", "name": "Vega 20", "memory_total": 34342961152}]
    for junk in ("", "not json", "{}", "[1, 2]", '{"card0": "oops"}', "ERROR: GPU[0] : Unable to get VRAM {"):
        assert parse_rocm_smi(junk) == []


def test_apple_silicon_reports_unified_memory():
    run = Runner(sysctl="Apple M2 Pro\n")
    assert apple(run, "Darwin", 32 * GiB) == [{"vendor": "apple", "name": "Apple M2 Pro", "memory_total": 32 * GiB}]
    assert apple(Runner(sysctl="Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n"), "Darwin", 16 * GiB) == []
    linux = Runner(sysctl="Apple M2 Pro\n")
    assert apple(linux, "Linux", 32 * GiB) == [] and linux.calls == []


def test_all_vendors_in_order():
    run = Runner(nvidia_smi=fixture("nvidia-smi-one-gpu.csv"), rocm_smi=fixture("rocm-smi-6.json"))
    assert [g["vendor"] for g in gpus(run, "Linux", 64 * GiB)] == ["nvidia", "amd", "amd"]


@pytest.mark.parametrize("failure", [
    lambda argv: None,                                              # missing tool / non-zero exit / timeout
    lambda argv: (_ for _ in ()).throw(FileNotFoundError(argv[0])),  # a runner that raises instead
    lambda argv: (_ for _ in ()).throw(subprocess.TimeoutExpired(argv, 2.0)),
    lambda argv: 42,                                                # a runner returning nonsense
])
def test_missing_or_failing_tools_give_no_gpus(failure):
    assert gpus(failure, "Darwin", GiB) == []
    assert nvidia(failure) == [] and amd(failure) == []


def test_real_tools_on_this_machine_give_a_list():
    for gpu in gpus():
        assert set(gpu) == {"vendor", "name", "memory_total"}
    assert NVIDIA_SMI[0] == "nvidia-smi"
