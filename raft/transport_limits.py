"""The bounds of the Raft transport (raft/transport.py) and the rate-limited warning through which every hit
of one is reported.

`TransportLimits` is what RaftNode and the daemon configure (mesh.toml's max_frame_kib ends up in
max_frame_bytes); raft/bounded_connection.py, raft/bounded_server.py and raft/transport.py enforce it.
`throttled` is the one shared log throttle of all three: a flood of bad connections must not flood the log,
whichever of them notices it. It logs as "quorum.raft.transport".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pysyncobj.monotonic import monotonic

log = logging.getLogger("quorum.raft.transport")


@dataclass(frozen=True)
class TransportLimits:
    # Largest frame (length prefix excluded) read or sent; a bigger announced length closes the connection
    # before anything is buffered. Commands are capped at half of it (RaftNode.propose): Fernet's base64 adds
    # a third, and one AppendEntries batch carries up to 64 KiB besides.
    max_frame_bytes: int = 4 * 1024 * 1024
    # A decompressed message may not exceed this (a small frame can inflate a lot).
    max_message_bytes: int = 8 * 1024 * 1024
    # Time from accept()/connect() to the end of the handshake (key exchange and the peer's address).
    handshake_timeout_s: float = 5.0
    # Connections accepted from one IP address at once; at the cap the oldest that has not finished its
    # handshake is closed, and when every one has, the new one is refused.
    max_connections_per_address: int = 8
    # Accepted connections still in their handshake, from all addresses together; the oldest goes first.
    max_pending_handshakes: int = 64
    # Bytes queued for a peer that does not read; beyond them the connection is closed.
    max_send_buffer_bytes: int = 64 * 1024 * 1024
    # After accept() fails for lack of resources (EMFILE, ENFILE, ...): pause the listener, doubling.
    accept_backoff_min_s: float = 0.05
    accept_backoff_max_s: float = 1.0
    # Connections taken per poll event on the listener.
    accepts_per_event: int = 16
    # A snapshot (full dump) received from the leader in pieces may not exceed this; beyond it the connection
    # is closed (the pieces go to a file, so this bounds the disk a member can make another one fill).
    max_snapshot_bytes: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1024 <= self.max_frame_bytes < 2 ** 31:
            raise ValueError("max_frame_bytes must be between 1 KiB and 2 GiB")
        if self.handshake_timeout_s <= 0 or self.max_connections_per_address < 1 or self.max_pending_handshakes < 1:
            raise ValueError("handshake_timeout_s, max_connections_per_address and max_pending_handshakes must be "
                             "positive")
        if not 0 < self.accept_backoff_min_s <= self.accept_backoff_max_s:
            raise ValueError("need 0 < accept_backoff_min_s <= accept_backoff_max_s")

    @property
    def max_command_bytes(self) -> int:
        return self.max_frame_bytes // 2



class _Throttled:
    """At most one log line per kind and interval: a flood of bad connections must not flood the log."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args) -> None:
        now = monotonic()
        if now - self._last.get(kind, -1e9) < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        skipped = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        log.warning(msg + (f" ({skipped} more like it not logged)" if skipped else ""), *args)


throttled = _Throttled()
