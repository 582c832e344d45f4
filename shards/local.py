"""A shard running in this process: templating, tokenizing and the engine, behind async calls.

This is what the gateway talks to for a replica on its own node; a replica on another node will
sit behind the same calls over gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import AsyncIterator, Callable

from shards.backend import Backend
from shards.engine import Engine, Job
from shards.stall_watch import StallWatch
from shards.templates import Message, render
from shards.types import (
    ContextLengthExceeded,
    Event,
    Failed,
    Finished,
    GenerateRequest,
    Opened,
    QueueFull,
    Sampling,
    ShardKind,
)

log = logging.getLogger("quorum.shard")


class Generation:
    """One queued or running generation: its events, and a way to stop it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event: Event) -> None:
        """Called on the engine's thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            # The loop closed under a job that was still running (shutdown): nobody is listening.
            log.debug("dropped a %s event after the loop closed", type(event).__name__)

    async def events(self) -> AsyncIterator[Event]:
        """Pieces, then one Finished or Failed. Leaving early cancels the generation."""
        try:
            while True:
                event = await self._events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()


class LocalShard:
    kind = ShardKind.GENERATOR
    ready = True

    def __init__(self, role: str, model: str, backend: Backend, queue_depth: int,
                 named_template: str | None, on_finish: Callable[[Finished], None] | None = None,
                 queue_tokens: int | None = None, stall: StallWatch | None = None) -> None:
        self.role = role
        self.model = model
        self.backend = backend
        self.n_ctx = backend.n_ctx
        self._named_template = named_template
        self._engine = Engine(backend, queue_depth, name=f"{role}/{model}", on_finish=on_finish,
                              queue_tokens=queue_tokens, stall=stall)
        self.slots = self._engine.slots  # generations decoded together (continuous batching)

    @property
    def waiting(self) -> int:
        return self._engine.waiting

    @property
    def busy(self) -> bool:
        return self._engine.busy

    @property
    def active(self) -> int:
        return self._engine.active

    @property
    def load(self) -> int:
        """Generations running or queued (mesh/replicas/router.py balances on it when present)."""
        return self._engine.load

    async def chat_prompt(self, messages: list[Message]) -> tuple[list[int], tuple[str, ...]]:
        """Renders and tokenizes a conversation (off the loop: long prompts take a while)."""
        def work() -> tuple[list[int], tuple[str, ...]]:
            rendered = render(messages, gguf_template=self.backend.chat_template(),
                              named=self._named_template, bos=self.backend.bos_text,
                              eos=self.backend.eos_text)
            return self.backend.tokenize(rendered.text, add_bos=not rendered.has_bos), rendered.stop_texts
        return await asyncio.to_thread(work)

    async def text_prompt(self, prompt: str) -> list[int]:
        return await asyncio.to_thread(self.backend.tokenize, prompt, True)

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """A prompt must leave room for at least one token, and for max_tokens when given."""
        if prompt_tokens >= self.n_ctx or prompt_tokens + (max_tokens or 0) > self.n_ctx:
            raise ContextLengthExceeded(self.n_ctx, prompt_tokens, max_tokens)

    async def open(self, req: GenerateRequest) -> Opened:
        """Renders, tokenizes, checks the window and queues every choice of a request.

        Raises TemplateError (bad messages for this model), ContextLengthExceeded or QueueFull;
        once it returns, the request holds its place in the queue. A full shard refuses (QueueFull)
        before rendering or tokenizing anything, and a chat over the window with QueueFull rather than
        ContextLengthExceeded when the queue could not take it once fitted into the window.
        """
        if not self._engine.has_room(req.n * max(1, len(req.prompts))):
            raise QueueFull(self._engine.queue_depth)
        if req.messages:
            prompt, stop_texts = await self.chat_prompt(list(req.messages))
            prompts = [prompt]
        else:
            prompts, stop_texts = [await self.text_prompt(p) for p in req.prompts], ()
        for prompt in prompts:
            try:
                self.check_fits(len(prompt), req.sampling.max_tokens)
            except ContextLengthExceeded:
                # The gateway fits a chat over the window (embeddings: costly) and brings it back at most a
                # window long: a shard that could not queue that refuses now, before that work is done.
                fitted = max(0, self.n_ctx - (req.sampling.max_tokens or 0))  # the prompt tokens it comes back with
                if req.messages and not self._engine.has_room(req.n, fitted):
                    raise QueueFull(self._engine.queue_depth) from None
                raise
        work = [(prompt, choice_sampling(req.sampling, req.first_choice + i)) for prompt in prompts
                for i in range(req.n)]
        gens = self.submit(work, stop_texts, forced=req.resume_tokens, resume_kv=req.resume_kv,
                           resume_kv_tokens=req.resume_kv_tokens, kv_checkpoints=req.kv_checkpoints)

        def cancel() -> None:
            for g in gens:
                g.cancel()

        async def events():
            try:
                for index, gen in enumerate(gens):
                    async for event in gen.events():
                        yield index, event
            finally:
                cancel()

        return Opened(prompt_tokens=sum(len(p) for p in prompts), choices=len(gens), events=events(),
                      cancel=cancel, prompt_token_ids=tuple(t for p in prompts for t in p))

    def submit(self, work: list[tuple[list[int], Sampling]], stop_texts: tuple[str, ...] = (),
               forced: tuple[int, ...] = (), resume_kv: bytes = b"", resume_kv_tokens: int = 0,
               kv_checkpoints: bool = False) -> list[Generation]:
        """Queues one generation per (prompt, sampling) pair, all or none; never blocks.

        A request's n choices (and its several prompts) go in one call; `forced` tokens are
        replayed at the start of the first (a resumed choice), restoring the KV checkpoint
        `resume_kv` for those it covers. Raises QueueFull when the queue
        cannot take them all.
        """
        loop = asyncio.get_running_loop()
        gens = [Generation(loop) for _ in work]
        jobs = [Job(prompt=prompt, sampling=s, emit=g.emit, stop_texts=stop_texts, cancel=g.cancelled,
                    forced=forced if i == 0 else (), resume_kv=resume_kv if i == 0 else b"",
                    resume_kv_tokens=resume_kv_tokens if i == 0 else 0, kv_checkpoints=kv_checkpoints)
                for i, (g, (prompt, s)) in enumerate(zip(gens, work))]
        self._engine.submit(jobs)
        return gens

    def close(self) -> None:
        self._engine.close()


def choice_sampling(sampling: Sampling, index: int) -> Sampling:
    """Choice i of n uses seed + i, so a seeded request with n > 1 still gives distinct choices."""
    if sampling.seed is None or index == 0:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + index)
