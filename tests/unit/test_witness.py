"""mesh/cluster/witness.py: a witness elected leader hands leadership to a model node (three real Raft
nodes in this process, on loopback), and routers join as witnesses by default."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest

from mesh.cluster.witness import LeadershipHandoff, joins_as_witness
from raft.commands import AddMember, CreateToken, InitMesh
from raft.node import ProposalFailed, RaftNode, RaftTiming
from tests.procs import free_ports, wait_until

PASSWORD = "unit-test-secret"
TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                    leader_fallback_s=0.4)


def result(future: Future, timeout: float = 10.0):
    return future.result(timeout=timeout)


@pytest.fixture
def group(tmp_path):
    """Three auto-ticked Raft nodes; the first is recorded as a witness, the others as model nodes."""
    addresses = [f"127.0.0.1:{free_ports(1)}" for _ in range(3)]
    nodes = [RaftNode(a, [p for p in addresses if p != a], tmp_path / f"raft{i}", PASSWORD, TIMING)
             for i, a in enumerate(addresses)]
    try:
        leader = wait_until(lambda: next((n for n in nodes if n.is_leader() and n.is_ready()), None), 30,
                            "a leader")
        result(leader.propose(InitMesh(mesh_id="m", name="w", created_at=1.0)))
        result(leader.propose(CreateToken("t", "c" * 64, 1.0, 1e12, uses=5)))
        for i, address in enumerate(addresses):
            result(leader.propose(AddMember(f"n{i}", f"node{i}", f"h:{i}", address, {}, 2.0, witness=i == 0,
                                            token_id=None if i == 0 else "t")))
        wait_until(lambda: all(len(n.state.members) == 3 for n in nodes), 20, "every copy to hold the members")
        yield nodes
    finally:
        for n in nodes:
            n.close()


def make_leader(nodes: list[RaftNode], target: RaftNode) -> None:
    """Moves leadership to `target` with the same transfer the handoff uses (retried while refused:
    a follower must be fully caught up)."""
    def moved() -> bool:
        leader = next((n for n in nodes if n.is_leader()), None)
        if leader is not None and leader is not target:
            try:
                result(leader.transfer_leadership(target.address))
            except ProposalFailed:
                pass  # not caught up yet, or the leader just changed: the next poll tries again
        return target.is_leader()
    wait_until(moved, 30, "the witness to lead", every=0.1)


def test_a_witness_leader_hands_leadership_to_a_connected_model_node(group):
    witness, models = group[0], group[1:]
    make_leader(group, witness)
    handoff = LeadershipHandoff(witness)
    assert set(handoff.targets()) == {m.address for m in models}
    assert asyncio.run(asyncio.wait_for(_hand_off_until_done(handoff), 20))
    leader = wait_until(lambda: next((n for n in models if n.is_leader()), None), 10, "a model node to lead")
    wait_until(lambda: all(n.leader() == leader.address for n in group), 10, "every node to see the new leader")
    assert not witness.is_leader()


async def _hand_off_until_done(handoff: LeadershipHandoff) -> bool:
    while not await handoff.hand_off():  # refused while followers catch up with the new term's entry
        await asyncio.sleep(0.05)
    return True


def test_only_connected_model_nodes_are_handoff_targets(group):
    witness, models = group[0], group[1:]
    make_leader(group, witness)
    models[1].close()  # one model node gone: the group keeps a majority, and one target remains
    wait_until(lambda: models[1].address not in LeadershipHandoff(witness).targets(), 10, "the dead node to drop")
    assert LeadershipHandoff(witness).targets() == [models[0].address]


def test_transfer_to_a_bad_address_fails_without_stopping_the_tick_thread(group):
    leader = next(n for n in group if n.is_leader())
    with pytest.raises(ProposalFailed):
        result(leader.transfer_leadership("127.0.0.1:1"))  # not a member: refused
    result(leader.propose(CreateToken("t2", "d" * 64, 1.0, 1e12)))  # the tick thread still applies commands


def test_routers_join_as_witnesses_by_default(tmp_path):
    router, desktop = tmp_path / "router", tmp_path / "desktop"
    (router / "etc").mkdir(parents=True)
    (router / "etc" / "openwrt_release").write_text("DISTRIB_ID='OpenWrt'\n")
    desktop.mkdir()
    assert joins_as_witness(False, router)
    assert not joins_as_witness(False, desktop)
    assert joins_as_witness(True, desktop)

