"""The gateway's work between HTTP and the shards: pick a replica, build the prompt, check it
fits, queue the generations, and turn their events into OpenAI answers or streams."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable

from mesh.cluster.sessions import NotCommitted, SessionLog, TurnRecorder
from mesh.core.config import MeshConfig
from mesh.core.errors import ApiError, bad_request, model_not_found, queue_full, unavailable
from mesh.core.metrics import Metrics
from mesh.gateway.responses import ChatFormat, ChoiceText, CompletionFormat, sse
from mesh.gateway.stream_resume import EXTRA
from mesh.gateway.tools import ToolShaper, content_violation
from mesh.gateway.validation import ChatRequest, CompletionRequest
from mesh.replicas.failover import ResumableRun
from mesh.replicas.router import LocalPicker, NoReplica, Router
from mesh.security.api_keys import caller_key_id
from shards.local import LocalShard
from shards.templates import TemplateError
from shards.types import (
    ContextLengthExceeded,
    Event,
    Failed,
    Finished,
    GenerateRequest,
    Message,
    NotReady,
    Opened,
    Piece,
    QueueFull,
)

log = logging.getLogger("quorum.gateway")

# A resumed choice whose replicas are all lost waits this long for one to come back (a crashed shard
# process is restarted within a second or two) before the stream ends in an error.
RESUME_WAIT_S = 30.0
RESUME_POLL_S = 0.05


@dataclass
class Run:
    """A request admitted by a replica: its events (resumed elsewhere if the replica is lost) and
    when it arrived (for time to first token)."""
    model: str
    resumable: ResumableRun
    started: float
    recorder: TurnRecorder | None = None  # a named session's turn, recorded in the log

    @property
    def prompt_tokens(self) -> int:
        return self.resumable.prompt_tokens

    @property
    def choices(self) -> int:
        return self.resumable.choices

    def cancel(self) -> None:
        self.resumable.cancel()


class Gateway:
    """The OpenAI side of the mesh. `picker` chooses the replica for each request: a Router over
    the whole mesh in the daemon, or a LocalPicker holding in-process shards."""

    def __init__(self, config: MeshConfig, metrics: Metrics, picker: Router | LocalPicker | None = None,
                 sessions: SessionLog | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.sessions = sessions
        self.picker = picker if picker is not None else LocalPicker()
        self.loading_detail = "starting"

    def attach(self, shard: LocalShard) -> None:
        """Serves a shard held in this process (LocalPicker only)."""
        self.picker.shards[(shard.role, shard.model)] = shard
        self.metrics.watch_queue(shard.role, shard.model, lambda: shard.waiting)
        log.info("serving %s with a local %s shard (context %d)", shard.model, shard.role, shard.n_ctx)

    def detach_all(self) -> list[LocalShard]:
        shards, self.picker.shards = list(self.picker.shards.values()), {}
        return shards

    @property
    def ready(self) -> bool:
        return bool(self.picker.ready_models("reasoning"))

    def served_models(self) -> list[str]:
        return self.picker.ready_models("reasoning")

    def known_models(self) -> list[str]:
        """Models this gateway answers for: its own catalog and the mesh's."""
        return sorted({m.name for m in self.config.models} | set(self.picker.known_models()))

    def check_model(self, model: str) -> None:
        """404 for a model the mesh does not know; 400 for one that cannot chat (an encoder)."""
        if model not in self.known_models():
            raise model_not_found(model)
        spec = self.config.model(model)
        roles = set(spec.roles if spec is not None else ()) | set(self.picker.model_roles(model))
        if roles and not roles & {"reasoning", "tool-use"}:
            raise bad_request(f"The model '{model}' makes embeddings and cannot generate text; use it with "
                              f"/v1/embeddings.", "model", "model_not_generative")

    # -- chat --------------------------------------------------------------------------------

    async def start_chat(self, req: ChatRequest) -> Run:
        if req.resume is not None:
            return await self._resume_chat(req)
        if req.session_id is None:
            return await self._open(req.model, GenerateRequest(sampling=req.sampling, n=req.n,
                                                               messages=_with_preamble(req, ())))
        if self.sessions is None:
            raise bad_request("Sessions need a mesh node (this gateway keeps no log).", "X-Session-Id")
        owner = caller_key_id() or ""  # with API keys on, the session is the key's (404 for another)
        turn, history = self.sessions.history(req.session_id, owner)
        run = await self._open(req.model, GenerateRequest(sampling=req.sampling, n=req.n,
                                                          messages=_with_preamble(req, history)))
        run.recorder = self.sessions.recorder(req.session_id, turn, req.messages, run.prompt_tokens,
                                              run.resumable.prompt_token_ids, owner)
        return run

    async def _resume_chat(self, req: ChatRequest) -> Run:
        """A stream the previous leader was answering, continued here (see mesh/gateway/stream_resume.py)."""
        state = req.resume
        self.check_model(req.model)
        messages, turn, owner = _with_preamble(req, ()), None, caller_key_id() or ""
        if req.session_id is not None and self.sessions is not None:
            turn, history = self.sessions.history(req.session_id, owner)
            messages = _with_preamble(req, history)
        request = GenerateRequest(sampling=req.sampling, n=req.n, messages=messages,
                                  kv_checkpoints=self.config.gateway.kv_checkpoints)

        def reopen(r: GenerateRequest, avoid: set[str]) -> Awaitable[tuple[str, Opened]]:
            return self._admit(req.model, r, avoid)

        progress = {i: (c.tokens, len(c.text)) for i, c in state.choices.items()}
        resumable = ResumableRun.resume(request, req.n, state.prompt_tokens, progress,
                                        state.first_unfinished(req.n), reopen)
        run = Run(model=req.model, resumable=resumable, started=time.perf_counter())
        if turn is not None:
            run.recorder = self.sessions.recorder(req.session_id, turn, req.messages, state.prompt_tokens,
                                                  owner=owner)
            done = state.choices.get(0)
            if done is not None:
                run.recorder.add(Piece(text=done.text, tokens=tuple(done.tokens)))
        log.info("resuming stream %s from a previous leader", state.id)
        return run

    async def collect_chat(self, req: ChatRequest, run: Run) -> dict:
        fmt = ChatFormat(req.model, req.logprobs)
        choices = [ChoiceText() for _ in range(run.choices)]
        shapers = [ToolShaper(req.tool_use) for _ in choices] if req.tool_use and req.tool_use.calls else None
        completion = 0
        async for index, event in self._events(run):
            if isinstance(event, Piece):
                choices[index].add(event)
                if shapers:
                    shapers[index].feed(event.text)
            elif isinstance(event, Finished):
                choices[index].finish_reason = event.reason
                completion += event.completion_tokens
                if shapers:
                    shapers[index].finish()
                    choices[index].message = shapers[index].message()
                    choices[index].finish_reason = shapers[index].finish_reason(event.reason)
                elif (problem := content_violation(req.tool_use, choices[index].text)) is not None:
                    # A JSON answer the grammar could not hold to the whole schema: said, not hidden.
                    choices[index].message = {"role": "assistant", "content": choices[index].text, "refusal": problem}
        return fmt.completion(choices, run.prompt_tokens, completion)

    async def stream_chat(self, req: ChatRequest, run: Run) -> AsyncIterator[bytes]:
        if req.tool_use is not None and req.tool_use.calls:
            async for data in self._stream_tool_calls(req, run):
                yield data
            return
        fmt = ChatFormat(req.model, req.logprobs)
        started: set[int] = set()
        texts: dict[int, str] = {}  # each choice's text, for the response_format schema check at its end
        completion = 0
        if req.resume is not None:  # same stream, same id: what was sent stays sent
            fmt.id, fmt.created = req.resume.id, req.resume.created
            started = {i for i, c in req.resume.choices.items() if c.started}
            completion = sum(c.completion_tokens for c in req.resume.choices.values() if c.finished)
        unchecked = set(started)  # choices begun by a previous leader: their whole text is not here

        def chunk(body: dict, extra: dict) -> bytes:
            # A relaying member needs the token ids to resume this stream if this leader dies.
            return sse({**body, EXTRA: {"index": index, **extra}} if req.relayed else body)

        try:
            async for index, event in self._events(run, stream=True):
                if isinstance(event, Failed):
                    yield sse(_failure(event).body())
                    return
                if index not in started:
                    started.add(index)
                    yield chunk(fmt.chunk(index, {"role": "assistant", "content": "", "refusal": None},
                                          with_usage_field=req.include_usage), {"prompt_tokens": run.prompt_tokens})
                if isinstance(event, Piece):
                    texts[index] = texts.get(index, "") + event.text
                    yield chunk(fmt.chunk(index, {"content": event.text}, logprobs=event.logprobs,
                                          with_usage_field=req.include_usage), {"tokens": list(event.tokens)})
                elif isinstance(event, Finished):
                    completion += event.completion_tokens
                    problem = None if index in unchecked else content_violation(req.tool_use, texts.get(index, ""))
                    if problem is not None:
                        yield chunk(fmt.chunk(index, {"refusal": problem}, with_usage_field=req.include_usage), {})
                    yield chunk(fmt.chunk(index, {}, finish_reason=event.reason, with_usage_field=req.include_usage),
                                {"completion_tokens": event.completion_tokens})
            if req.include_usage:
                yield sse(fmt.usage_chunk(run.prompt_tokens, completion))
            yield sse("[DONE]")
        finally:
            run.cancel()

    async def _stream_tool_calls(self, req: ChatRequest, run: Run) -> AsyncIterator[bytes]:
        """A chat stream whose answers may be tool calls: each choice's text goes through a
        ToolShaper, which holds a call's header back until it is whole and then releases its
        arguments as they come. The role rides on each choice's first delta; the tokens and
        logprobs of text held back go out with the next chunk."""
        fmt = ChatFormat(req.model, req.logprobs)
        shapers: dict[int, ToolShaper] = {}
        started: set[int] = set()
        held: dict[int, tuple[list[int], list]] = {}  # per choice: tokens and logprobs not sent yet
        completion = 0

        def chunk(index: int, delta: dict, extra: dict | None = None, finish_reason: str | None = None) -> bytes:
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", "content": None, "refusal": None, **delta}
            tokens, logprobs = held.pop(index, ([], []))
            body = fmt.chunk(index, delta, finish_reason=finish_reason, logprobs=tuple(logprobs),
                             with_usage_field=req.include_usage)
            if req.relayed:  # a relaying member keeps the tokens to resume this stream if this leader dies
                body[EXTRA] = {"index": index, "prompt_tokens": run.prompt_tokens, "tokens": tokens, **(extra or {})}
            return sse(body)

        try:
            async for index, event in self._events(run, stream=True):
                if isinstance(event, Failed):
                    yield sse(_failure(event).body())
                    return
                shaper = shapers.setdefault(index, ToolShaper(req.tool_use))
                if isinstance(event, Piece):
                    tokens, logprobs = held.setdefault(index, ([], []))
                    tokens.extend(event.tokens)
                    logprobs.extend(event.logprobs)
                    for delta in shaper.feed(event.text):
                        yield chunk(index, delta)
                elif isinstance(event, Finished):
                    for delta in shaper.finish():
                        yield chunk(index, delta)
                    completion += event.completion_tokens
                    yield chunk(index, {}, {"completion_tokens": event.completion_tokens},
                                shaper.finish_reason(event.reason))
            if req.include_usage:
                yield sse(fmt.usage_chunk(run.prompt_tokens, completion))
            yield sse("[DONE]")
        finally:
            run.cancel()

    # -- completions -------------------------------------------------------------------------

    async def start_completion(self, req: CompletionRequest) -> Run:
        return await self._open(req.model, GenerateRequest(sampling=req.sampling, n=req.n,
                                                           prompts=req.prompts))

    async def collect_completion(self, req: CompletionRequest, run: Run) -> dict:
        fmt = CompletionFormat(req.model, req.sampling.top_logprobs is not None)
        choices = [ChoiceText() for _ in range(run.choices)]
        completion = 0
        async for index, event in self._events(run):
            if isinstance(event, Piece):
                choices[index].add(event)
            elif isinstance(event, Finished):
                choices[index].finish_reason = event.reason
                completion += event.completion_tokens
        prefixes = [req.prompts[i // req.n] if req.echo else "" for i in range(len(choices))]
        return fmt.completion(choices, run.prompt_tokens, completion, prefixes)

    async def stream_completion(self, req: CompletionRequest, run: Run) -> AsyncIterator[bytes]:
        fmt = CompletionFormat(req.model, req.sampling.top_logprobs is not None)
        offsets = [0] * run.choices
        echoed: set[int] = set()
        completion = 0
        try:
            async for index, event in self._events(run, stream=True):
                if isinstance(event, Failed):
                    yield sse(_failure(event).body())
                    return
                if req.echo and index not in echoed:
                    echoed.add(index)
                    prompt = req.prompts[index // req.n]
                    offsets[index] = len(prompt)
                    yield sse(fmt.chunk(index, prompt, None, None, req.include_usage))
                if isinstance(event, Piece):
                    lp = fmt.legacy_logprobs(event.logprobs, offsets[index])
                    offsets[index] += len(event.text)
                    yield sse(fmt.chunk(index, event.text, None, lp, req.include_usage))
                elif isinstance(event, Finished):
                    completion += event.completion_tokens
                    yield sse(fmt.chunk(index, "", event.reason, None, req.include_usage))
            if req.include_usage:
                yield sse(fmt.usage_chunk(run.prompt_tokens, completion))
            yield sse("[DONE]")
        finally:
            run.cancel()

    # -- shared ------------------------------------------------------------------------------

    async def _open(self, model: str, request: GenerateRequest) -> Run:
        """Admits a request on a replica of `model`, or raises the ApiError that says why not."""
        started = time.perf_counter()
        request = dataclasses.replace(request, kv_checkpoints=self.config.gateway.kv_checkpoints)
        self.check_model(model)
        try:
            node_id, opened = await self._admit(model, request, set(), fit=bool(request.messages))
        except ContextLengthExceeded as exc:  # a chat longer than the window: the context role shortens it
            from mesh.gateway.context_window import fit_and_admit

            request, node_id, opened = await fit_and_admit(
                self, request, exc, lambda r: self._admit(model, r, set(), fit=True))
        self.metrics.prompt_tokens.labels(model).inc(opened.prompt_tokens)

        def reopen(req: GenerateRequest, avoid: set[str]) -> Awaitable[tuple[str, Opened]]:
            return self._admit(model, req, avoid)

        def counted(node_id: str) -> None:
            self.metrics.failovers.labels(model).inc()

        return Run(model=model, resumable=ResumableRun(request, node_id, opened, reopen, counted), started=started)

    async def _admit(self, model: str, request: GenerateRequest, avoid: set[str],
                     fit: bool = False) -> tuple[str, Opened]:
        """Opens `request` on the least-loaded ready replica outside `avoid` (with `fit`, a prompt
        over the window raises ContextLengthExceeded instead of its 400); a replica that turns
        out to be unreachable is skipped for the next one.

        A resume (`avoid` names the lost replicas) with no other replica waits up to RESUME_WAIT_S for
        any replica to be ready again, the lost ones included: a shard process that crashed is
        restarted on its node, and the choice resumes there."""
        retry_after = self.config.gateway.retry_after_s
        deadline = time.monotonic() + RESUME_WAIT_S if avoid else 0.0
        while True:
            try:
                node_id, shard = self._pick(model, request, avoid)
            except NoReplica:
                if time.monotonic() < deadline:
                    await asyncio.sleep(RESUME_POLL_S)
                    avoid = set()
                    continue
                raise unavailable(f"No replica of '{model}' is ready ({self.loading_detail}).", retry_after,
                                  code="loading" if not avoid else "no_replica") from None
            try:
                return node_id, await shard.open(request)
            except TemplateError as exc:
                raise bad_request(str(exc), "messages") from None
            except ContextLengthExceeded as exc:
                if fit:
                    raise
                raise bad_request(str(exc), "messages", "context_length_exceeded") from None
            except QueueFull as exc:
                raise queue_full(str(exc), retry_after) from None
            except NotReady as exc:
                log.warning("replica of %s on %s cannot take requests (%s); trying another", model, node_id, exc)
                avoid = avoid | {node_id}

    def _pick(self, model: str, request: GenerateRequest, avoid: set[str]) -> tuple[str, Any]:
        """A grammar-constrained request (tool calls, JSON answers) goes to a tool-use replica of
        the model when one is ready, else to a reasoning replica, which applies the same grammar."""
        if request.sampling.grammar:
            try:
                picked = self.picker.pick("tool-use", model, avoid)
            except NoReplica:
                pass  # no tool-use replica (the default mesh has none): the reasoning one serves it
            else:
                self.metrics.routed.labels("tool-use", model).inc()
                return picked
        picked = self.picker.pick("reasoning", model, avoid)
        self.metrics.routed.labels("reasoning", model).inc()
        return picked

    async def _events(self, run: Run, stream: bool = False) -> AsyncIterator[tuple[int, Event]]:
        """Each choice's events in turn; records time to first token; a Failed event ends a
        non-streamed answer with a 500 (a streamed one reports it in the stream)."""
        first_seen = False
        try:
            async for index, event in run.resumable.events():
                if not first_seen and isinstance(event, (Piece, Finished)):
                    first_seen = True
                    self.metrics.ttft.labels(run.model).observe(time.perf_counter() - run.started)
                if run.recorder is not None and index == 0:
                    event = await self._record(run.recorder, event)
                if isinstance(event, Failed) and not stream:
                    if event.retryable:
                        raise unavailable(event.message, self.config.gateway.retry_after_s, code="not_committed")
                    raise ApiError(500, event.message, type="server_error")
                yield index, event
        finally:
            run.cancel()

    async def _record(self, recorder: TurnRecorder, event: Event) -> Event:
        """Adds choice 0's answer to the session log; its end is committed before it is passed on."""
        if isinstance(event, Piece):
            recorder.add(event)
        elif isinstance(event, Finished):
            try:
                await recorder.finish(event.reason)
            except NotCommitted as exc:
                return Failed(str(exc), retryable=True)
        return event


def _with_preamble(req: ChatRequest, history: tuple[Message, ...] | list[Message]) -> tuple[Message, ...]:
    """The conversation a replica renders: what the tools or the JSON answer need the model to
    know (a system message), the session's history, then this turn's messages."""
    use = req.tool_use
    preamble = (Message("system", use.preamble),) if use is not None and use.preamble else ()
    return (*preamble, *history, *req.messages)


def _failure(event: Failed) -> ApiError:
    """How a failure reads inside a stream (whose status line was sent long ago)."""
    if event.retryable:
        return ApiError(503, event.message, type="service_unavailable", code="unavailable")
    return ApiError(500, event.message, type="server_error")
