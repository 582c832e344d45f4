"""Runs one backend on one worker thread, with a bounded queue in front of it.

llama.cpp contexts are not thread-safe, so each shard has exactly one thread that touches its
backend. Requests wait in a queue of bounded depth (QueueFull beyond it: the gateway answers 429).
A job reports through `emit`, called on the worker thread; the caller bridges it to its loop.
Setting `job.cancel` stops a generation at the next token (a client that went away).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from shards.backend import Backend
from shards.text import TextStream
from shards.types import Event, Failed, Finished, QueueFull, Sampling

log = logging.getLogger("quorum.shard")


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    stop_texts: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)
    forced: tuple[int, ...] = ()  # tokens to replay first (a resumed generation)
    resume_kv: bytes = field(default=b"", repr=False)  # a KV checkpoint covering part of them (GenerateRequest)
    resume_kv_tokens: int = 0
    kv_checkpoints: bool = False  # ask the backend for KV checkpoints (GenerateRequest.kv_checkpoints)


class Engine:
    def __init__(self, backend: Backend, queue_depth: int, name: str = "shard",
                 on_finish: Callable[[Finished], None] | None = None) -> None:
        self.backend = backend
        self.on_finish = on_finish  # called on the worker thread for every ended generation
        self.queue_depth = queue_depth
        self.name = name
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._busy = False
        self._closing = threading.Event()
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, jobs: list[Job]) -> None:
        """Queues jobs (all or none) or raises QueueFull; never blocks.

        An idle engine always takes a request, however many choices it asks for; a busy one takes
        it while the jobs waiting stay within queue_depth.
        """
        with self._lock:
            idle = not self._busy and self._waiting == 0
            if not idle and self._waiting + len(jobs) > self.queue_depth:
                raise QueueFull(self.queue_depth)
            self._waiting += len(jobs)
        for job in jobs:
            self._jobs.put(job)

    def close(self) -> None:
        """Stops the running generation at its next token, tells queued jobs the shard stopped,
        ends the worker and frees the backend."""
        self._closing.set()
        current = self._current
        if current is not None:
            current.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.backend.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._busy = not self._closing.is_set()
            if self._closing.is_set():
                job.emit(Failed("the shard is shutting down", retryable=True))
                continue
            self._current = job
            try:
                if job.cancel.is_set():
                    finished = Finished("cancelled", len(job.prompt), 0)
                else:
                    finished = self._generate(job)
                if self.on_finish is not None:
                    self.on_finish(finished)
                job.emit(finished)
            except Exception as exc:  # a backend failure ends this job, not the shard
                log.exception("%s: generation failed", self.name)
                job.emit(Failed(f"generation failed: {exc}"))
            finally:
                self._current = None
                with self._lock:
                    self._busy = False

    def _generate(self, job: Job) -> Finished:
        s = job.sampling
        seed = s.seed if s.seed is not None else random.getrandbits(31)
        stream = TextStream(self.backend.token_bytes, s.stop + job.stop_texts,
                            with_logprobs=s.top_logprobs is not None)
        started = time.perf_counter()
        first: float | None = None
        produced, reason = 0, "length"
        budget = self.backend.n_ctx - len(job.prompt)
        if s.max_tokens is not None:
            budget = min(budget, s.max_tokens)
        steps = self.backend.generate(job.prompt, s, seed, job.forced, resume_kv=job.resume_kv,
                                      resume_kv_tokens=job.resume_kv_tokens, checkpoints=job.kv_checkpoints)
        checkpoint: tuple[bytes, int] | None = None  # the latest, until a piece carries it
        try:
            while produced < budget:
                if job.cancel.is_set():
                    reason = "cancelled"
                    break
                step = next(steps, None)
                if step is None:
                    break
                produced += 1
                if first is None:
                    first = time.perf_counter() - started
                if self.backend.is_end(step.token):
                    reason = "stop"
                    break
                if step.kv:
                    checkpoint = (step.kv, step.kv_tokens)
                piece = stream.push(step)
                if piece is not None:
                    if checkpoint is not None:
                        piece = dataclasses.replace(piece, kv=checkpoint[0], kv_tokens=checkpoint[1])
                        checkpoint = None
                    job.emit(piece)
                if stream.stopped:
                    reason = "stop"
                    break
        finally:
            steps.close()
        if reason != "cancelled":
            tail = stream.finish()
            if tail is not None:
                job.emit(tail)
        decode_s = time.perf_counter() - started - (first or 0.0)
        return Finished(reason, len(job.prompt), produced, first_token_s=first, decode_s=decode_s)
