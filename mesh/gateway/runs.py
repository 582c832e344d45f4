"""A request the mesh has taken: its choices' typed events, wherever they come from.

A Run's events come from a replica (through mesh/replicas/failover.py, which resumes a lost
replica's choice on another) or, on a member relaying to the leader, from the leader's gateway
over the peer port (mesh/gateway/leader_link.py, which resumes through the next leader with the
same code). Every answer, streamed or not, in every API, is rendered from `Run.events`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator

from mesh.cluster.sessions import TurnRecorder
from mesh.core.errors import ApiError, unavailable
from mesh.core.metrics import Metrics
from mesh.gateway.session_turns import record
from mesh.replicas.failover import ResumableRun
from shards.types import Event, Failed, Finished, Piece


@dataclass
class Run:
    """A request admitted by a replica (or by the leader): its events (resumed elsewhere if the
    server is lost) and when it arrived (for time to first token)."""
    model: str
    resumable: ResumableRun
    started: float
    metrics: Metrics
    retry_after_s: int
    recorder: TurnRecorder | None = None  # a named session's turn, recorded in the log

    @property
    def prompt_tokens(self) -> int:
        return self.resumable.prompt_tokens

    @property
    def choices(self) -> int:
        return self.resumable.choices

    def cancel(self) -> None:
        self.resumable.cancel()

    async def events(self, stream: bool = False) -> AsyncIterator[tuple[int, Event]]:
        """Each choice's events in turn; records time to first token and the session's turn; a
        Failed event ends a non-streamed answer with its error (a streamed one reports it in the
        stream, see mesh/gateway/stream_render.py)."""
        first_seen = False
        try:
            async for index, event in self.resumable.events():
                if not first_seen and isinstance(event, (Piece, Finished)):
                    first_seen = True
                    self.metrics.ttft.labels(self.model).observe(time.perf_counter() - self.started)
                if self.recorder is not None and index == 0:
                    event = await record(self.recorder, event, self.resumable.node_id)
                if isinstance(event, Failed) and not stream:
                    raise failure(event, self.retry_after_s)
                yield index, event
        finally:
            self.cancel()


def failure(event: Failed, retry_after_s: int) -> ApiError:
    """How a failed generation reads: a lost server or an uncommitted turn is a 503 to retry."""
    if event.retryable:
        return unavailable(event.message, retry_after_s, code="not_committed")
    return ApiError(500, event.message, type="server_error")


def stream_failure(event: Failed) -> ApiError:
    """How a failure reads inside a stream (whose status line was sent long ago)."""
    if event.retryable:
        return ApiError(503, event.message, type="service_unavailable", code="unavailable")
    return ApiError(500, event.message, type="server_error")
