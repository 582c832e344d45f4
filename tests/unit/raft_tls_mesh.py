"""A mesh of real RaftNodes over mutual TLS on loopback, built the way meshd builds one (raft/tls.py): the first
member alone creates the mesh and records every member; each joiner starts with the leader as its partner and
is added to the Raft group after the log binds its node id to its Raft address. Shared by test_raft_tls*.py
and tests/bench/bench_raft_tls.py."""

from __future__ import annotations

import socket
import ssl
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from mesh.security.pki import create_ca, issue_node_certificate
from raft import codec
from raft.commands import AddMember, CreateToken, InitMesh
from raft.node import RaftNode, RaftTiming
from raft.tls import RaftTls
from tests.procs import free_ports, wait_until

TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                    leader_fallback_s=0.4)
WAIT_S = 20.0
SECRET = "the-old-mesh-secret-" + "x" * 20


@dataclass(frozen=True)
class Cert:
    node_id: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def tls(self, authorize=None) -> RaftTls:
        return RaftTls.from_pem(self.cert_pem, self.key_pem, self.ca_pem, authorize)

    def client_context(self) -> ssl.SSLContext:
        return self.tls().client_context

    def server_context(self) -> ssl.SSLContext:
        return self.tls().server_context


class Authority:
    """A mesh CA that issues member certificates (CN = node id)."""

    def __init__(self, name: str = "test") -> None:
        self.ca_pem, self.ca_key = create_ca(name)

    def issue(self, node_id: str) -> Cert:
        key, cert = issue_node_certificate(self.ca_pem, self.ca_key, node_id)
        return Cert(node_id, cert, key, self.ca_pem)


def addresses(count: int) -> list[str]:
    """Loopback Raft addresses, lowest first (pysyncobj: the higher address dials the lower)."""
    base = free_ports(count)
    return [f"127.0.0.1:{base + i}" for i in range(count)]


def add_member(node_id: str, address: str, token: str | None) -> AddMember:
    return AddMember(node_id=node_id, name=node_id, http_address="", raft_address=address, profile={},
                     joined_at=time.time(), token_id=token)


def build_mesh(root: Path, ca: Authority, ids: list[str], addrs: list[str], extra: list[tuple[str, str]] = (),
               password: str = "", tls: bool = True) -> dict[str, RaftNode]:
    """Members `ids` at `addrs` (the first creates the mesh), with TLS (or the password's Fernet: `tls=False`).
    `extra`: more (node id, address) members recorded in the log but never started."""
    def start(i: int, partners: list[str]) -> RaftNode:
        kw = {"tls": ca.issue(ids[i]).tls()} if tls else {}
        return RaftNode(addrs[i], partners, root / ids[i], password, TIMING, **kw)

    nodes = {ids[0]: start(0, [])}
    first = nodes[ids[0]]
    try:
        wait_until(lambda: first.is_leader() and first.is_ready(), WAIT_S, "the first member's leadership")
        now = time.time()
        for cmd in [InitMesh("m", "tls-test", now), add_member(ids[0], addrs[0], None),
                    CreateToken("t", "0" * 64, now - 10, now + 3600, uses=len(ids) + len(extra))]:
            first.propose(cmd).result(timeout=WAIT_S)
        for node_id, address in [*zip(ids[1:], addrs[1:]), *extra]:
            first.propose(add_member(node_id, address, "t")).result(timeout=WAIT_S)
        for i in range(1, len(ids)):
            nodes[ids[i]] = start(i, addrs[:i])
            first.add_partner(addrs[i]).result(timeout=WAIT_S)
        applied = first.state.applied
        wait_until(lambda: all(n.is_ready() and n.state.applied >= applied for n in nodes.values()), WAIT_S,
                   "every member caught up")
    except BaseException:
        close_all(nodes)
        raise
    return nodes


def close_all(nodes: dict[str, RaftNode]) -> None:
    for node in nodes.values():
        node.close()


def leader_of(nodes: dict[str, RaftNode]) -> RaftNode:
    def one():
        leaders = [n for n in nodes.values() if n.is_leader()]
        return leaders[0] if len(leaders) == 1 else None
    return wait_until(one, WAIT_S, "one leader")


def commit(nodes: dict[str, RaftNode], cmd) -> int:
    """Proposes through the leader and waits until every node in `nodes` applied it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            leader_of(nodes).propose(cmd).result(timeout=5)
            break
        except Exception as exc:  # leadership moved under us: propose again through the new leader
            if time.monotonic() > deadline:
                raise AssertionError(f"could not commit {cmd}: {exc!r}") from exc
    applied = leader_of(nodes).state.applied
    wait_until(lambda: all(n.state.applied >= applied for n in nodes.values()), WAIT_S, "every node to apply")
    return applied


def transport_of(node: RaftNode):
    return node._obj._SyncObj__transport


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def frame(data: bytes) -> bytes:
    return struct.pack("i", len(data)) + data


def typed_frame(message) -> bytes:
    return frame(zlib.compress(codec.dumps(message), 3))


def closed_by_peer(sock: socket.socket, limit_s: float = 10.0) -> bool:
    """True once the other side closes (EOF, reset, or a TLS alert); False if it stays open `limit_s`."""
    sock.settimeout(limit_s)
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except socket.timeout:
        return False
    return False


def tls_client(address: str, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A blocking TLS connection to a Raft port (the handshake raises ssl.SSLError if refused there)."""
    raw = socket.create_connection(("127.0.0.1", port_of(address)), timeout=5)
    try:
        return context.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


class Boom:
    """A pickle that creates a file when loaded: proof of code execution if a node unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
