"""mesh/replicas/failover.py: a lost replica's choice resumes elsewhere and the client sees each token once."""

from __future__ import annotations

import asyncio

from mesh.replicas.failover import ResumableRun, ResumeAt, single_choice
from shards.types import Failed, Finished, GenerateRequest, Opened, Piece, Sampling


def opened(events, choices=1) -> Opened:
    async def gen():
        for e in events:
            yield e

    return Opened(prompt_tokens=5, choices=choices, events=gen(), cancel=lambda: None)


def resumable(request: GenerateRequest, node_id: str, first: Opened, reopen) -> ResumableRun:
    """A run whose lost choices are reopened as the gateway does: `request`'s choice alone, going on
    from what was passed on (`reopen(single-choice request, avoid)` stands for admission)."""
    return ResumableRun(node_id, first, lambda at, avoid: reopen(single_choice(request, at), avoid))


def collect(run: ResumableRun) -> list:
    async def main():
        return [e async for e in run.events()]
    return asyncio.run(main())


LOST = Failed("connection reset", retryable=True)


def test_a_lost_choice_resumes_and_replayed_text_is_dropped():
    asked = []

    async def reopen(req, avoid):
        asked.append((req, avoid))
        return "n2", opened([(0, Piece("ab", (1, 2))), (0, Piece("cd", (3, 4))), (0, Finished("stop", 5, 4))])

    first = opened([(0, Piece("ab", (1, 2))), (0, Piece("c", (3,))), (0, LOST)])
    run = resumable(GenerateRequest(Sampling(seed=7), messages=()), "n1", first, reopen)
    events = collect(run)
    assert [e.text for _, e in events if isinstance(e, Piece)] == ["ab", "c", "d"]
    assert [e for _, e in events if isinstance(e, Finished)] == [Finished("stop", 5, 4)]
    req, avoid = asked[0]
    assert req.resume_tokens == (1, 2, 3) and req.first_choice == 0 and req.n == 1
    assert avoid == {"n1"}


def test_later_choices_run_fresh_after_a_resumed_one():
    asked = []

    async def reopen(req, avoid):
        asked.append(req)
        replay = [(0, Piece("a", (1,)))] if req.resume_tokens else []
        return "n2", opened([*replay, (0, Piece("z", (9,))), (0, Finished("stop", 5, 1))])

    first = opened([(0, Piece("a", (1,))), (0, LOST)], choices=2)
    run = resumable(GenerateRequest(Sampling(seed=7), n=2, prompts=("p",)), "n1", first, reopen)
    events = collect(run)
    assert [(i, type(e).__name__) for i, e in events] == [(0, "Piece"), (0, "Piece"), (0, "Finished"),
                                                         (1, "Piece"), (1, "Finished")]
    assert [(r.first_choice, r.resume_tokens) for r in asked] == [(0, (1,)), (1, ())]


def test_a_failure_that_is_not_a_lost_replica_passes_through():
    async def reopen(req, avoid):
        raise AssertionError("must not resume")

    run = resumable(GenerateRequest(Sampling()), "n1", opened([(0, Failed("bug"))]), reopen)
    assert collect(run) == [(0, Failed("bug"))]


def test_no_replica_left_ends_the_choice_with_an_error():
    async def reopen(req, avoid):
        raise LookupError("no ready replica")

    run = resumable(GenerateRequest(Sampling()), "n1", opened([(0, Piece("a", (1,))), (0, LOST)]), reopen)
    events = collect(run)
    assert isinstance(events[-1][1], Failed) and "no other could resume" in events[-1][1].message


def test_failovers_are_bounded():
    calls = []

    async def reopen(req, avoid):
        calls.append(set(avoid))
        return f"n{len(calls) + 1}", opened([(0, LOST)])

    run = resumable(GenerateRequest(Sampling()), "n1", opened([(0, LOST)]), reopen)
    events = collect(run)
    assert len(calls) == 3 and calls[-1] == {"n1", "n2", "n3"}
    assert events == [(0, LOST)]


def test_a_resume_logs_where_its_gap_went(caplog):
    async def reopen(req, avoid):
        return "n2", opened([(0, Piece("ab", (1, 2))), (0, Piece("c", (3,))), (0, Finished("stop", 5, 3))])

    first = opened([(0, Piece("a", (1,))), (0, LOST)])
    with caplog.at_level("INFO", logger="quorum.failover"):
        events = collect(resumable(GenerateRequest(Sampling(temperature=0.0)), "n1", first, reopen))
    assert [e.text for _, e in events if isinstance(e, Piece)] == ["a", "b", "c"]
    [line] = [r.getMessage() for r in caplog.records if "resumed on" in r.getMessage()]
    assert line.startswith("choice 0 resumed on n2, 1 tokens replayed: first new piece ")
    assert "loss noticed at" in line and "admitted at" in line and "nan" not in line


def test_the_latest_kv_checkpoint_is_kept_stripped_and_sent_on_resume():
    asked = []

    async def reopen(req, avoid):
        asked.append(req)
        return "n2", opened([(0, Piece("abcd", (1, 2, 3, 4))), (0, Piece("e", (5,))), (0, Finished("stop", 5, 5))])

    first = opened([(0, Piece("ab", (1, 2), kv=b"old", kv_tokens=6)), (0, Piece("c", (3,))),
                    (0, Piece("d", (4,), kv=b"new", kv_tokens=8)), (0, LOST)])
    run = resumable(GenerateRequest(Sampling(temperature=0.0)), "n1", first, reopen)
    events = collect(run)
    pieces = [e for _, e in events if isinstance(e, Piece)]
    assert [p.text for p in pieces] == ["ab", "c", "d", "e"]
    assert all(p.kv == b"" and p.kv_tokens == 0 for p in pieces), "the client never sees a checkpoint"
    [req] = asked
    assert req.resume_tokens == (1, 2, 3, 4)
    assert (req.resume_kv, req.resume_kv_tokens) == (b"new", 8)
    assert run.checkpoints == {}, "a finished choice's checkpoint is let go"


def test_a_checkpoint_belongs_to_its_choice_and_a_resumed_replica_replaces_it():
    asked = []

    async def reopen(req, avoid):
        asked.append(req)
        if len(asked) == 1:  # choice 0 resumed: sends a newer checkpoint, then is lost again
            return "n2", opened([(0, Piece("a", (1,))), (0, Piece("b", (2,), kv=b"n2", kv_tokens=7)), (0, LOST)])
        if len(asked) == 2:
            return "n3", opened([(0, Piece("ab", (1, 2))), (0, Finished("stop", 5, 2))])
        return "n3", opened([(0, Piece("z", (9,))), (0, Finished("stop", 5, 1))])

    first = opened([(0, Piece("a", (1,), kv=b"n1", kv_tokens=6)), (0, LOST)], choices=2)
    run = resumable(GenerateRequest(Sampling(temperature=0.0), n=2, prompts=("p",)), "n1", first, reopen)
    events = collect(run)
    assert [e.text for _, e in events if isinstance(e, Piece)] == ["a", "b", "z"]
    assert [(r.first_choice, r.resume_tokens, r.resume_kv, r.resume_kv_tokens) for r in asked] == [
        (0, (1,), b"n1", 6), (0, (1, 2), b"n2", 7), (1, (), b"", 0)]


def test_single_choice_is_the_same_request_for_a_replica_and_for_a_new_leader():
    """A relaying member asks the next leader for ResumeAt(choice, tokens); the leader builds the
    same single-choice request a gateway builds for a new replica, seeds following the choice."""
    base = GenerateRequest(Sampling(seed=7), n=2, prompts=("p", "q"))
    one = single_choice(base, ResumeAt(3, (4, 5)))
    assert (one.n, one.prompts, one.first_choice, one.resume_tokens) == (1, ("q",), 1, (4, 5))
    again = single_choice(one, ResumeAt(0, (4, 5, 6)))  # the new leader's replica lost in turn
    assert (again.n, again.prompts, again.first_choice, again.resume_tokens) == (1, ("q",), 1, (4, 5, 6))
