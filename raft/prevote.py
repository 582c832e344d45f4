"""Pre-vote for pysyncobj 0.3.17 (Raft thesis §9.6): a member whose election timer runs out first asks the
others whether they would vote for it, without touching its term; only when a majority says yes does
pysyncobj run its real election (term + 1, request_vote). So a restarted or partitioned member, whose timer
runs out before it hears from the leader, never raises the group's term and never deposes a healthy leader.

A member grants a pre-vote (`should_grant`) only when it is not the leader, has not heard from a leader for
at least the minimum election timeout (leader stickiness: every follower of a live leader says no), and the
candidate's log is at least as up to date as its own. A refusal carries the refuser's term; a candidate
behind it adopts that term (as etcd does), so a member with an old term and a member with an old log cannot
refuse each other forever. A leadership transfer (pysyncobj's 'timeout_now') skips the pre-vote: the leader
asked for that election, and stock request_vote handling (no stickiness there) lets it through.

`PreVoteSyncObj` is SyncObj with two overrides, both tied to pysyncobj 0.3.17's private names (pinned by
tests/unit/test_raft_prevote.py; `PINNED_PYSYNCOBJ` refuses any other version):
- `_onTick`: before SyncObj's tick, when the election condition of SyncObj._onTick holds (follower or
  candidate, `__raftElectionDeadline` passed, connected to anyone, transport ready, no transfer pending),
  the deadline is pushed one election timeout on and a pre-vote round is sent instead; when a round wins,
  the deadline is set to 0 and SyncObj's own code runs the election on that tick.
- `_SyncObj__onMessageReceived` (the callback SyncObj.__init__ hands the transport, looked up on the
  instance, so this subclass's attribute is the one registered): takes 'pre_vote' and 'pre_vote_response'
  itself, notes leader contact (an append_entries SyncObj will accept), keeps entries it already holds from
  pysyncobj's truncation (raft/append_guard.py), and hands everything else on.
The two message types are in raft/wire.py's schema. Every member must run this code: a member without it
refuses 'pre_vote' frames (unknown type) and drops the connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.syncobj import _RAFT_STATE
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from raft import append_guard

log = logging.getLogger("quorum.raft.prevote")

PINNED_PYSYNCOBJ = "0.3.17"
NEVER = float("-inf")


def should_grant(*, is_leader: bool, since_leader_s: float, min_election_s: float, own_term: int,
                 own_last_log_term: int, own_last_log_index: int, term: int, last_log_term: int,
                 last_log_index: int) -> bool:
    """Whether a member answers yes to a pre-vote for `term` (the candidate's term + 1)."""
    if is_leader or since_leader_s < min_election_s:
        return False  # a live leader: the candidate is the one out of touch
    if term <= own_term:
        return False  # the candidate is behind this member's term (the refusal tells it the term)
    return (last_log_term, last_log_index) >= (own_last_log_term, own_last_log_index)


@dataclass
class PreVoteRound:
    """The pre-vote state of one member (touched only on its tick thread)."""
    round: int = 0
    term: int = 0  # the term the current round asks for
    grants: set = field(default_factory=set)
    won_at: float = NEVER
    leader_contact: float = NEVER
    rounds_started: int = 0  # counters for tests and metrics
    rounds_won: int = 0
    refused: int = 0  # pre-votes this member refused


class PreVoteSyncObj(SyncObj):
    """SyncObj with pre-vote and leader stickiness. `prevote=False` gives stock pysyncobj elections
    (benchmarks compare the two)."""

    def __init__(self, *args, prevote: bool = True, **kwargs) -> None:
        if PYSYNCOBJ_VERSION != PINNED_PYSYNCOBJ:
            raise RuntimeError(f"raft.prevote overrides private parts of pysyncobj {PINNED_PYSYNCOBJ}'s SyncObj; "
                               f"found {PYSYNCOBJ_VERSION}: re-check SyncObj._onTick and __onMessageReceived")
        # Set before SyncObj.__init__, which may start the tick thread.
        self.prevote_enabled = prevote
        self.prevote = PreVoteRound()
        super().__init__(*args, **kwargs)

    # ---- what SyncObj keeps under private names (pysyncobj 0.3.17) --------------------------------------

    def _term(self) -> int:
        return self._SyncObj__raftCurrentTerm

    def _last_log(self) -> tuple[int, int]:
        return self._SyncObj__getCurrentLogTerm(), self._SyncObj__getCurrentLogIndex()

    def _majority(self, votes: int) -> bool:
        return votes > (len(self._SyncObj__otherNodes) + 1) / 2

    def _send(self, node, message: dict) -> None:
        self._SyncObj__transport.send(node, message)

    # ---- the election gate --------------------------------------------------------------------------------

    def _onTick(self, timeToWait=0.0):
        if self.prevote_enabled:
            self._gate_election()
        super()._onTick(timeToWait)

    def _gate_election(self) -> None:
        now = monotonic_time()
        state = self._SyncObj__raftState
        if state == _RAFT_STATE.LEADER:
            self.prevote.leader_contact = now
            return
        if state not in (_RAFT_STATE.FOLLOWER, _RAFT_STATE.CANDIDATE) or self._SyncObj__selfNode is None:
            return
        if self._SyncObj__raftElectionDeadline >= now or not self._SyncObj__connectedToAnyone() \
                or not self._SyncObj__transport.ready:
            return
        if self._SyncObj__transferInProgress:
            return  # the leader's 'timeout_now': its election, no pre-vote
        won = self.prevote.won_at > self.prevote.leader_contact \
            and now - self.prevote.won_at < self.conf.raftMinTimeout
        if not won:
            won = self._start_round(now)
        if won:
            self.prevote.won_at = NEVER
            self._SyncObj__raftElectionDeadline = 0  # SyncObj._onTick runs its election on this tick
        else:
            self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()

    def _start_round(self, now: float) -> bool:
        """Sends a pre-vote round; True when this member alone is a majority (a group of one)."""
        p = self.prevote
        p.round += 1
        p.rounds_started += 1
        p.term = self._term() + 1
        p.grants = {self._SyncObj__selfNode}
        # The leader is no longer heard (that is why the timer ran out): forget it, as a stock election
        # does (syncobj.py:638) and etcd's pre-candidate does, so status and the gateway say "no leader"
        # instead of sending to one that is gone.
        self._SyncObj__raftLeader = None
        if self._majority(1):
            p.rounds_won += 1
            return True
        last_term, last_index = self._last_log()
        message = {"type": "pre_vote", "term": p.term, "round": p.round, "last_log_index": last_index,
                   "last_log_term": last_term}
        for node in self._SyncObj__otherNodes:
            self._send(node, message)
        return False

    # ---- messages -----------------------------------------------------------------------------------------

    def _SyncObj__onMessageReceived(self, node, message):
        kind = message["type"]
        if kind == "pre_vote":
            self._on_pre_vote(node, message)
            return
        if kind == "pre_vote_response":
            self._on_pre_vote_response(node, message)
            return
        if kind == "append_entries" and message["term"] >= self._term():
            self.prevote.leader_contact = monotonic_time()  # SyncObj takes this sender as its leader
            if message.get("prevLogIdx", self._log_index()) < self._log_index():  # raft/append_guard.py
                action, value = append_guard.trim(message, self._SyncObj__getEntries(message["prevLogIdx"]))
                if action == "known":  # all held already: no truncation, success up to what it vouched for
                    beat = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries")}
                    beat["commit_index"] = min(message["commit_index"], value)
                    SyncObj._SyncObj__onMessageReceived(self, node, beat)  # term, leader, timer, commit index
                    self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=value + 1, success=True)
                    return
                message = value
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _log_index(self) -> int:
        return self._SyncObj__getCurrentLogIndex()

    def _on_pre_vote(self, node, message: dict) -> None:
        if self._SyncObj__selfNode is None:
            return
        last_term, last_index = self._last_log()
        granted = should_grant(is_leader=self._SyncObj__raftState == _RAFT_STATE.LEADER,
                               since_leader_s=monotonic_time() - self.prevote.leader_contact,
                               min_election_s=self.conf.raftMinTimeout, own_term=self._term(),
                               own_last_log_term=last_term, own_last_log_index=last_index, term=message["term"],
                               last_log_term=message["last_log_term"], last_log_index=message["last_log_index"])
        if not granted:
            self.prevote.refused += 1
        self._send(node, {"type": "pre_vote_response", "round": message["round"], "term": self._term(),
                          "granted": granted})

    def _on_pre_vote_response(self, node, message: dict) -> None:
        p = self.prevote
        state = self._SyncObj__raftState
        if state not in (_RAFT_STATE.FOLLOWER, _RAFT_STATE.CANDIDATE) or message["round"] != p.round:
            return  # an answer to an earlier round, or this member has become leader meanwhile
        if not message["granted"]:
            if message["term"] > self._term():
                # Behind the group's term: take it (as SyncObj does on a request_vote of a higher term) so the
                # next round asks for a term the others can grant.
                self._SyncObj__setCurrentTerm(message["term"], None)
                self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
                self._SyncObj__raftLeader = None
            return
        if p.term != self._term() + 1:
            return  # this member's term moved since the round began: the grant was for another term
        p.grants.add(node)
        if self._majority(len(p.grants)):
            p.rounds_won += 1
            p.won_at = monotonic_time()
            p.round += 1  # later answers to this round count for nothing
            self._SyncObj__raftElectionDeadline = 0
            log.info("pre-vote for term %d won (%d of %d)", p.term, len(p.grants),
                     len(self._SyncObj__otherNodes) + 1)
