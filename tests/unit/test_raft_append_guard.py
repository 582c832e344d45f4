"""raft/append_guard.py: a follower deletes entries only from the first one that conflicts (Raft §5.3), not every
entry after prevLogIdx as pysyncobj 0.3.17 does. The rule itself, then a real follower (tests/raft_harness.py: real
RaftNode and PreVoteSyncObj on an in-memory network) sent again a range it holds, as a leader does after a reset."""

from __future__ import annotations

import logging

from raft.append_guard import trim
from raft.commands import SetReplicas
from tests.raft_harness import Cluster
from tests.unit.test_raft_prevote import HAND

OURS = [(b"p", 10, 2), (b"a", 11, 2), (b"b", 12, 2), (b"c", 13, 3), (b"d", 14, 3)]  # from prevLogIdx 10 on


def append(prev: int, prev_term: int, *entries: tuple) -> dict:
    return {"type": "append_entries", "term": 3, "commit_index": 14, "prevLogIdx": prev, "prevLogTerm": prev_term,
            "entries": list(entries)}


def test_a_range_held_already_is_answered_without_deleting_what_follows():
    assert trim(append(10, 2, (b"a", 11, 2), (b"b", 12, 2)), OURS) == ("known", 12)
    assert trim(append(10, 2), OURS) == ("known", 10)  # a heartbeat behind this log vouches for index 10 only


def test_held_entries_are_dropped_so_only_a_conflict_deletes():
    action, message = trim(append(10, 2, (b"a", 11, 2), (b"B", 12, 4), (b"C", 13, 4)), OURS)
    assert action == "pass"
    assert (message["prevLogIdx"], message["prevLogTerm"], message["entries"]) == (11, 2, [(b"B", 12, 4),
                                                                                          (b"C", 13, 4)])
    action, message = trim(append(10, 2, *OURS[1:], (b"e", 15, 3)), OURS)  # beyond this log: appended after 14
    assert action == "pass" and message["prevLogIdx"] == 14 and message["entries"] == [(b"e", 15, 3)]


def test_what_stays_pysyncobjs_to_handle():
    first_conflicts = append(10, 2, (b"A", 11, 4))
    assert trim(first_conflicts, OURS) == ("pass", first_conflicts)
    other_term_at_prev = append(10, 1, (b"a", 11, 2))
    assert trim(other_term_at_prev, OURS) == ("pass", other_term_at_prev)  # pysyncobj refuses it and resets
    nothing_beyond = append(14, 3, (b"e", 15, 3))
    assert trim(nothing_beyond, OURS[-1:]) == ("pass", nothing_beyond)
    chunked = {**append(10, 2), "transmission": "start", "data": b"x"}
    assert trim(chunked, OURS) == ("pass", chunked)


def test_a_follower_sent_a_range_it_holds_keeps_its_log_and_commit(tmp_path, caplog):
    with Cluster(tmp_path, 3, timing=HAND) as c:
        lead = c.stable_leader()
        futures = [lead.propose(SetReplicas("reasoning", n)) for n in range(1, 9)]
        c.run_until(lambda: all(f.done() for f in futures), "eight commands to commit")
        follower = c.others(lead)[0]
        obj = follower._obj
        c.run_until(lambda: obj._SyncObj__raftCommitIndex == lead._obj._SyncObj__raftCommitIndex,
                    "the follower to learn the commit index")
        last, commit = obj._SyncObj__getCurrentLogIndex(), obj._SyncObj__raftCommitIndex
        held = obj._SyncObj__getEntries(last - 5)
        stale = {"type": "append_entries", "term": lead.status()["term"], "commit_index": commit,
                 "prevLogIdx": held[0][1], "prevLogTerm": held[0][2], "entries": held[1:3]}
        with caplog.at_level(logging.CRITICAL):
            obj._SyncObj__onMessageReceived(lead._obj._SyncObj__selfNode, stale)
        assert obj._SyncObj__getCurrentLogIndex() == last
        assert obj._SyncObj__raftCommitIndex == commit
        assert not [r for r in caplog.records if "truncating" in r.getMessage()]
        done = lead.propose(SetReplicas("reasoning", 2))  # and the group goes on
        c.run_until(done.done, "one more command")
        c.run_until(lambda: obj._SyncObj__raftLastApplied == last + 1, "the follower to apply it")
        assert follower.state == lead.state
