"""raft/node.py: a one-member RaftNode in this process, on tests/raft_harness.py (ticked by hand on a fake
clock, its real journal under tmp_path; the TCP transport is tests/unit/test_raft_transport.py's)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from raft.commands import AddMember, InitMesh, SetMemberState
from raft.node import RaftNode, RaftTiming
from raft.state import Rejected
from tests.procs import free_ports
from tests.raft_harness import Cluster

TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.1, election_max_s=0.2, connection_retry_s=0.1,
                    leader_fallback_s=0.3)

_cluster: Cluster | None = None  # the open one, for the helpers below (one at a time: see Cluster)


@pytest.fixture
def solo(tmp_path):
    """A one-member group, not started (start(0) / restart(0) start it)."""
    global _cluster
    with Cluster(tmp_path, 1, timing=TIMING, start=False) as c:
        _cluster = c
        try:
            yield c
        finally:
            _cluster = None


def tick_until(node: RaftNode, condition, what: str, limit_s: float = 20.0):
    return _cluster.run_until(condition, what, limit_s)


def settle(node: RaftNode, future: Future):
    tick_until(node, future.done, "the proposal to be applied")
    return future


@pytest.fixture
def node(solo):
    return solo.start(0)


def leader(node: RaftNode) -> RaftNode:
    tick_until(node, lambda: node.is_leader() and node.is_ready(), "leadership")
    return node


def init_mesh(mesh_id: str = "mesh-1") -> InitMesh:
    return InitMesh(mesh_id=mesh_id, name="first", created_at=123.0)


def test_one_member_group_elects_itself_leader(node):
    leader(node)
    status = node.status()
    assert status["is_leader"] and status["leader"] == node.address == status["self"]
    assert status["ready"]
    assert status["has_quorum"]


def test_propose_init_mesh_resolves_and_state_shows_it(node):
    leader(node)
    result = settle(node, node.propose(init_mesh())).result(timeout=0)
    assert result == {"ok": True, "applied": 1}
    assert node.state.mesh_id == "mesh-1" and node.state.name == "first"
    assert node.state.applied == 1


def test_on_applied_hook_sees_each_accepted_state(solo):
    seen = []
    n = solo.start(0, on_applied=seen.append)
    leader(n)
    settle(n, n.propose(init_mesh())).result(timeout=0)
    with pytest.raises(Rejected):
        settle(n, n.propose(init_mesh("again"))).result(timeout=0)
    assert [s.applied for s in seen] == [1]
    assert seen[-1] is n.state


def test_rejected_command_fails_its_future_and_leaves_state_unchanged(node):
    leader(node)
    settle(node, node.propose(init_mesh())).result(timeout=0)
    before = node.state
    future = settle(node, node.propose(SetMemberState("nobody", "gone")))
    with pytest.raises(Rejected, match="unknown member"):
        future.result(timeout=0)
    assert node.state == before
    assert node.state.applied == 1


def test_command_before_init_is_rejected(node):
    leader(node)
    future = settle(node, node.propose(SetMemberState("n1", "gone")))
    with pytest.raises(Rejected, match="not initialised"):
        future.result(timeout=0)
    assert not node.state.initialised


def test_restart_on_same_data_dir_recovers_state_from_journal(solo, tmp_path):
    first = solo.start(0)
    leader(first)
    settle(first, first.propose(init_mesh("kept"))).result(timeout=0)
    settle(first, first.propose(AddMember("n1", "alpha", "127.0.0.1:1", "127.0.0.1:3", {"cores": 2},
                                          10.0))).result(timeout=0)
    expected = first.state
    solo.stop(0)
    assert (tmp_path / "n0" / "raft.wal").exists()

    second = solo.start(0)
    tick_until(second, lambda: second.state == expected, "the journal to be replayed")
    assert second.state.mesh_id == "kept"
    assert second.state.members["n1"].name == "alpha"
    assert second.state.applied == 2
    leader(second)
    # The recovered log goes on where it stopped.
    with pytest.raises(Rejected, match="already initialised"):
        settle(second, second.propose(init_mesh("new"))).result(timeout=0)
    assert second.state == expected


@pytest.mark.parametrize("password", ["", None])
def test_empty_password_is_refused(tmp_path, password):
    with pytest.raises(ValueError, match="password"):
        RaftNode(f"127.0.0.1:{free_ports(1)}", [], tmp_path / "raft", password, auto_tick=False)


def test_close_twice_is_safe(node):
    node.close()
    node.close()
