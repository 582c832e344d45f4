"""Everything a node keeps lives in its data dir:

    admin.token      this member's admin credential, which meshctl sends to the control API (0600; its
                     sha256 is in the log, revoked with the member)
    ca.pem, ca.key   the CAs the mesh trusts (the signing one first; several during a rotation), and the
                     signing CA's key on authority members only (0600; see mesh/security/authority.py)
    ca-next.pem, ca-next.key  a CA an authority made for a rotation, until the log makes it the signing one
                     (mesh/security/ca_rotation.py)
    node.pem, node.key  this node's certificate (signed by the mesh CA, renewed while it runs:
                     mesh/security/renewal.py) and key (0600)
    node.json        this node's id, name, mesh, addresses and last known Raft partners
    mesh.toml        optional configuration (else the built-in defaults)
    raft/            pysyncobj's journal and full dump
    models/          model files and their verification stamps

node.pem marks a data dir that belongs to a mesh. Data dirs from before kept a mesh-wide `mesh.secret` (once
the Raft password and the admin credential's root; it guarded nothing at the end, but every member and every
removed one held it): `retire_secret` deletes it at start.
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

_IDENTITY_FILES = ("node.key", "node.pem", "ca.pem", "ca.key", "ca-next.pem", "ca-next.key")


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

    def retire_secret(self) -> bool:
        """Deletes (overwritten first) the mesh.secret of a data dir made before it was retired; whether there
        was one."""
        return _shred(self.path / "mesh.secret")

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
        """After leaving: drop the Raft journal, the admin token and the certificates
        (models stay); keep id and name."""
        for path in self.raft_dir.iterdir():
            path.unlink()
        for name in ("mesh.secret", "admin.token", *_IDENTITY_FILES):
            (self.path / name).unlink(missing_ok=True)
        self.save(record)

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
        return _shred(self.path / "ca.key")

    # -- a CA rotation (mesh/security/ca_rotation.py) ------------------------------------------

    def write_trust(self, bundle: bytes) -> None:
        """ca.pem: the CAs the mesh trusts now, the signing one first."""
        _write_private(self.path / "ca.pem", bundle.decode(), mode=0o644)

    def write_ca_key(self, key_pem: bytes) -> None:
        """ca.key: the signing CA's key (the key it replaces is overwritten first)."""
        _shred(self.path / "ca.key")
        _write_private(self.path / "ca.key", key_pem.decode())

    def next_ca(self) -> tuple[bytes, bytes] | None:
        """(certificate, key) of a CA this authority made and proposed, not yet signing (ca-next.pem/.key)."""
        try:
            return (self.path / "ca-next.pem").read_bytes(), (self.path / "ca-next.key").read_bytes()
        except FileNotFoundError:
            return None

    def write_next_ca(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Kept before the rotation is proposed: once the log makes it the signing CA, its key is here."""
        _write_private(self.path / "ca-next.key", key_pem.decode())
        _write_private(self.path / "ca-next.pem", cert_pem.decode(), mode=0o644)

    def drop_next_ca(self) -> None:
        _shred(self.path / "ca-next.key")
        (self.path / "ca-next.pem").unlink(missing_ok=True)

    def install_next_ca(self) -> None:
        """The log made the next CA the signing one: its key becomes ca.key."""
        pending = self.next_ca()
        if pending is not None:
            self.write_ca_key(pending[1])
            self.drop_next_ca()

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


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Writes a 0600 file whole: a reader (meshctl, a test) sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _shred(path: Path) -> bool:
    """Overwrites, then deletes, a key file; whether there was one."""
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
