"""raft/transport.py: pysyncobj 0.3.17's TCP transport with a frame cap, linear buffers, a handshake deadline,
per-address and pending-handshake caps, and an accept() back-off instead of unbinding on EMFILE.

Connection-level claims run a BoundedConnection over a socketpair with pysyncobj's own poller; transport-level
claims run real RaftNodes (Fernet with the password) on loopback, their tick threads running.
"""

from __future__ import annotations

import errno
import inspect
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pysyncobj
import pysyncobj.syncobj as pso_syncobj
import pysyncobj.transport as pso_transport
import pytest
from pysyncobj.encryptor import getEncryptor
from pysyncobj.poller import POLL_EVENT_TYPE, createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from raft import codec
from raft.commands import InitMesh, SetReplicas
from raft.node import CommandTooLarge, ProposalFailed, RaftNode, RaftTiming
from raft.transport import BoundedConnection, BoundedServer, BoundedTransport, TransportLimits
from tests.procs import REPO, free_ports, guarded, wait_until

PASSWORD = "transport-test-secret"
TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                    leader_fallback_s=0.4)
WAIT_S = 20.0


# ---- pins: what this module assumes about pysyncobj -----------------------------------------------------

def test_pinned_to_pysyncobj_0_3_17_and_its_extension_points():
    assert pysyncobj.version.VERSION == "0.3.17"
    params = inspect.signature(pso_syncobj.SyncObj.__init__).parameters
    assert "transportClass" in params and "transport" in params
    init = inspect.getsource(pso_syncobj.SyncObj.__init__)
    assert "transportClass(self, self.__selfNode, self.__otherNodes)" in init
    # The methods BoundedTransport overrides exist with the signatures it calls.
    for name, args in [("_createServer", ["self"]), ("addNode", ["self", "node"]),
                       ("_onNewIncomingConnection", ["self", "conn"]),
                       ("_onIncomingMessageReceived", ["self", "conn", "message"]),
                       ("_onOutgoingConnected", ["self", "conn"]),
                       ("_onOutgoingMessageReceived", ["self", "conn", "message"]), ("_onTick", ["self"])]:
        assert list(inspect.signature(getattr(pso_transport.TCPTransport, name)).parameters) == args, name
    # BoundedConnection offers every public name TcpConnection has (TCPTransport uses them).
    public = {n for n in dir(TcpConnection) if not n.startswith("_")}
    assert public <= {n for n in dir(BoundedConnection) if not n.startswith("_")}


# ---- BoundedConnection over a socketpair ----------------------------------------------------------------

class Pair:
    """A BoundedConnection on one end of a socketpair, the raw socket on the other, pysyncobj's poller."""

    def __init__(self, limits: TransportLimits = TransportLimits(), **kwargs) -> None:
        self.poller = createPoller("auto")
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.messages: list = []
        self.conn = BoundedConnection(self.poller, socket=ours, timeout=60, recvBufferSize=2 ** 13, limits=limits,
                                      **kwargs)
        self.conn.setOnMessageReceivedCallback(self.messages.append)

    def pump(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.poller.poll(0.01)

    def close(self) -> None:
        self.conn.disconnect()
        self.peer.close()


def wire(message, encryptor=None) -> bytes:
    data = zlib.compress(codec.dumps(message), 3)
    if encryptor is not None:
        data = encryptor.encrypt(data)
    return struct.pack("i", len(data)) + data


def test_frames_round_trip_in_pysyncobjs_framing_with_the_typed_codec():
    pair = Pair()
    try:
        pair.peer.sendall(wire({"type": "x", "n": 1}) + wire("second"))
        pair.pump()
        assert pair.messages == [{"type": "x", "n": 1}, "second"]
        pair.conn.send(["reply", 2])
        pair.pump()
        data = pair.peer.recv(65536)
        (length,) = struct.unpack("i", data[:4])
        assert codec.loads(zlib.decompress(data[4:4 + length])) == ["reply", 2]
    finally:
        pair.close()


@pytest.mark.parametrize("length", [2 ** 31 - 1, 64 * 1024 + 1, -1, -2 ** 31])
def test_an_oversized_or_negative_length_prefix_closes_the_connection_before_buffering(length):
    pair = Pair(TransportLimits(max_frame_bytes=64 * 1024))
    try:
        pair.peer.sendall(struct.pack("i", length) + b"\0" * 1000)
        pair.pump(1)
        assert pair.conn.state == CONNECTION_STATE.DISCONNECTED
        assert pair.conn._rbuf == b"" and pair.messages == []
    finally:
        pair.close()


def test_a_frame_at_the_cap_is_taken_and_a_later_oversized_one_closes():
    cap = 64 * 1024
    pair = Pair(TransportLimits(max_frame_bytes=cap))
    try:
        body = zlib.compress(codec.dumps(os.urandom(cap - 200)), 0)
        assert len(body) <= cap
        pair.peer.sendall(struct.pack("i", len(body)) + body)
        pair.pump()
        assert len(pair.messages) == 1
        pair.peer.sendall(wire("ok") + struct.pack("i", cap + 1))
        pair.pump()
        assert pair.messages[1:] == ["ok"] and pair.conn.state == CONNECTION_STATE.DISCONNECTED
    finally:
        pair.close()


def test_a_message_that_inflates_beyond_the_limit_closes_the_connection():
    pair = Pair(TransportLimits(max_message_bytes=1024 * 1024))
    try:
        pair.peer.sendall(wire(b"\0" * (4 * 1024 * 1024)))  # ~4 KiB on the wire
        pair.pump()
        assert pair.messages == [] and pair.conn.state == CONNECTION_STATE.DISCONNECTED
    finally:
        pair.close()


def test_an_outgoing_frame_over_the_cap_is_dropped_not_sent():
    pair = Pair(TransportLimits(max_frame_bytes=4096))
    try:
        pair.conn.send(os.urandom(8192))
        pair.conn.send("small")
        pair.pump()
        data = pair.peer.recv(65536)
        (length,) = struct.unpack("i", data[:4])
        assert len(data) == 4 + length and codec.loads(zlib.decompress(data[4:])) == "small"
        assert pair.conn.state == CONNECTION_STATE.CONNECTED
    finally:
        pair.close()


def receive_time(make, size: int, stock_format: bool = False) -> float:
    """Seconds of the receiving side's thread to take one frame of `size` bytes in 8 KiB reads (in pysyncobj's
    own pickle format for its TcpConnection, which is all it reads)."""
    poller = createPoller("auto")
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    got = []
    conn = make(poller, ours)
    conn.setOnMessageReceivedCallback(got.append)
    if stock_format:
        data = zlib.compress(pickle.dumps(os.urandom(size)), 3)
        payload = struct.pack("i", len(data)) + data
    else:
        payload = wire(os.urandom(size))
    busy = 0.0
    sent = 0
    peer.setblocking(False)
    try:
        while not got:
            try:
                sent += peer.send(payload[sent:sent + 65536]) if sent < len(payload) else 0
            except BlockingIOError:
                pass
            start = time.thread_time()
            poller.poll(0)
            busy += time.thread_time() - start
        return busy
    finally:
        conn.disconnect()
        peer.close()


def test_receive_buffering_is_linear_where_pysyncobjs_is_quadratic():
    """Side by side, 8 KiB reads: pysyncobj's `bytes +=` copies the whole buffer on every read."""
    limits = TransportLimits(max_frame_bytes=32 * 1024 * 1024, max_message_bytes=64 * 1024 * 1024)

    def ours(poller, sock):
        return BoundedConnection(poller, socket=sock, timeout=60, recvBufferSize=2 ** 13, limits=limits)

    def stock(poller, sock):
        return TcpConnection(poller, socket=sock, timeout=60, recvBufferSize=2 ** 13)

    small, big = 2 * 1024 * 1024, 16 * 1024 * 1024
    ours_small, ours_big = receive_time(ours, small), receive_time(ours, big)
    stock_big = receive_time(stock, big, stock_format=True)
    print(f"\nthread time for one frame in 8 KiB reads: ours 2 MiB {ours_small:.3f} s, 16 MiB {ours_big:.3f} s; "
          f"pysyncobj 16 MiB {stock_big:.3f} s")
    assert ours_big < stock_big / 3
    assert ours_big < 8 * max(ours_small, 0.005) * 2.5  # 8x the bytes: linear, with room for noise


def test_the_write_barrier_runs_before_any_byte_leaves_and_writes_wait_for_the_poller():
    calls = []
    pair = Pair(barrier=lambda: calls.append("barrier"), defer_writes=True)
    try:
        pair.peer.setblocking(False)
        pair.conn.send("a")
        pair.conn.send("b")
        with pytest.raises(BlockingIOError):
            pair.peer.recv(100)
        assert calls == []
        pair.pump(1)
        assert calls == ["barrier"]  # one barrier for both frames
        assert len(pair.peer.recv(1000)) > 8
    finally:
        pair.close()


# ---- BoundedServer: accept() out of descriptors -------------------------------------------------------

class FakePoller:
    def __init__(self) -> None:
        self.subscribed: dict[int, int] = {}

    def subscribe(self, fd, callback, mask):
        self.subscribed[fd] = mask

    def unsubscribe(self, fd):
        self.subscribed.pop(fd, None)


class FailingListener:
    def __init__(self, errors: list[int]) -> None:
        self.errors = errors

    def accept(self):
        if self.errors:
            raise OSError(self.errors.pop(0), "no")
        raise BlockingIOError(errno.EAGAIN, "empty")

    def close(self):
        pass


def test_emfile_on_accept_pauses_the_listener_with_backoff_and_rearms_it():
    now = [100.0]
    shed = []
    poller = FakePoller()
    limits = TransportLimits(accept_backoff_min_s=0.1, accept_backoff_max_s=0.4)
    server = BoundedServer(poller, "127.0.0.1", 1, lambda conn: None, make_connection=lambda s: s, limits=limits,
                           on_exhausted=lambda: shed.append(now[0]), clock=lambda: now[0])
    server._sock, server._fileno = FailingListener([errno.EMFILE, errno.ENFILE, errno.EMFILE, errno.ECONNABORTED]), 7
    poller.subscribe(7, None, POLL_EVENT_TYPE.READ)
    waits = []
    for _ in range(3):
        server._on_event(7, POLL_EVENT_TYPE.READ)
        assert server.paused and 7 not in poller.subscribed  # not polled: no busy loop on a full table
        start = now[0]
        while server.paused:
            now[0] += 0.01
            server.on_tick()
        waits.append(round(now[0] - start, 2))
        assert poller.subscribed[7] == POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
    assert waits == pytest.approx([0.1, 0.2, 0.4], abs=0.015) and len(shed) == 3 and server.pauses == 3
    server._on_event(7, POLL_EVENT_TYPE.READ)  # ECONNABORTED: skipped, then EAGAIN
    assert not server.paused and server._sock is not None


EMFILE_CHILD = """
import pathlib, resource, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
from raft.node import RaftNode
from raft.transport import TransportLimits
limits = TransportLimits(max_connections_per_address=1000, max_pending_handshakes=1000, handshake_timeout_s=600)
node = RaftNode(sys.argv[2], [], pathlib.Path(tempfile.mkdtemp()), "pw", limits=limits)
server = node._obj._SyncObj__transport._server
while True:
    time.sleep(0.2)
    print("pauses", server.pauses, flush=True)
"""


def test_listener_survives_descriptor_exhaustion_without_the_caps():
    """Caps off: 50 silent connections exhaust a 40-descriptor process; the listener pauses, and once the
    clients are gone it accepts again (pysyncobj 0.3.17 unbinds for good)."""
    address = f"127.0.0.1:{free_ports(1)}"
    host, port = address.split(":")
    child = subprocess.Popen(guarded([sys.executable, "-c", EMFILE_CHILD, str(REPO), address]),
                             stdout=subprocess.PIPE, text=True)
    silent: list[socket.socket] = []
    try:
        def accepts() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                return True
            except OSError:
                assert child.poll() is None, "the node process died"
                return False
        wait_until(accepts, WAIT_S, "the node to listen")
        for _ in range(50):
            try:
                silent.append(socket.create_connection((host, int(port)), timeout=1))
            except OSError:  # the backlog is full while the listener is paused
                break
        time.sleep(0.5)
        for s in silent:
            s.close()
        wait_until(accepts, 3, "the node to accept connections again")
        child.kill()
        out, _ = child.communicate(timeout=WAIT_S)
        pauses = [int(line.split()[1]) for line in out.splitlines() if line.startswith("pauses")]
        assert pauses and pauses[-1] > 0, "accept() never ran out of descriptors: the test did not test"
    finally:
        for s in silent:
            s.close()
        child.kill()
        child.wait(WAIT_S)


# ---- BoundedTransport in real RaftNodes ---------------------------------------------------------------

def closed_by_peer(sock: socket.socket, limit_s: float) -> bool:
    sock.settimeout(limit_s)
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def one_node(tmp_path: Path, limits: TransportLimits) -> RaftNode:
    node = RaftNode(f"127.0.0.1:{free_ports(1)}", [], tmp_path / "raft", PASSWORD, TIMING, limits=limits)
    wait_until(lambda: node.is_leader() and node.is_ready(), WAIT_S, "leadership")
    return node


def port_of(node: RaftNode) -> int:
    return int(node.address.rsplit(":", 1)[1])


def transport_of(node: RaftNode) -> BoundedTransport:
    return node._obj._SyncObj__transport


def test_raft_node_uses_the_bounded_transport_and_a_wrong_pin_is_refused(tmp_path, monkeypatch):
    node = one_node(tmp_path, TransportLimits())
    try:
        assert isinstance(transport_of(node), BoundedTransport)
        assert isinstance(transport_of(node)._server, BoundedServer)
    finally:
        node.close()
    monkeypatch.setattr("raft.transport.PYSYNCOBJ_VERSION", "0.3.18")
    with pytest.raises(RuntimeError, match="0.3.17"):
        BoundedTransport(None, None, [])


def test_silent_and_trickling_connections_are_closed_at_the_handshake_deadline(tmp_path):
    node = one_node(tmp_path, TransportLimits(handshake_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as silent, \
                socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as trickle:
            trickle.sendall(struct.pack("i", 1000) + b"x")  # a frame that never completes
            started = time.monotonic()
            assert closed_by_peer(silent, 5) and closed_by_peer(trickle, 5)
            assert 0.3 < time.monotonic() - started < 3
        assert transport_of(node).refused >= 2
    finally:
        node.close()


def member_handshake(sock: socket.socket, claimed_address: str) -> bytes:
    """What a member does on a connection it opened: its random key, then (under the key the other side
    answers with) the address it claims."""
    fernet = getEncryptor(PASSWORD)
    my_key = os.urandom(32)
    sock.sendall(wire(my_key, fernet))
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("i", buf[:4])[0]:
        buf += sock.recv(65536)
    key, their_key = codec.loads(zlib.decompress(fernet.decrypt(buf[4:])))
    assert key == my_key
    sock.sendall(wire((their_key, claimed_address), fernet))
    return their_key


def test_per_address_cap_evicts_the_oldest_unfinished_handshake_and_refuses_beyond_members(tmp_path):
    limits = TransportLimits(max_connections_per_address=2, handshake_timeout_s=60)
    base = free_ports(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    # The lowest address: the two others would dial it, so both identities are accepted on its port.
    node = RaftNode(addresses[0], addresses[1:], tmp_path / "raft", PASSWORD, TIMING, limits=limits)
    opened: list[socket.socket] = []

    def connect() -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", base), timeout=5))
        return opened[-1]
    try:
        transport = transport_of(node)
        wait_until(lambda: transport.ready, WAIT_S, "the listener")
        silent = [connect(), connect()]
        wait_until(lambda: len(transport._unknownConnections) == 2, WAIT_S, "two pending handshakes")
        third = connect()
        assert closed_by_peer(silent[0], 5), "the oldest silent connection was not evicted"
        # Members finish their handshake: they take slots from silent connections, never the reverse.
        members = []
        for claimed in addresses[1:]:
            members.append(connect())
            member_handshake(members[-1], claimed)
        assert closed_by_peer(silent[1], 5) and closed_by_peer(third, 5)
        wait_until(lambda: sum(c.handshake_done for c in transport._incoming()) == 2, WAIT_S, "two members in")
        started = time.monotonic()
        assert closed_by_peer(connect(), 5), "a connection beyond the cap was kept"
        assert time.monotonic() - started < 1
        assert all(not closed_by_peer(m, 0.3) for m in members)
    finally:
        for s in opened:
            s.close()
        node.close()


def test_a_member_reconnecting_replaces_its_old_connection(tmp_path):
    base = free_ports(2)
    me, other = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    node = RaftNode(me, [other], tmp_path / "raft", PASSWORD, TIMING)
    try:
        wait_until(lambda: transport_of(node).ready, WAIT_S, "the listener")
        first = socket.create_connection(("127.0.0.1", base), timeout=5)
        member_handshake(first, other)
        wait_until(lambda: node.partners().get(other), WAIT_S, "the member connected")
        second = socket.create_connection(("127.0.0.1", base), timeout=5)
        member_handshake(second, other)
        assert closed_by_peer(first, 5), "the stale connection stayed open (pysyncobj leaves it delivering)"
        assert not closed_by_peer(second, 0.3)
        second.close()
    finally:
        node.close()


@pytest.mark.parametrize("message", [123, ["list"], {"type": 5}, {"type": "append_entries"}])
def test_a_member_frame_that_is_not_a_raft_message_drops_the_connection_not_the_node(tmp_path, message):
    base = free_ports(2)
    me, other = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    node = RaftNode(me, [other], tmp_path / "raft", PASSWORD, TIMING)
    try:
        wait_until(lambda: transport_of(node).ready, WAIT_S, "the listener")
        with socket.create_connection(("127.0.0.1", base), timeout=5) as s:
            key = member_handshake(s, other)
            wait_until(lambda: node.partners().get(other), WAIT_S, "the member connected")
            s.sendall(wire((key, message), getEncryptor(PASSWORD)))
            assert closed_by_peer(s, 5)
        with socket.create_connection(("127.0.0.1", base), timeout=5) as s:  # and it still ticks and accepts
            member_handshake(s, other)
            wait_until(lambda: node.partners().get(other), WAIT_S, "the member connected again")
    finally:
        node.close()


def test_a_three_member_group_commits_through_a_flood_with_tight_caps(tmp_path):
    limits = TransportLimits(max_connections_per_address=4, max_pending_handshakes=4, handshake_timeout_s=1.0)
    base = free_ports(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    nodes = [RaftNode(a, [b for b in addresses if b != a], tmp_path / f"n{i}", PASSWORD, TIMING, limits=limits)
             for i, a in enumerate(addresses)]
    silent = []
    try:
        def leader():
            leaders = [n for n in nodes if n.is_leader()]
            return leaders[0] if len(leaders) == 1 and all(n.is_ready() for n in nodes) else None
        wait_until(leader, WAIT_S, "a leader")
        for i in range(30):
            silent.append(socket.create_connection(("127.0.0.1", base + i % 3), timeout=5))
        for n in nodes:  # make every member reconnect while the flood holds the slots
            for conn in list(transport_of(n)._connections.values()):
                conn.disconnect()
        for cmd in [InitMesh("m", "flood", 1.0)] + [SetReplicas("reasoning", i) for i in range(3)]:
            deadline = time.monotonic() + WAIT_S
            while True:
                try:
                    wait_until(leader, WAIT_S, "a leader").propose(cmd).result(5)
                    break
                except ProposalFailed:  # leadership moved while members reconnected: again
                    assert time.monotonic() < deadline
        wait_until(lambda: all(n.state == nodes[0].state for n in nodes), WAIT_S, "equal copies")
    finally:
        for s in silent:
            s.close()
        for n in nodes:
            n.close()


def test_a_command_larger_than_the_transport_carries_is_refused_at_propose(tmp_path):
    node = one_node(tmp_path, TransportLimits(max_frame_bytes=64 * 1024))
    try:
        with pytest.raises(CommandTooLarge):
            node.propose(InitMesh("m" * 40_000, "n", 1.0)).result(5)
        node.propose(InitMesh("m", "n", 1.0)).result(5)
    finally:
        node.close()


def test_limits_are_validated():
    with pytest.raises(ValueError):
        TransportLimits(max_frame_bytes=2 ** 31)
    with pytest.raises(ValueError):
        TransportLimits(max_connections_per_address=0)
    with pytest.raises(ValueError):
        TransportLimits(accept_backoff_min_s=2, accept_backoff_max_s=1)
    assert TransportLimits().max_command_bytes == 2 * 1024 * 1024


def test_pysyncobj_leaves_socket_inet_ntop_alone():
    """pysyncobj 0.3.17 replaces socket.inet_ntop with a Windows-only version on every OS; raft/__init__.py
    keeps it from doing so (psutil's connection listing and others call it)."""
    import subprocess
    import sys

    code = ("import raft.node, socket, psutil; assert socket.inet_ntop(socket.AF_INET, b'\\x7f\\0\\0\\1') == "
            "'127.0.0.1'; psutil.Process().net_connections('tcp')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
