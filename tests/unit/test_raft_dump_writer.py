"""raft/dump_writer.py: the full dump encoded, compressed and written off the tick thread through pysyncobj
0.3.17's asynchronous-serializer hook (serializer + serializeChecker), and a compaction a stop interrupted
completed at start."""

from __future__ import annotations

import inspect
import threading
import time
from pathlib import Path

import pysyncobj.serializer as pso_serializer
import pysyncobj.syncobj as pso_syncobj
import pytest
from pysyncobj.config import SERIALIZER_STATE, SyncObjConf

from raft import journal as rj
from raft import snapshot
from raft.commands import InitMesh, SetReplicas
from raft.dump_writer import DumpWriter, finish_compaction
from raft.journal import DurableJournal
from raft.node import RaftNode, RaftTiming
from raft.state import MeshState, Session, Turn, apply
from tests.procs import free_ports
from tests.unit.test_raft_prevote import PASSWORD, terms

ENTRIES = ((b"\x01", 9, 2), (b"\x01", 8, 2))  # (last, prev) as pysyncobj hands them over
WAIT_S = 10.0
ENCODE = snapshot.encode_dump  # not held by the `gate` fixture


def addresses(count: int = 3) -> list[str]:
    base = free_ports(count)
    return [f"127.0.0.1:{base + i}" for i in range(count)]


def wait_for(condition, what: str, limit_s: float = 20.0, nodes=()) -> None:
    """Polls `condition` (real tick threads run these nodes) until it holds, bounded."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {[n.status() for n in nodes]}")
        time.sleep(0.01)


def test_pinned_to_pysyncobj_0_3_17_async_serializer_hook():
    assert "serializeChecker" in inspect.getsource(SyncObjConf.__init__)
    serialize = inspect.getsource(pso_serializer.Serializer.serialize)
    # A custom serializer is called on the calling (tick) thread, then pysyncobj renames `<dump>.tmp`.
    assert "tmpFile = self.__fileName + '.tmp'" in serialize
    assert "self.__serializer(tmpFile, data[1:])" in serialize
    assert "atomicReplace(tmpFile, self.__fileName)" in serialize
    assert "if self.__pid != 0:\n            return" in serialize  # no second dump before the checker's verdict
    check = inspect.getsource(pso_serializer.Serializer.checkSerializing)
    assert "status = self.__serializeChecker()" in check
    assert "if status in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):" in check
    transmission = inspect.getsource(pso_serializer.Serializer.getTransmissionData)
    assert "if self.__pid != 0:\n            return None" in transmission  # no snapshot sent while writing
    compaction = inspect.getsource(pso_syncobj.SyncObj._SyncObj__tryLogCompaction)
    # The journal is cut only on SUCCESS, and nothing new starts while the checker says otherwise.
    assert "if serializeState == SERIALIZER_STATE.SUCCESS:" in compaction
    assert "self.__deleteEntriesTo(serializeID)" in compaction
    assert "if serializeState != SERIALIZER_STATE.NOT_SERIALIZING:\n            return" in compaction
    load = inspect.getsource(pso_syncobj.SyncObj._SyncObj__loadDumpFile)
    # Why finish_compaction exists: a journal whose first two entries are not the dump's is cleared.
    assert "self.__raftLog[0] != data[2]" in load and "self.__raftLog.clear()" in load
    rj.install()
    assert pso_serializer.atomicReplace is rj.replace_dump


@pytest.fixture
def gate(monkeypatch):
    """Holds the background encoder until set."""
    event = threading.Event()
    encode = snapshot.encode_dump

    def held(*args):
        assert event.wait(WAIT_S)
        return encode(*args)

    monkeypatch.setattr(snapshot, "encode_dump", held)
    yield event
    event.set()


def wait_check(writer: DumpWriter) -> int:
    deadline = time.monotonic() + WAIT_S
    while (status := writer.check()) == SERIALIZER_STATE.SERIALIZING:
        assert time.monotonic() < deadline, "the background dump did not finish"
        time.sleep(0.005)
    return status


def state_with(mesh_id: str) -> MeshState:
    return MeshState(mesh_id=mesh_id, applied=1)


def test_serialize_returns_at_once_and_the_dump_lands_in_the_background(tmp_path, gate):
    dump = str(tmp_path / "raft.dump")
    writer = DumpWriter(dump, lambda: state_with("m1"))
    try:
        assert writer.check() == SERIALIZER_STATE.NOT_SERIALIZING
        started = time.monotonic()
        writer.serialize(dump + ".tmp", (*ENTRIES, []))
        rj.replace_dump(dump + ".tmp", dump)  # pysyncobj's rename right after: the writer's to do, later
        assert time.monotonic() - started < 0.5
        assert writer.check() == SERIALIZER_STATE.SERIALIZING and not Path(dump).exists()
        gate.set()
        assert wait_check(writer) == SERIALIZER_STATE.SUCCESS
        assert writer.check() == SERIALIZER_STATE.NOT_SERIALIZING
        state, last, prev, _ = snapshot.read_dump(dump)
        assert state.mesh_id == "m1" and (last, prev) == ENTRIES and writer.written == 1
        assert not Path(dump + ".writing").exists()
    finally:
        writer.close()


def test_the_dump_holds_the_state_when_it_was_asked_for_not_a_later_one(tmp_path, gate):
    dump = str(tmp_path / "raft.dump")
    current = {"state": apply(MeshState(), InitMesh("m", "first", 1.0))}
    writer = DumpWriter(dump, lambda: current["state"])
    try:
        asked = current["state"]
        writer.serialize(dump + ".tmp", (*ENTRIES, []))
        current["state"] = apply(asked, SetReplicas("reasoning", 3))  # the tick thread applies on meanwhile
        gate.set()
        assert wait_check(writer) == SERIALIZER_STATE.SUCCESS
        assert snapshot.read_dump(dump)[0] == asked != current["state"]
    finally:
        writer.close()


def test_a_snapshot_from_the_leader_during_a_write_wins_and_the_write_fails(tmp_path, gate):
    dump = str(tmp_path / "raft.dump")
    writer = DumpWriter(dump, lambda: state_with("older"))
    try:
        writer.serialize(dump + ".tmp", (*ENTRIES, []))
        newer = ENCODE(state_with("newer"), (b"\x01", 20, 3), (b"\x01", 19, 3), [])
        Path(dump + ".1.tmp").write_bytes(newer)
        rj.replace_dump(dump + ".1.tmp", dump)  # pysyncobj's Serializer.setTransmissionData
        gate.set()
        assert wait_check(writer) == SERIALIZER_STATE.FAILED
        assert snapshot.read_dump(dump)[0].mesh_id == "newer"
        assert not Path(dump + ".writing").exists() and writer.failed == 1
    finally:
        writer.close()
    # Closed: the dump's renames are durable_replace again.
    Path(dump + ".tmp").write_bytes(b"x")
    rj.replace_dump(dump + ".tmp", dump)
    assert Path(dump).read_bytes() == b"x"


def test_a_failed_write_reports_failed_and_leaves_the_dump(tmp_path, monkeypatch, caplog):
    dump = str(tmp_path / "raft.dump")
    Path(dump).write_bytes(b"previous")

    def eio(path, raw):
        raise OSError(5, "EIO")

    monkeypatch.setattr(snapshot, "write_file", eio)
    writer = DumpWriter(dump, lambda: state_with("m"))
    try:
        writer.serialize(dump + ".tmp", (*ENTRIES, []))
        assert wait_check(writer) == SERIALIZER_STATE.FAILED
        assert Path(dump).read_bytes() == b"previous"
        assert "raft dump at entry 9 failed" in caplog.text
    finally:
        writer.close()


def entries(first: int, last: int) -> list[tuple[bytes, int, int]]:
    return [(b"\x01", i, 1) for i in range(first, last + 1)]


def test_finish_compaction_cuts_the_journal_to_the_dump_only_when_it_holds_the_dumps_entries(tmp_path):
    j = DurableJournal(tmp_path / "j")
    try:
        for e in entries(1, 10):
            j.add(*e)
        assert finish_compaction(j, (b"\x01", 5, 1), (b"\x01", 6, 2)) == 0  # another term at 6: not this log
        assert finish_compaction(j, (b"\x01", 5, 1), (b"\x01", 6, 1)) == 4
        assert [e[1] for e in j] == list(range(5, 11))
        assert finish_compaction(j, (b"\x01", 5, 1), (b"\x01", 6, 1)) == 0  # already there
        assert finish_compaction(j, (b"\x01", 12, 1), (b"\x01", 13, 1)) == 0  # beyond the journal
    finally:
        j._destroy()


def test_a_member_stopped_mid_dump_keeps_every_entry_after_it(tmp_path, gate):
    """The dump lands at close (close waits for it) but pysyncobj never heard SUCCESS: the journal is uncut."""
    address = addresses(1)[0]
    timing = RaftTiming(heartbeat_s=0.02, election_min_s=0.1, election_max_s=0.2, connection_retry_s=0.1,
                        leader_fallback_s=0.3, compaction_min_entries=5)
    node = RaftNode(address, [], tmp_path / "raft", PASSWORD, timing, auto_tick=False)
    try:
        wait_ticked(node, lambda: node.is_leader() and node.is_ready())
        for cmd in [InitMesh("m", "stop", 1.0), *(SetReplicas("reasoning", i) for i in range(8))]:
            f = node.propose(cmd)
            wait_ticked(node, f.done)
            f.result(0)
        wait_ticked(node, lambda: node.dumps.busy)  # a dump under way, held by the gate
        expected = node.state
        threading.Timer(0.2, gate.set).start()
    finally:
        node.close()  # waits for the dump
    again = RaftNode(address, [], tmp_path / "raft", PASSWORD, timing, auto_tick=False)
    try:
        wait_ticked(again, lambda: again.state == expected)
    finally:
        again.close()


def wait_ticked(node: RaftNode, condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, node.status()
        node.tick(0.01)


# ---- the claim: compacting a large state changes no leader ------------------------------------------------

def large_state(sessions: int = 250) -> MeshState:
    """About 8 MB of sessions (the estimate of raft/session_budget.py): over a second of encoding here."""
    ids = tuple(range(70000, 74096))
    turn = Turn(messages=(("user", "x" * 4000),), prompt_tokens=4096, answer_tokens=ids[:2000],
                answer_text="y" * 4000, finish_reason="stop", prompt_token_ids=ids)
    state = apply(MeshState(), InitMesh("m", "large", 1.0))
    return MeshState(mesh_id=state.mesh_id, name=state.name, created_at=state.created_at, applied=state.applied,
                     sessions={f"s{k}": Session(turns=(turn,), last_used=float(k)) for k in range(sessions)})


def test_compacting_a_large_state_changes_no_leader(tmp_path):
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.3, election_max_s=0.6, connection_retry_s=0.5,
                        leader_fallback_s=0.6, compaction_min_entries=30)
    addrs = addresses(3)
    nodes = [RaftNode(a, [b for b in addrs if b != a], tmp_path / f"n{i}", PASSWORD, timing)
             for i, a in enumerate(addrs)]
    try:
        wait_for(lambda: sum(n.is_leader() for n in nodes) == 1 and all(n.is_ready() for n in nodes), "a leader",
                 nodes=nodes)
        wait_for(lambda: all(all(n.partners().values()) for n in nodes), "a connected group", nodes=nodes)
        lead = next(n for n in nodes if n.is_leader())
        big = large_state()
        assert big.session_bytes > 8_000_000
        for n in nodes:
            n._log.state = big  # the same state everywhere, as if the log had built it
        before = terms(nodes)
        gaps: list[float] = []
        last = [time.monotonic()]

        def on_tick() -> None:
            now = time.monotonic()
            gaps.append(now - last[0])
            last[0] = now

        lead._obj.addOnTickCallback(on_tick)
        for i in range(40):
            lead.propose(SetReplicas("reasoning", i % 60)).result(timeout=WAIT_S)
        wait_for(lambda: all(n.dumps.written >= 1 for n in nodes), "every member to dump the large state",
                 limit_s=60, nodes=nodes)
        wait_for(lambda: all(n.status()["log_length"] < 30 for n in nodes), "every journal to be cut",
                 limit_s=WAIT_S, nodes=nodes)
        assert max(n.dumps.last_write_s for n in nodes) > 0.3  # the writes took longer than an election timeout
        assert snapshot.read_dump(str(tmp_path / "n0" / "raft.dump"))[0].sessions == big.sessions
        assert terms(nodes) == before and lead.is_leader()
        # The leader's tick thread never stalled an election timeout (written inline, each member's tick stalls
        # well over a second here). Three members' encoders share one GIL in this process; a member in its own
        # process has one encoder against its tick thread.
        assert max(gaps) < timing.election_max_s, max(gaps)
    finally:
        for n in nodes:
            n.close()
