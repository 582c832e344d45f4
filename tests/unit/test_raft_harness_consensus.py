"""Consensus claims on tests/raft_harness.py (real RaftNode, PreVoteSyncObj, journal and apply over an in-memory
network on a fake clock): partitions, a deposed leader's entries, and the Raft paper's safety properties under
seeded random faults. The meshd-level partition test (tests/integration/test_partition.py) keeps what needs real
processes: the HTTP answers of a cut-off member (503, no_leader, Retry-After) and the gateway of the majority."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from raft.commands import InitMesh, SetReplicas
from raft.node import ProposalFailed, RaftTiming
from tests.raft_harness import Cluster

TIMING = RaftTiming()  # production timing (DESIGN.md)
CONNECTION_TIMEOUT_S = max(3.5, TIMING.election_max_s)  # RaftNode's connectionTimeout


def test_a_cut_off_follower_commits_nothing_the_majority_goes_on_and_it_catches_up(tmp_path):
    """tests/integration/test_partition.py's consensus half: the minority cannot write, the majority keeps
    committing, the minority catches up when the partition heals."""
    with Cluster(tmp_path) as c:
        lead = c.stable_leader()
        c.commit(InitMesh("m", "partition", 1.0))
        cut = c.others(lead)[0]
        c.network.isolate(cut.address, c.addresses)
        c.run_for(CONNECTION_TIMEOUT_S + 1.0)
        assert not cut.status()["has_quorum"] and not any(cut.partners().values())
        refused = cut.propose(SetReplicas("reasoning", 9))
        for i in range(5):
            assert c.commit(SetReplicas("reasoning", i + 1), via=lead)["ok"]  # the majority serves
        assert lead.is_leader() and lead.status()["has_quorum"]
        c.run_for(5.0)
        assert not refused.done() or isinstance(refused.exception(), ProposalFailed)
        assert cut.state.replicas.get("reasoning") is None and cut.state.applied == 1
        majority_commit = lead.status()["commit_index"]

        c.network.heal()
        c.run_until(lambda: cut.status()["has_quorum"] and cut.status()["commit_index"] >= majority_commit
                    and cut.state.applied >= lead.state.applied, "the cut-off member to catch up", 10)
        assert cut.state.replicas == lead.state.replicas
        assert c.settled() is lead  # pre-vote: the rejoining member deposed nobody


def cut_off_follower_leader(tmp_path, prevote: bool) -> str | None:
    with Cluster(tmp_path, prevote=prevote) as c:
        lead = c.stable_leader()
        cut = c.others(lead)[0]
        c.network.isolate(cut.address, c.addresses)
        c.run_for(CONNECTION_TIMEOUT_S + 2.0)
        return cut.leader()


def test_with_stock_elections_a_cut_off_follower_forgets_its_leader(tmp_path):
    assert cut_off_follower_leader(tmp_path, prevote=False) is None


def test_with_pre_vote_a_cut_off_follower_forgets_its_leader(tmp_path):
    assert cut_off_follower_leader(tmp_path, prevote=True) is None


def test_an_isolated_leader_steps_down_its_uncommitted_entry_is_discarded_and_it_follows_the_new_leader(tmp_path):
    """Raft §5.3-5.4: a leader cut off from the majority commits nothing; the majority elects a leader of a higher
    term; on healing the old leader's uncommitted entry is replaced by the new leader's log."""
    with Cluster(tmp_path) as c:
        old = c.stable_leader()
        c.commit(InitMesh("m", "isolated", 1.0))
        old_term = old.status()["term"]
        c.network.isolate(old.address, c.addresses)
        lost = old.propose(SetReplicas("reasoning", 7))  # appended at the old leader only
        c.run_until(lambda: not old.is_leader(), "the old leader to step down", TIMING.leader_fallback_s + 0.1)
        rest = c.others(old)
        new = c.stable_leader(rest, limit_s=10)
        assert new.status()["term"] > old_term
        assert c.commit(SetReplicas("reasoning", 2), via=new)["ok"]

        c.network.heal()
        c.run_until(lambda: c.settled() is new and old.state.applied == new.state.applied, "the old leader to follow",
                    10)
        assert lost.done() and isinstance(lost.exception(), ProposalFailed)
        assert old.state == new.state and old.state.replicas["reasoning"] == 2


@pytest.mark.parametrize("seed", [1, 2])
def test_election_and_state_machine_safety_under_random_faults(tmp_path, seed):
    """Raft §5.2 Election Safety (at most one leader per term) and §5.4.3 State Machine Safety (every member applies
    the same commands in the same order; an acknowledged command keeps its place) while a seeded script cuts, heals,
    stops and restarts members of five, on links that lose 5% of messages."""
    script = random.Random(seed)
    leaders_of_term: dict[int, set[str]] = defaultdict(set)
    acked: dict[int, int] = {}  # applied index -> the value of the acknowledged SetReplicas there
    with Cluster(tmp_path, 5, seed=seed) as c:
        a = c.addresses
        for i, x in enumerate(a):
            for y in a[i + 1:]:
                c.network.drop(x, y, 0.05)
        c.commit(InitMesh("m", "fuzz", 1.0), via=c.stable_leader())
        pending = []

        def watch() -> None:
            for n in c.running:
                if n.is_leader():
                    leaders_of_term[n.status()["term"]].add(n.address)
            lead = next((n for n in c.running if n.is_leader()), None)
            if lead is not None and c.steps % 5 == 0:
                value = c.steps % 60
                pending.append((value, lead.propose(SetReplicas("reasoning", value))))

        c.on_step(watch)
        for _ in range(16):
            victim = script.choice(a)
            action = script.choice(["cut", "isolate", "heal", "restart"])
            if action == "cut":
                c.network.cut(victim, script.choice([x for x in a if x != victim]))
            elif action == "isolate":
                c.network.isolate(victim, a)
            elif action == "heal":
                c.network.heal()
            elif c.nodes[victim] is not None and len(c.running) > 3:
                c.stop(victim)
            elif c.nodes[victim] is None:
                c.start(victim)
            c.run_for(script.uniform(0.2, 1.0))
        c.remove_hook(watch)
        c.network.heal()
        for x in a:
            if c.nodes[x] is None:
                c.start(x)
        lead = c.stable_leader(limit_s=20)
        c.commit(SetReplicas("reasoning", 61), via=lead)
        c.run_until(lambda: all(n.state.applied == lead.state.applied for n in c.running), "every member to apply",
                    10)

        assert all(len(who) == 1 for who in leaders_of_term.values()), dict(leaders_of_term)
        assert len(leaders_of_term) >= 2  # the script did force elections
        assert len({repr(n.state) for n in c.running}) == 1
        for value, future in pending:
            if future.done() and future.exception() is None:
                index = future.result()["applied"]
                assert acked.setdefault(index, value) == value, f"two acknowledged commands at applied {index}"
        assert acked and max(acked) <= lead.state.applied
