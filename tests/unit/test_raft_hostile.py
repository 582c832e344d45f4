"""Hostile bytes on the Raft port: real RaftNodes (pysyncobj with a password, so Fernet) in this
process, on loopback, their tick threads running.

pysyncobj's frame is a 4-byte native int length, then Fernet(zlib(message)), the message in raft/codec.py's
typed encoding (raft/bounded_connection.py; never a pickle). After the
first message each side wraps every message with a 32-byte random key the peer chose for this
connection; the receiver drops the connection on any frame that fails the HMAC, carries an older
Fernet timestamp than the previous frame, or lacks the key. Fernet's TTL is not used.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from pysyncobj.encryptor import getEncryptor

from raft import codec
from raft.commands import InitMesh, RevokeApiKey, RevokeToken, SetMemberState, SetReplicas
from raft.node import RaftNode, RaftTiming
from raft.state import Rejected
from tests.procs import REPO, free_ports, guarded, wait_until

PASSWORD = "hostile-test-secret"
TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                    leader_fallback_s=0.4)
WAIT_S = 20.0


def frame(data: bytes) -> bytes:
    return struct.pack("i", len(data)) + data


def split_frames(buffer: bytes) -> list[bytes]:
    out = []
    while len(buffer) >= 4:
        (length,) = struct.unpack("i", buffer[:4])
        if length < 0 or len(buffer) - 4 < length:
            break
        out.append(buffer[4:4 + length])
        buffer = buffer[4 + length:]
    return out


def start(addresses: dict[str, tuple[str, list[str]]], root: Path) -> dict[str, RaftNode]:
    return {name: RaftNode(me, partners, root / name, PASSWORD, TIMING) for name, (me, partners) in addresses.items()}


def leader_of(nodes: dict[str, RaftNode]) -> RaftNode:
    def one():
        leaders = [n for n in nodes.values() if n.is_leader()]
        return leaders[0] if len(leaders) == 1 and all(n.is_ready() for n in nodes.values()) else None
    return wait_until(one, WAIT_S, "one leader and every node ready")


def commit(nodes: dict[str, RaftNode], cmd) -> int:
    """Proposes `cmd` through the leader (re-finding it if leadership moves) and waits until every
    node has applied it; returns the applied count."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lead = leader_of(nodes)
        try:
            lead.propose(cmd).result(timeout=5)
            break
        except Exception as exc:  # leadership moved under us: propose again through the new leader
            if time.monotonic() > deadline:
                raise AssertionError(f"could not commit {cmd}: {exc!r}") from exc
    applied = lead.state.applied
    wait_until(lambda: all(n.state.applied >= applied for n in nodes.values()), WAIT_S, "every node to apply")
    return applied


def three(tmp_path: Path) -> dict[str, RaftNode]:
    base = free_ports(3)
    addrs = [f"127.0.0.1:{base + i}" for i in range(3)]
    return start({f"n{i}": (a, [b for b in addrs if b != a]) for i, a in enumerate(addrs)}, tmp_path)


def close_all(nodes: dict[str, RaftNode]) -> None:
    for n in nodes.values():
        n.close()


def same_state(nodes: dict[str, RaftNode]) -> bool:
    states = [n.state for n in nodes.values()]
    return all(state == states[0] for state in states)


def port_of(node: RaftNode) -> int:
    return int(node.address.rsplit(":", 1)[1])


def closed_by_peer(sock: socket.socket, limit_s: float = 10.0) -> bool:
    """True once the other side closes (EOF or reset), reading and discarding what it sends."""
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


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Boom:
    """A pickle that creates a file when loaded: proof of code execution if a node unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_garbage_and_forged_frames_are_dropped_and_the_group_keeps_committing(tmp_path):
    nodes = three(tmp_path)
    try:
        commit(nodes, InitMesh("m", "hostile", 1.0))
        marker = tmp_path / "pwned"
        rng = random.Random(6)
        forged = [
            frame(zlib.compress(pickle.dumps(Boom(marker)))),  # the unauthenticated format: code execution
            frame(zlib.compress(pickle.dumps(["status"]))),  # an admin (utility) message without the password
            frame(zlib.compress(pickle.dumps(nodes["n0"].address))),  # claims to be a member
            frame(rng.randbytes(200)),
            frame(b"gAAAAA" + rng.randbytes(120)),  # looks like a Fernet token, bad HMAC
            struct.pack("i", -5) + rng.randbytes(50),  # negative length
            frame(getEncryptor("another-mesh-secret").encrypt(zlib.compress(pickle.dumps("x")))),  # wrong key
        ]
        for i, payload in enumerate(forged * 2):
            target = list(nodes.values())[i % 3]
            with socket.create_connection(("127.0.0.1", port_of(target)), timeout=5) as s:
                s.sendall(payload)
                assert closed_by_peer(s), f"node kept a connection after forged frame {i % len(forged)}"
        for i in range(5):
            commit(nodes, SetReplicas("reasoning", i))
        assert not marker.exists(), "a node unpickled an unauthenticated frame"
        assert same_state(nodes)
        assert all(n.status()["has_quorum"] for n in nodes.values())
    finally:
        close_all(nodes)


def test_silent_connections_and_a_connection_flood_do_not_stop_the_group_or_leak(tmp_path):
    nodes = three(tmp_path)
    try:
        commit(nodes, InitMesh("m", "flood", 1.0))
        baseline = open_fds()
        ports = [port_of(n) for n in nodes.values()]
        silent = [socket.create_connection(("127.0.0.1", ports[i % 3]), timeout=5) for i in range(60)]
        rng = random.Random(7)
        # pysyncobj accepts one connection per poll with a backlog of 5: each costs a tick (~35 ms here).
        for i in range(150):  # connect, maybe spray bytes, disconnect
            with socket.create_connection(("127.0.0.1", ports[i % 3]), timeout=5) as s:
                if i % 2:
                    s.sendall(rng.randbytes(rng.randint(1, 64)))
        for i in range(5):
            commit(nodes, SetReplicas("reasoning", i))
        for s in silent:
            s.close()
        # Every connection the nodes accepted is closed again once its client is gone.
        wait_until(lambda: open_fds() <= baseline + 10, WAIT_S, f"fds back near {baseline} (now {open_fds()})",
                   every=0.1)
        commit(nodes, SetReplicas("reasoning", 9))
        assert same_state(nodes)
    finally:
        close_all(nodes)


def test_a_2_gib_length_prefix_is_refused_at_once_and_the_group_goes_on(tmp_path):
    """A length prefix of 2 GiB (pysyncobj 0.3.17 would buffer whatever follows, at quadratic cost):
    raft/transport.py closes the connection on the prefix alone, before buffering anything."""
    nodes = three(tmp_path)
    try:
        commit(nodes, InitMesh("m", "endless", 1.0))
        target = nodes["n1"]
        for prefix in (struct.pack("i", 2 ** 31 - 1), struct.pack("i", 4 * 1024 * 1024 + 1)):
            with socket.create_connection(("127.0.0.1", port_of(target)), timeout=5) as s:
                started = time.monotonic()
                s.sendall(prefix)
                assert closed_by_peer(s, 5.0), "the node kept a connection announcing an oversized frame"
                assert time.monotonic() - started < 1.0
        with socket.create_connection(("127.0.0.1", port_of(target)), timeout=5) as s:
            s.sendall(struct.pack("i", 2 ** 31 - 1))
            with pytest.raises(OSError):  # reset: the node does not read the 4 MiB behind the prefix
                for _ in range(64):
                    s.sendall(b"\0" * 65536)
        commit(nodes, SetReplicas("reasoning", 1))
        assert same_state(nodes)
    finally:
        close_all(nodes)


def test_a_command_with_wrong_field_types_is_rejected_everywhere_and_the_log_goes_on(tmp_path):
    """A dict where a name belongs (the control API's assign passed its 'model' on unchecked) made
    apply raise TypeError; pysyncobj retried that entry on every tick, on every node, forever."""
    nodes = three(tmp_path)
    try:
        commit(nodes, InitMesh("m", "poison", 1.0))
        for bad in (SetMemberState(node_id={"x": 1}, state="gone"), RevokeToken(token_id=[{"x": 1}]),
                    RevokeApiKey(key_id={"k": "v"})):
            with pytest.raises(Rejected, match="malformed command"):
                leader_of(nodes).propose(bad).result(timeout=10)
        applied = commit(nodes, SetReplicas("reasoning", 3))
        assert applied == 2 and same_state(nodes) and nodes["n0"].state.replicas["reasoning"] == 3
    finally:
        close_all(nodes)


class Proxy:
    """A TCP relay on loopback that records what passes (and can send each frame twice)."""

    def __init__(self, listen_port: int, target_port: int, duplicate: bool = False) -> None:
        self.server = socket.create_server(("127.0.0.1", listen_port))
        self.target = target_port
        self.duplicate = duplicate
        self.upstream: list[bytearray] = []  # what each accepted connection sent towards the target
        self.duplicated = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:  # closed by stop()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:  # target down: drop the client, it reconnects
                client.close()
                continue
            record = bytearray()
            self.upstream.append(record)
            for src, dst, rec in ((client, upstream, record), (upstream, client, None)):
                t = threading.Thread(target=self._pipe, args=(src, dst, rec), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        src.settimeout(0.2)
        pending = b""
        frames = 0
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                if record is not None:
                    record += data
                if not (self.duplicate and record is not None):
                    dst.sendall(data)
                    continue
                pending += data
                for f in split_frames(pending):
                    pending = pending[4 + len(f):]
                    frames += 1
                    dst.sendall(frame(f))
                    if frames > 2:  # past the key exchange: every frame goes twice
                        dst.sendall(frame(f))
                        self.duplicated += 1
        except OSError:  # either side closed: end this direction
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

    def stop(self) -> None:
        self._stop.set()
        self.server.close()
        for t in self._threads:
            t.join(5)


def proxied_pair(tmp_path: Path, duplicate: bool = False) -> tuple[dict[str, RaftNode], Proxy]:
    """Two nodes, `a` reaching `b` only through a Proxy: a's address is the highest, so a dials
    (pysyncobj: the higher address connects) and b never dials a."""
    base = free_ports(3)
    b, proxy, a = (f"127.0.0.1:{base + i}" for i in range(3))
    relay = Proxy(base + 1, base, duplicate)
    nodes = start({"a": (a, [proxy]), "b": (b, [a])}, tmp_path)
    return nodes, relay


def test_replayed_captured_connection_is_refused_after_its_first_frame(tmp_path):
    nodes, relay = proxied_pair(tmp_path)
    try:
        commit(nodes, InitMesh("m", "replay", 1.0))
        for i in range(3):
            commit(nodes, SetReplicas("reasoning", i))
        b = nodes["b"]
        captured = bytes(max(relay.upstream, key=len))
        frames = split_frames(captured)
        assert len(frames) > 5, "the capture holds the key exchange and appendEntries"
        before = (b.state, b.status()["commit_index"])

        fernet = getEncryptor(PASSWORD)
        with socket.create_connection(("127.0.0.1", port_of(b)), timeout=5) as s:
            s.sendall(captured)  # the whole recorded conversation, as a second, fresh connection
            answer = bytearray()
            s.settimeout(10)
            while chunk := s.recv(65536):
                answer += chunk
        replies = split_frames(bytes(answer))
        # b took the first frame (a's random key: any old one decrypts) and queued one frame, its own
        # fresh key wrapped with the replayed one; the next replayed frame carried the old connection's
        # key and b closed the connection. raft/transport.py writes queued frames on the poller's next
        # WRITE event (after the journal's fsync), so the close usually comes first and nothing is sent.
        assert len(replies) <= 1, replies
        replayed_key = codec.loads(zlib.decompress(fernet.decrypt(frames[0])))
        for reply in replies:
            key, fresh = codec.loads(zlib.decompress(fernet.decrypt(reply)))
            assert key == replayed_key and isinstance(fresh, bytes) and len(fresh) == 32
        assert (b.state, b.status()["commit_index"]) == before, "the replay changed b"
        commit(nodes, SetReplicas("reasoning", 4))
        assert nodes["a"].state == b.state
    finally:
        close_all(nodes)
        relay.stop()


def test_frames_duplicated_inside_a_live_connection_are_accepted_and_harmless(tmp_path):
    """A man in the middle may repeat frames within the same second on a live connection: the key
    and the timestamp check pass. Raft's own indexes make the repeats no-ops."""
    nodes, relay = proxied_pair(tmp_path, duplicate=True)
    try:
        commit(nodes, InitMesh("m", "dup", 1.0))
        connections = len(relay.upstream)
        for i in range(5):
            commit(nodes, SetReplicas("reasoning", i))
        assert relay.duplicated > 5
        assert len(relay.upstream) == connections, "b dropped the connection carrying repeated frames"
        assert nodes["a"].state == nodes["b"].state
        assert nodes["b"].state.applied == 6
    finally:
        close_all(nodes)
        relay.stop()


EMFILE_CHILD = """
import pathlib, resource, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
from raft.node import RaftNode
node = RaftNode(sys.argv[2], [], pathlib.Path(tempfile.mkdtemp()), "pw")
time.sleep(120)
"""


def test_listener_survives_a_silent_connection_flood_that_exhausts_file_descriptors():
    """A node limited to 40 files; 50 connections that never speak; then all closed again."""
    address = f"127.0.0.1:{free_ports(1)}"
    host, port = address.split(":")
    child = subprocess.Popen(guarded([sys.executable, "-c", EMFILE_CHILD, str(REPO), address]))
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
                silent.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:  # refused: the listener is gone
                break
        for s in silent:
            s.close()
        wait_until(accepts, 3, "the node to accept connections again")
    finally:
        for s in silent:
            s.close()
        child.kill()
        child.wait(WAIT_S)
