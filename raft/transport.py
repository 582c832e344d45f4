"""pysyncobj 0.3.17's TCP transport, bounded and fair: a frame cap, linear-time buffers, a handshake
deadline, a cap on connections per remote address, and back-off instead of unbinding on EMFILE.

This module is the entry point (raft/node.py and mesh/daemon.py import `BoundedTransport` and
`TransportLimits` from it). The pieces:

  raft/transport_limits.py    TransportLimits and the rate-limited warning for every limit hit
  raft/bounded_connection.py  BoundedConnection: framing, the frame and message caps, linear buffers
  raft/bounded_server.py      BoundedServer: the listener and its accept() back-off
  raft/transport.py           BoundedTransport: wires them into SyncObj, with the per-address and
                              pending-handshake caps and the handshake deadline

`BoundedTransport` is handed to SyncObj as `transportClass` (a functools.partial carrying the limits and the
journal barrier); it subclasses TCPTransport and overrides the methods that construct connections and the
server (`addNode`, `_createServer`) and the handshake callbacks. Re-check all of this when the pysyncobj pin
moves (tests/unit/test_raft_transport.py asserts it).

The barrier: with the journal in batch mode (raft/journal.py), `barrier()` (the journal's sync) runs before
any byte leaves through a socket and once a tick, and writes wait for the poller's next WRITE event, so every
entry appended during a tick shares one fsync and nothing is acknowledged before it is on disk.
"""

from __future__ import annotations

import functools
import socket
from typing import Callable

from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.monotonic import monotonic
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from raft.bounded_connection import BoundedConnection
from raft.bounded_server import BoundedServer
from raft.journal import JournalFailed
from raft.transport_limits import TransportLimits, throttled

__all__ = ["BoundedConnection", "BoundedServer", "BoundedTransport", "TransportLimits", "PINNED_PYSYNCOBJ"]

PINNED_PYSYNCOBJ = "0.3.17"


class BoundedTransport(TCPTransport):
    """TCPTransport with BoundedConnection/BoundedServer, per-address and pending-handshake caps, and a
    handshake deadline enforced from the tick (pysyncobj only times out connections that have events)."""

    def __init__(self, syncObj, selfNode, otherNodes, limits: TransportLimits = TransportLimits(),
                 barrier: Callable[[], None] | None = None, defer_writes: bool = False,
                 clock: Callable[[], float] = monotonic) -> None:
        if PYSYNCOBJ_VERSION != PINNED_PYSYNCOBJ:
            raise RuntimeError(f"raft.transport subclasses pysyncobj {PINNED_PYSYNCOBJ}'s TCPTransport; found "
                               f"{PYSYNCOBJ_VERSION}: re-check transport.py, tcp_connection.py and tcp_server.py")
        self._limits = limits
        self._barrier = barrier
        self._defer_writes = defer_writes
        self._clock = clock
        self.refused = 0  # connections closed by the caps or the deadline (tests, metrics)
        super().__init__(syncObj, selfNode, otherNodes)

    @classmethod
    def factory(cls, **kwargs) -> Callable:
        """What SyncObj's `transportClass` takes: called as (syncObj, selfNode, otherNodes)."""
        return functools.partial(cls, **kwargs)

    def _new_connection(self, sock: socket.socket | None = None) -> BoundedConnection:
        conf = self._syncObj.conf
        return BoundedConnection(self._syncObj._poller, socket=sock, timeout=conf.connectionTimeout,
                                 sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                 keepalive=conf.tcp_keepalive, limits=self._limits, barrier=self._barrier,
                                 defer_writes=self._defer_writes, clock=self._clock)

    # ---- overrides of TCPTransport (pysyncobj 0.3.17) -----------------------------------------------

    def _createServer(self):
        # TCPTransport._createServer with BoundedServer: the same choice of bind address.
        conf = self._syncObj.conf
        if conf.bindAddress is not None:
            host, port = conf.bindAddress.rsplit(":", 1)
        elif getattr(self._selfNode, "address", None) is not None:
            host, port = self._selfNode.address.rsplit(":", 1)
            host = "::" if ":" in host else "0.0.0.0"
        else:
            raise RuntimeError("Unable to determine bind address")
        if host != "0.0.0.0":
            host = globalDnsResolver().resolve(host)
        self._server = BoundedServer(self._syncObj._poller, host, port, self._onNewIncomingConnection,
                                     conf.sendBufferSize, conf.recvBufferSize, make_connection=self._new_connection,
                                     limits=self._limits, on_exhausted=self._shed_oldest_pending, clock=self._clock)

    def addNode(self, node):
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self._new_connection()
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _onNewIncomingConnection(self, conn):
        ip = conn.peer[0]
        same = [c for c in self._incoming() if c.peer[0] == ip]
        if len(same) >= self._limits.max_connections_per_address:
            unfinished = [c for c in same if not c.handshake_done]
            if not unfinished:
                self._refuse(conn, f"{len(same)} connections from {ip} already")
                return
            self._refuse(min(unfinished, key=lambda c: c.opened_at), f"connection cap for {ip}")
        if len(self._unknownConnections) >= self._limits.max_pending_handshakes:
            self._shed_oldest_pending()
        super()._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn, message):
        before = {node: c for node, c in self._connections.items()}
        try:
            super()._onIncomingMessageReceived(conn, message)
        except (TypeError, ValueError, KeyError, IndexError) as exc:  # e.g. an unhashable "address"
            self._refuse(conn, f"malformed handshake message: {exc!r}")
            return
        if conn.state == CONNECTION_STATE.DISCONNECTED or conn in self._unknownConnections:
            return
        conn.handshake_done = True
        for node, old in before.items():
            # The peer reconnected: pysyncobj replaces the connection in its map and leaves the old one open,
            # still delivering messages. Close it.
            if self._connections.get(node) is conn and old is not conn and old.incoming:
                old.setOnDisconnectedCallback(None)
                old.disconnect()

    def _onMessageReceived(self, node, message):
        # SyncObj indexes message['type'] and friends: a member whose frames decrypt but are not Raft messages
        # would raise out of the poller (skipping every other event of that poll). Drop its connection instead.
        try:
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise TypeError(f"not a Raft message: {type(message).__name__}")
            super()._onMessageReceived(node, message)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            conn = self._connections.get(node)
            if conn is not None:
                self._refuse(conn, f"malformed message from {node}: {exc!r}")

    def _onOutgoingConnected(self, conn):
        super()._onOutgoingConnected(conn)
        if not self._syncObj.encryptor:
            conn.handshake_done = True

    def _onOutgoingMessageReceived(self, conn, message):
        super()._onOutgoingMessageReceived(conn, message)
        conn.handshake_done = True

    def _onTick(self):
        if self._barrier is not None:
            try:
                self._barrier()  # a one-member group commits without sending: entries durable by the next tick
            except (OSError, JournalFailed):  # logged by the journal; every connection refuses to send
                pass
        super()._onTick()
        now = self._clock()
        deadline = now - self._limits.handshake_timeout_s
        for conn in list(self._unknownConnections) + list(self._connections.values()):
            if not conn.handshake_done and conn.state != CONNECTION_STATE.DISCONNECTED and conn.opened_at < deadline:
                self._refuse(conn, "handshake deadline")
        if isinstance(self._server, BoundedServer):
            self._server.on_tick()

    # ---- helpers -----------------------------------------------------------------------------------

    def _incoming(self) -> list[BoundedConnection]:
        known = [c for c in self._connections.values() if c.incoming and c.state != CONNECTION_STATE.DISCONNECTED]
        return list(self._unknownConnections) + known

    def _refuse(self, conn: BoundedConnection, why: str) -> None:
        self.refused += 1
        throttled.warning("refused-" + why.split()[0], "raft transport: closed connection %s %s (%s)",
                           "from" if conn.incoming else "to", conn.peer, why)
        self._unknownConnections.discard(conn)
        conn.disconnect()

    def _shed_oldest_pending(self) -> None:
        pending = [c for c in self._unknownConnections if c.state != CONNECTION_STATE.DISCONNECTED]
        if pending:
            self._refuse(min(pending, key=lambda c: c.opened_at), "pending handshake cap or out of descriptors")
