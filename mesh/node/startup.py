"""What starting a member needs before and around the daemon: ports bound with clear errors, bounded
waits, the Raft settings from mesh.toml, and a member's peer address."""

from __future__ import annotations

import asyncio
import socket
import time

from mesh.core.config import MeshConfig
from mesh.core.errors import StartupError
from raft.node import RaftTiming
from raft.transport import TransportLimits


def raft_timing(cfg: MeshConfig) -> RaftTiming:
    r = cfg.raft
    return RaftTiming(heartbeat_s=r.heartbeat_ms / 1000, election_min_s=r.election_min_ms / 1000,
                      election_max_s=r.election_max_ms / 1000, connection_retry_s=r.connection_retry_ms / 1000,
                      leader_fallback_s=r.leader_fallback_ms / 1000,
                      compaction_min_entries=r.compaction_min_entries)


def raft_limits(cfg: MeshConfig) -> TransportLimits:
    r = cfg.raft
    return TransportLimits(max_frame_bytes=r.max_frame_kib * 1024, handshake_timeout_s=r.handshake_timeout_ms / 1000,
                           max_connections_per_address=r.max_connections_per_address)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(256)
    return sock  # not inheritable (PEP 446): shard processes must not hold meshd's ports


async def until(condition, what: str, timeout: float = 60.0, every: float = 0.02) -> None:
    """Waits for a condition (bounded), checking every `every` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise StartupError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


def peer_address_of(member) -> str:
    """A member's HTTPS peer address; members recorded before it existed used the HTTP port + 3."""
    if member.peer_address:
        return member.peer_address
    host, _, port = member.http_address.rpartition(":")
    return f"{host}:{int(port) + 3}"
