"""Continuous batching in the engine (shards/engine.py, shards/slots.py) over NullBackend with slots:
generations share the worker, join while others run, leave alone, and the queue counts slots and
prompt tokens."""

from __future__ import annotations

import threading

import pytest

from shards.backend_null import NullBackend
from shards.engine import Engine, Job
from shards.types import Failed, Finished, Piece, QueueFull
from tests.unit.test_engine import WAIT_S, Events, expected_reply, job


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(backend: NullBackend, queue_depth: int = 4, **options) -> Engine:
        engine = Engine(backend, queue_depth, name="test", **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()
        assert not engine._thread.is_alive()


def test_several_generations_run_together_and_each_gets_its_own_answer(engines):
    backend = NullBackend(reply_tokens=40, slots=4)
    engine = engines(backend)
    events = [Events() for _ in range(4)]
    engine.submit([job(e, prompt=list(f"prompt {i}".encode()), seed=i) for i, e in enumerate(events)])
    for i, e in enumerate(events):
        e.wait_end()
        assert e.finished.reason == "stop"
        assert e.text == expected_reply(backend, list(f"prompt {i}".encode()), i)


def test_a_request_joins_while_another_is_generating_and_both_interleave(engines):
    engine = engines(NullBackend(n_ctx=4096, reply_tokens=3000, delay_s=0.001, slots=2))
    first = Events()
    long_job = job(first)
    engine.submit([long_job])
    assert first.first_piece.wait(WAIT_S)
    second = Events()
    engine.submit([job(second, max_tokens=5)])
    second.wait_end()
    assert second.finished.reason == "length" and len(second.text) == 5
    assert not first.ended.is_set(), "the first generation is still running beside the second"
    assert engine.active == 1
    long_job.cancel.set()
    assert first.wait_end()[-1].reason == "cancelled"


class Watched(Events):
    """Events that a test can wait on for any condition over the items so far."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def __call__(self, event) -> None:
        with self._changed:
            super().__call__(event)
            self._changed.notify_all()

    def wait_for(self, predicate) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.items), timeout=WAIT_S)


def test_cancelling_one_generation_leaves_the_others_running(engines):
    backend = NullBackend(n_ctx=4096, reply_tokens=3000, delay_s=0.001, slots=3)
    engine = engines(backend)
    events = [Watched() for _ in range(3)]
    jobs = [job(e, seed=i) for i, e in enumerate(events)]
    engine.submit(jobs)
    assert events[1].first_piece.wait(WAIT_S)
    jobs[1].cancel.set()
    assert events[1].wait_end()[-1].reason == "cancelled"
    counts = [len(events[i].items) for i in (0, 2)]
    for i, seen in zip((0, 2), counts):  # the others keep streaming after the cancelled one left
        assert events[i].wait_for(lambda items, seen=seen: len(items) > seen + 3)
        assert not events[i].ended.is_set()
    for i in (0, 2):
        jobs[i].cancel.set()
        assert events[i].wait_end()[-1].reason == "cancelled"
    reply = expected_reply(NullBackend(n_ctx=4096, reply_tokens=3000), list(b"hello"), 0)
    assert reply.startswith(events[0].text), "each generation keeps its own answer"


def running(engine: Engine, n: int) -> list[tuple[Job, Events]]:
    """Submits n long jobs and returns once each is generating."""
    out = []
    for _ in range(n):
        events = Events()
        j = job(events)
        engine.submit([j])
        assert events.first_piece.wait(WAIT_S)
        out.append((j, events))
    return out


def test_the_queue_counts_free_slots_then_queue_depth(engines):
    engine = engines(NullBackend(n_ctx=4096, reply_tokens=3000, delay_s=0.001, slots=2), queue_depth=1)
    runs = running(engine, 2)
    assert engine.active == 2 and engine.waiting == 0 and engine.load == 2
    waiting = Events()
    queued = job(waiting)
    assert engine.has_room(1) and not engine.has_room(2)
    engine.submit([queued])
    assert not engine.has_room(1)  # what a shard asks before it renders and tokenizes a prompt
    with pytest.raises(QueueFull):
        engine.submit([job(Events())])
    assert engine.waiting == 1
    queued.cancel.set()
    for j, _ in runs:
        j.cancel.set()
    for _, e in runs:
        assert e.wait_end()[-1].reason == "cancelled"
    assert waiting.wait_end() == [Finished("cancelled", 5, 0)]


def test_free_slots_admit_without_queueing(engines):
    engine = engines(NullBackend(n_ctx=4096, reply_tokens=3000, delay_s=0.001, slots=3), queue_depth=0)
    runs = running(engine, 3)
    with pytest.raises(QueueFull):
        engine.submit([job(Events())])
    for j, e in runs:
        j.cancel.set()
        e.wait_end()


def test_the_queue_counts_prompt_tokens(engines):
    engine = engines(NullBackend(n_ctx=4096, reply_tokens=3000, delay_s=0.001, slots=1), queue_depth=8,
                     queue_tokens=100)
    [(running_job, running_events)] = running(engine, 1)
    small = Events()
    small_job = job(small, prompt=[65] * 60)
    engine.submit([small_job])
    with pytest.raises(QueueFull):
        engine.submit([job(Events(), prompt=[65] * 50)])
    fits = Events()
    fits_job = job(fits, prompt=[65] * 40)
    engine.submit([fits_job])
    for j in (small_job, fits_job, running_job):
        j.cancel.set()
    for e in (running_events, small, fits):
        e.wait_end()


class FailingSecond(NullBackend):
    """Its second generation fails at its third token."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.started = 0

    def generate(self, prompt, sampling, seed, forced=(), **options):
        self.started += 1
        steps = super().generate(prompt, sampling, seed, forced)
        if self.started != 2:
            return steps

        def failing():
            for i, step in enumerate(steps):
                if i == 2:
                    raise RuntimeError("bad sector")
                yield step
        return failing()


def test_a_generation_that_fails_ends_alone(engines):
    engine = engines(FailingSecond(reply_tokens=30, slots=3))
    events = [Events() for _ in range(3)]
    engine.submit([job(e, seed=i) for i, e in enumerate(events)])
    assert events[1].wait_end()[-1] == Failed("generation failed: bad sector")
    for i in (0, 2):
        assert events[i].wait_end()[-1].reason == "stop"
    assert engine.active == 0 and not engine.busy


def test_close_cancels_every_running_generation_and_fails_the_queued():
    engine = Engine(NullBackend(n_ctx=4096, reply_tokens=3000, delay_s=0.001, slots=2), 4)
    runs = running(engine, 2)
    queued = Events()
    engine.submit([job(queued)])
    engine.close()
    assert not engine._thread.is_alive()
    for _, e in runs:
        assert e.items[-1].reason == "cancelled"
    assert queued.items == [Failed("the shard is shutting down", retryable=True)]


def test_on_finish_and_pieces_per_generation(engines):
    finished: list[Finished] = []
    lock = threading.Lock()

    def on_finish(f: Finished) -> None:
        with lock:
            finished.append(f)

    engine = engines(NullBackend(reply_tokens=12, slots=4), on_finish=on_finish)
    events = [Events() for _ in range(6)]
    engine.submit([job(e, seed=i, max_tokens=3 + i) for i, e in enumerate(events)])
    for i, e in enumerate(events):
        e.wait_end()
        assert sum(len(p.tokens) for p in e.items if isinstance(p, Piece)) == 3 + i
    assert sorted(f.completion_tokens for f in finished) == [3, 4, 5, 6, 7, 8]
