"""shards/engine.py Engine over NullBackend: events, stop reasons, cancellation, queue admission, close."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import pytest

from shards.backend_null import EOS, NullBackend
from shards.engine import Engine, Job
from shards.types import Failed, Finished, Piece, QueueFull, Sampling, TokenStep

WAIT_S = 10.0  # upper bound on any wait; tests normally finish far sooner


class Backend(NullBackend):
    """NullBackend that records whether the engine freed it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


class Events:
    """Collects a job's events from the worker thread; signals its first piece and its end."""

    def __init__(self, on_piece=None) -> None:
        self.items: list = []
        self.first_piece = threading.Event()
        self.ended = threading.Event()
        self._on_piece = on_piece

    def __call__(self, event) -> None:
        self.items.append(event)
        if isinstance(event, Piece):
            if self._on_piece is not None and not self.first_piece.is_set():
                self._on_piece()
            self.first_piece.set()
        if isinstance(event, (Finished, Failed)):
            self.ended.set()

    def wait_end(self) -> list:
        assert self.ended.wait(WAIT_S), f"job did not end; events so far: {self.items}"
        return self.items

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.items if isinstance(e, Piece))

    @property
    def finished(self) -> Finished:
        [fin] = [e for e in self.items if isinstance(e, Finished)]
        return fin


def job(events: Events, prompt: list[int] | None = None, **sampling) -> Job:
    return Job(prompt=prompt or list(b"hello"), sampling=Sampling(**sampling), emit=events)


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(backend: NullBackend | None = None, queue_depth: int = 4, on_finish=None) -> Engine:
        engine = Engine(backend or Backend(), queue_depth, name="test", on_finish=on_finish)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()
        assert not engine._thread.is_alive()


def expected_reply(backend: NullBackend, prompt: list[int], seed: int) -> str:
    steps = backend.generate(prompt, Sampling(), seed)
    out = []
    for step in steps:
        if step.token == EOS:
            break
        out.append(step.token)
    return bytes(out).decode()


def test_job_emits_pieces_then_one_finished_stop_after_reply_tokens(engines):
    backend = Backend(reply_tokens=24)
    engine = engines(backend)
    events = Events()
    engine.submit([job(events, seed=7)])
    items = events.wait_end()
    assert all(isinstance(e, Piece) for e in items[:-1]) and len(items) > 1
    assert isinstance(items[-1], Finished)
    fin = items[-1]
    assert fin.reason == "stop"
    pieces = items[:-1]
    assert sum(len(p.tokens) for p in pieces) == 24
    assert events.text == expected_reply(backend, list(b"hello"), 7)
    assert len(events.text) == 24
    assert fin.prompt_tokens == 5
    assert fin.completion_tokens == 24 + 1, "the sampled end token is counted too"
    assert fin.first_token_s is not None and fin.first_token_s >= 0 and fin.decode_s >= 0


def test_same_seed_gives_same_text(engines):
    engine = engines()
    a, b = Events(), Events()
    engine.submit([job(a, seed=42), job(b, seed=42)])
    a.wait_end(), b.wait_end()
    assert a.text == b.text


def test_max_tokens_gives_length_and_exact_completion_tokens(engines):
    engine = engines(Backend(reply_tokens=24))
    events = Events()
    engine.submit([job(events, max_tokens=5)])
    events.wait_end()
    assert events.finished.reason == "length"
    assert events.finished.completion_tokens == 5
    assert len(events.text) == 5


def test_context_window_end_gives_length(engines):
    engine = engines(Backend(n_ctx=12, reply_tokens=100))
    events = Events()
    engine.submit([job(events, prompt=list(b"0123456789"))])
    events.wait_end()
    assert events.finished.reason == "length"
    assert events.finished.completion_tokens == 2


def test_stop_sequence_ends_with_stop_before_it(engines):
    backend = Backend(reply_tokens=40)
    reply = expected_reply(backend, list(b"hello"), 3)
    stop = reply.split(" ")[1]
    engine = engines(backend)
    events = Events()
    engine.submit([job(events, seed=3, stop=(stop,))])
    events.wait_end()
    assert events.finished.reason == "stop"
    assert events.text == reply[:reply.index(stop)]


def test_job_stop_texts_also_stop(engines):
    backend = Backend(reply_tokens=40)
    reply = expected_reply(backend, list(b"hello"), 3)
    engine = engines(backend)
    events = Events()
    engine.submit([Job(prompt=list(b"hello"), sampling=Sampling(seed=3), emit=events, stop_texts=(" ",))])
    events.wait_end()
    assert events.finished.reason == "stop"
    assert events.text == reply.split(" ")[0]


def test_logprobs_come_with_pieces_when_asked(engines):
    engine = engines()
    events = Events()
    engine.submit([job(events, top_logprobs=2, max_tokens=6)])
    events.wait_end()
    pieces = [e for e in events.items if isinstance(e, Piece)]
    entries = [lp for p in pieces for lp in p.logprobs]
    assert len(entries) == 6
    assert all(len(e.top) == 2 for e in entries)


def test_cancel_mid_generation_ends_with_cancelled_early(engines):
    backend = Backend(n_ctx=2048, reply_tokens=1000, delay_s=0.002)
    engine = engines(backend)
    the_job: list[Job] = []
    events = Events(on_piece=lambda: the_job[0].cancel.set())
    the_job.append(job(events))
    engine.submit(the_job)
    items = events.wait_end()
    fin = items[-1]
    assert isinstance(fin, Finished) and fin.reason == "cancelled"
    assert fin.completion_tokens < 100, "cancellation must stop the generation at the next token"
    assert sum(isinstance(e, Finished) for e in items) == 1


def test_job_cancelled_before_it_starts_reports_cancelled_without_generating(engines):
    engine = engines()
    events = Events()
    j = job(events)
    j.cancel.set()
    engine.submit([j])
    assert events.wait_end() == [Finished("cancelled", 5, 0)]


def slow_running(engine: Engine) -> tuple[Job, Events]:
    """Submits a long job and returns once it is generating (the engine is busy)."""
    events = Events()
    j = job(events)
    engine.submit([j])
    assert events.first_piece.wait(WAIT_S)
    return j, events


def test_busy_engine_with_one_waiting_rejects_with_queue_full(engines):
    engine = engines(Backend(n_ctx=4096, reply_tokens=3000, delay_s=0.002), queue_depth=1)
    running, running_events = slow_running(engine)
    assert engine.busy
    waiting_events = Events()
    waiting = job(waiting_events)
    engine.submit([waiting])
    assert engine.waiting == 1
    with pytest.raises(QueueFull) as info:
        engine.submit([job(Events())])
    assert info.value.depth == 1
    assert engine.waiting == 1, "a rejected submit leaves the queue as it was"
    waiting.cancel.set()
    running.cancel.set()
    assert running_events.wait_end()[-1].reason == "cancelled"
    assert waiting_events.wait_end() == [Finished("cancelled", 5, 0)]


def test_busy_engine_takes_all_jobs_or_none(engines):
    engine = engines(Backend(n_ctx=4096, reply_tokens=3000, delay_s=0.002), queue_depth=2)
    running, running_events = slow_running(engine)
    with pytest.raises(QueueFull):
        engine.submit([job(Events()) for _ in range(3)])
    assert engine.waiting == 0
    fits = [Events(), Events()]
    jobs = [job(e) for e in fits]
    for j in jobs:
        j.cancel.set()
    engine.submit(jobs)
    assert engine.waiting <= 2
    running.cancel.set()
    for e in (running_events, *fits):
        e.wait_end()


def test_idle_engine_accepts_more_jobs_than_queue_depth_at_once(engines):
    done = queue.Queue()
    engine = engines(Backend(reply_tokens=8), queue_depth=1, on_finish=done.put)
    many = [Events() for _ in range(4)]
    engine.submit([job(e, seed=i) for i, e in enumerate(many)])
    for e in many:
        assert e.wait_end()[-1].reason == "stop"
        assert len(e.text) == 8
    assert done.qsize() == 4


def test_on_finish_called_for_every_generation(engines):
    finished = queue.Queue()
    engine = engines(Backend(reply_tokens=4), on_finish=finished.put)
    events = [Events() for _ in range(3)]
    jobs = [job(events[0]), job(events[1], max_tokens=2), job(events[2])]
    jobs[2].cancel.set()
    engine.submit(jobs)
    for e in events:
        e.wait_end()
    reasons = sorted(finished.get(timeout=WAIT_S).reason for _ in range(3))
    assert reasons == ["cancelled", "length", "stop"]
    assert finished.empty()


class Exploding(Backend):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def generate(self, prompt: list[int], sampling: Sampling, seed: int, forced=(), **options) -> Iterator[TokenStep]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("GPU on fire")
        return super().generate(prompt, sampling, seed, forced)


def test_backend_failure_fails_that_job_only(engines):
    engine = engines(Exploding())
    first, second = Events(), Events()
    engine.submit([job(first)])
    assert first.wait_end() == [Failed("generation failed: GPU on fire")]
    engine.submit([job(second)])
    assert second.wait_end()[-1].reason == "stop"
    assert not engine.busy and engine.waiting == 0


def test_close_idle_engine_stops_worker_and_closes_backend():
    backend = Backend()
    engine = Engine(backend, 2)
    engine.close()
    assert not engine._thread.is_alive()
    assert backend.closed.is_set()


def test_close_tells_queued_jobs_the_shard_stopped():
    backend = Backend(n_ctx=512, reply_tokens=20, delay_s=0.005)
    engine = Engine(backend, 4)
    running = Events()
    engine.submit([job(running)])
    assert running.first_piece.wait(WAIT_S)
    queued = Events()
    engine.submit([job(queued)])
    engine.close()
    assert not engine._thread.is_alive()
    assert running.items[-1].reason == "cancelled", "the running job stops at its next token"
    assert queued.items == [Failed("the shard is shutting down", retryable=True)]


def test_engine_close_with_null_backend_does_not_raise():
    engine = Engine(NullBackend(), 1)
    try:
        engine.close()
    finally:
        engine._thread.join(WAIT_S)
