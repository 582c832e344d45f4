"""tests/raft_harness.py itself: the in-memory network, its connection model, the injected clock, determinism, and
RaftNode's `transport` seam. Every test here runs on fake time: no sleeps, no sockets."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pysyncobj.syncobj as pso_syncobj
import pytest

import raft.journal as raft_journal
import raft.prevote as raft_prevote
from raft.commands import InitMesh, SetReplicas
from raft.node import RaftNode, RaftTiming
from raft.wire import MessageRefused
from tests.raft_harness import CONNECT, MESSAGE, Cluster, FakeClock, MemoryNetwork, MemoryTransport

ROOT = Path(__file__).resolve().parents[2]
TIMING = RaftTiming()  # production timing (DESIGN.md): elections 0.3-0.6 s, heartbeat 0.05 s


def test_three_members_elect_one_leader_that_all_follow_and_commit(tmp_path):
    with Cluster(tmp_path) as c:
        lead = c.stable_leader(limit_s=3 * TIMING.election_max_s)
        assert [n.is_leader() for n in c.running].count(True) == 1
        assert c.commit(InitMesh("m", "first", 1.0)) == {"ok": True, "applied": 1}
        c.run_until(lambda: all(n.state.applied == 1 for n in c.running), "every member to apply")
        assert all(n.state == lead.state for n in c.running)
        assert c.network.lost == 0


def scripted_history(root: Path, seed: int) -> tuple:
    """Faults of every kind, a crash and a restart: the cluster's whole observable history."""
    with Cluster(root, 5, seed=seed) as c:
        a = c.addresses
        c.network.drop(a[0], a[4], 0.2)
        c.network.delay(a[1], a[2], 0.02, jitter_s=0.05)
        lead = c.stable_leader()
        c.commit(InitMesh("m", "x", 1.0))
        c.network.isolate(lead.address, a)
        c.run_for(3)
        c.network.heal()
        c.stop(2)
        c.run_for(2)
        c.start(2)
        c.run_for(3)
        return c.history, c.network.sent, c.network.lost, c.steps


def test_the_same_seed_and_script_give_the_same_history(tmp_path):
    first = scripted_history(tmp_path / "a", seed=7)
    assert first == scripted_history(tmp_path / "b", seed=7)
    assert first[2] > 0 and len({term for _, _, term, _ in first[0]}) >= 2  # the script did move things


def test_the_history_does_not_depend_on_the_processes_hash_seed(tmp_path):
    """SyncObj iterates sets of nodes (string hashes, randomised per process): link queues and per-link random
    sources keep that order from mattering. One other process, with a hash seed unlike this one's."""
    here = hashlib.sha256(repr(scripted_history(tmp_path / "here", 7)).encode()).hexdigest()
    script = ("import hashlib, sys; from pathlib import Path; "
              "from tests.unit.test_raft_harness import scripted_history; "
              "print(hashlib.sha256(repr(scripted_history(Path(sys.argv[1]), 7)).encode()).hexdigest())")
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_the_clock_random_source_and_datasync_are_installed_only_while_open(tmp_path):
    saved = (pso_syncobj.monotonicTime, raft_prevote.monotonic_time, pso_syncobj.random, raft_journal._datasync)
    c = Cluster(tmp_path, 1)
    try:
        assert pso_syncobj.monotonicTime is c.clock and raft_prevote.monotonic_time is c.clock
        assert raft_journal._datasync is not saved[3]
        with pytest.raises(RuntimeError, match="another Cluster"):
            Cluster(tmp_path / "second", 1)
        before = c[0].status()
        c.run_for(2.0)
        assert c.elapsed_s == pytest.approx(2.0)
        assert c[0]._obj.getStatus()["uptime"] == 2  # SyncObj's own reading of time is the fake clock
        assert before["term"] <= c[0].status()["term"]
    finally:
        c.close()
    c.close()
    assert (pso_syncobj.monotonicTime, raft_prevote.monotonic_time, pso_syncobj.random,
            raft_journal._datasync) == saved


def test_a_durable_cluster_keeps_the_journals_datasync(tmp_path):
    with Cluster(tmp_path, 1, durable=True) as c:
        assert raft_journal._datasync is not None and raft_journal._datasync.__name__ != "_no_datasync"
        c.commit(InitMesh("m", "x", 1.0))
        assert c[0].journal.syncs >= 1


def test_nothing_leaves_a_member_before_its_journal_is_written(tmp_path, monkeypatch):
    with Cluster(tmp_path) as c:
        post = c.network.post
        checked = []

        def checked_post(src, dst, epoch, kind, data=None):
            if kind == MESSAGE:
                assert not c.nodes[src].journal.dirty, f"{src} sent with unsynced journal entries"
                checked.append(src)
            return post(src, dst, epoch, kind, data)

        monkeypatch.setattr(c.network, "post", checked_post)
        c.stable_leader()
        c.commit(InitMesh("m", "x", 1.0))
        for i in range(5):
            c.commit(SetReplicas("reasoning", i))
        assert len(checked) > 20


def test_a_message_outside_the_wire_schema_fails_the_test_loudly(tmp_path):
    with Cluster(tmp_path) as c:
        lead = c.stable_leader()
        follower = c.others(lead)[0]
        transport = lead._obj._SyncObj__transport
        assert isinstance(transport, MemoryTransport)
        assert transport.send(follower._obj.selfNode, {"type": "status"})  # a utility command: never on the wire
        with pytest.raises(MessageRefused, match="unknown message type"):
            c.run_for(c.step_s)


def test_a_cut_is_silent_until_the_connection_times_out_as_tcp_does(tmp_path):
    timeout_s = max(3.5, TIMING.election_max_s)  # RaftNode's connectionTimeout
    with Cluster(tmp_path) as c:
        lead = c.stable_leader()
        follower = c.others(lead)[0]
        c.network.cut(lead.address, follower.address)
        c.run_for(timeout_s - 0.5)
        assert lead.partners()[follower.address], "disconnected before the timeout: a cut is not a reset"
        assert follower.partners()[lead.address]
        c.run_for(1.0)
        assert not lead.partners()[follower.address]  # the leader's heartbeats found the connection dead
        c.network.heal()
        lead = c.stable_leader(limit_s=2 * TIMING.connection_retry_s + TIMING.election_max_s)
        assert follower.partners()[lead.address]


def test_a_stopped_member_is_seen_disconnected_at_once(tmp_path):
    with Cluster(tmp_path) as c:
        lead = c.stable_leader()
        follower = c.others(lead)[-1]
        c.stop(follower)
        c.step()
        assert not lead.partners()[follower.address]


def test_links_stay_fifo_under_jitter_and_drops_are_seeded_per_link():
    clock = FakeClock()

    class Member:
        address = "a:1"

        def knows(self, _address):
            return True

    def losses(seed: int) -> tuple[list[int], int]:
        network = MemoryNetwork(clock, seed)
        network.attach(Member())
        network.delay("b:2", "a:1", 0.01, jitter_s=0.5)
        network.drop("b:2", "a:1", 0.3)
        for i in range(200):
            network.post("b:2", "a:1", 1, MESSAGE, bytes([i]))
            network.post("c:3", "a:1", 1, CONNECT)  # another link: its events do not shift b's draws
        clock.advance(1.0)
        got = [data[0] for _src, _epoch, kind, data in network.due("a:1") if kind == MESSAGE]
        return got, network.lost

    got, lost = losses(seed=1)
    assert got == sorted(got) and 30 < lost < 90 and len(got) + lost == 200
    assert losses(seed=1) == (got, lost)
    assert losses(seed=2) != (got, lost)


def test_a_group_commits_through_lossy_slow_links(tmp_path):
    with Cluster(tmp_path, seed=5) as c:
        a = c.addresses
        for x, y in ((a[0], a[1]), (a[1], a[2]), (a[0], a[2])):
            c.network.drop(x, y, 0.1)
            c.network.delay(x, y, 0.005, jitter_s=0.02)
        c.stable_leader()
        c.commit(InitMesh("m", "lossy", 1.0), limit_s=20)
        for i in range(20):
            c.commit(SetReplicas("reasoning", i), limit_s=20)
        c.run_until(lambda: all(n.state.applied == 21 for n in c.running), "every member to apply all", 20)
        assert len({repr(n.state) for n in c.running}) == 1
        assert c.network.lost > 0


# ---- RaftNode's `transport` seam ----------------------------------------------------------------------------

def test_raft_node_refuses_tls_with_a_custom_transport(tmp_path):
    network = MemoryNetwork(FakeClock())
    with pytest.raises(ValueError, match="tls"):
        RaftNode("n0:7000", [], tmp_path / "raft", "", TIMING, auto_tick=False, tls=object(),
                 transport=MemoryTransport.factory(network))


def test_a_harness_member_runs_without_a_password_or_an_encryptor_and_on_the_memory_transport(tmp_path):
    with Cluster(tmp_path, 1) as c:
        obj = c[0]._obj
        assert obj.encryptor is None and obj.conf.password is None
        assert isinstance(obj._SyncObj__transport, MemoryTransport)


def test_no_production_module_imports_the_harness():
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for d in ("raft", "mesh", "shards", "nodes", "proto")
                 for p in (ROOT / d).rglob("*.py") for line in p.read_text(encoding="utf-8").splitlines()
                 if line.lstrip().startswith(("import ", "from ")) and ("raft_harness" in line or "tests" in line)]
    assert offenders == []
