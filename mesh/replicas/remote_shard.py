"""A shard on another node, behind the same `open()` as a LocalShard, over gRPC.

`open()` returns once the peer has admitted the request (its Admitted event), so a refusal
surfaces from `open()` as the exception a LocalShard raises:

    RESOURCE_EXHAUSTED / queue_full                 -> QueueFull
    INVALID_ARGUMENT / context_length_exceeded      -> ContextLengthExceeded (same message)
    INVALID_ARGUMENT / template                     -> TemplateError
    UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED by the peer, connection failures,
    no Admitted within admit_timeout_s              -> NotReady (try another replica)
    anything else (bad_request, INTERNAL, ...)      -> RemoteError (a bug on one side)

Once admitted, a stream that breaks (peer killed, stopped, or frozen: the keepalive options in
CLIENT_OPTIONS notice that in about half a second) ends each unfinished choice with a Failed
event instead of hanging.

The channel asks TLS for the certificate of the member `node_id` (grpc_tls.target_for): a server that
presents any other member's certificate (a removed member posing as this one) fails the handshake.
`credentials` may be a callable (this member's current certificate): once it returns new credentials (a
renewal), the next call on an idle shard makes a new channel with them; the old one is closed by gRPC
when it is dropped (grpc.aio.Channel.__del__).

grpc.aio objects belong to the loop that made them: the channel is made lazily on the first
call's running loop and every later call must come from that loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Union

import grpc

from mesh.security.grpc_tls import target_for
from proto import mesh_pb2
from shards.grpc_service import (
    CLIENT_OPTIONS,
    CONTEXT_LENGTH,
    QUEUE_DEPTH_KEY,
    QUEUE_FULL,
    REASON_KEY,
    TEMPLATE,
    admitted_from_proto,
    context_length_error,
    embed_request_to_proto,
    embedded_from_proto,
    event_from_proto,
    request_to_proto,
)
from shards.templates import TemplateError
from shards.types import Event, Failed, Finished, GenerateRequest, NotReady, Opened, QueueFull, ShardError

log = logging.getLogger("quorum.remote")

GENERATE = "/quorum.mesh.v1.Shard/Generate"
HEALTH = "/quorum.mesh.v1.Shard/Health"
EMBED = "/quorum.mesh.v1.Shard/Embed"
EMBED_TIMEOUT_S = 120.0  # a full batch of long texts on a slow device, with room to spare

# Codes that mean "this replica cannot take it now": a router tries another one.
Credentials = Union[grpc.ChannelCredentials, Callable[[], grpc.ChannelCredentials], None]
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class RemoteError(ShardError):
    """A peer refused a request for a reason that is nobody's fault but a bug (bad_request,
    INTERNAL, UNIMPLEMENTED, ...): retrying elsewhere will not help."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.reason = reason


class RemoteShard:
    """One (role, model) shard served by the node `node_id` at `address` (host:port).

    `load` counts this client's requests in flight on it (opened and not yet ended), so a router
    can pick the least-loaded replica. `n_ctx`, `waiting` and `busy` are as of the last health().
    """

    def __init__(self, address: str, role: str, model: str, node_id: str, *,
                 credentials: Credentials = None,
                 admit_timeout_s: float = 30.0, max_in_flight: int = 256) -> None:
        self.address = address
        self.role = role
        self.model = model
        self.node_id = node_id
        self.load = 0
        self.n_ctx = 0
        self.waiting = 0
        self.busy = False
        self._credentials = credentials
        self._admit_timeout_s = admit_timeout_s  # a peer that neither admits nor refuses by then
        self._max_in_flight = max_in_flight  # gRPC cancels calls when thousands share a channel
        self._channel: grpc.aio.Channel | None = None
        self._channel_credentials: grpc.ChannelCredentials | None = None  # what self._channel was made with
        self._retired: list[grpc.aio.Channel] = []  # channels of older credentials, kept until no call runs
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"RemoteShard({self.role}/{self.model} on {self.node_id} at {self.address}, load {self.load})"

    def channel(self) -> grpc.aio.Channel:
        """This shard's channel, made on the running loop the first time."""
        loop = asyncio.get_running_loop()
        creds = self._credentials() if callable(self._credentials) else self._credentials
        if self._channel is not None and creds is not self._channel_credentials and loop is self._loop:
            # Renewed credentials: new calls take a new channel, presenting the certificate held now (one from a CA
            # that a rotation retires next is refused from then on). Calls running on the old one finish there: it
            # is held until no call runs, then dropped, which closes it (dropping it earlier would cancel them).
            self._retired.append(self._channel)
            self._channel = None
        if self._retired and self.load == 0:
            self._retired.clear()
        if self._channel is None:
            if creds is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=CLIENT_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self.address, creds,
                                                      options=(*CLIENT_OPTIONS, target_for(self.node_id)))
            self._channel_credentials = creds
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(f"{self!r}: its gRPC channel belongs to another event loop")
        return self._channel

    async def close(self) -> None:
        """Closes the channel and any of older credentials (cancelling calls still running); a later call makes a
        new one."""
        channels, self._channel, self._loop, self._retired = [self._channel, *self._retired], None, None, []
        for channel in channels:
            if channel is not None:
                await channel.close()

    async def open(self, req: GenerateRequest) -> Opened:
        """Sends the request and waits for the peer to admit it; see the module doc for errors."""
        if self.load >= self._max_in_flight:
            raise QueueFull(self.load)
        generate = self.channel().unary_stream(
            GENERATE, request_serializer=mesh_pb2.GenerateRequest.SerializeToString,
            response_deserializer=mesh_pb2.GenerateEvent.FromString)
        call = generate(request_to_proto(self.role, self.model, req))
        self.load += 1
        ended = False

        def end(_call: object = None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.load -= 1

        call.add_done_callback(end)
        try:
            first = await asyncio.wait_for(call.read(), self._admit_timeout_s)
        except grpc.aio.AioRpcError as exc:
            end()
            raise self._refusal(exc) from None
        except asyncio.TimeoutError:
            call.cancel()
            end()
            raise NotReady(f"{self.node_id} ({self.address}) did not admit the request within "
                           f"{self._admit_timeout_s:g} s") from None
        except BaseException:  # our caller was cancelled, or a bug: leave nothing running
            call.cancel()
            end()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("event") != "admitted":
            call.cancel()
            end()
            raise RemoteError(grpc.StatusCode.INTERNAL, "protocol",
                              f"{self.node_id} did not start the stream with Admitted")
        prompt_tokens, choices, prompt_token_ids = admitted_from_proto(first.admitted)
        cancelled = False

        def cancel() -> None:
            nonlocal cancelled
            cancelled = True
            call.cancel()
            end()

        return Opened(prompt_tokens=prompt_tokens, choices=choices,
                      events=self._events(call, choices, lambda: cancelled, end),
                      cancel=cancel, prompt_token_ids=prompt_token_ids)

    async def _events(self, call: grpc.aio.UnaryStreamCall, choices: int,
                      cancelled: Callable[[], bool], end: Callable[[], None]) -> AsyncIterator[tuple[int, Event]]:
        """The stream after Admitted; a broken stream ends every unfinished choice with Failed."""
        current = 0  # choices arrive in order: every choice before `current` has ended
        try:
            while current < choices:
                try:
                    msg = await call.read()
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise  # our caller's task is being cancelled
                    if cancelled():
                        return  # our own cancel(): the caller has stopped listening
                    problem = "the call was cancelled on this side (channel closed)"
                    break
                except grpc.aio.AioRpcError as exc:
                    if cancelled():
                        return
                    problem = f"{exc.code().name}: {exc.details()}"
                    break
                if msg is grpc.aio.EOF:
                    problem = "the stream ended before every choice finished"
                    break
                try:
                    index, event = event_from_proto(msg)
                except ValueError as exc:
                    problem = str(exc)
                    break
                yield index, event
                if isinstance(event, (Finished, Failed)):
                    current = index + 1
            else:
                return
            log.warning("%s/%s on %s (%s): %s", self.role, self.model, self.node_id, self.address, problem)
            message = f"lost the stream from {self.node_id} ({self.address}): {problem}"
            for index in range(current, choices):
                yield index, Failed(message, retryable=True)
        finally:
            call.cancel()  # no-op once the call has ended
            end()

    async def embed(self, texts: list[str]):
        """The peer's context shard embeds `texts` (shards.context.Embedded); refusals as for open()."""
        if self.load >= self._max_in_flight:
            raise QueueFull(self.load)
        embed = self.channel().unary_unary(EMBED, request_serializer=mesh_pb2.EmbedRequest.SerializeToString,
                                           response_deserializer=mesh_pb2.EmbedReply.FromString)
        self.load += 1
        try:
            reply = await embed(embed_request_to_proto(self.role, self.model, list(texts)), timeout=EMBED_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise self._refusal(exc) from None
        finally:
            self.load -= 1
        try:
            return embedded_from_proto(reply, len(texts))
        except ValueError as exc:
            raise RemoteError(grpc.StatusCode.INTERNAL, "protocol", f"{self.node_id}: {exc}") from None

    async def health(self, timeout_s: float = 2.0) -> dict:
        """This shard as its node reports it: {"node_id", "address", "role", "model", "ready",
        "waiting", "busy", "n_ctx", "load"}; ready is False if the node does not serve it.
        Raises NotReady if the node cannot be reached."""
        health = self.channel().unary_unary(
            HEALTH, request_serializer=mesh_pb2.HealthRequest.SerializeToString,
            response_deserializer=mesh_pb2.HealthReply.FromString)
        try:
            reply = await health(mesh_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise NotReady(f"{self.node_id} ({self.address}) health check failed: "
                           f"{exc.code().name}: {exc.details()}") from None
        entry = next((s for s in reply.shards if (s.role, s.model) == (self.role, self.model)), None)
        if entry is not None:
            self.n_ctx, self.waiting, self.busy = entry.n_ctx, entry.waiting, entry.busy
        return {"node_id": self.node_id, "address": self.address, "role": self.role, "model": self.model,
                "ready": entry is not None and entry.ready,
                "waiting": entry.waiting if entry is not None else 0,
                "busy": entry.busy if entry is not None else False,
                "n_ctx": entry.n_ctx if entry is not None else 0, "load": self.load}

    def _refusal(self, exc: grpc.aio.AioRpcError) -> Exception:
        """The exception a LocalShard would have raised for the status a peer answered."""
        code, details = exc.code(), exc.details() or ""
        meta = {k: v for k, v in (exc.trailing_metadata() or ())}
        reason = meta.get(REASON_KEY, "")
        if reason == QUEUE_FULL:
            try:
                depth = int(meta.get(QUEUE_DEPTH_KEY, "0"))
            except ValueError:
                depth = 0
            return QueueFull(depth)
        if reason == CONTEXT_LENGTH:
            return context_length_error(details, meta)
        if reason == TEMPLATE:
            return TemplateError(details)
        if code in _UNREACHABLE:
            return NotReady(f"{self.role}/{self.model} on {self.node_id} ({self.address}): "
                            f"{code.name}: {details}")
        return RemoteError(code, reason, details)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
