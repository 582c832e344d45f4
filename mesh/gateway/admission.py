"""Admission: a generation request onto a replica, or the ApiError that says why not.

One path for a first admission, a resumed choice and a failover: pick the least-loaded ready
replica (a tool-use replica for a grammar-constrained request when one is ready), try the next one
when it cannot take requests (mesh/replicas/router.py try_replicas), turn the shard's refusals into
the API's errors (400, 429, 503), and fit a conversation longer than the window
(mesh/gateway/context_window.py). The admitted request becomes a Run whose lost replicas are
replaced by the same admission (mesh/replicas/failover.py).

A named session's turn goes to the replica that served its previous turn while that one is ready
and has a free slot: it still holds the previous prompt's KV cache, so only the new part of the
conversation is prefilled (Sessions, below; the router's `prefer`). Otherwise, and after a change of
leader (this map lives in the leader's memory, so a new leader reads the member that ended the session's last turn
from the log), the least-loaded replica serves it as any request. A turn resumed on another replica after its own
was lost moves the session there.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Callable

from mesh.core.config import MeshConfig
from mesh.core.errors import bad_request, queue_full, unavailable
from mesh.core.metrics import Metrics
from mesh.gateway.runs import Run
from mesh.replicas.failover import ResumableRun, ResumeAt, single_choice
from mesh.replicas.router import LocalPicker, NoReplica, Router, try_replicas
from raft.vocab import Role
from shards.templates import TemplateError
from shards.types import ContextLengthExceeded, GenerateRequest, Opened, QueueFull

log = logging.getLogger("quorum.gateway")

# A resumed choice whose replicas are all lost waits this long for one to come back (a crashed shard
# process is restarted within a second or two) before the stream ends in an error.
RESUME_WAIT_S = 30.0
RESUME_POLL_S = 0.05
SESSIONS_KEPT = 4096  # named sessions whose last replica is remembered (the least recently used go)


class Sessions:
    """Which member's replica served each named session's last turn (bounded, least recently used out)."""

    def __init__(self, size: int = SESSIONS_KEPT) -> None:
        self.size = size
        self._last: collections.OrderedDict[tuple[str, str, str], str] = collections.OrderedDict()

    def get(self, key: tuple[str, str, str] | None) -> str | None:
        if key is None or key not in self._last:
            return None
        self._last.move_to_end(key)
        return self._last[key]

    def put(self, key: tuple[str, str, str] | None, node_id: str) -> None:
        if key is None:
            return
        self._last[key] = node_id
        self._last.move_to_end(key)
        while len(self._last) > self.size:
            self._last.popitem(last=False)


class Admission:
    """Admits generation requests on the replicas `picker` offers (a Router over the whole mesh in
    the daemon, a LocalPicker holding in-process shards in tests)."""

    def __init__(self, config: MeshConfig, metrics: Metrics, picker: Router | LocalPicker) -> None:
        self.config = config
        self.metrics = metrics
        self.picker = picker
        self.loading_detail = "starting"
        # Why no replica of a model serves, from the mesh's state (the daemon sets it: mesh/cluster/readiness.py);
        # None falls back to loading_detail.
        self.unready_reason: Callable[[str], str | None] = lambda model: None
        self.sessions = Sessions()
        # (owner, session id) -> the member whose replica ended the session's last turn, from the log (the daemon
        # sets it), for a session this member has not routed yet (it became leader since).
        self.recorded_replica: Callable[[str, str], str | None] = lambda owner, session_id: None

    def unready(self, model: str) -> str:
        return self.unready_reason(model) or self.loading_detail

    async def open(self, model: str, request: GenerateRequest, resume: ResumeAt | None = None,
                   session: tuple[str, str] | None = None) -> Run:
        """Admits `request` (only its choice `resume.choice`, going on from `resume.tokens`, when a
        relaying member resumes a stream a lost leader was answering). `session` (owner, session id)
        names a session whose previous turn's replica is preferred."""
        started = time.perf_counter()
        request = dataclasses.replace(request, kv_checkpoints=self.config.gateway.kv_checkpoints)
        if resume is not None:
            request = single_choice(request, resume)
        key = (*session, model) if session is not None else None
        prefer = self.sessions.get(key) or (self.recorded_replica(*session) if session is not None else None)
        try:
            node_id, opened = await self.admit(model, request, set(), fit=bool(request.messages), prefer=prefer)
        except ContextLengthExceeded as exc:  # a chat longer than the window: the context role shortens it
            from mesh.gateway.context_window import fit_and_admit  # numpy: only model nodes ever fit

            request, node_id, opened = await fit_and_admit(
                self, request, exc, lambda r: self.admit(model, r, set(), fit=True, prefer=prefer))
        self.sessions.put(key, node_id)
        if prefer is not None and node_id != prefer:
            log.debug("session turn on %s, not on %s (its previous replica is gone or full)", node_id, prefer)
        self.metrics.prompt_tokens.labels(model).inc(opened.prompt_tokens)

        async def reopen(at: ResumeAt, avoid: set[str]) -> tuple[str, Opened]:
            node_id, opened = await self.admit(model, single_choice(request, at), avoid, prefer=prefer)
            self.sessions.put(key, node_id)  # the session's KV cache is there now: its next turn follows it
            return node_id, opened

        def counted(node_id: str) -> None:
            self.metrics.failovers.labels(model).inc()

        return Run(model=model, resumable=ResumableRun(node_id, opened, reopen, counted), started=started,
                   metrics=self.metrics, retry_after_s=self.config.gateway.retry_after_s)

    async def admit(self, model: str, request: GenerateRequest, avoid: set[str],
                    fit: bool = False, prefer: str | None = None) -> tuple[str, Opened]:
        """Opens `request` on the least-loaded ready replica outside `avoid` (the one on `prefer` while
        it has a free slot; with `fit`, a prompt over the window raises ContextLengthExceeded instead of
        its 400); a replica that turns out to be unreachable is skipped for the next one.

        A resume (`avoid` names the lost replicas) with no other replica waits up to RESUME_WAIT_S for
        any replica to be ready again, the lost ones included: a shard process that crashed is
        restarted on its node, and the choice resumes there."""
        retry_after = self.config.gateway.retry_after_s
        deadline = time.monotonic() + RESUME_WAIT_S if avoid else 0.0

        async def none_left(avoided: set[str]) -> set[str]:
            if time.monotonic() < deadline:
                await asyncio.sleep(RESUME_POLL_S)
                return set()
            raise unavailable(f"No replica of '{model}' is ready ({self.unready(model)}).", retry_after,
                              code="loading" if not avoided else "no_replica")

        async def use(shard: Any) -> Opened:
            try:
                return await shard.open(request)
            except TemplateError as exc:
                raise bad_request(str(exc), "messages") from None
            except ContextLengthExceeded as exc:
                if fit:
                    raise
                raise bad_request(str(exc), "messages", "context_length_exceeded") from None
            except QueueFull as exc:
                raise queue_full(str(exc), retry_after) from None

        return await try_replicas(lambda avoided: self._pick(model, request, avoided, prefer), use, none_left,
                                  f"replica of {model}", avoid)

    def _pick(self, model: str, request: GenerateRequest, avoid: set[str],
              prefer: str | None = None) -> tuple[str, Any]:
        """A grammar-constrained request (tool calls, JSON answers) goes to a tool-use replica of
        the model when one is ready, else to a reasoning replica, which applies the same grammar."""
        if request.sampling.grammar:
            try:
                picked = self.picker.pick(Role.TOOL_USE, model, avoid, prefer)
            except NoReplica:
                pass  # no tool-use replica (the default mesh has none): the reasoning one serves it
            else:
                self.metrics.routed.labels(Role.TOOL_USE, model).inc()
                return picked
        picked = self.picker.pick(Role.REASONING, model, avoid, prefer)
        self.metrics.routed.labels(Role.REASONING, model).inc()
        return picked
