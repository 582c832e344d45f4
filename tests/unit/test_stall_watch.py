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
    watch = StallWatch(said.append, limit_s=120.0, per_token_s=0.0, name="reasoning/m", every_s=3600)
    try:
        watch.started()
        begun = time.monotonic()
        assert watch.check(now=begun + 119) is None  # a slow step, within its bound
        watch.ended()
        assert watch.check(now=begun + 1000) is None  # an ended step is never reported
        watch.started(prefill_tokens=3)
        begun = time.monotonic()
        assert watch.check(now=begun + 121) == said[0]
        assert "reasoning/m: a decoding step has run 121 s, past its bound of 120 s (3 prompt tokens" in said[0]
        assert watch.check(now=begun + 500) is None and len(said) == 1  # once: the process is ending
    finally:
        watch.close()


def test_the_bound_grows_with_the_prompt_a_step_prefills():
    said: list[str] = []
    watch = StallWatch(said.append, limit_s=120.0, per_token_s=1.0, every_s=3600)
    try:
        watch.started(prefill_tokens=4000)  # a generate-only backend's first step: the whole prompt
        begun = time.monotonic()
        assert watch.check(now=begun + 4000) is None  # a slow prefill, not a stall
        assert watch.check(now=begun + 4121) is not None
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


def test_a_pipeline_head_is_watched_closer_than_a_whole_model(monkeypatch, tmp_path):
    """A head's step is one token through its stages: a hung stage is noticed after 30 s, not 2 minutes."""
    from shards.host import HostSpec, stall_watch
    from shards.stall_watch import HEAD_STEP_LIMIT_S, STEP_LIMIT_S

    monkeypatch.delenv("QUORUM_STALL_LIMIT_S", raising=False)
    whole = HostSpec("reasoning", "m", "llama", "/m.gguf", 512, 1, 4, str(tmp_path / "s.sock"), 1)
    head = HostSpec("reasoning", "m", "llama", "/m.gguf", 512, 1, 4, str(tmp_path / "s.sock"), 1,
                    stages=("127.0.0.1:5000=9",))
    for spec, limit in ((whole, STEP_LIMIT_S), (head, HEAD_STEP_LIMIT_S)):
        watch = stall_watch(spec)
        try:
            assert watch.limit_s == limit and watch.name == "reasoning/m"
        finally:
            watch.close()
    assert HEAD_STEP_LIMIT_S < STEP_LIMIT_S
