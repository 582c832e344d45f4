"""Everything a node keeps lives in its data dir:

    mesh.secret      the mesh secret (0600): guards nothing any more (Raft is mutual TLS with node.pem,
                     admin credentials are recorded per member); still written, and handed to joiners
                     over TLS, because its presence marks a data dir that belongs to a mesh
    admin.token      the admin credential meshctl sends to the control API (0600; derived from the secret)
    ca.pem, ca.key   the mesh CA's certificate, and its key on authority members only (0600; see
                     mesh/security/authority.py)
    node.pem, node.key  this node's certificate (signed by the mesh CA, renewed while it runs:
                     mesh/security/renewal.py) and key (0600)
    node.json        this node's id, name, mesh, addresses and last known Raft partners
    mesh.toml        optional configuration (else the built-in defaults)
    raft/            pysyncobj's journal and full dump
    models/          model files and their verification stamps
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from mesh.security.pki import NodeIdentity

_IDENTITY_FILES = ("node.key", "node.pem", "ca.pem", "ca.key")


def default_data_dir() -> Path:
    env = os.environ.get("MESH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "quorum"


@dataclass(frozen=True)
class NodeRecord:
    """What a node remembers about itself between runs (node.json)."""
    node_id: str
    name: str
    mesh_id: str = ""  # empty until the node has created or joined a mesh
    listen: str = ""  # the --listen it was started with, reused by `meshd start`
    advertise: str = ""  # the host other members reach it on
    witness: bool = False
    partners: tuple[str, ...] = ()  # Raft addresses of the other members, last known

    @property
    def joined(self) -> bool:
        return bool(self.mesh_id)


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

    def record(self, name: str | None = None) -> NodeRecord:
        """This node's record: created on first use (a new id; the name from --name or the host)."""
        path = self.path / "node.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        known = {f.name for f in dataclasses.fields(NodeRecord)}
        stored = {k: v for k, v in stored.items() if k in known}
        stored["partners"] = tuple(stored.get("partners", ()))
        record = NodeRecord(**{"node_id": uuid.uuid4().hex[:12],
                               "name": socket.gethostname().split(".")[0] or "node", **stored})
        if name:
            record = dataclasses.replace(record, name=name)
        self.save(record)
        return record

    def save(self, record: NodeRecord) -> None:
        path = self.path / "node.json"
        body = json.dumps({**dataclasses.asdict(record), "partners": list(record.partners)}, indent=1) + "\n"
        if not path.exists() or path.read_text() != body:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(body)
            os.replace(tmp, path)

    def forget_mesh(self, record: NodeRecord) -> None:
        """After leaving: drop the Raft journal, the secret, the admin token and the certificates
        (models stay); keep id and name."""
        for path in self.raft_dir.iterdir():
            path.unlink()
        for name in ("mesh.secret", "admin.token", *_IDENTITY_FILES):
            (self.path / name).unlink(missing_ok=True)
        self.save(record)

    def write_secret(self, value: str) -> None:
        """Stores a mesh secret received when joining (0600)."""
        _write_private(self.path / "mesh.secret", value.strip() + "\n")

    # -- certificates and the admin credential -------------------------------------------------

    def write_identity(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes, ca_key_pem: bytes | None) -> None:
        """Stores this node's key and certificate and the mesh CA; its key only on an authority."""
        _write_private(self.path / "node.key", key_pem.decode())
        (self.path / "node.pem").write_bytes(cert_pem)
        (self.path / "ca.pem").write_bytes(ca_pem)
        if ca_key_pem is not None:
            _write_private(self.path / "ca.key", ca_key_pem.decode())

    def identity(self) -> NodeIdentity:
        """This node's key, certificate and mesh CA; ValueError if the data dir has none."""
        try:
            return NodeIdentity(key_pem=(self.path / "node.key").read_bytes(),
                                cert_pem=(self.path / "node.pem").read_bytes(),
                                ca_pem=(self.path / "ca.pem").read_bytes())
        except FileNotFoundError as exc:
            raise ValueError(f"{self.path} has no node certificate ({exc.filename} is missing): it was made by "
                             f"an older Quorum; make the mesh again with `meshd init`, or join it anew") from None

    def ca_key(self) -> bytes | None:
        """The mesh CA's key, or None on a member that is not an authority."""
        try:
            return (self.path / "ca.key").read_bytes()
        except FileNotFoundError:
            return None

    def drop_ca_key(self) -> bool:
        """Deletes ca.key (overwritten first: a plain unlink leaves the bytes on disk); whether there was one."""
        path = self.path / "ca.key"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        with open(path, "r+b") as f:
            f.write(secrets.token_bytes(size))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        return True

    def admin_token(self) -> str:
        """This member's admin credential (admin.token, 0600, where meshctl on this machine finds it);
        "" when it has none yet or keeps one from before credentials were recorded in the log."""
        path = self.path / "admin.token"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return ""
        return text if text.startswith("qadm2.") else ""

    def write_admin_token(self, text: str) -> None:
        _write_private(self.path / "admin.token", text + "\n")


def _write_private(path: Path, text: str) -> None:
    """Writes a 0600 file whole: a reader (meshctl, a test) sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
