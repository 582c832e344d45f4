"""Stream continuity: a request's choices run to the end even when the replica serving them is lost.

The gateway keeps, per choice, the tokens and text it has already passed on. When a replica is
lost mid-answer (its events end in a retryable Failed: connection reset, keepalive timeout, shard
shutting down), the choice is opened again on another replica with those tokens as
`resume_tokens`: the replica prefills the prompt exactly as the first one did and replays the
tokens one step each (see shards/backend_llama.py), so at temperature 0, or with a seed, the rest
of the answer is what the lost replica would have produced. The replayed part comes back too and
is dropped here by count (tokens, characters), so the client sees each token once.

The same code resumes a stream a member relays from the leader when the *leader* is lost
(mesh/gateway/leader_link.py): there the "replica" is the leader's gateway, whose typed events
come over the peer port, and reopening asks the next leader for the choice from `ResumeAt`
(which builds the same single-choice request with `single_choice`, on the new leader).

At temperature 0 the serving replica also ships a KV-cache checkpoint every few tokens, riding on
a piece (Piece.kv). The latest one per choice is kept here, stripped from the piece passed on, and
sent with the resume (`resume_kv`): the standby restores it instead of prefilling the prompt and
replaying the tokens it covers, and replays only the few sent after it.

Each resume logs where its gap went (the failover benchmark reads these lines): from the last
piece passed on to the loss being noticed, to the standby admitting the choice, to its first
piece (prompt prefilled, first replayed token), to the first new piece (the rest replayed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from shards.types import Event, Failed, Finished, GenerateRequest, Opened, Piece

log = logging.getLogger("quorum.failover")

MAX_FAILOVERS = 3  # replicas lost while answering one request before the gateway gives up



@dataclasses.dataclass(frozen=True)
class ResumeAt:
    """Where a choice goes on: its index among the request's choices and the tokens already passed on
    (replayed before sampling goes on), with the lost server's latest KV checkpoint if one came."""
    choice: int
    tokens: tuple[int, ...] = ()
    kv: bytes = dataclasses.field(default=b"", repr=False)
    kv_tokens: int = 0


def single_choice(request: GenerateRequest, at: ResumeAt) -> GenerateRequest:
    """`request`'s choice `at.choice` alone, resuming from `at` (no tokens: a fresh choice)."""
    prompts = (request.prompts[at.choice // request.n],) if request.prompts else ()
    return dataclasses.replace(request, n=1, prompts=prompts, first_choice=request.first_choice + at.choice % request.n,
                               resume_tokens=at.tokens, resume_kv=at.kv, resume_kv_tokens=at.kv_tokens)


# (where to resume, node ids to avoid) -> (node id, opened): opens the choice on another server or raises.
# The gateway's reopens a replica (single_choice + admission); a relaying member's asks the next leader.
Reopen = Callable[[ResumeAt, set[str]], Awaitable[tuple[str, Opened]]]


class ResumableRun:
    def __init__(self, node_id: str, opened: Opened, reopen: Reopen,
                 on_failover: Callable[[str], None] | None = None) -> None:
        self.node_id = node_id
        self.opened = opened
        self.prompt_tokens = opened.prompt_tokens
        self.prompt_token_ids = opened.prompt_token_ids  # as the first replica tokenized it
        self.choices = opened.choices
        self._reopen = reopen
        self._on_failover = on_failover
        self.lost: set[str] = set()
        n = opened.choices
        self.tokens: list[list[int]] = [[] for _ in range(n)]  # per choice, as passed on
        self._skip_tokens = [0] * n  # replayed tokens still to drop, per choice
        self._skip_chars = [0] * n
        self._sent_chars = [0] * n
        self.checkpoints: dict[int, tuple[bytes, int]] = {}  # per choice: latest (KV, tokens it covers)
        self._last_piece_at = time.perf_counter()  # when a piece was last passed on
        self._resume: _ResumeTiming | None = None  # the resume in progress, until its first new piece

    def cancel(self) -> None:
        self.opened.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) for every choice in order, across failovers; one end per choice."""
        opened, base, next_choice, failovers = self.opened, 0, 0, 0
        while True:
            lost = None
            async for index, event in opened.events:
                i = base + index
                if isinstance(event, Failed) and event.retryable and failovers < MAX_FAILOVERS:
                    lost = (i, event.message)
                    break
                if isinstance(event, Piece):
                    if event.kv:
                        self.checkpoints[i] = (event.kv, event.kv_tokens)
                        event = dataclasses.replace(event, kv=b"", kv_tokens=0)
                    if self._resume is not None and self._resume.first_piece is None:
                        self._resume.first_piece = time.perf_counter()
                    event = self._new_part(i, event)
                    if event is None:
                        continue
                    self._passed_on(i)
                if isinstance(event, (Finished, Failed)):
                    next_choice = i + 1
                    self.checkpoints.pop(i, None)  # the choice is over: its checkpoint (up to MBs) is not needed
                    self._resume = None
                yield i, event
            opened.cancel()
            if lost is None and next_choice >= self.choices:
                return
            if lost is not None:
                failovers += 1
                self.lost.add(self.node_id)
                next_choice = lost[0]
                log.warning("replica on %s lost during choice %d (%s); resuming after %d tokens",
                            self.node_id, next_choice, lost[1], len(self.tokens[next_choice]))
                self._resume = _ResumeTiming(self._last_piece_at, time.perf_counter(),
                                             len(self.tokens[next_choice]),
                                             self.checkpoints.get(next_choice, (b"", 0))[1])
                if self._on_failover is not None:
                    self._on_failover(self.node_id)
            try:
                self.node_id, opened = await self._reopen(self._resume_at(next_choice), set(self.lost))
            except Exception as exc:  # nothing left to resume on (no replica, no leader): the choice ends in an error
                yield next_choice, Failed(f"the replica was lost and no other could resume: {exc}")
                return
            if self._resume is not None:
                self._resume.admitted = time.perf_counter()
            self.opened, base = opened, next_choice

    def _passed_on(self, i: int) -> None:
        """A new piece of choice i goes to the client: the end of a resume's gap, if one is open."""
        now, timing, self._resume = time.perf_counter(), self._resume, None
        self._last_piece_at = now
        if timing is not None:
            ms = timing.milliseconds(now)
            log.info("choice %d resumed on %s, %d tokens replayed: first new piece %.0f ms after the last one "
                     "(loss noticed at %.0f ms, admitted at %.0f, first replayed piece at %.0f)%s",
                     i, self.node_id, timing.replayed, ms["gap"], ms["noticed"], ms["admitted"], ms["first_piece"],
                     f"; sent a KV checkpoint of {timing.kv_tokens} tokens" if timing.kv_tokens else "")

    def _resume_at(self, i: int) -> ResumeAt:
        """Choice i from what was passed on (all of it: none, for a fresh choice)."""
        self._skip_tokens[i] = len(self.tokens[i])
        self._skip_chars[i] = self._sent_chars[i]
        kv, kv_tokens = self.checkpoints.get(i, (b"", 0))
        return ResumeAt(i, tuple(self.tokens[i]), kv, kv_tokens)

    def _new_part(self, i: int, piece: Piece) -> Piece | None:
        """The part of a piece not passed on before (a resumed replica replays what was sent)."""
        drop_tokens = min(self._skip_tokens[i], len(piece.tokens))
        self._skip_tokens[i] -= drop_tokens
        drop_chars = min(self._skip_chars[i], len(piece.text))
        self._skip_chars[i] -= drop_chars
        if not drop_tokens and not drop_chars:
            self.tokens[i].extend(piece.tokens)
            self._sent_chars[i] += len(piece.text)
            return piece
        tokens = piece.tokens[drop_tokens:]
        text = piece.text[drop_chars:]
        logprobs = piece.logprobs[drop_tokens:]
        self.tokens[i].extend(tokens)
        self._sent_chars[i] += len(text)
        if not text and not logprobs:
            return None
        return Piece(text=text, tokens=tuple(tokens), logprobs=tuple(logprobs))


@dataclasses.dataclass
class _ResumeTiming:
    """perf_counter() stamps of one resume, from the last piece passed on before the loss."""
    last_piece: float
    noticed: float
    replayed: int
    kv_tokens: int = 0  # tokens (prompt + answer) the KV checkpoint sent with the resume covers
    admitted: float | None = None
    first_piece: float | None = None

    def milliseconds(self, first_new: float) -> dict[str, float]:
        def since(t: float | None) -> float:
            return (t - self.last_piece) * 1000 if t is not None else float("nan")
        return {"noticed": since(self.noticed), "admitted": since(self.admitted),
                "first_piece": since(self.first_piece), "gap": since(first_new)}
