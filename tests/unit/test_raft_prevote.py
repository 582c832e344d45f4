"""raft/prevote.py: pre-vote and leader stickiness on pysyncobj 0.3.17, so that a restarted or partitioned
member never deposes a healthy leader (Raft thesis §9.6).

Hand-ticked groups (auto_tick=False, the test thread ticks every member) check the mechanism step by step;
the restart claim runs real tick threads under load over loopback.
"""

from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import pysyncobj
import pysyncobj.syncobj as pso_syncobj
import pytest

from raft.commands import InitMesh, SetReplicas
from raft.node import ProposalFailed, RaftNode, RaftTiming
from raft.prevote import PreVoteSyncObj, should_grant
from tests.procs import free_ports

PASSWORD = "prevote-test-secret"
HAND = RaftTiming(heartbeat_s=0.02, election_min_s=0.15, election_max_s=0.3, connection_retry_s=0.1,
                  leader_fallback_s=0.4)
# The restart test runs real tick threads on a shared 2-core machine: the production timing (DESIGN.md).
LIVE = RaftTiming(heartbeat_s=0.05, election_min_s=0.3, election_max_s=0.6, connection_retry_s=0.5,
                  leader_fallback_s=0.6)


def addresses(count: int = 3) -> list[str]:
    base = free_ports(count)
    return [f"127.0.0.1:{base + i}" for i in range(count)]


def start(root: Path, addrs: list[str], i: int, timing: RaftTiming = HAND, auto_tick: bool = False,
          prevote: bool = True) -> RaftNode:
    return RaftNode(addrs[i], [a for a in addrs if a != addrs[i]], root / f"n{i}", PASSWORD, timing,
                    auto_tick=auto_tick, prevote=prevote)


def tick_until(nodes, condition, what: str, limit_s: float = 20.0):
    deadline = time.monotonic() + limit_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {[n.status() for n in nodes]}")
        for n in nodes:
            n.tick(0.005)


def one_leader(nodes) -> RaftNode:
    def ready():
        leaders = [n for n in nodes if n.is_leader()]
        return len(leaders) == 1 and all(n.is_ready() and n.leader() == leaders[0].address for n in nodes) \
            and all(n.partners().get(m.address) for n in nodes for m in nodes if m is not n)
    tick_until(nodes, ready, "one leader that every member follows")
    return next(n for n in nodes if n.is_leader())


def terms(nodes) -> list[int]:
    return [n.status()["term"] for n in nodes]


def expire_election_timer(node: RaftNode) -> None:
    """As if `node` had heard nothing for an election timeout (a pause, a partition, a late start)."""
    node._obj._SyncObj__raftElectionDeadline = 0


@pytest.fixture
def group(tmp_path):
    made: list[RaftNode] = []

    def make(prevote: bool = True, count: int = 3) -> list[RaftNode]:
        addrs = addresses(count)
        made.extend(start(tmp_path, addrs, i, prevote=prevote) for i in range(count))
        return made

    yield make
    for n in made:
        n.close()


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
    node = start(tmp_path, addresses(1), 0)
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
    nodes = group(prevote=False)
    lead = one_leader(nodes)
    before = lead.status()["term"]
    follower = next(n for n in nodes if n is not lead)
    expire_election_timer(follower)
    tick_until(nodes, lambda: min(terms(nodes)) > before, "the whole group to move to a new term")
    assert follower.status()["term"] > before


# ---- pre-vote ---------------------------------------------------------------------------------------------

def test_a_timed_out_follower_asks_first_and_is_refused_while_the_leader_lives(group):
    nodes = group()
    lead = one_leader(nodes)
    before = terms(nodes)
    follower = next(n for n in nodes if n is not lead)
    refused = sum(n._obj.prevote.refused for n in nodes)
    won = follower._obj.prevote.rounds_won  # the first election's
    for _ in range(3):
        rounds = follower._obj.prevote.rounds_started
        expire_election_timer(follower)
        tick_until(nodes, lambda: sum(n._obj.prevote.refused for n in nodes) >= refused + 2,
                   "both members to refuse the pre-vote")
        refused += 2
        assert follower._obj.prevote.rounds_started == rounds + 1
    assert follower._obj.prevote.rounds_won == won
    assert terms(nodes) == before
    assert one_leader(nodes) is lead


def test_the_leader_dying_still_elects_a_new_one(group):
    nodes = group()
    lead = one_leader(nodes)
    before = lead.status()["term"]
    lead.close()
    rest = [n for n in nodes if n is not lead]
    started = time.monotonic()
    new = one_leader(rest)
    assert new is not lead and time.monotonic() - started < 10
    assert new.status()["term"] > before
    assert new._obj.prevote.rounds_won >= 1
    future = new.propose(InitMesh("m", "after", 1.0))
    tick_until(rest, future.done, "a commit under the new leader")
    assert future.result(timeout=0)["ok"]


def test_leadership_transfer_skips_the_pre_vote(group):
    nodes = group()
    lead = one_leader(nodes)
    target = next(n for n in nodes if n is not lead)
    won = target._obj.prevote.rounds_won

    def transferred() -> bool:
        if target.is_leader():
            return True
        if lead.is_leader():  # denied while the leader has not seen the target's match index: ask again
            future = lead.transfer_leadership(target.address)
            tick_until(nodes, future.done, "the transfer request")
        return False

    tick_until(nodes, transferred, "the target to lead")
    assert target._obj.prevote.rounds_won == won


def test_a_member_behind_the_groups_term_takes_it_from_a_refusal(group):
    nodes = group()
    lead = one_leader(nodes)
    follower = next(n for n in nodes if n is not lead)
    term = lead.status()["term"]
    obj = follower._obj
    obj.prevote.round = 7
    obj.prevote.term = term  # a round that asked for the leader's term, as a member one term behind would
    obj._SyncObj__onMessageReceived(lead._obj._SyncObj__selfNode,
                                    {"type": "pre_vote_response", "round": 7, "term": term + 3, "granted": False})
    assert follower.status()["term"] == term + 3


def test_a_partitioned_follower_rejoins_without_raising_the_term(group):
    nodes = group()
    lead = one_leader(nodes)
    before = terms(nodes)
    follower = next(n for n in nodes if n is not lead)
    rounds = follower._obj.prevote.rounds_started
    cuts = [Cut(follower, n.address, 4 * HAND.election_max_s) for n in nodes if n is not follower]
    tick_until(nodes, lambda: time.monotonic() > cuts[0].until, "the partition to heal")
    assert follower._obj.prevote.rounds_started >= rounds + 2  # it kept asking while cut off
    assert one_leader(nodes) is lead
    assert terms(nodes) == before


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
    """Proposes SetReplicas to `lead`, at most `depth` in flight, until stopped."""

    def __init__(self, lead: RaftNode, depth: int = 8) -> None:
        self.lead = lead
        self.depth = depth
        self.committed = 0
        self.failed = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raft-load", daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors

    def _run(self) -> None:
        pending: set[Future] = set()
        i = 0
        try:
            while not self._stop.is_set():
                if len(pending) >= self.depth:
                    wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                else:
                    i += 1
                    pending.add(self.lead.propose(SetReplicas("reasoning", i % 60)))
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    if f.exception() is None:
                        self.committed += 1
                    elif isinstance(f.exception(), ProposalFailed):  # counted: the claim is on terms
                        self.failed += 1
                    else:
                        raise f.exception()
        except BaseException as exc:  # handed to the test thread, which fails with it
            self.errors.append(exc)


def wait_for(condition, what: str, limit_s: float = 20.0, nodes=()):
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {[n.status() for n in nodes]}")
        time.sleep(0.01)


class Cut:
    """Drops every message between `node` and `peer` (both ways, on `node`'s side; the TCP connection stays up)
    until `until` (monotonic): a member that hears the rest of the group but not that peer."""

    def __init__(self, node: RaftNode, peer: str, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        self.dropped = 0
        transport = node._obj._SyncObj__transport
        deliver, send = transport._onMessageReceivedCallback, transport.send

        def filtered_deliver(sender, message):
            if sender.address == peer and time.monotonic() < self.until:
                self.dropped += 1
                return None
            return deliver(sender, message)

        def filtered_send(to, message):
            if to.address == peer and time.monotonic() < self.until:
                self.dropped += 1
                return False
            return send(to, message)

        transport._onMessageReceivedCallback = filtered_deliver  # both looked up by name at each call
        transport.send = filtered_send


def restart_under_load(tmp_path: Path, prevote: bool, restarts: int = 10) -> tuple[list[int], list[int], Load]:
    """Restarts the follower the others dial `restarts` times; after each start it hears the other follower but not
    the leader for longer than an election timeout (the leader's packets late or lost, as under load or a
    partial partition). Returns (terms before, terms after, the load) and leaves nothing running."""
    addrs = addresses(3)
    nodes = [start(tmp_path, addrs, i, LIVE, auto_tick=True, prevote=prevote) for i in range(3)]
    try:
        wait_for(lambda: sum(n.is_leader() for n in nodes) == 1 and all(n.is_ready() for n in nodes),
                 "a leader", nodes=nodes)
        lead = next(n for n in nodes if n.is_leader())
        lead.propose(InitMesh("m", "restarts", 1.0)).result(timeout=10)
        wait_for(lambda: all(all(n.partners().values()) for n in nodes), "a fully connected group", nodes=nodes)
        before = terms(nodes)
        i = min((i for i, n in enumerate(nodes) if n is not lead), key=lambda i: addrs[i])
        with Load(lead) as load:
            for _ in range(restarts):
                committed = load.committed
                wait_for(lambda: load.committed >= committed + 20 or not lead.is_leader(), "load between restarts",
                         nodes=nodes)
                nodes[i].close()
                nodes[i] = start(tmp_path, addrs, i, LIVE, auto_tick=True, prevote=prevote)
                cut = Cut(nodes[i], lead.address, 1.5 * LIVE.election_max_s)
                wait_for(lambda: time.monotonic() > cut.until, "the cut to heal", nodes=nodes)
                at = max(n.status()["commit_index"] for n in nodes if n is not nodes[i])
                back = nodes[i]
                wait_for(lambda: back.status()["last_applied"] >= at and back.leader() is not None
                         and all(back.partners().values()), "the restarted follower to catch up", nodes=nodes)
        return before, terms(nodes), load
    finally:
        for n in nodes:
            n.close()


def test_restarting_a_follower_ten_times_under_load_changes_no_leader(tmp_path):
    before, after, load = restart_under_load(tmp_path, prevote=True)
    assert load.committed >= 200
    assert after == before  # no election anywhere: every member's term is the one it started with


def test_without_pre_vote_the_same_restarts_depose_the_leader(tmp_path):
    """The claim's control: stock pysyncobj 0.3.17 moves the group to new terms on the same script."""
    before, after, _ = restart_under_load(tmp_path, prevote=False, restarts=2)
    assert min(after) > max(before)
