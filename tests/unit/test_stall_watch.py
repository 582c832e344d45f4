"""shards/stall_watch.py: a decoding step that never returns is reported once, past a bound that grows with the
prompt a generate-only backend prefills in its first step; steps that end in time are never reported. Through the
engine with a backend stuck in a step (the real process ending itself is in test_shard_process.py)."""

from __future__ import annotations

import threading
import time

from shards.backend_null import NullBackend
from shards.engine import Engine, Job
from shards.stall_watch import StallWatch
from shards.types import Failed, Finished, Sampling

WAIT_S = 10.0


def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_step_past_its_bound_is_reported_once_and_steps_in_time_never():
    said: list[str] = []
    watch = StallWatch(said.append, limit_s=0.2, per_token_s=0.0, name="reasoning/m")
    try:
        for _ in range(5):  # steps well within the bound
            watch.started()
            watch.ended()
        watch.started(prefill_tokens=3)
        until(lambda: said, "the stuck step to be reported")
        assert "reasoning/m: a decoding step has run" in said[0] and "3 prompt tokens" in said[0]
        time.sleep(0.3)  # the watch looks again in the meantime: still the one report
        assert len(said) == 1
    finally:
        watch.close()


def test_the_bound_grows_with_the_prompt_a_step_prefills():
    said: list[str] = []
    watch = StallWatch(said.append, limit_s=0.2, per_token_s=60.0)
    try:
        watch.started(prefill_tokens=1)  # a bound of 60.2 s: a slow prefill, not a stall
        time.sleep(0.6)
        assert said == []
    finally:
        watch.close()


class StuckBackend(NullBackend):
    """Its second token never comes: a llama.cpp call that never returns."""

    def __init__(self) -> None:
        super().__init__(reply_tokens=8)
        self.release = threading.Event()

    def generate(self, *args, **kwargs):
        steps = super().generate(*args, **kwargs)
        yield next(steps)
        self.release.wait()
        yield from steps


def test_the_engine_times_its_steps_and_a_stuck_one_is_reported():
    said: list[str] = []
    backend = StuckBackend()
    engine = Engine(backend, queue_depth=2, name="reasoning/m",
                    stall=StallWatch(said.append, limit_s=0.3, per_token_s=0.0, name="reasoning/m"))
    try:
        events = []
        engine.submit([Job(prompt=backend.tokenize("hi", True), sampling=Sampling(temperature=0, max_tokens=8),
                           emit=events.append)])
        until(lambda: said, "the stuck step to be reported")
        assert not any(isinstance(e, (Finished, Failed)) for e in events)  # the generation is still stuck
    finally:
        backend.release.set()
        engine.close()
