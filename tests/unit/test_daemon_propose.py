"""A member's start-up proposals survive an election at that moment (seen in CI: pre-vote at start, AddMember
answered `leader_changed`, and the whole meshd ended). NodeDaemon.propose_until_taken tries again while the
log cannot take a command, stops at a Rejected one, and does not propose twice what a lost answer committed."""

from __future__ import annotations

import asyncio

import pytest

from mesh.node.daemon import NodeDaemon
from raft.node import ProposalFailed
from raft.state import Rejected


class Log:
    """The daemon's propose() with a scripted outcome per call (what the Raft node answered)."""

    def __init__(self, *outcomes) -> None:
        self.outcomes, self.calls = list(outcomes), 0

    async def propose(self, cmd, timeout: float = 30.0) -> dict:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def until_taken(log: Log, **kw):
    return asyncio.run(NodeDaemon.propose_until_taken(log, "cmd", **kw))


def test_a_leader_change_and_a_timeout_are_tried_again():
    log = Log(ProposalFailed("leader_changed"), TimeoutError(), {"ok": 1})
    assert until_taken(log) == {"ok": 1} and log.calls == 3


def test_a_rejected_command_is_not_tried_again():
    log = Log(Rejected("a member named 'a' already exists"), {"ok": 1})
    with pytest.raises(Rejected):
        until_taken(log)
    assert log.calls == 1


def test_a_command_committed_despite_its_lost_answer_is_not_proposed_again():
    log = Log(ProposalFailed("leader_changed"), {"ok": 1})
    assert until_taken(log, applied=lambda: True) == {} and log.calls == 1


def test_it_gives_up_after_its_time():
    log = Log(*[ProposalFailed("no_leader")] * 50)
    with pytest.raises(ProposalFailed):
        until_taken(log, within_s=0.5)
    assert 2 <= log.calls < 10


def test_a_lost_answer_that_commits_after_the_retry_was_sent_is_not_an_error():
    """The first try's answer was lost, the retry went out, then the first committed: the retry is Rejected
    ("already exists"), and the command is done."""
    log = Log(ProposalFailed("leader_changed"), Rejected("admin credential id c1 already exists"))
    seen = iter([False, True])  # not yet applied before the retry; applied when the retry is refused
    assert until_taken(log, applied=lambda: next(seen)) == {} and log.calls == 2
