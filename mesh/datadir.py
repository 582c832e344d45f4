"""Everything a node keeps lives in its data dir:

    mesh.secret      the mesh secret (0600): Raft's password; never leaves the machine in clear
    node.json        this node's id and name
    mesh.toml        optional configuration (else the built-in defaults)
    raft/            pysyncobj's journal and full dump
    models/          model files and their verification stamps
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> Path:
    env = os.environ.get("MESH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "quorum"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    name: str


class DataDir:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()

    @property
    def raft_dir(self) -> Path:
        return self.path / "raft"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def config_file(self) -> Path | None:
        path = self.path / "mesh.toml"
        return path if path.exists() else None

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.raft_dir.mkdir(exist_ok=True, mode=0o700)
        self.models_dir.mkdir(exist_ok=True)

    def secret(self) -> str:
        """The mesh secret, created (0600) on first use."""
        path = self.path / "mesh.secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        value = path.read_text().strip()
        if len(value) < 32:
            raise ValueError(f"{path} holds no usable secret; delete it to make a new mesh")
        return value

    def identity(self, name: str | None = None) -> NodeIdentity:
        """This node's id (created once) and name (--name wins, then the stored one, then the host name)."""
        path = self.path / "node.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        ident = NodeIdentity(node_id=stored.get("node_id") or uuid.uuid4().hex[:12],
                             name=name or stored.get("name") or socket.gethostname().split(".")[0] or "node")
        if stored != {"node_id": ident.node_id, "name": ident.name}:
            path.write_text(json.dumps({"node_id": ident.node_id, "name": ident.name}) + "\n")
        return ident
