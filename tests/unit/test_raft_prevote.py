"""raft/prevote.py: pre-vote and leader stickiness on pysyncobj 0.3.17, so that a restarted or partitioned
member never deposes a healthy leader (Raft thesis §9.6).

The groups run on tests/raft_harness.py (real RaftNode and PreVoteSyncObj over an in-memory network on a fake
clock): the mechanism step by step, and the restart claim under load. Only the handler-registration check starts
a member over TCP (what the transport calls is what it checks).
"""

from __future__ import annotations

import inspect
from concurrent.futures import Future
from pathlib import Path

import pysyncobj
import pysyncobj.syncobj as pso_syncobj
import pytest

from raft.commands import InitMesh, SetReplicas
from raft.node import ProposalFailed, RaftNode, RaftTiming
from raft.prevote import PreVoteSyncObj, should_grant
from tests.procs import free_ports
from tests.raft_harness import Cluster

PASSWORD = "prevote-test-secret"
HAND = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                  leader_fallback_s=0.4)
# The restart claim: the production timing (DESIGN.md).
LIVE = RaftTiming(heartbeat_s=0.05, election_min_s=0.3, election_max_s=0.6, connection_retry_s=0.5,
                  leader_fallback_s=0.6)


def terms(nodes) -> list[int]:
    return [n.status()["term"] for n in nodes]


def expire_election_timer(node: RaftNode) -> None:
    """As if `node` had heard nothing for an election timeout (a pause, a partition, a late start)."""
    node._obj._SyncObj__raftElectionDeadline = 0


@pytest.fixture
def group(tmp_path):
    made: list[Cluster] = []

    def make(prevote: bool = True, count: int = 3) -> Cluster:
        made.append(Cluster(tmp_path, count, timing=HAND, prevote=prevote))
        return made[-1]

    yield make
    for c in made:
        c.close()


# ---- pins: what raft/prevote.py assumes about pysyncobj -------------------------------------------------

def test_pinned_to_pysyncobj_0_3_17_private_names_and_election_code():
    assert pysyncobj.version.VERSION == "0.3.17"
    tick = inspect.getsource(pso_syncobj.SyncObj._onTick)
    # The election condition the gate mirrors, and the election it lets through by zeroing the deadline.
    assert "if self.__raftState in (_RAFT_STATE.FOLLOWER, _RAFT_STATE.CANDIDATE) and self.__selfNode is not None:" \
        in tick
    assert "if self.__raftElectionDeadline < monotonicTime() and self.__connectedToAnyone():" in tick
    assert "self.__setCurrentTerm(self.__raftCurrentTerm + 1, self.__selfNode.id)" in tick
    assert tick.index("__raftElectionDeadline < monotonicTime()") < tick.index("self._poller.poll(timeToWait)")
    init = inspect.getsource(pso_syncobj.SyncObj.__init__)
    # Looked up on the instance, so PreVoteSyncObj's attribute of that name is what the transport calls.
    assert "self.__transport.setOnMessageReceivedCallback(self.__onMessageReceived)" in init
    handler = inspect.getsource(pso_syncobj.SyncObj._SyncObj__onMessageReceived)
    assert "if message['type'] == 'timeout_now'" in handler and "self.__transferInProgress = True" in handler
    assert "if message['type'] == 'append_entries' and message['term'] >= self.__raftCurrentTerm:" in handler
    for name in ("__getCurrentLogTerm", "__getCurrentLogIndex", "__setCurrentTerm", "__setState",
                 "__generateRaftTimeout", "__connectedToAnyone", "__onMessageReceived"):
        assert callable(getattr(pso_syncobj.SyncObj, "_SyncObj" + name)), name
    assert list(inspect.signature(pso_syncobj.SyncObj._onTick).parameters) == ["self", "timeToWait"]


def test_a_node_registers_the_pre_vote_handler_and_has_the_private_state(tmp_path):
    node = RaftNode(f"127.0.0.1:{free_ports(1)}", [], tmp_path / "n0", PASSWORD, HAND, auto_tick=False)
    try:
        obj = node._obj
        assert isinstance(obj, PreVoteSyncObj)
        callback = obj._SyncObj__transport._onMessageReceivedCallback
        assert callback.__func__ is PreVoteSyncObj._SyncObj__onMessageReceived and callback.__self__ is obj
        for name in ("__raftState", "__raftCurrentTerm", "__raftElectionDeadline", "__transferInProgress",
                     "__selfNode", "__otherNodes", "__transport", "__raftLeader"):
            assert hasattr(obj, "_SyncObj" + name), name
    finally:
        node.close()


def test_stock_pysyncobj_lets_a_timed_out_follower_depose_a_healthy_leader(group):
    """What pre-vote is for: pysyncobj 0.3.17 bumps the term at once, and the leader steps down for it."""
    c = group(prevote=False)
    lead = c.stable_leader()
    before = lead.status()["term"]
    follower = c.others(lead)[0]
    expire_election_timer(follower)
    c.run_until(lambda: min(c.terms()) > before, "the whole group to move to a new term")
    assert follower.status()["term"] > before


# ---- pre-vote ---------------------------------------------------------------------------------------------

def test_a_timed_out_follower_asks_first_and_is_refused_while_the_leader_lives(group):
    c = group()
    lead = c.stable_leader()
    before = c.terms()
    follower = c.others(lead)[0]
    refused = sum(n._obj.prevote.refused for n in c.running)
    won = follower._obj.prevote.rounds_won  # the first election's
    for _ in range(3):
        rounds = follower._obj.prevote.rounds_started
        expire_election_timer(follower)
        c.run_until(lambda: sum(n._obj.prevote.refused for n in c.running) >= refused + 2,
                    "both members to refuse the pre-vote")
        refused += 2
        assert follower._obj.prevote.rounds_started == rounds + 1
    assert follower._obj.prevote.rounds_won == won
    assert c.terms() == before
    assert c.stable_leader() is lead


def test_the_leader_dying_still_elects_a_new_one(group):
    c = group()
    lead = c.stable_leader()
    before = lead.status()["term"]
    c.stop(lead)
    started = c.elapsed_s
    new = c.stable_leader(limit_s=10)
    assert new is not lead and c.elapsed_s - started < 10
    assert new.status()["term"] > before
    assert new._obj.prevote.rounds_won >= 1
    assert c.commit(InitMesh("m", "after", 1.0), via=new)["ok"]


def test_leadership_transfer_skips_the_pre_vote(group):
    c = group()
    lead = c.stable_leader()
    target = c.others(lead)[0]
    won = target._obj.prevote.rounds_won

    def transferred() -> bool:
        if target.is_leader():
            return True
        if lead.is_leader():  # denied while the leader has not seen the target's match index: ask again
            c.settle(lead.transfer_leadership(target.address))
        return False

    c.run_until(transferred, "the target to lead")
    assert target._obj.prevote.rounds_won == won


def test_a_member_behind_the_groups_term_takes_it_from_a_refusal(group):
    c = group()
    lead = c.stable_leader()
    follower = c.others(lead)[0]
    term = lead.status()["term"]
    obj = follower._obj
    obj.prevote.round = 7
    obj.prevote.term = term  # a round that asked for the leader's term, as a member one term behind would
    obj._SyncObj__onMessageReceived(lead._obj._SyncObj__selfNode,
                                    {"type": "pre_vote_response", "round": 7, "term": term + 3, "granted": False})
    assert follower.status()["term"] == term + 3


def test_a_partitioned_follower_rejoins_without_raising_the_term(group):
    c = group()
    lead = c.stable_leader()
    before = c.terms()
    follower = c.others(lead)[0]
    rounds = follower._obj.prevote.rounds_started
    # Shorter than the connection timeout: as under a flaky link, the connections stay up, the messages are lost.
    c.network.isolate(follower.address, c.addresses)
    c.run_for(4 * HAND.election_max_s)
    c.network.heal()
    assert follower._obj.prevote.rounds_started >= rounds + 2  # it kept asking while cut off
    assert c.stable_leader() is lead
    assert c.terms() == before


@pytest.mark.parametrize("change, granted", [
    ({}, True),
    ({"is_leader": True}, False),
    ({"since_leader_s": 0.1}, False),  # heard from a leader within the minimum election timeout
    ({"term": 5}, False),  # asks for a term this member already has
    ({"last_log_term": 3}, False),  # an older last term
    ({"last_log_index": 9}, False),  # the same last term, a shorter log
    ({"last_log_index": 11}, True),
    ({"last_log_term": 5, "last_log_index": 1}, True),
])
def test_should_grant(change, granted):
    args = dict(is_leader=False, since_leader_s=0.5, min_election_s=0.3, own_term=5, own_last_log_term=4,
                own_last_log_index=10, term=6, last_log_term=4, last_log_index=10)
    assert should_grant(**{**args, **change}) is granted


# ---- the claim: restarting a follower under load changes no leader ----------------------------------------

class Load:
    """Proposes SetReplicas to `lead` after every step of the cluster, `per_step` at a time (100 a fake second by
    default), at most `depth` in flight."""

    def __init__(self, cluster: Cluster, lead: RaftNode, depth: int = 8, per_step: int = 1) -> None:
        self.cluster = cluster
        self.lead = lead
        self.depth = depth
        self.per_step = per_step
        self.committed = 0
        self.failed = 0
        self._sent = 0
        self._pending: list[Future] = []

    def __enter__(self) -> "Load":
        self.cluster.on_step(self.pump)
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.remove_hook(self.pump)

    def pump(self) -> None:
        waiting = []
        for f in self._pending:
            if not f.done():
                waiting.append(f)
            elif f.exception() is None:
                self.committed += 1
            elif isinstance(f.exception(), ProposalFailed):  # counted: the claim is on terms
                self.failed += 1
            else:
                raise f.exception()
        self._pending = waiting
        for _ in range(min(self.per_step, self.depth - len(self._pending))):
            self._sent += 1
            self._pending.append(self.lead.propose(SetReplicas("reasoning", self._sent % 60)))


def restart_under_load(root: Path, prevote: bool, restarts: int = 10) -> tuple[list[int], list[int], Load, int]:
    """Restarts the follower the others dial `restarts` times; after each start it hears the other follower but not
    the leader for longer than an election timeout (the leader's packets late or lost, as under load or a
    partial partition). Returns (terms before, terms after, the load, pre-votes refused by the other two)."""
    with Cluster(root, 3, timing=LIVE, prevote=prevote) as c:
        lead = c.stable_leader()
        c.commit(InitMesh("m", "restarts", 1.0))
        before = c.terms()
        i = min(n.address for n in c.others(lead))  # the lower address is dialled
        with Load(c, lead) as load:
            for _ in range(restarts):
                committed = load.committed
                c.run_until(lambda: load.committed >= committed + 20 or not lead.is_leader(), "load between restarts")
                c.stop(i)
                back = c.start(i)
                c.network.cut(back.address, lead.address)
                c.run_for(1.5 * LIVE.election_max_s)
                c.network.heal(back.address, lead.address)
                at = max(n.status()["commit_index"] for n in c.others(back))
                c.run_until(lambda: back.status()["last_applied"] >= at and back.leader() is not None
                            and all(back.partners().values()), "the restarted follower to catch up")
        return before, c.terms(), load, sum(n._obj.prevote.refused for n in c.others(c[i]))


def test_restarting_a_follower_ten_times_under_load_changes_no_leader(tmp_path):
    before, after, load, refused = restart_under_load(tmp_path, prevote=True)
    assert load.committed >= 200
    assert refused >= 10  # each restarted follower did time out and ask, and was told no
    assert after == before  # no election anywhere: every member's term is the one it started with


def test_without_pre_vote_the_same_restarts_depose_the_leader(tmp_path):
    """The claim's control: stock pysyncobj 0.3.17 moves the group to new terms on the same script."""
    before, after, _, _ = restart_under_load(tmp_path, prevote=False, restarts=2)
    assert min(after) > max(before)
