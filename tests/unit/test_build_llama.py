"""scripts/build-llama's decisions, without compiling: the flags per host, the cache key, and what it
does when the self-check of a build crashes (rebuild once with conservative flags; never leave a
venv whose llama.cpp crashes)."""

from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def build(monkeypatch, tmp_path):
    loader = SourceFileLoader("build_llama", str(REPO / "scripts" / "build-llama"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("build_llama", loader))
    loader.exec_module(module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    return module


def x86(build, monkeypatch, flags: str) -> None:
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "cpu_flags", lambda: set(flags.split()))


def test_x86_builds_native_without_amx_and_falls_back_to_the_cpus_own_flags(build, monkeypatch):
    x86(build, monkeypatch, "avx avx2 fma f16c amx_tile amx_int8 amx_bf16")
    (safe_name, safe), (cons_name, cons) = build.profiles()
    assert (safe_name, cons_name) == ("safe", "conservative")
    assert "-DGGML_NATIVE=ON" in safe and "-DGGML_RPC=ON" in safe
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in safe
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in safe
    assert "-DGGML_NATIVE=OFF" in cons and "-DGGML_AVX512=OFF" in cons and "-DGGML_AMX_INT8=OFF" in cons
    assert "-DGGML_AVX2=ON" in cons and "-DGGML_BMI2=OFF" in cons  # only what the CPU lists


def test_old_x86_without_avx2_gets_no_avx2_in_the_fallback(build, monkeypatch):
    x86(build, monkeypatch, "sse4_2 avx")
    cons = build.profiles()[1][1]
    assert "-DGGML_AVX=ON" in cons and "-DGGML_AVX2=OFF" in cons and "-DGGML_FMA=OFF" in cons


def test_termux_and_pi_profiles(build, monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(build, "cpu_flags", lambda: {"asimd", "asimddp"})
    monkeypatch.setattr(build, "on_termux", lambda: True)
    safe = build.profiles()[0][1]
    assert "-DGGML_OPENMP=OFF" in safe and "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod" in safe
    monkeypatch.setattr(build, "on_termux", lambda: False)
    assert "-DGGML_NATIVE=ON" in build.profiles()[0][1]
    monkeypatch.setattr(build.platform, "machine", lambda: "armv7l")
    assert "-DGGML_NATIVE=OFF" in build.profiles()[0][1]


def test_cmake_args_from_the_environment_replace_the_safe_profile(build, monkeypatch):
    x86(build, monkeypatch, "avx avx2")
    monkeypatch.setenv("CMAKE_ARGS", '-DGGML_NATIVE=OFF -DCMAKE_C_FLAGS="-O2 -g"')
    (_, safe), (_, cons) = build.profiles()
    assert safe == ["-DGGML_RPC=ON", "-DGGML_NATIVE=OFF", "-DCMAKE_C_FLAGS=-O2 -g"]
    assert "-DGGML_AVX512=OFF" in cons


def test_cache_key_follows_flags_and_cpu(build, monkeypatch):
    x86(build, monkeypatch, "avx avx2")
    a = build.wheel_for(["-DGGML_NATIVE=ON"])[0]
    assert a == build.wheel_for(["-DGGML_NATIVE=ON"])[0]
    assert a != build.wheel_for(["-DGGML_NATIVE=OFF"])[0]
    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx", "avx2", "avx512f"})
    assert a != build.wheel_for(["-DGGML_NATIVE=ON"])[0]
    assert build._quote("-DCMAKE_C_FLAGS=-a -b") == '-DCMAKE_C_FLAGS="-a -b"'


def fake_builds(build, monkeypatch, checks: list[tuple[bool, str]]) -> list[str]:
    """Builds make an empty wheel file; self-checks answer from `checks` in order."""
    done: list[str] = []

    def fake_build(args, folder):
        folder.mkdir(parents=True, exist_ok=True)
        wheel = folder / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
        wheel.write_bytes(b"")
        done.append("build " + ("safe" if "-DGGML_NATIVE=ON" in args else "conservative"))
        return wheel

    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(build, "install", lambda py, wheel: done.append("install"))
    monkeypatch.setattr(build, "selfcheck", lambda py: checks.pop(0))
    monkeypatch.setattr(build.subprocess, "run", lambda cmd, **kw: done.append(" ".join(cmd[-4:])))
    return done


def test_a_crashing_build_is_dropped_and_rebuilt_conservatively(build, monkeypatch, tmp_path):
    x86(build, monkeypatch, "avx avx2")
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    done = fake_builds(build, monkeypatch, [(False, "killed by signal 11\nggml_backend_amx_mul_mat"),
                                            (True, "decoded 8 tokens")])
    monkeypatch.setattr(build.sys, "argv", ["build-llama", "install", str(venv / "python")])
    assert build.main() == 0
    monkeypatch.setattr(build.sys, "argv", ["build-llama", "check", str(venv / "python")])
    assert build.main() == 0
    assert done == ["build safe", "install", "build conservative", "install"]
    assert (tmp_path / "venv" / ".quorum-llama").read_text().startswith("conservative ")
    assert build.wheel_for(build.profiles()[0][1])[1] is None, "the crashing wheel left the cache"
    assert build.wheel_for(build.profiles()[1][1])[1] is not None


def test_when_no_build_runs_llama_cpp_python_is_removed(build, monkeypatch, tmp_path):
    x86(build, monkeypatch, "avx avx2")
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    done = fake_builds(build, monkeypatch, [(False, "killed by signal 11"), (False, "killed by signal 4")])
    monkeypatch.setattr(build.sys, "argv", ["build-llama", "check", str(venv / "python")])
    assert build.main() == 1
    assert done[-1] == "uninstall --quiet --yes llama-cpp-python"
    assert not (tmp_path / "venv" / ".quorum-llama").exists()
