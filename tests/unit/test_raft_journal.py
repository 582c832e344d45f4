"""raft/journal.py: records with a CRC and a length, fsynced before acknowledgement, term and vote replaced
atomically, a torn or corrupt tail cut at open, and the pysyncobj hooks that put it under SyncObj. Real files
in tmp_path; real RaftNodes for restarts (ticked by hand, or three with their tick threads)."""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path

import pysyncobj.journal as pso_journal
import pysyncobj.pickle as pso_pickle
import pysyncobj.serializer as pso_serializer
import pysyncobj.syncobj as pso_syncobj
import pytest

import raft.journal as rj
from raft.commands import InitMesh, SetReplicas
from raft.journal import MAGIC, SYNC_BATCH, SYNC_EACH_ADD, DurableJournal, JournalCorrupt, JournalPath
from raft.node import ProposalFailed, RaftNode, RaftTiming
from tests.procs import free_ports, wait_until

PASSWORD = "journal-test-secret"
TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                    leader_fallback_s=0.4)
WAIT_S = 20.0


def entries(n: int, start: int = 1, term: int = 1) -> list[tuple[bytes, int, int]]:
    return [(f"command {i}".encode() * (1 + i % 3), i, term + i // 4) for i in range(start, start + n)]


def filled(path: Path, n: int = 5, mode: str = SYNC_BATCH) -> DurableJournal:
    j = DurableJournal(path, mode)
    for e in entries(n):
        j.add(*e)
    j.sync()
    return j


def contents(j: DurableJournal) -> list:
    return [j[i] for i in range(len(j))]


# ---- the contract pysyncobj relies on ----------------------------------------------------------------

def test_same_interface_as_pysyncobjs_file_journal():
    for name, member in inspect.getmembers(pso_journal.FileJournal, inspect.isfunction):
        if name.startswith("_FileJournal") or name == "__init__":
            continue
        ours = getattr(DurableJournal, name)
        # SyncObj passes arguments by position: the counts must match.
        assert len(inspect.signature(ours).parameters) == len(inspect.signature(member).parameters), name


def test_behaves_like_pysyncobjs_memory_journal_through_a_random_history(tmp_path):
    import random
    rng = random.Random(3)
    ours, ref = DurableJournal(tmp_path / "j"), pso_journal.MemoryJournal()
    for step in range(400):
        op = rng.random()
        if op < 0.6 or not len(ref):
            idx = (ref[-1][1] if len(ref) else 0) + 1
            command = rng.randbytes(rng.randint(0, 50))
            for j in (ours, ref):
                j.add(command, idx, 1 + idx // 10)
        elif op < 0.75:
            cut = rng.randint(0, len(ref))
            ours.deleteEntriesFrom(cut)
            ref.deleteEntriesFrom(cut)
        elif op < 0.9:
            cut = rng.randint(0, len(ref) - 1)
            ours.deleteEntriesTo(cut)
            ref.deleteEntriesTo(cut)
        elif op < 0.93:
            ours.clear()
            ref.clear()
        assert contents(ours) == [ref[i] for i in range(len(ref))]
        if step % 50 == 0:  # and the file says the same
            ours._destroy()
            ours = DurableJournal(tmp_path / "j")
            assert contents(ours) == [ref[i] for i in range(len(ref))]
    ours._destroy()


def test_term_vote_and_commit_index_survive_reopen(tmp_path):
    j = filled(tmp_path / "j", 6)
    j.setCurrentTerm(7, "127.0.0.1:4000")
    j.setRaftCommitIndex(5)
    j.onOneSecondTimer()
    j._destroy()
    again = DurableJournal(tmp_path / "j")
    assert (again.getCurrentTerm(), again.getVotedForNodeId(), again.getRaftCommitIndex()) == (7, "127.0.0.1:4000", 5)
    assert contents(again) == entries(6)
    again._destroy()


def test_commit_index_never_points_past_the_journal(tmp_path):
    j = filled(tmp_path / "j", 3)
    j.setRaftCommitIndex(50)
    assert j.getRaftCommitIndex() == 3
    j._destroy()


# ---- durability: fsync placement -------------------------------------------------------------------

@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync/fdatasync raft.journal makes, as the path of the file or directory synced."""
    seen: list[str] = []

    def record(real):
        def sync(fd):
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)
        return sync
    monkeypatch.setattr(rj.os, "fsync", record(os.fsync))
    monkeypatch.setattr(rj, "_datasync", record(rj._datasync))
    return seen


def test_add_mode_fsyncs_every_write_and_batch_mode_once_per_sync(tmp_path, fsyncs):
    each = DurableJournal(tmp_path / "each", SYNC_EACH_ADD)
    fsyncs.clear()
    for e in entries(4):
        each.add(*e)
    each.deleteEntriesFrom(3)
    assert fsyncs == [str(tmp_path / "each")] * 5 and not each.dirty
    batch = DurableJournal(tmp_path / "batch", SYNC_BATCH)
    fsyncs.clear()
    for e in entries(4):
        batch.add(*e)
    assert fsyncs == [] and batch.dirty
    batch.sync()
    batch.sync()  # nothing new: no second fsync
    assert fsyncs == [str(tmp_path / "batch")] and not batch.dirty
    each._destroy()
    batch._destroy()


def test_term_and_vote_are_written_to_a_temporary_fsynced_and_renamed_with_the_directory_fsynced(tmp_path, fsyncs):
    j = DurableJournal(tmp_path / "j")
    fsyncs.clear()
    j.setCurrentTerm(3, "a:1")
    assert fsyncs == [str(tmp_path / "j.meta.tmp"), str(tmp_path)]
    assert not (tmp_path / "j.meta.tmp").exists()
    fsyncs.clear()
    j.setCurrentTerm(3, "a:1")  # unchanged: no write
    assert fsyncs == []
    j._destroy()


def test_compaction_writes_a_new_file_fsyncs_it_and_its_directory(tmp_path, fsyncs):
    j = filled(tmp_path / "j", 10)
    fsyncs.clear()
    j.deleteEntriesTo(6)
    assert fsyncs == [str(tmp_path / "j.tmp"), str(tmp_path)]
    assert contents(j) == entries(10)[6:]
    j.add(*entries(1, start=11)[0])
    j._destroy()
    assert contents(DurableJournal(tmp_path / "j")) == entries(10)[6:] + entries(1, start=11)


def test_full_dump_replacement_fsyncs_the_file_and_its_directory(tmp_path, fsyncs):
    rj.install()
    assert pso_serializer.atomicReplace is rj.replace_dump  # durable_replace unless a writer owns the dump
    dump = tmp_path / "raft.dump"
    (tmp_path / "raft.dump.tmp").write_bytes(b"state")
    fsyncs.clear()
    pso_serializer.atomicReplace(str(tmp_path / "raft.dump.tmp"), str(dump))
    assert fsyncs == [str(tmp_path / "raft.dump.tmp"), str(tmp_path)] and dump.read_bytes() == b"state"


def test_a_failed_fsync_is_never_retried_into_a_false_success(tmp_path, monkeypatch):
    j = DurableJournal(tmp_path / "j")
    j.add(b"x", 1, 0)

    def eio(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(rj, "_datasync", eio)
    with pytest.raises(OSError):
        j.sync()
    monkeypatch.setattr(rj, "_datasync", lambda fd: None)
    with pytest.raises(rj.JournalFailed):  # the kernel may have dropped the pages: no acknowledgement, ever
        j.sync()
    j._destroy()


# ---- torn and corrupt tails ------------------------------------------------------------------------

def record_bounds(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    _, offsets, end, why = rj.scan(data)
    assert why is None
    return list(zip(offsets, offsets[1:] + [end]))


def test_every_cut_inside_the_last_record_keeps_the_good_prefix(tmp_path, caplog):
    path = tmp_path / "j"
    filled(path, 5)._destroy()
    original = path.read_bytes()
    start, end = record_bounds(path)[-1]
    for cut in range(start + 1, end):
        path.write_bytes(original[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="quorum.raft.journal"):
            j = DurableJournal(path)
        assert contents(j) == entries(4), cut
        assert len(caplog.records) == 1 and "cut" in caplog.records[0].getMessage()
        assert path.stat().st_size == start  # the tail is gone from the file too
        j.add(*entries(1, start=5)[0])  # and the journal goes on where the good prefix ends
        j._destroy()
        assert contents(DurableJournal(path)) == entries(5)


def test_every_flipped_byte_in_the_last_record_is_detected(tmp_path):
    path = tmp_path / "j"
    filled(path, 5)._destroy()
    original = path.read_bytes()
    start, end = record_bounds(path)[-1]
    for pos in range(start, end):
        corrupt = bytearray(original)
        corrupt[pos] ^= 0x40
        path.write_bytes(bytes(corrupt))
        j = DurableJournal(path)
        assert contents(j) == entries(4), pos
        j._destroy()


def test_a_corrupt_record_in_the_middle_cuts_everything_after_it(tmp_path):
    path = tmp_path / "j"
    filled(path, 8)._destroy()
    start, _ = record_bounds(path)[3]
    data = bytearray(path.read_bytes())
    data[start + 12] ^= 1
    path.write_bytes(bytes(data))
    j = DurableJournal(path)
    assert contents(j) == entries(3)
    j._destroy()


def test_garbage_appended_after_the_last_record_is_cut(tmp_path):
    path = tmp_path / "j"
    filled(path, 3)._destroy()
    with open(path, "ab") as f:
        f.write(os.urandom(100))
    assert contents(DurableJournal(path)) == entries(3)


def test_a_file_torn_inside_its_header_starts_empty_and_a_foreign_file_is_refused(tmp_path):
    (tmp_path / "torn").write_bytes(MAGIC[:3])
    assert len(DurableJournal(tmp_path / "torn")) == 0
    (tmp_path / "foreign").write_bytes(b"PYSYNCOBJ" + b"\0" * 40)
    with pytest.raises(JournalCorrupt, match="not a Quorum Raft journal"):
        DurableJournal(tmp_path / "foreign")


def test_a_corrupt_term_and_vote_file_stops_the_start_instead_of_guessing(tmp_path):
    j = DurableJournal(tmp_path / "j")
    j.setCurrentTerm(4, "x:1")
    j._destroy()
    meta = tmp_path / "j.meta"
    meta.write_bytes(meta.read_bytes()[:-3])
    with pytest.raises(JournalCorrupt, match="term and vote"):
        DurableJournal(tmp_path / "j")


def test_a_corrupt_commit_index_file_reads_as_one(tmp_path):
    j = filled(tmp_path / "j", 4)
    j.setRaftCommitIndex(4)
    j._destroy()
    (tmp_path / "j.commit").write_bytes(b"\xff" * 12)
    j = DurableJournal(tmp_path / "j")
    assert j.getRaftCommitIndex() == 1 and len(j) == 4
    j._destroy()


def legacy_entries(n: int) -> tuple[list, list]:
    """Entries as an earlier version logged them (type byte + pysyncobj's pickle of the replicated call, a
    no-op, a membership change), and as raft/journal.py converts them (type byte + raft/codec.py)."""
    from pysyncobj.node import TCPNode

    from raft import codec
    bodies = [(0, ({"kind": "set_replicas", "role": "reasoning", "count": i},)) for i in range(n - 2)]
    bodies.append(["add", "h:2", TCPNode("h:2")])
    old = [(b"\x01", 1, 1)] + [(bytes([2 if isinstance(b, list) else 0]) + pso_pickle.dumps(b), i + 2, 1)
                               for i, b in enumerate(bodies)]
    new = [(b"\x01", 1, 1)] + [(bytes([2 if isinstance(b, list) else 0]) + codec.dumps(b, codec.NODES), i + 2, 1)
                               for i, b in enumerate(bodies)]
    return old, new


def test_a_pysyncobj_file_journal_is_migrated_once(tmp_path):
    stock = pso_journal.FileJournal(str(tmp_path / "raft.journal"))
    old, new = legacy_entries(5)
    for e in old:
        stock.add(*e)
    stock.setCurrentTerm(3, "h:1")
    stock.setRaftCommitIndex(4)
    stock.onOneSecondTimer()
    stock._destroy()
    j = DurableJournal(tmp_path / "raft.wal")
    assert rj.migrate_stock_journal(tmp_path / "raft.journal", j)
    assert contents(j) == new and (j.getCurrentTerm(), j.getVotedForNodeId()) == (3, "h:1")
    assert j.getRaftCommitIndex() == 4
    assert not (tmp_path / "raft.journal").exists() and (tmp_path / "raft.journal.pre-wal").exists()
    assert not rj.migrate_stock_journal(tmp_path / "raft.journal", j)
    j._destroy()


# ---- under SyncObj ---------------------------------------------------------------------------------

def test_the_hook_hands_syncobj_our_journal_and_leaves_plain_paths_to_pysyncobj(tmp_path):
    rj.install()
    assert "createJournal(self.__conf.journalFile)" in inspect.getsource(pso_syncobj.SyncObj.__init__)
    j = DurableJournal(tmp_path / "j")
    assert pso_syncobj.createJournal(JournalPath(j)) is j
    assert isinstance(pso_syncobj.createJournal(str(tmp_path / "stock")), pso_journal.FileJournal)
    assert isinstance(pso_syncobj.createJournal(None), pso_journal.MemoryJournal)
    j._destroy()


def tick_until(node: RaftNode, condition, what: str, limit_s: float = WAIT_S):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; status: {node.status()}"
        node.tick(0.02)


def test_restart_with_compaction_keeps_every_committed_entry(tmp_path):
    address = f"127.0.0.1:{free_ports(1)}"
    timing = RaftTiming(heartbeat_s=0.02, election_min_s=0.1, election_max_s=0.2, connection_retry_s=0.1,
                        leader_fallback_s=0.3, compaction_min_entries=5)
    node = RaftNode(address, [], tmp_path / "raft", PASSWORD, timing, auto_tick=False)
    try:
        tick_until(node, lambda: node.is_leader() and node.is_ready(), "leadership")
        futures = [node.propose(InitMesh("m", "compact", 1.0))]
        tick_until(node, futures[0].done, "init")
        for i in range(12):
            f = node.propose(SetReplicas("reasoning", i))
            tick_until(node, f.done, "commit")
            f.result(0)
        expected = node.state
    finally:
        node.close()
    assert (tmp_path / "raft" / "raft.dump").exists(), "no compaction happened: the test did not test"
    again = RaftNode(address, [], tmp_path / "raft", PASSWORD, timing, auto_tick=False)
    try:
        tick_until(again, lambda: again.state == expected, "the dump and journal to be replayed")
        assert len(again.journal) < 13  # compacted
    finally:
        again.close()


def three(tmp_path: Path, journal_sync: str = SYNC_BATCH) -> tuple[list[str], list[RaftNode]]:
    base = free_ports(3)
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    return addresses, [start(addresses, i, tmp_path, journal_sync) for i in range(3)]


def start(addresses: list[str], i: int, root: Path, journal_sync: str = SYNC_BATCH) -> RaftNode:
    me = addresses[i]
    return RaftNode(me, [a for a in addresses if a != me], root / f"n{i}", PASSWORD, TIMING, journal_sync=journal_sync)


def commit(nodes: list[RaftNode], cmd) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        leader = wait_until(lambda: next((n for n in nodes if n.is_leader() and n.is_ready()), None), WAIT_S,
                            "a leader")
        try:
            leader.propose(cmd).result(5)
            return
        except ProposalFailed:  # leadership moved: again through the new leader
            assert time.monotonic() < deadline


def test_a_member_restarted_with_a_torn_tail_catches_up_from_its_peers(tmp_path, caplog):
    addresses, nodes = three(tmp_path)
    try:
        commit(nodes, InitMesh("m", "torn", 1.0))
        for i in range(6):
            commit(nodes, SetReplicas("reasoning", i))
        wait_until(lambda: all(n.state == nodes[0].state for n in nodes), WAIT_S, "equal copies")
        victim = next(i for i, n in enumerate(nodes) if not n.is_leader())
        nodes[victim].close()
        wal = tmp_path / f"n{victim}" / "raft.wal"
        start_, end = record_bounds(wal)[-3]
        with open(wal, "r+b") as f:
            f.truncate(start_ + (end - start_) // 2)  # torn inside the third-last record
        with caplog.at_level(logging.WARNING, logger="quorum.raft.journal"):
            nodes[victim] = start(addresses, victim, tmp_path)
        assert any("cut" in r.getMessage() for r in caplog.records)
        commit(nodes, SetReplicas("reasoning", 9))
        wait_until(lambda: all(n.state == nodes[0].state for n in nodes), WAIT_S, "the restarted member to catch up")
        assert nodes[victim].state.replicas["reasoning"] == 9 and nodes[victim].state.applied == 8
    finally:
        for n in nodes:
            n.close()


class PowerCut:
    """A file layer that keeps, per journal file, only what was there at its last fsync: a power cut."""

    def __init__(self, monkeypatch) -> None:
        self.synced: dict[str, bytes] = {}
        real = rj._datasync

        def datasync(fd):
            real(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.synced[path] = rj._read_all(fd)
        monkeypatch.setattr(rj, "_datasync", datasync)

    def entries_after_cut(self, path: Path) -> list:
        return rj.scan(self.synced.get(str(path), MAGIC))[0]


@pytest.mark.parametrize("journal_sync", [SYNC_BATCH, SYNC_EACH_ADD])
def test_every_entry_a_client_saw_committed_was_fsynced_on_a_majority(tmp_path, monkeypatch, journal_sync):
    power = PowerCut(monkeypatch)
    addresses, nodes = three(tmp_path, journal_sync)
    try:
        commit(nodes, InitMesh("m", "power", 1.0))
        checked = 0
        for i in range(20):
            commit(nodes, SetReplicas("reasoning", i % 4))
            # The client heard "committed". Every entry up to the commit index must survive a power cut now.
            leader = next(n for n in nodes if n.is_leader())
            commit_index = leader.status()["commit_index"]
            committed = [e for e in list(leader.journal[:]) if e[1] <= commit_index]
            survivors = [power.entries_after_cut(tmp_path / f"n{k}" / "raft.wal") for k in range(3)]
            for entry in committed:
                holders = sum(entry in s for s in survivors)
                assert holders >= 2, f"committed entry {entry[1:]} is durable on {holders} of 3 members"
                checked += 1
        assert checked > 20
    finally:
        for n in nodes:
            n.close()
