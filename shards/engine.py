"""Runs one backend on one worker thread: up to `slots` generations at once, a bounded queue behind.

llama.cpp contexts are not thread-safe, so each shard has exactly one thread that touches its
backend. That thread loops: admit queued jobs into free slots (a request joins at the next step),
advance every running generation by one step (for a batching backend, one llama_decode over all
of them: shards/backend_llama_batch.py), hand out the tokens, and free the slots of the ended.
Requests beyond the slots wait in a queue of bounded depth, counted in requests and in prompt
tokens (QueueFull beyond either: the gateway answers 429).
A job reports through `emit`, called on the worker thread; the caller bridges it to its loop.
Setting `job.cancel` stops a generation at the next step (a client that went away).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from shards.backend import Backend
from shards.slots import Run, Stepper
from shards.stall_watch import StallWatch
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
                 on_finish: Callable[[Finished], None] | None = None, queue_tokens: int | None = None,
                 stall: StallWatch | None = None) -> None:
        """`stall`: times each step (shards/stall_watch.py); the engine closes it."""
        self.backend = backend
        self.stall = stall
        self.on_finish = on_finish  # called on the worker thread for every ended generation
        self.queue_depth = queue_depth
        # Prompt tokens the queue may hold (not yet prefilled); None: queue_depth full windows.
        self.queue_tokens = queue_tokens if queue_tokens is not None else queue_depth * backend.n_ctx
        self.name = name
        self._stepper = Stepper(backend)
        self.slots = self._stepper.slots
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._waiting_tokens = 0
        self._active = 0
        self._closing = threading.Event()
        self._runs: list[Run] = []
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued for a free slot."""
        return self._waiting

    @property
    def active(self) -> int:
        """Jobs holding a slot (generating)."""
        return self._active

    @property
    def busy(self) -> bool:
        return self._active > 0

    @property
    def load(self) -> int:
        """Jobs generating or queued (what a router balances on)."""
        return self._active + self._waiting

    def has_room(self, count: int, tokens: int = 0) -> bool:
        """Whether `count` more generations of `tokens` prompt tokens each would be taken now (slots and
        queue; submit checks the real prompt tokens once they are known). A hint before costly work
        (rendering and tokenizing; the gateway fitting a long chat): a full shard refuses at once."""
        with self._lock:
            load = self._active + self._waiting
            if not load:
                return True
            if load + count > self.slots + self.queue_depth:
                return False
            waits = count - max(0, self.slots - load)
            return waits <= 0 or self._waiting_tokens + waits * tokens <= self.queue_tokens

    def submit(self, jobs: list[Job]) -> None:
        """Queues jobs (all or none) or raises QueueFull; never blocks.

        An idle engine always takes a request, however many choices it asks for; otherwise the jobs
        must fit in the free slots plus queue_depth, and the prompt tokens waiting within queue_tokens.
        """
        tokens = sum(len(j.prompt) for j in jobs)
        with self._lock:
            load = self._active + self._waiting
            free = max(0, self.slots - load)
            will_wait = sum(len(j.prompt) for j in jobs[free:])  # what free slots do not take at once
            if load and (load + len(jobs) > self.slots + self.queue_depth
                         or self._waiting_tokens + will_wait > self.queue_tokens):
                raise QueueFull(self.queue_depth)
            self._waiting += len(jobs)
            self._waiting_tokens += tokens
        for job in jobs:
            self._jobs.put(job)

    def close(self) -> None:
        """Stops the running generations at their next step, tells queued jobs the shard stopped,
        ends the worker and frees the backend."""
        self._closing.set()
        for run in list(self._runs):
            run.job.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self.stall is not None:
            self.stall.close()
        self.backend.close()

    def _run(self) -> None:
        stopping = False
        while True:
            while not stopping and len(self._runs) < self.slots:
                try:
                    job = self._jobs.get(block=not self._runs)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                self._admit(job)
            if not self._runs:
                if stopping:
                    return
                continue
            self._step()

    def _admit(self, job: Job) -> None:
        with self._lock:
            self._waiting -= 1
            self._waiting_tokens -= len(job.prompt)
        if self._closing.is_set():
            job.emit(Failed("the shard is shutting down", retryable=True))
            return
        if job.cancel.is_set():
            self._ended(job, Finished("cancelled", len(job.prompt), 0))
            return
        run = Run(job, self.backend)
        if run.budget <= 0:
            run.reason = "length"
            self._ended(job, run.finish())
            return
        try:
            run.seq = self._stepper.start(job, run.seed)
        except Exception as exc:  # a backend failure ends this job, not the shard
            log.exception("%s: generation failed to start", self.name)
            job.emit(Failed(f"generation failed: {exc}"))
            return
        self._runs.append(run)
        with self._lock:
            self._active += 1

    def _step(self) -> None:
        closing = self._closing.is_set()
        for run in self._runs:
            if closing or run.job.cancel.is_set():
                run.reason = "cancelled"
        live = [r for r in self._runs if r.reason is None]
        if live:
            if self.stall is not None:  # a generate-only backend prefills a whole prompt (and replay) in one step
                self.stall.started(0 if self._stepper.batched else
                                   sum(len(r.job.prompt) + len(r.job.forced) for r in live if not r.produced))
            try:
                self._stepper.step([r.seq for r in live])
            except Exception as exc:  # the step itself failed: every generation in it ends, the shard goes on
                log.exception("%s: a batched step failed", self.name)
                for run in live:
                    run.seq.error = exc
            finally:
                if self.stall is not None:
                    self.stall.ended()
            for run in live:
                self._hand_out(run)
        for run in [r for r in self._runs if r.reason is not None]:
            self._runs.remove(run)
            with self._lock:
                self._active -= 1
            self._release(run)

    def _hand_out(self, run: Run) -> None:
        seq = run.seq
        steps, seq.out = seq.out, []
        for step in steps:
            run.push(step)
            if run.reason is not None:
                return
        if seq.error is not None:
            run.reason = "failed"
        elif seq.done:
            run.reason = "length"

    def _release(self, run: Run) -> None:
        try:
            self._stepper.release(run.seq)
        except Exception:  # freeing a slot failed: logged; the generation's result stands
            log.exception("%s: releasing a slot failed", self.name)
        if run.reason == "failed":
            exc = run.seq.error
            log.error("%s: generation failed: %s", self.name, exc, exc_info=exc)
            run.job.emit(Failed(f"generation failed: {exc}"))
            return
        try:
            self._ended(run.job, run.finish())
        except Exception as exc:  # a failure finishing the text ends this job, not the shard
            log.exception("%s: finishing a generation failed", self.name)
            run.job.emit(Failed(f"generation failed: {exc}"))

    def _ended(self, job: Job, finished: Finished) -> None:
        if self.on_finish is not None:
            self.on_finish(finished)
        job.emit(finished)
