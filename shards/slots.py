"""What the engine keeps per running generation (a slot), and how it steps a backend's sequences.

A backend either batches (it has `start`, `step` and `release`: shards/backend_llama_batch.py) or
only has `generate` (one iterator per generation). `Stepper` gives the engine one shape for both:
start a sequence, advance all running ones by one step, release one. A generate-only backend runs
`slots` iterators in turn, one token each per step (NullBackend's trivial batching); without a
`slots` attribute it runs one at a time, as before.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Iterator

from shards.backend import Backend
from shards.text import TextStream
from shards.types import Finished, TokenStep


@dataclass(eq=False)
class IterSequence:
    """A generate() iterator as a sequence: the tokens of its latest step, or its end or error."""
    steps: Iterator[TokenStep]
    out: list[TokenStep] = field(default_factory=list)
    done: bool = False
    error: Exception | None = None


class Stepper:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.batched = all(hasattr(backend, name) for name in ("start", "step", "release"))
        self.slots = max(1, int(getattr(backend, "slots", 1)))

    def start(self, job, seed: int):
        args = (job.prompt, job.sampling, seed, job.forced)
        options = {"resume_kv": job.resume_kv, "resume_kv_tokens": job.resume_kv_tokens,
                   "checkpoints": job.kv_checkpoints}
        if self.batched:
            return self.backend.start(*args, **options)
        return IterSequence(self.backend.generate(*args, **options))

    def step(self, seqs: list) -> None:
        if self.batched:
            self.backend.step([s for s in seqs if not s.out])  # pending tokens are handed out first
            return
        for seq in seqs:
            if seq.out:
                continue
            try:
                step = next(seq.steps, None)
            except Exception as exc:  # the backend failed this generation: it ends alone (the engine reports it)
                seq.error = exc
                continue
            if step is None:
                seq.done = True
            else:
                seq.out.append(step)

    def release(self, seq) -> None:
        if self.batched:
            self.backend.release(seq)
        else:
            seq.steps.close()


class Run:
    """One admitted job in a slot: its text stream, token budget, timing and pending checkpoint."""

    def __init__(self, job, backend: Backend) -> None:
        s = job.sampling
        self.job = job
        self.seed = s.seed if s.seed is not None else random.getrandbits(31)
        self.stream = TextStream(backend.token_bytes, s.stop + job.stop_texts, with_logprobs=s.top_logprobs is not None)
        self.is_end = backend.is_end
        self.budget = backend.n_ctx - len(job.prompt)
        if s.max_tokens is not None:
            self.budget = min(self.budget, s.max_tokens)
        self.started = time.perf_counter()
        self.first: float | None = None
        self.produced = 0
        self.reason: str | None = None  # set when the generation ends
        self.checkpoint: tuple[bytes, int] | None = None  # the latest, until a piece carries it
        self.seq = None

    def push(self, step: TokenStep) -> None:
        """Takes one token: emits the text it releases; sets `reason` when the generation ends."""
        if self.produced >= self.budget:
            self.reason = "length"
            return
        self.produced += 1
        if self.first is None:
            self.first = time.perf_counter() - self.started
        if self.is_end(step.token):
            self.reason = "stop"
            return
        if step.kv:
            self.checkpoint = (step.kv, step.kv_tokens)
        piece = self.stream.push(step)
        if piece is not None:
            if self.checkpoint is not None:
                piece = dataclasses.replace(piece, kv=self.checkpoint[0], kv_tokens=self.checkpoint[1])
                self.checkpoint = None
            self.job.emit(piece)
        if self.stream.stopped:
            self.reason = "stop"
        elif self.produced >= self.budget:
            self.reason = "length"

    def finish(self) -> Finished:
        """The Finished event (after the held-back text, unless cancelled)."""
        reason = self.reason or "length"
        if reason != "cancelled":
            tail = self.stream.finish()
            if tail is not None:
                self.job.emit(tail)
        decode_s = time.perf_counter() - self.started - (self.first or 0.0)
        return Finished(reason, len(self.job.prompt), self.produced, first_token_s=self.first, decode_s=decode_s,
                        cached_tokens=getattr(self.seq, "reused", 0))

