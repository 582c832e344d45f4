"""A step of the engine that never returns: a llama.cpp call stuck for good (a pipeline stage that keeps its
connection and never answers, a native deadlock). Every stream on the replica would wait forever while the
process still answers gRPC keepalives and health checks, so nothing above it would notice. `StallWatch` times
each step against a bound no working device comes near, and calls `on_stall` once when a step passes it; the
shard process then ends itself (shards/host.py), meshd restarts it, and its streams resume on another replica.

The bound: a batched step decodes at most one prompt piece (64 tokens) and one token per slot, so a fixed
STEP_LIMIT_S covers it on any device; a generate-only backend's first step prefills the whole prompt (and any
replayed tokens), so that step gets PER_PROMPT_TOKEN_S more per token, far slower than any device prefills.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("quorum.engine")

STEP_LIMIT_S = 120.0
# A pipeline's head decodes one sequence a token a step through its stages (a few seconds a token at worst on
# a LAN of phones): a stage that hangs is what stops it, and it is noticed sooner.
HEAD_STEP_LIMIT_S = 30.0
PER_PROMPT_TOKEN_S = 1.0


class StallWatch:
    def __init__(self, on_stall: Callable[[str], None], limit_s: float = STEP_LIMIT_S,
                 per_token_s: float = PER_PROMPT_TOKEN_S, name: str = "shard", every_s: float | None = None) -> None:
        """`every_s`: how often the watch thread looks (default: a quarter of the bound, at most a second)."""
        self.on_stall = on_stall
        self.limit_s = limit_s
        self.per_token_s = per_token_s
        self.name = name
        self._lock = threading.Lock()
        self._step: tuple[float, float, int] | None = None  # (started, its bound, prompt tokens in it)
        self._fired = False
        self._closed = threading.Event()
        self._busy = threading.Event()  # a step is running: the thread looks only then (no wake-ups when idle)
        self._every_s = every_s if every_s is not None else min(1.0, limit_s / 4)
        self._thread = threading.Thread(target=self._watch, name=f"stall-watch-{name}", daemon=True)
        self._thread.start()

    def started(self, prefill_tokens: int = 0) -> None:
        """A step begins; `prefill_tokens`: prompt tokens it may prefill beyond a batched step's piece."""
        with self._lock:
            self._step = (time.monotonic(), self.limit_s + self.per_token_s * prefill_tokens, prefill_tokens)
        self._busy.set()

    def ended(self) -> None:
        with self._lock:
            self._step = None
        self._busy.clear()

    def close(self) -> None:
        self._closed.set()
        self._busy.set()
        self._thread.join(timeout=5)

    def check(self, now: float | None = None) -> str | None:
        """One look (the thread's, every `every_s`): calls on_stall, once, for a step past its bound; returns
        what it said."""
        with self._lock:
            step = self._step
            if step is None or self._fired:
                return None
            started, bound, tokens = step
            running = (time.monotonic() if now is None else now) - started
            if running <= bound:
                return None
            self._fired = True
        why = (f"{self.name}: a decoding step has run {running:.0f} s, past its bound of {bound:.0f} s "
               f"({tokens} prompt tokens in it): the backend is stuck")
        try:
            self.on_stall(why)
        except Exception:  # the callback's own failure: logged, the watch has done what it can
            log.exception("%s: the stall callback failed", self.name)
        return why

    def _watch(self) -> None:
        while not self._closed.is_set():
            self._busy.wait()
            if self._closed.wait(self._every_s):
                return
            self.check()
