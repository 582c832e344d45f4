"""raft/codec.py, raft/wire.py, raft/snapshot.py: no pickle on anything from the network or the disk.

Frames, log entries and the full dump are the typed codec; a peer holding the mesh password cannot make a
member unpickle anything, nor use pysyncobj's utility commands; dumps and journals of the earlier (pickled)
format are converted once at start with an unpickler restricted to the known classes.
"""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
import socket
import struct
import time
import zlib
from pathlib import Path

import pysyncobj.pickle as pso_pickle
import pysyncobj.serializer as pso_serializer
import pysyncobj.syncobj as pso_syncobj
import pytest
from pysyncobj.encryptor import getEncryptor
from pysyncobj.node import TCPNode

from raft import codec, snapshot, wire
from raft.commands import InitMesh, SetReplicas, encode
from raft.journal import LEGACY_MAGIC, MAGIC, DurableJournal, JournalCorrupt, encode_record
from raft.node import RaftNode, RaftTiming
from raft.state import ApiKey, JoinToken, Member, MeshState, Model, Pin, Session, Shard, Turn, Unplaced
from tests.procs import free_ports
from tests.unit.test_raft_hostile import PASSWORD, close_all, commit, frame, port_of, same_state, split_frames, three

# ---- the codec ------------------------------------------------------------------------------------------

VALUES = [None, True, False, 0, 1, -1, 2 ** 63, -(2 ** 70), 0.5, -1e300, "", "héllo", b"", b"\x00\xff" * 9,
          [], (), {}, [1, (2, [3, {"a": b"b"}])], {"k": None, (1, "x"): [True]}, (b"cmd", 4, 2),
          list(range(20000, 28192)), tuple(range(-300, 300)), [2 ** 40] * 9, [2 ** 63] * 9, [True] * 9,
          (1, 2, 3, 4, 5, 6, 7, -(2 ** 63)), [1, 2, 3, 4, 5, 6, 7, 8, "x"]]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip_with_their_exact_types(value):
    back = codec.loads(codec.dumps(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, (list, tuple)):
        assert [type(v) for v in back] == [type(v) for v in value]


def test_tuples_and_lists_stay_apart_nested():
    back = codec.loads(codec.dumps((1, [2, (3,)], {"t": (4, 5)})))
    assert type(back) is tuple and type(back[1]) is list and type(back[1][1]) is tuple and type(back[2]["t"]) is tuple


class Boom:
    """A pickle that creates a file when loaded: proof of code execution if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("value", [object(), {1, 2}, frozenset({1}), TCPNode("h:1"), Boom(Path("x")),
                                   Member("n", "a", "", "", {}, "active", 1.0)], ids=lambda v: type(v).__name__)
def test_anything_else_is_refused_when_encoding(value):
    with pytest.raises(codec.CodecError):
        codec.dumps(value)


def test_a_pickle_and_malformed_bytes_are_refused_when_decoding(tmp_path):
    marker = tmp_path / "pwned"
    bad = [
        pickle.dumps(Boom(marker)),
        codec.FORMAT + pickle.dumps(Boom(marker)),
        b"",
        codec.FORMAT,
        codec.FORMAT + b"\x0d",  # unknown tag
        codec.FORMAT + b"\x0a\x03h:1",  # a node: not in the plain profile
        codec.FORMAT + b"\x0c\x09MeshState\x00",  # a record: not in the plain profile
        codec.FORMAT + b"\x07\xff\xff\xff\xff\x0f",  # a list announcing 4 billion items
        codec.FORMAT + b"\x05\x05abc",  # a short string
        codec.FORMAT + b"\x05\x02\xff\xfe",  # bad UTF-8
        codec.FORMAT + b"\x09\x01\x07\x00\x00",  # a list as a dict key
        codec.FORMAT + b"\x03" + b"\xff" * 30 + b"\x01",  # an endless varint
        codec.FORMAT + b"\x07\x01" * 40 + b"\x00",  # nested too deep
        codec.FORMAT + b"\x00\x00",  # bytes after the value
        codec.FORMAT + b"\x0d\x00\x08\xff\x01" + b"\x00" * 64,  # 255 packed ints in 64 bytes
        codec.FORMAT + b"\x0d\x00\x03\x00",  # a packed width that does not exist
        codec.FORMAT + b"\x0d\x02\x01\x00",  # neither list nor tuple
    ]
    for data in bad:
        with pytest.raises(codec.CodecError):
            codec.loads(data)
    assert not marker.exists()


def test_nodes_only_in_the_nodes_profile():
    data = codec.dumps(["add", "h:1", TCPNode("h:1")], codec.NODES)
    op, address, node = codec.loads(data, codec.NODES)
    assert (op, address) == ("add", "h:1") and type(node) is TCPNode and node.address == "h:1"
    with pytest.raises(codec.CodecError):
        codec.loads(data)


# ---- pysyncobj's pickle calls, replaced (pins) ----------------------------------------------------------

def test_every_pickle_call_of_pysyncobjs_syncobj_and_serializer_goes_to_the_codec():
    wire.install()
    assert pso_syncobj.pickle is wire.CodecPickle and pso_serializer.pickle is wire.CodecPickle
    source = inspect.getsource(pso_syncobj)
    # The call sites raft/wire.py accounts for (pysyncobj 0.3.17): commands, membership, version, pieces.
    assert "import pysyncobj.pickle as pickle" in source
    calls = sorted({line.strip() for line in source.splitlines() if "pickle." in line and "import" not in line})
    assert calls == sorted([
        "self._applyCommand(pickle.dumps(newVersion), callback, _COMMAND_TYPE.VERSION)",
        "self._applyCommand(pickle.dumps(['add', node.id, node]), callback, _COMMAND_TYPE.MEMBERSHIP)",
        "self._applyCommand(pickle.dumps(['rem', node.id, node]), callback, _COMMAND_TYPE.MEMBERSHIP)",
        "entry = pickle.dumps(entries[0])",
        "ver = pickle.loads(command[1:])",
        "command = pickle.loads(command[1:])",
        "newEntries = [pickle.loads(self.__recvTransmission)]",
        "return pickle.loads(command[1:])",
        "applier(pickle.dumps(cmd), callback, _COMMAND_TYPE.REGULAR)",
    ]), calls
    assert wire.CodecPickle.loads(wire.CodecPickle.dumps((0, ({"kind": "x"},)))) == (0, ({"kind": "x"},))


def test_message_schema_takes_what_pysyncobj_sends_and_nothing_else():
    ids = {0: None}
    regular = b"\x00" + codec.dumps((0, ({"kind": "set_replicas"},)), codec.NODES)
    member = b"\x02" + codec.dumps(["add", "h:2", TCPNode("h:2")], codec.NODES)
    good = [
        {"type": "request_vote", "term": 3, "last_log_index": 9, "last_log_term": 2},
        {"type": "response_vote", "term": 3},
        {"type": "append_entries", "term": 3, "commit_index": 5, "entries": [(b"\x01", 6, 3), (regular, 7, 3),
                                                                              (member, 8, 3)],
         "prevLogIdx": 5, "prevLogTerm": 2},
        {"type": "append_entries", "term": 3, "commit_index": 5, "serialized": (b"dump", True, False)},
        {"type": "append_entries", "term": 3, "commit_index": 5, "serialized": None},
        {"type": "next_node_idx", "next_node_idx": 7, "reset": False, "success": True},
        {"type": "apply_command", "command": regular, "request_id": 4},
        {"type": "apply_command_response", "request_id": 4, "log_idx": 7, "log_term": 3},
        {"type": "apply_command_response", "request_id": 4, "error": 6},
        {"type": "timeout_now", "term": 3},
    ]
    for message in good:
        wire.check_message(message, ids)
    bad = [
        "status", ["status"], ["remove", "h:2"], {"type": "status"}, {"type": 1},
        {"type": "request_vote", "term": 3, "last_log_index": 9},  # missing a field
        {"type": "request_vote", "term": 3, "last_log_index": 9, "last_log_term": 2, "x": 1},  # an extra one
        {"type": "response_vote", "term": True}, {"type": "response_vote", "term": -1},
        {"type": "response_vote", "term": 2.0},
        {"type": "apply_command", "command": member},  # membership from a peer: only a member's own methods
        {"type": "apply_command", "command": b"\x03" + codec.dumps(5)},  # set_version from a peer
        {"type": "apply_command", "command": b"\x00" + pickle.dumps((0, ({},)))},
        {"type": "apply_command", "command": b"\x00" + codec.dumps((9, ({},)))},  # no such method
        {"type": "apply_command", "command": b"\x00" + codec.dumps((0, ({},), {"_doApply": False}))},
        {"type": "append_entries", "term": 3, "commit_index": 5, "entries": [(b"\x00" + pickle.dumps(1), 6, 3)],
         "prevLogIdx": 5, "prevLogTerm": 2},
        {"type": "append_entries", "term": 3, "commit_index": 5, "entries": [(b"\x01", "6", 3)],
         "prevLogIdx": 5, "prevLogTerm": 2},
        {"type": "append_entries", "term": 3, "commit_index": 5, "serialized": (b"dump", 1, 0)},
        {"type": "append_entries", "term": 3, "commit_index": 5, "transmission": "start", "data": b"x"},
    ]
    for message in bad:
        with pytest.raises(wire.MessageRefused):
            wire.check_message(message, ids)


# ---- a member with the password, over the network -------------------------------------------------------

def recv_frame(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    sock.settimeout(limit_s)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("i", buf[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf[4:]


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> tuple[bool, bytes]:
    """(closed by the peer, what it sent meanwhile)."""
    sock.settimeout(limit_s)
    got = b""
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return True, got
    except socket.timeout:
        return False, got
    return False, got


class Peer:
    """A peer that holds the mesh password and does pysyncobj's handshake."""

    def __init__(self, port: int) -> None:
        self.fernet = getEncryptor(PASSWORD)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.their_key: bytes | None = None

    def send_raw(self, plaintext: bytes) -> None:
        self.sock.sendall(frame(self.fernet.encrypt(zlib.compress(plaintext))))

    def send(self, message) -> None:
        self.send_raw(codec.dumps(message if self.their_key is None else (self.their_key, message)))

    def key_exchange(self) -> None:
        mine = os.urandom(32)
        self.send(mine)
        key, self.their_key = codec.loads(zlib.decompress(self.fernet.decrypt(recv_frame(self.sock))))
        assert key == mine and len(self.their_key) == 32

    def close(self) -> None:
        self.sock.close()


def test_a_member_with_the_password_cannot_make_a_node_unpickle_nor_use_utility_commands(tmp_path):
    nodes = three(tmp_path)
    marker = tmp_path / "pwned"
    try:
        commit(nodes, InitMesh("m", "codec", 1.0))
        members_before = {name: set(n.partners()) for name, n in nodes.items()}
        addresses = [n.address for n in nodes.values()]
        boom = pickle.dumps(Boom(marker))

        fake_entry = {"type": "append_entries", "term": 1, "commit_index": 1, "prevLogIdx": 1, "prevLogTerm": 0,
                      "entries": [(b"\x00" + boom, 2, 1)]}
        removal = b"\x02" + codec.dumps(["rem", addresses[1], TCPNode(addresses[1])], codec.NODES)
        attempts = [  # (what, how, payload)
            ("a pickle as the first frame", "first", boom),
            ("a pickle under the connection key", "keyed pickle", None),
            ("utility status", "identity", ["status"]),
            ("utility remove", "identity", ["remove", addresses[1]]),
            ("utility add", "identity", ["add", "127.0.0.1:1"]),
            ("utility set_version", "identity", ["set_version", 7]),
            ("utility transfer", "identity", ["transfer", addresses[2]]),
            ("a read-only peer", "identity", "readonly"),
            ("a pickled command", "member", {"type": "apply_command", "command": b"\x00" + boom, "request_id": 1}),
            ("a pickled entry", "member", fake_entry),
            ("a membership change", "member", {"type": "apply_command", "command": removal}),
        ]
        # pysyncobj: the higher address dials the lower. Posing as the highest member to the lowest is a
        # plausible claim (it gets in, then misbehaves); posing as the lowest to the highest never is.
        by_address = {n.address: n for n in nodes.values()}
        lowest, highest = min(by_address), max(by_address)
        attempts.append(("a claim to be a member this node dials", "dials", lowest))
        for i, (what, how, payload) in enumerate(attempts * 2):
            if how == "member":
                target = by_address[lowest]
            elif how == "dials":
                target = by_address[highest]
            else:
                target = list(nodes.values())[i % 3]
            claimed = highest
            peer = Peer(port_of(target))
            try:
                if how == "first":
                    peer.send_raw(payload)
                else:
                    peer.key_exchange()
                    if how == "keyed pickle":  # Fernet-valid, under the right key, but a pickle
                        peer.send_raw(pickle.dumps((peer.their_key, Boom(marker))))
                    elif how in ("identity", "dials"):
                        peer.send(payload)
                    else:
                        peer.send(claimed)
                        peer.send(payload)
                closed, got = read_until_closed(peer.sock)
                assert closed, f"{what}: the node kept the connection"
                replies = [codec.loads(zlib.decompress(peer.fernet.decrypt(f)))[1] for f in split_frames(got)]
                if how == "member":  # a member's connection carries Raft traffic, but nothing answers the attempt
                    assert all(m.get("type") != "apply_command_response" for m in replies), (what, replies)
                else:
                    assert replies == [], f"{what}: the node answered {replies}"
            finally:
                peer.close()
        assert not marker.exists(), "a node ran code from a frame"
        for i in range(3):
            commit(nodes, SetReplicas("reasoning", i))
        assert same_state(nodes) and all(n.status()["has_quorum"] for n in nodes.values())
        assert {name: set(n.partners()) for name, n in nodes.items()} == members_before
        assert all(n.state.mesh_id == "m" for n in nodes.values())
    finally:
        close_all(nodes)
    assert not marker.exists()


# ---- the full dump --------------------------------------------------------------------------------------

def rich_state() -> MeshState:
    turn = Turn(messages=(("user", "hi"),), prompt_tokens=3, answer_tokens=(1, 2, 3), answer_text="yo",
                finish_reason="stop", prompt_token_ids=(5, 6, 7))
    return MeshState(
        mesh_id="m", name="mesh", created_at=1.5,
        members={"n1": Member("n1", "alpha", "h:1", "h:2", {"cores": 4, "gpus": [{"name": "x", "mem": 2 ** 33}],
                                                            "battery": None, "ratio": 0.5}, "active", 2.0,
                              witness=True, peer_address="h:3")},
        models={"g": Model("g", "g.gguf", "ab" * 32, 123, ("reasoning", "context"), 4096, None, 10 ** 9)},
        shards={("reasoning", "g", "n1"): Shard("reasoning", "g", "n1", "ready", "ok")},
        tokens={"t": JoinToken("t", "cd" * 32, 1.0, 2.0, uses=3, used=1)},
        api_keys={"k": ApiKey("k", "key", "ef" * 32, 3.0, revoked=True)},
        replicas={"reasoning": 2},
        pins={("reasoning", "n1"): Pin("reasoning", "g", "n1")},
        unplaced=(Unplaced("context", "g", 1, "no room"),),
        model_files={"g": frozenset({"n1", "n2"})},
        sessions={"s": Session(turns=(turn, Turn(messages=(), prompt_tokens=0)), last_used=9.0)},
        applied=42,
    )


def test_the_dump_round_trips_into_the_known_dataclasses_only():
    state = rich_state()
    last, prev = (b"\x00" + codec.dumps((0, ({"kind": "x"},)), codec.NODES), 9, 2), (b"\x01", 8, 2)
    raw = snapshot.encode_dump(state, last, prev, ["h:2", "h:1"])
    back, last2, prev2, cluster = snapshot.decode_dump(raw)
    assert back == state and (last2, prev2, cluster) == (last, prev, ["h:1", "h:2"])
    assert type(back.shards[("reasoning", "g", "n1")]) is Shard and type(back.model_files["g"]) is frozenset
    assert snapshot.encode_dump(back, last, prev, cluster) == raw, "the same state gives the same bytes"
    with pytest.raises(snapshot.DumpCorrupt, match="CRC"):
        snapshot.decode_dump(raw[:-1] + bytes([raw[-1] ^ 1]))
    # A record name outside raft/state.py's dataclasses is refused.
    evil = codec.dumps({"state": state, "last": last, "prev": prev, "cluster": []}, snapshot.STATE) \
        .replace(b"\x09MeshState", b"\x09os.system")
    body = zlib.compress(evil)
    with pytest.raises(snapshot.DumpCorrupt, match="unknown record"):
        snapshot.decode_dump(snapshot.DUMP_MAGIC + struct.pack("<I", zlib.crc32(body)) + body)
    with pytest.raises(snapshot.DumpCorrupt, match="old pickled dump"):
        snapshot.decode_dump(gzip.compress(pickle.dumps(state)))


# ---- an earlier version's files, converted once -------------------------------------------------------

def legacy_command(cmd) -> bytes:
    return b"\x00" + pso_pickle.dumps((0, (encode(cmd),)))


def write_legacy(data_dir: Path, address: str, extra_state=None) -> MeshState:
    """A data dir as the previous version left it: a WAL01 journal of pickled commands and a gzip+pickle dump
    taken after its last entry."""
    from raft.state import apply
    data_dir.mkdir(parents=True)
    cmds = [InitMesh("old", "before", 1.0), SetReplicas("reasoning", 2)]
    entries = [(b"\x01", 1, 1)] + [(legacy_command(c), i + 2, 1) for i, c in enumerate(cmds)]
    (data_dir / "raft.wal").write_bytes(LEGACY_MAGIC + b"".join(encode_record(*e) for e in entries))
    state = MeshState()
    for c in cmds:
        state = apply(state, c)
    consumer = {"state": state if extra_state is None else extra_state}
    dump = ([{"_SyncObj__enabledCodeVersion": 0}, consumer], entries[-1], entries[-2], {TCPNode(address)})
    with gzip.open(data_dir / "raft.dump", "wb") as g:
        pso_pickle.dump(dump, g)
    return state


def tick_until(nodes, condition, what: str, limit_s: float = 20.0):
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {[n.status() for n in nodes]}")
        for n in nodes:
            n.tick(0.005)


def test_an_earlier_versions_pickled_journal_and_dump_load_once_and_are_rewritten(tmp_path):
    address = f"127.0.0.1:{free_ports(1)}"
    expected = write_legacy(tmp_path / "raft", address)
    node = RaftNode(address, [], tmp_path / "raft", PASSWORD, TIMING, auto_tick=False)
    try:
        assert (tmp_path / "raft" / "raft.wal").read_bytes().startswith(MAGIC)
        assert (tmp_path / "raft" / "raft.dump").read_bytes().startswith(snapshot.DUMP_MAGIC)
        assert (tmp_path / "raft" / "raft.wal.pre-codec").exists()
        assert (tmp_path / "raft" / "raft.dump.pre-codec").exists()
        tick_until([node], lambda: node.is_leader() and node.is_ready(), "leadership")
        assert node.state == expected
        future = node.propose(SetReplicas("context", 1))
        tick_until([node], future.done, "the proposal")
        assert future.result(timeout=0)["applied"] == 3
        after = node.state
    finally:
        node.close()
    node = RaftNode(address, [], tmp_path / "raft", PASSWORD, TIMING, auto_tick=False)
    try:
        tick_until([node], lambda: node.state == after, "the converted log to replay")
    finally:
        node.close()


def test_an_old_dump_or_journal_holding_anything_else_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    address = f"127.0.0.1:{free_ports(1)}"
    write_legacy(tmp_path / "a", address, extra_state=Boom(marker))
    (tmp_path / "a" / "raft.wal").unlink()
    with pytest.raises(snapshot.DumpCorrupt, match=str(tmp_path / "a" / "raft.dump")):
        RaftNode(address, [], tmp_path / "a", PASSWORD, TIMING, auto_tick=False)
    (tmp_path / "b").mkdir()
    bad = [(b"\x01", 1, 1), (b"\x00" + pickle.dumps(Boom(marker), 2), 2, 1)]
    (tmp_path / "b" / "raft.wal").write_bytes(LEGACY_MAGIC + b"".join(encode_record(*e) for e in bad))
    with pytest.raises(JournalCorrupt, match=str(tmp_path / "b" / "raft.wal")):
        DurableJournal(tmp_path / "b" / "raft.wal")
    assert not marker.exists()


# ---- a 3-member group, ticked by hand ------------------------------------------------------------------

TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.1, election_max_s=0.2, connection_retry_s=0.1,
                    leader_fallback_s=0.3, compaction_min_entries=4)


def group(root: Path, addresses: list[str]) -> list[RaftNode]:
    return [RaftNode(a, [b for b in addresses if b != a], root / f"n{i}", PASSWORD, TIMING, auto_tick=False)
            for i, a in enumerate(addresses)]


def commit_by_hand(nodes: list[RaftNode], cmd) -> None:
    deadline = time.monotonic() + 30
    while True:
        tick_until(nodes, lambda: sum(n.is_leader() for n in nodes) == 1 and all(n.is_ready() for n in nodes),
                   "one leader")
        lead = next(n for n in nodes if n.is_leader())
        future = lead.propose(cmd)
        tick_until(nodes, future.done, "the proposal")
        if future.exception() is None:
            applied = lead.state.applied
            tick_until(nodes, lambda: all(n.state.applied >= applied for n in nodes), "every member to apply")
            return
        assert time.monotonic() < deadline, future.exception()


def test_a_three_member_group_commits_compacts_and_restarts_with_the_codec(tmp_path):
    base = free_ports(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    nodes = group(tmp_path, addresses)
    try:
        commit_by_hand(nodes, InitMesh("m", "by-hand", 1.0))
        for i in range(8):
            commit_by_hand(nodes, SetReplicas("reasoning", i))
        wait = time.monotonic() + 10
        while not all((tmp_path / f"n{i}" / "raft.dump").exists() for i in range(3)) and time.monotonic() < wait:
            for n in nodes:
                n.tick(0.005)
        expected = nodes[0].state
        assert all(n.state == expected for n in nodes) and expected.applied == 9
    finally:
        for n in nodes:
            n.close()
    for i in range(3):
        assert (tmp_path / f"n{i}" / "raft.wal").read_bytes().startswith(MAGIC)
        dump = tmp_path / f"n{i}" / "raft.dump"
        assert dump.exists(), "no compaction happened: the dump went untested"
        assert snapshot.read_dump(str(dump))[0].mesh_id == "m"
    nodes = group(tmp_path, addresses)
    try:
        tick_until(nodes, lambda: all(n.state == expected for n in nodes), "the restarted group to recover")
        commit_by_hand(nodes, SetReplicas("context", 1))
        assert all(n.state.applied == 10 for n in nodes)
    finally:
        for n in nodes:
            n.close()


def test_a_lagging_member_catches_up_from_a_snapshot_in_the_codec(tmp_path):
    base = free_ports(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    nodes = group(tmp_path, addresses)
    try:
        late = nodes.pop()
        late.close()
        commit_by_hand(nodes, InitMesh("m", "snap", 1.0))
        for i in range(10):
            commit_by_hand(nodes, SetReplicas("reasoning", i))
        tick_until(nodes, lambda: all((tmp_path / f"n{i}" / "raft.dump").exists() for i in range(2)), "compaction")
        nodes.append(RaftNode(addresses[2], addresses[:2], tmp_path / "n2", PASSWORD, TIMING, auto_tick=False))
        tick_until(nodes, lambda: nodes[2].state == nodes[0].state, "the late member to install the snapshot")
        assert nodes[2].state.replicas == {"reasoning": 9}
    finally:
        for n in nodes:
            n.close()


def test_an_old_dump_whose_dataclasses_predate_a_field_converts_with_the_fields_default(tmp_path):
    """Pickles keep an instance's __dict__: a Turn pickled before prompt_token_ids existed has none."""
    turn = Turn(messages=(("user", "hi"),), prompt_tokens=3)
    old_turn = object.__new__(Turn)
    object.__setattr__(old_turn, "__dict__", {k: v for k, v in turn.__dict__.items() if k != "prompt_token_ids"})
    state = MeshState(mesh_id="m", sessions={"s": Session(turns=(old_turn,), last_used=1.0)}, applied=1)
    entries = [(b"\x01", 1, 1), (legacy_command(SetReplicas("reasoning", 1)), 2, 1)]
    dump = ([{}, {"state": state}], entries[1], entries[0], {TCPNode("127.0.0.1:9")})
    with gzip.open(tmp_path / "raft.dump", "wb") as g:
        pso_pickle.dump(dump, g)
    assert snapshot.migrate_legacy_dump(tmp_path / "raft.dump")
    back, last, prev, cluster = snapshot.read_dump(str(tmp_path / "raft.dump"))
    assert back.sessions["s"].turns[0] == turn and "prompt_token_ids" in back.sessions["s"].turns[0].__dict__
    assert last[0].startswith(b"\x00" + codec.FORMAT) and [n.address for n in cluster] == ["127.0.0.1:9"]
    assert not snapshot.migrate_legacy_dump(tmp_path / "raft.dump"), "converted once"
