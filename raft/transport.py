"""pysyncobj 0.3.17's TCP transport, bounded and fair: a frame cap, linear-time buffers, a handshake
deadline, a cap on connections per remote address, and back-off instead of unbinding on EMFILE.

This module is the entry point (raft/node.py and mesh/node/daemon.py import `BoundedTransport` and
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

What a connection may carry (raft/wire.py): on a fresh incoming connection the peer's 32-byte key, then the
address of a voting member that dials this one (the higher address dials the lower); pysyncobj's utility
commands and read-only peers are refused. After that every message must match the schema of what pysyncobj
sends, its log entries must decode (raft/codec.py) into pysyncobj's command shapes, a peer may only forward
replicated calls (never membership or version changes), and entries or snapshots sent in pieces are bounded.

The barrier: with the journal in batch mode (raft/journal.py), `barrier()` (the journal's sync) runs before
any byte leaves through a socket and once a tick, and writes wait for the poller's next WRITE event, so every
entry appended during a tick shares one fsync and nothing is acknowledged before it is on disk.

With `tls` (raft/tls.py; pysyncobj's password off) every connection is mutual TLS and `tls.authorize(node id in
the peer's certificate, Raft address)` decides who may use it: as client once TLS is up (the address dialled),
as server on the peer's address claim, and again on every established connection every RECHECK_S.
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

from raft import codec
from raft.bounded_connection import BoundedConnection
from raft.bounded_server import BoundedServer
from raft.journal import JournalFailed
from raft.tls import RECHECK_S, RaftTls
from raft.transport_limits import TransportLimits, throttled
from raft.wire import KEY_BYTES, MessageRefused, check_entry, check_message, proposer_may_send

__all__ = ["BoundedConnection", "BoundedServer", "BoundedTransport", "TransportLimits", "PINNED_PYSYNCOBJ"]

PINNED_PYSYNCOBJ = "0.3.17"


class BoundedTransport(TCPTransport):
    """TCPTransport with BoundedConnection/BoundedServer, per-address and pending-handshake caps, and a
    handshake deadline enforced from the tick (pysyncobj only times out connections that have events)."""

    def __init__(self, syncObj, selfNode, otherNodes, limits: TransportLimits = TransportLimits(),
                 barrier: Callable[[], None] | None = None, defer_writes: bool = False,
                 clock: Callable[[], float] = monotonic, tls: RaftTls | None = None) -> None:
        if PYSYNCOBJ_VERSION != PINNED_PYSYNCOBJ:
            raise RuntimeError(f"raft.transport subclasses pysyncobj {PINNED_PYSYNCOBJ}'s TCPTransport; found "
                               f"{PYSYNCOBJ_VERSION}: re-check transport.py, tcp_connection.py and tcp_server.py")
        self._limits = limits
        self._barrier = barrier
        self._defer_writes = defer_writes
        self._clock = clock
        if tls is not None and tls.authorize is None:
            raise ValueError("TLS for Raft needs an `authorize(node_id, raft_address)`")
        self._tls = tls
        self._rechecked = clock()
        self.refused = 0  # connections closed by the caps or the deadline (tests, metrics)
        self._pieces: dict = {}  # node -> an entry's pieces so far (bytearray) or a snapshot's size so far (int)
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
                                 defer_writes=self._defer_writes, clock=self._clock, tls=self._tls)

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
        # pysyncobj takes, on a fresh connection, the peer's random key, then either a member's address,
        # 'readonly' (a non-voting reader of the whole log) or a utility command list (status, add, remove,
        # set_version, transfer: TCPTransport._onUtilityMessage). Only the first two steps of a voting member are
        # accepted here: membership changes go through RaftNode's own methods, on the member itself.
        if self._syncObj.encryptor and not conn.sendRandKey:
            if type(message) is not bytes or len(message) != KEY_BYTES:
                self._refuse(conn, f"handshake: expected a {KEY_BYTES}-byte key, got {type(message).__name__}")
                return
        elif type(message) is not str or message not in self._nodeAddrToNode:
            what = "utility command" if isinstance(message, list) else \
                "read-only peer" if message == "readonly" else f"unknown member {str(message)[:80]!r}"
            self._refuse(conn, f"handshake: refused {what}")
            return
        elif self._shouldConnect(self._nodeAddrToNode[message]):
            # pysyncobj: the higher address dials the lower. A claim to be a member this side dials itself would
            # take over the map entry of that outgoing connection (and orphan it): never a real member.
            self._refuse(conn, f"handshake: {message[:80]} is dialled by this member, it does not dial here")
            return
        elif self._tls is not None and not self._authorized(conn, message):
            return
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
        # Every message is checked against what pysyncobj sends (raft/wire.py) before SyncObj sees it: SyncObj
        # indexes message['type'] and friends, applies what entries carry and retries a failing entry forever.
        # A member whose frames decrypt but are not such messages loses its connection instead.
        try:
            check_message(message, self._syncObj._idToMethod)
            self._check_pieces(node, message)
            if message["type"] == "apply_command" and self._tls is not None:
                self._check_proposer(node, message["command"])
            super()._onMessageReceived(node, message)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            self._pieces.pop(node, None)
            conn = self._connections.get(node)
            if conn is not None:
                self._refuse(conn, f"malformed message from {node}: {exc!r}")

    def _check_proposer(self, node, command: bytes) -> None:
        """A command a member forwards for the log that only another member may propose (its own addresses or
        profile) is refused: with TLS the forwarding member is the node id of its certificate."""
        conn = self._connections.get(node)
        body = codec.loads(command[1:], codec.NODES)
        call_args = body[1] if type(body) is tuple and len(body) >= 2 else ()
        wire = call_args[0] if call_args else None
        peer = getattr(conn, "peer_id", None)
        if peer is not None and type(wire) is dict and not proposer_may_send(peer, wire):
            raise MessageRefused(f"{peer} may not propose {wire.get('kind')} for {str(wire.get('node_id'))[:40]}")

    def _check_pieces(self, node, message) -> None:
        """Bounds what SyncObj accumulates from pieces: an entry sent in 'transmission' pieces (rebuilt here
        and checked like any entry before SyncObj decodes it) and a snapshot sent in 'serialized' pieces."""
        if message["type"] != "append_entries":
            return
        transmission = message.get("transmission")
        if transmission is not None:
            if transmission == "start":
                self._pieces[node] = bytearray()
            elif not isinstance(self._pieces.get(node), bytearray):
                raise MessageRefused(f"transmission {transmission!r} without a start")
            buf = self._pieces[node]
            buf += message["data"]
            if len(buf) > self._limits.max_message_bytes:
                raise MessageRefused(f"an entry sent in pieces beyond {self._limits.max_message_bytes} bytes")
            if transmission == "finish":
                del self._pieces[node]
                try:
                    entry = codec.loads(bytes(buf), codec.NODES)
                except codec.CodecError as exc:
                    raise MessageRefused(f"an entry sent in pieces: {exc}") from None
                check_entry(entry, self._syncObj._idToMethod)
            return
        serialized = message.get("serialized")
        if type(serialized) is tuple:
            data, first, _last = serialized
            total = len(data) + (0 if first or not isinstance(self._pieces.get(node), int) else self._pieces[node])
            if total > self._limits.max_snapshot_bytes:
                raise MessageRefused(f"a snapshot beyond {self._limits.max_snapshot_bytes} bytes")
            self._pieces[node] = total

    def _onOutgoingConnected(self, conn):
        node = self._connToNode(conn)
        if self._tls is not None and (node is None or not self._authorized(conn, node.address)):
            if node is None:
                self._refuse(conn, "outgoing connection to no known member")
            return
        super()._onOutgoingConnected(conn)
        if not self._syncObj.encryptor:
            conn.handshake_done = True

    def _onOutgoingMessageReceived(self, conn, message):
        if not conn.sendRandKey and (type(message) is not bytes or len(message) != KEY_BYTES):
            self._refuse(conn, f"handshake: expected a {KEY_BYTES}-byte key, got {type(message).__name__}")
            return
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
        if self._tls is not None and now - self._rechecked >= RECHECK_S:
            self._rechecked = now
            for node, conn in list(self._connections.items()):
                if conn.handshake_done and conn.state != CONNECTION_STATE.DISCONNECTED and \
                        hasattr(node, "address"):
                    self._authorized(conn, node.address)

    # ---- helpers -----------------------------------------------------------------------------------

    def _incoming(self) -> list[BoundedConnection]:
        known = [c for c in self._connections.values() if c.incoming and c.state != CONNECTION_STATE.DISCONNECTED]
        return list(self._unknownConnections) + known

    def _authorized(self, conn: BoundedConnection, address: str) -> bool:
        """Whether the member in `conn`'s certificate may speak for `address`; refuses the connection if not."""
        try:
            allowed = conn.peer_id is not None and self._tls.authorize(conn.peer_id, address)
        except Exception as exc:  # a bug in the caller's rule must close this connection, not stop the tick thread
            throttled.warning("authorize-error", "raft transport: authorize(%r, %r) raised %r", conn.peer_id, address,
                              exc)
            allowed = False
        if not allowed:
            self._refuse(conn, f"TLS: certificate of {conn.peer_id!r} is not a live member at {address[:80]}")
        return allowed

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
