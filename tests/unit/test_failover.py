"""mesh/failover.py: a lost replica's choice resumes elsewhere and the client sees each token once."""

from __future__ import annotations

import asyncio

from mesh.failover import ResumableRun
from shards.types import Failed, Finished, GenerateRequest, Opened, Piece, Sampling


def opened(events, choices=1) -> Opened:
    async def gen():
        for e in events:
            yield e

    return Opened(prompt_tokens=5, choices=choices, events=gen(), cancel=lambda: None)


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
    run = ResumableRun(GenerateRequest(Sampling(seed=7), messages=()), "n1", first, reopen)
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
    run = ResumableRun(GenerateRequest(Sampling(seed=7), n=2, prompts=("p",)), "n1", first, reopen)
    events = collect(run)
    assert [(i, type(e).__name__) for i, e in events] == [(0, "Piece"), (0, "Piece"), (0, "Finished"),
                                                         (1, "Piece"), (1, "Finished")]
    assert [(r.first_choice, r.resume_tokens) for r in asked] == [(0, (1,)), (1, ())]


def test_a_failure_that_is_not_a_lost_replica_passes_through():
    async def reopen(req, avoid):
        raise AssertionError("must not resume")

    run = ResumableRun(GenerateRequest(Sampling()), "n1", opened([(0, Failed("bug"))]), reopen)
    assert collect(run) == [(0, Failed("bug"))]


def test_no_replica_left_ends_the_choice_with_an_error():
    async def reopen(req, avoid):
        raise LookupError("no ready replica")

    run = ResumableRun(GenerateRequest(Sampling()), "n1", opened([(0, Piece("a", (1,))), (0, LOST)]), reopen)
    events = collect(run)
    assert isinstance(events[-1][1], Failed) and "no other could resume" in events[-1][1].message


def test_failovers_are_bounded():
    calls = []

    async def reopen(req, avoid):
        calls.append(set(avoid))
        return f"n{len(calls) + 1}", opened([(0, LOST)])

    run = ResumableRun(GenerateRequest(Sampling()), "n1", opened([(0, LOST)]), reopen)
    events = collect(run)
    assert len(calls) == 3 and calls[-1] == {"n1", "n2", "n3"}
    assert events == [(0, LOST)]


def test_a_resume_logs_where_its_gap_went(caplog):
    async def reopen(req, avoid):
        return "n2", opened([(0, Piece("ab", (1, 2))), (0, Piece("c", (3,))), (0, Finished("stop", 5, 3))])

    first = opened([(0, Piece("a", (1,))), (0, LOST)])
    with caplog.at_level("INFO", logger="quorum.failover"):
        events = collect(ResumableRun(GenerateRequest(Sampling(temperature=0.0)), "n1", first, reopen))
    assert [e.text for _, e in events if isinstance(e, Piece)] == ["a", "b", "c"]
    [line] = [r.getMessage() for r in caplog.records if "resumed on" in r.getMessage()]
    assert line.startswith("choice 0 resumed on n2, 1 tokens replayed: first new piece ")
    assert "loss noticed at" in line and "admitted at" in line and "nan" not in line
