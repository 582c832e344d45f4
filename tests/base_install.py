"""A meshd process that behaves as if only the base install were present (pyproject's
`dependencies`, what a witness on a router gets): a meta-path finder, ahead of every other finder,
refuses any third-party module whose distribution is not a base dependency or a dependency of one
(read from the installed quorum-mesh metadata), exactly as a missing package would, with
ModuleNotFoundError. So grpc, numpy, llama_cpp, onnxruntime, uvloop, jinja2, pytest's pygments ...
cannot be imported. Every refused attempt is written to the process's log as a line starting with
BLOCKED_MARK, so an attempt that some `except ImportError` swallows (meshd's optional uvloop,
httpx's optional CLI) still shows.

    node = witness(root / "w", peer=first.address, token=join_token(first)).start()
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from tests.procs import Meshd

HEAVY = ("grpc", "numpy", "llama_cpp", "onnxruntime")  # what a witness must never even try to import
BLOCKED_MARK = "BLOCKED-IMPORT"
OURS = ("mesh", "shards", "raft", "proto", "nodes", "tests")

def base_distributions() -> set[str]:
    """The distributions of the base install: quorum-mesh's dependencies without extras, and theirs."""
    names, todo = set(), ["quorum-mesh"]
    while todo:
        try:
            requirements = md.requires(todo.pop()) or ()
        except md.PackageNotFoundError:  # a dependency for other Pythons or platforms: not installed here
            continue
        for req in requirements:
            if "extra ==" in req:
                continue
            name = _normal(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
            if name not in names:
                names.add(name)
                todo.append(name)
    return names


def allowed_modules() -> set[str]:
    """Top-level modules a base install can import: the standard library, this project's packages,
    and those the base distributions install."""
    base = base_distributions()
    installed = {top for top, dists in md.packages_distributions().items() if any(_normal(d) in base for d in dists)}
    return installed | set(OURS) | set(sys.stdlib_module_names)


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def launcher() -> str:
    """`python -c` source: installs the finder, then runs meshd's main with the arguments."""
    return f"""
import sys
from importlib.abc import MetaPathFinder

ALLOWED = {sorted(allowed_modules())!r}


class BaseInstallOnly(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ALLOWED or top in sys.modules:
            return None
        print("{BLOCKED_MARK}", name, file=sys.stderr, flush=True)
        raise ModuleNotFoundError(f"No module named {{name!r}} (not in the base install)", name=name)


ALLOWED = frozenset(ALLOWED)
sys.meta_path.insert(0, BaseInstallOnly())
sys.argv[0] = "meshd"
from mesh.cli.meshd import main
sys.exit(main(sys.argv[1:]))
"""


def base_install(node: Meshd) -> Meshd:
    """Makes `node` (not started yet) run meshd under the launcher: same arguments, same log."""
    at = node.args.index("mesh.cli.meshd")
    node.args = [*node.args[:at - 2], sys.executable, "-c", launcher(), *node.args[at + 1:]]
    return node


def witness(data_dir: Path, peer: str, token: str, **kw) -> Meshd:
    """`meshd join --witness` through `peer`, on the base install (not started)."""
    return base_install(Meshd(data_dir, "--peer", peer, "--token", token, "--witness", command="join", **kw))


def blocked_attempts(node: Meshd) -> list[str]:
    """Modules outside the base install that the process tried to import (from its log)."""
    return [line.split()[1] for line in node.log().splitlines() if line.startswith(BLOCKED_MARK + " ")]


def heavy_attempts(node: Meshd) -> list[str]:
    """Attempts on the model-node packages: a witness must make none, not even a guarded one."""
    return [name for name in blocked_attempts(node) if name.partition(".")[0] in HEAVY]


def mapped_heavy_libraries(pid: int) -> list[str]:
    """Shared objects of the heavy packages in the process's memory map (/proc/PID/maps, Linux):
    what the kernel says is loaded, whatever the process reports about itself."""
    markers = ("/grpc/", "/numpy/", "numpy.libs", "/llama_cpp/", "/onnxruntime/")
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
        if any(m in path for m in markers):
            paths.add(path)
    return sorted(paths)
