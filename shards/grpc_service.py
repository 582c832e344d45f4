"""The gRPC side of a node: its shards (Generate, Health) and its model files (FetchModel).

Everything that maps between shards/types.py and proto/mesh.proto lives here, for both ends: the
client in mesh/replicas/remote_shard.py imports the converters, the channel options and the error reasons
from this module, so the wire mapping is written once.

Refusals are gRPC statuses with a machine-readable reason in the trailing metadata key
`quorum-reason` (REASON_KEY); the details carry the human message:

    QueueFull                 RESOURCE_EXHAUSTED  queue_full  (+ quorum-queue-depth)
    ContextLengthExceeded     INVALID_ARGUMENT    context_length_exceeded  (+ quorum-n-ctx, quorum-prompt-tokens,
                                                                           quorum-max-tokens when asked)
    TemplateError             INVALID_ARGUMENT    template
    malformed request         INVALID_ARGUMENT    bad_request
    unknown (role, model)     UNAVAILABLE         not_served
    NotReady                  UNAVAILABLE         not_ready
    a bug in the shard        INTERNAL            internal

Embed (context shards): no texts or too many -> INVALID_ARGUMENT bad_request; a shard that is not
an encoder -> UNAVAILABLE not_served; QueueFull and NotReady as above. Vectors travel as bytes
(little-endian float32).

FetchModel: a name that is not a plain file name, or a bad sha256 -> INVALID_ARGUMENT bad_request;
no such file -> NOT_FOUND not_found; not verified to the requested sha256 -> FAILED_PRECONDITION
unverified; offset past the end -> OUT_OF_RANGE out_of_range.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from proto import mesh_pb2, mesh_pb2_grpc
from shards.context import MAX_TEXTS, Embedded
from shards.model_files import ModelFileError, is_verified, model_path
from shards.templates import TemplateError
from shards.tools import MAX_GRAMMAR_CHARS
from shards.types import (
    ContextLengthExceeded,
    Event,
    Failed,
    Finished,
    GenerateRequest,
    GeneratorReplica,
    Message,
    NotReady,
    Opened,
    Piece,
    QueueFull,
    Replica,
    Sampling,
    ShardKind,
    TokenLogprob,
)

log = logging.getLogger("quorum.grpc")

# -- channel and server options (LIBRARY-NOTES, grpcio) ---------------------------------------

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # both ends; gRPC's default receive limit is 4 MiB
CHUNK_BYTES = 1 << 20  # FetchModel sends the file in chunks of this size
CONNECT_TIMEOUT_MS = 4000  # the longest one attempt to connect to a peer may take (TCP and TLS)

_KEEPALIVE: tuple[tuple[str, int], ...] = (
    # A frozen peer (SIGSTOP, cable cut) goes unnoticed for a minute with keepalive_timeout_ms
    # alone; these together detect it in under a second (a regression test in
    # tests/unit/test_grpc_shard.py checks it: newer transports clamp keepalive).
    ("grpc.keepalive_time_ms", 250),
    ("grpc.keepalive_timeout_ms", 500),
    ("grpc.http2.ping_timeout_ms", 500),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A connection attempt to a frozen peer (the kernel accepts, TLS never answers) ends after this, not
    # gRPC's default of 20 s: a stream resumed after a lost leader waited that long on a frozen replica
    # (measured: 20.0 s, 3.0 s with 3000). A TLS handshake on a slow device takes well under a second.
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# For shard calls (small messages). Measured on loopback, peer frozen through a proxy:
# with BDP probing on, an idle stream (request queued) was noticed after 0.5 or 1.5 s (a BDP ping
# in flight holds keepalive back about a second), a busy one after 0.56 s; with it off, 0.75 s
# in both cases. Token streams never need the flow-control window BDP probing grows.
CLIENT_OPTIONS: tuple[tuple[str, int], ...] = _KEEPALIVE + (("grpc.http2.bdp_probe", 0),)

# For model transfers (FetchModel): bulk data needs BDP probing to grow the window beyond 64 KiB
# on links with some latency; a frozen peer is still noticed in under 1.5 s.
TRANSFER_OPTIONS: tuple[tuple[str, int], ...] = _KEEPALIVE

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Accept the clients' 250 ms pings: without these the server answers GOAWAY too_many_pings.
    ("grpc.http2.min_ping_interval_without_data_ms", 200),
    ("grpc.http2.max_ping_strikes", 0),
    # The server pings too, so a frozen client's generation is cancelled rather than run out.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# -- error reasons ---------------------------------------------------------------------------

REASON_KEY = "quorum-reason"
QUEUE_DEPTH_KEY = "quorum-queue-depth"
N_CTX_KEY = "quorum-n-ctx"
PROMPT_TOKENS_KEY = "quorum-prompt-tokens"
MAX_TOKENS_KEY = "quorum-max-tokens"

QUEUE_FULL = "queue_full"
CONTEXT_LENGTH = "context_length_exceeded"
TEMPLATE = "template"
BAD_REQUEST = "bad_request"
NOT_SERVED = "not_served"
NOT_READY = "not_ready"
UNVERIFIED = "unverified"
NOT_FOUND = "not_found"
OUT_OF_RANGE = "out_of_range"
INTERNAL = "internal"

# -- what a well-formed GenerateRequest stays within (sanity bounds, not the gateway's policy) ---

MAX_CHOICES = 64  # n times the number of prompts
MAX_STOP = 64
MAX_TOP_LOGPROBS = 100
ROLES = ("system", "developer", "user", "assistant")
INT64_MAX = (1 << 63) - 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

SHARD_SERVICE = "quorum.mesh.v1.Shard"
NODE_SERVICE = "quorum.mesh.v1.Node"


class BadRequest(ValueError):
    """A GenerateRequest that no shard should run (the sender's bug or garbage on the wire)."""


# -- conversions -----------------------------------------------------------------------------

def request_to_proto(role: str, model: str, req: GenerateRequest) -> mesh_pb2.GenerateRequest:
    s = req.sampling
    sampling = mesh_pb2.Sampling(temperature=s.temperature, top_p=s.top_p, stop=list(s.stop),
                                 presence_penalty=s.presence_penalty,
                                 frequency_penalty=s.frequency_penalty)
    if s.seed is not None:
        sampling.seed = s.seed
    if s.max_tokens is not None:
        # Any value past int64 asks for more than any context window holds: same refusal.
        sampling.max_tokens = min(s.max_tokens, INT64_MAX)
    if s.top_logprobs is not None:
        sampling.top_logprobs = s.top_logprobs
    if s.grammar:
        sampling.grammar = s.grammar
    return mesh_pb2.GenerateRequest(
        role=role, model=model, sampling=sampling, n=req.n,
        messages=[mesh_pb2.Message(role=m.role, content=m.content) for m in req.messages],
        prompts=list(req.prompts), first_choice=req.first_choice, resume_tokens=list(req.resume_tokens),
        resume_kv=req.resume_kv, resume_kv_tokens=req.resume_kv_tokens, kv_checkpoints=req.kv_checkpoints)


def request_from_proto(msg: mesh_pb2.GenerateRequest) -> GenerateRequest:
    """The request a LocalShard runs, or BadRequest naming what is wrong with it."""
    if msg.n < 1:
        raise BadRequest(f"n must be at least 1; got {msg.n}")
    if bool(msg.messages) == bool(msg.prompts):
        raise BadRequest("a request needs messages or prompts, not both and not neither")
    if msg.n * max(1, len(msg.prompts)) > MAX_CHOICES:
        raise BadRequest(f"n times the number of prompts must be at most {MAX_CHOICES}; "
                         f"got {msg.n} x {max(1, len(msg.prompts))}")
    for i, m in enumerate(msg.messages):
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m.role!r}")
    return GenerateRequest(
        sampling=_sampling_from_proto(msg.sampling) if msg.HasField("sampling") else Sampling(),
        n=msg.n, messages=tuple(Message(m.role, m.content) for m in msg.messages),
        prompts=tuple(msg.prompts), first_choice=msg.first_choice, resume_tokens=tuple(msg.resume_tokens),
        resume_kv=msg.resume_kv, resume_kv_tokens=msg.resume_kv_tokens, kv_checkpoints=msg.kv_checkpoints)


def _sampling_from_proto(s: mesh_pb2.Sampling) -> Sampling:
    temperature = s.temperature if s.HasField("temperature") else 1.0
    top_p = s.top_p if s.HasField("top_p") else 1.0
    numbers = {"temperature": temperature, "top_p": top_p, "presence_penalty": s.presence_penalty,
               "frequency_penalty": s.frequency_penalty}
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise BadRequest(f"sampling.{name} must be finite; got {value}")
    if temperature < 0:
        raise BadRequest(f"sampling.temperature must be at least 0; got {temperature}")
    if not 0 < top_p <= 1:
        raise BadRequest(f"sampling.top_p must be above 0 and at most 1; got {top_p}")
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise BadRequest(f"sampling.max_tokens must be at least 1; got {s.max_tokens}")
    if s.HasField("top_logprobs") and not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"sampling.top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}; "
                         f"got {s.top_logprobs}")
    if len(s.stop) > MAX_STOP:
        raise BadRequest(f"at most {MAX_STOP} stop sequences; got {len(s.stop)}")
    if len(s.grammar) > MAX_GRAMMAR_CHARS:
        raise BadRequest(f"sampling.grammar may be at most {MAX_GRAMMAR_CHARS} characters; got {len(s.grammar)}")
    return Sampling(
        temperature=temperature, top_p=top_p,
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(x for x in s.stop if x),
        top_logprobs=s.top_logprobs if s.HasField("top_logprobs") else None,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        grammar=s.grammar if s.HasField("grammar") and s.grammar else None)


def admitted_to_proto(opened: Opened) -> mesh_pb2.GenerateEvent:
    return mesh_pb2.GenerateEvent(admitted=mesh_pb2.Admitted(
        prompt_tokens=opened.prompt_tokens, choices=opened.choices, prompt_token_ids=list(opened.prompt_token_ids)))


def admitted_from_proto(admitted: mesh_pb2.Admitted) -> tuple[int, int, tuple[int, ...]]:
    """(prompt tokens, choices, prompt token ids) of an Admitted event."""
    return admitted.prompt_tokens, admitted.choices, tuple(admitted.prompt_token_ids)


def event_to_proto(index: int, event: Event) -> mesh_pb2.GenerateEvent:
    if isinstance(event, Piece):
        return mesh_pb2.GenerateEvent(piece=mesh_pb2.Piece(
            index=index, text=event.text, tokens=list(event.tokens),
            logprobs=[mesh_pb2.TokenLogprob(
                token=lp.token, logprob=lp.logprob, bytes=bytes(lp.bytes),
                top=[mesh_pb2.TopLogprob(token=t, logprob=p, bytes=bytes(b)) for t, p, b in lp.top])
                for lp in event.logprobs], kv=event.kv, kv_tokens=event.kv_tokens))
    if isinstance(event, Finished):
        finished = mesh_pb2.Finished(index=index, reason=event.reason, prompt_tokens=event.prompt_tokens,
                                     completion_tokens=event.completion_tokens, decode_s=event.decode_s,
                                     cached_tokens=event.cached_tokens)
        if event.first_token_s is not None:
            finished.first_token_s = event.first_token_s
        return mesh_pb2.GenerateEvent(finished=finished)
    if isinstance(event, Failed):
        return mesh_pb2.GenerateEvent(failed=mesh_pb2.Failed(index=index, message=event.message,
                                                             retryable=event.retryable))
    raise TypeError(f"not a shard event: {event!r}")


def event_from_proto(msg: mesh_pb2.GenerateEvent) -> tuple[int, Event]:
    """A Piece, Finished or Failed event with its choice index; ValueError for anything else."""
    kind = msg.WhichOneof("event")
    if kind == "piece":
        p = msg.piece
        return p.index, Piece(
            text=p.text, tokens=tuple(p.tokens),
            logprobs=tuple(TokenLogprob(token=lp.token, logprob=lp.logprob, bytes=tuple(lp.bytes),
                                        top=tuple((t.token, t.logprob, tuple(t.bytes)) for t in lp.top))
                           for lp in p.logprobs),
            kv=p.kv, kv_tokens=p.kv_tokens)
    if kind == "finished":
        f = msg.finished
        return f.index, Finished(reason=f.reason, prompt_tokens=f.prompt_tokens,
                                 completion_tokens=f.completion_tokens,
                                 first_token_s=f.first_token_s if f.HasField("first_token_s") else None,
                                 decode_s=f.decode_s, cached_tokens=f.cached_tokens)
    if kind == "failed":
        return msg.failed.index, Failed(msg.failed.message, msg.failed.retryable)
    raise ValueError(f"unexpected {kind or 'empty'} event in the middle of a stream")


# -- decoding that refuses garbage with INVALID_ARGUMENT, not UNKNOWN -------------------------

class Undecodable:
    """Stands in for a request whose bytes did not parse; the handler refuses it."""

    def __init__(self, error: str) -> None:
        self.error = error


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(str(exc))
    return parse


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str, message: str,
                 queue_depth: int | None = None, extra: tuple[tuple[str, str], ...] = ()) -> None:
    """Ends the call with `code`, the message as details and the reason in trailing metadata."""
    metadata = [(REASON_KEY, reason), *extra]
    if queue_depth is not None:
        metadata.append((QUEUE_DEPTH_KEY, str(queue_depth)))
    await context.abort(code, message, trailing_metadata=tuple(metadata))


# -- the shard service -----------------------------------------------------------------------

class ShardService(mesh_pb2_grpc.ShardServicer):
    """Serves Generate and Health for whatever shards `shards()` returns at the time of each call.

    Register it with `add_to(server)`: the generated add_ShardServicer_to_server works too, but
    then gRPC itself answers undecodable requests, with UNKNOWN instead of INVALID_ARGUMENT.
    """

    def __init__(self, shards: Callable[[], dict[tuple[str, str], Replica]]) -> None:
        self._shards = shards

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SHARD_SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=_parser(mesh_pb2.GenerateRequest),
                response_serializer=mesh_pb2.GenerateEvent.SerializeToString),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.Health, request_deserializer=_parser(mesh_pb2.HealthRequest),
                response_serializer=mesh_pb2.HealthReply.SerializeToString),
            "Embed": grpc.unary_unary_rpc_method_handler(
                self.Embed, request_deserializer=_parser(mesh_pb2.EmbedRequest),
                response_serializer=mesh_pb2.EmbedReply.SerializeToString),
        }),))

    async def Generate(self, request: mesh_pb2.GenerateRequest | Undecodable,
                       context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, BAD_REQUEST,
                         f"undecodable GenerateRequest: {request.error}")
            return
        try:
            req = request_from_proto(request)
        except BadRequest as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, BAD_REQUEST, str(exc))
            return
        shard = self._shards().get((request.role, request.model))
        if shard is None or shard.kind is not ShardKind.GENERATOR:  # an encoder does not generate
            await _abort(context, grpc.StatusCode.UNAVAILABLE, NOT_SERVED,
                         f"this node serves no {request.role!r} shard of {request.model!r}")
            return
        opened = await self._open(shard, req, context)
        try:
            await context.write(admitted_to_proto(opened))
            async for index, event in opened.events:
                await context.write(event_to_proto(index, event))
        finally:
            # The client went away (CancelledError here) or the stream ended: either way the
            # generation stops at its next token and the events generator is closed now, not
            # whenever it is collected.
            opened.cancel()
            aclose = getattr(opened.events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _open(self, shard: GeneratorReplica, req: GenerateRequest, context: grpc.aio.ServicerContext):
        """shard.open(req), with its refusals turned into statuses (context.abort raises)."""
        code = grpc.StatusCode
        try:
            return await shard.open(req)
        except QueueFull as exc:
            await _abort(context, code.RESOURCE_EXHAUSTED, QUEUE_FULL, str(exc), queue_depth=exc.depth)
        except ContextLengthExceeded as exc:
            await _abort(context, code.INVALID_ARGUMENT, CONTEXT_LENGTH, str(exc), extra=context_length_metadata(exc))
        except TemplateError as exc:
            await _abort(context, code.INVALID_ARGUMENT, TEMPLATE, str(exc))
        except NotReady as exc:
            await _abort(context, code.UNAVAILABLE, NOT_READY, str(exc) or "the shard is not ready")
        except Exception as exc:  # a bug in a shard: say so, keep serving
            log.exception("%s/%s: open failed", shard.role, shard.model)
            await _abort(context, code.INTERNAL, INTERNAL, f"the shard failed to open the request: {exc}")
        raise AssertionError("context.abort returned")

    async def Health(self, request: mesh_pb2.HealthRequest | Undecodable,
                     context: grpc.aio.ServicerContext) -> mesh_pb2.HealthReply:
        if isinstance(request, Undecodable):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, BAD_REQUEST,
                         f"undecodable HealthRequest: {request.error}")
        reply = mesh_pb2.HealthReply()
        for (role, model), shard in sorted(self._shards().items()):
            reply.shards.add(role=role, model=model, ready=shard.ready,
                             waiting=shard.waiting, busy=shard.busy, n_ctx=shard.n_ctx)
        return reply

    async def Embed(self, request: mesh_pb2.EmbedRequest | Undecodable,
                    context: grpc.aio.ServicerContext) -> mesh_pb2.EmbedReply:
        code = grpc.StatusCode
        if isinstance(request, Undecodable):
            await _abort(context, code.INVALID_ARGUMENT, BAD_REQUEST, f"undecodable EmbedRequest: {request.error}")
        inputs = embed_inputs_from_proto(request)
        if not 0 < len(inputs) <= MAX_TEXTS:
            await _abort(context, code.INVALID_ARGUMENT, BAD_REQUEST,
                         f"an EmbedRequest takes 1 to {MAX_TEXTS} inputs; got {len(inputs)}")
        shard = self._shards().get((request.role, request.model))
        if shard is None or shard.kind is not ShardKind.ENCODER:
            await _abort(context, code.UNAVAILABLE, NOT_SERVED,
                         f"this node serves no encoder for {request.role!r} of {request.model!r}")
        try:
            return embedded_to_proto(await shard.embed(inputs))
        except ValueError as exc:  # a token id outside the vocabulary: the client's mistake
            await _abort(context, code.INVALID_ARGUMENT, BAD_REQUEST, str(exc))
        except QueueFull as exc:
            await _abort(context, code.RESOURCE_EXHAUSTED, QUEUE_FULL, str(exc), queue_depth=exc.depth)
        except NotReady as exc:
            await _abort(context, code.UNAVAILABLE, NOT_READY, str(exc) or "the shard is not ready")
        except Exception as exc:  # a bug in the encoder: say so, keep serving
            log.exception("%s/%s: embed failed", request.role, request.model)
            await _abort(context, code.INTERNAL, INTERNAL, f"the encoder failed: {exc}")
        raise AssertionError("context.abort returned")


def context_length_error(message: str, metadata: dict[str, str] | None = None) -> ContextLengthExceeded:
    """The ContextLengthExceeded a peer raised, rebuilt from its message and the counts in its
    trailing metadata (0 / None where a peer did not send them)."""
    meta = metadata or {}
    exc = ContextLengthExceeded.__new__(ContextLengthExceeded)
    Exception.__init__(exc, message)
    exc.n_ctx, exc.prompt = _int_or(meta.get(N_CTX_KEY), 0), _int_or(meta.get(PROMPT_TOKENS_KEY), 0)
    exc.completion = _int_or(meta.get(MAX_TOKENS_KEY), None)
    return exc


def context_length_metadata(exc: ContextLengthExceeded) -> tuple[tuple[str, str], ...]:
    meta = ((N_CTX_KEY, str(exc.n_ctx)), (PROMPT_TOKENS_KEY, str(exc.prompt)))
    return meta + (((MAX_TOKENS_KEY, str(exc.completion)),) if exc.completion is not None else ())


def _int_or(value: str | None, default: int | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else default


def embed_request_to_proto(role: str, model: str, texts: list) -> mesh_pb2.EmbedRequest:
    """Texts go in `texts` (as before: nodes that predate `inputs` read them); a request with token
    ids sends every input in `inputs`."""
    if all(isinstance(t, str) for t in texts):
        return mesh_pb2.EmbedRequest(role=role, model=model, texts=texts)
    inputs = [mesh_pb2.EmbedInput(text=t) if isinstance(t, str)
              else mesh_pb2.EmbedInput(tokens=mesh_pb2.TokenIds(ids=list(t))) for t in texts]
    return mesh_pb2.EmbedRequest(role=role, model=model, inputs=inputs)


def embed_inputs_from_proto(request: mesh_pb2.EmbedRequest) -> list:
    """The inputs of an EmbedRequest: texts (str) and token ids (tuples of int), in order."""
    if not request.inputs:
        return list(request.texts)
    return [i.text if i.WhichOneof("input") == "text" else tuple(i.tokens.ids) for i in request.inputs]


def embedded_to_proto(e: Embedded) -> mesh_pb2.EmbedReply:
    vectors = e.vectors.astype("<f4", copy=False)
    return mesh_pb2.EmbedReply(dimensions=vectors.shape[1], vectors=vectors.tobytes(), tokens=list(e.tokens),
                               n_ctx=e.n_ctx)


def embedded_from_proto(reply: mesh_pb2.EmbedReply, texts: int) -> Embedded:
    """The Embedded a peer sent for `texts` texts; ValueError if its shape does not match."""
    import numpy as np

    d = reply.dimensions
    if d == 0 or len(reply.vectors) != texts * d * 4 or len(reply.tokens) != texts:
        raise ValueError(f"an EmbedReply for {texts} texts had {len(reply.tokens)} token counts and "
                         f"{len(reply.vectors)} bytes of {d}-dimensional vectors")
    vectors = np.frombuffer(reply.vectors, dtype="<f4").reshape(texts, d).astype(np.float32)
    return Embedded(vectors=vectors, tokens=tuple(reply.tokens), n_ctx=reply.n_ctx)


# -- the node service: model files for peers ---------------------------------------------------

class NodeService(mesh_pb2_grpc.NodeServicer):
    """Serves verified model files from `models_dir` to peers (FetchModel).

    A file is served only by its plain name, only if its verification stamp matches the sha256
    the peer asks for: a node never passes on a file it has not verified to that hash. Register
    it with `add_to(server)` (see ShardService).
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(NODE_SERVICE, {
            "FetchModel": grpc.unary_stream_rpc_method_handler(
                self.FetchModel, request_deserializer=_parser(mesh_pb2.FetchModelRequest),
                response_serializer=mesh_pb2.ModelChunk.SerializeToString),
        }),))

    async def FetchModel(self, request: mesh_pb2.FetchModelRequest | Undecodable,
                         context: grpc.aio.ServicerContext) -> None:
        code = grpc.StatusCode
        if isinstance(request, Undecodable):
            await _abort(context, code.INVALID_ARGUMENT, BAD_REQUEST,
                         f"undecodable FetchModelRequest: {request.error}")
            return
        try:
            path = model_path(self.models_dir, request.file)
        except ModelFileError as exc:
            await _abort(context, code.INVALID_ARGUMENT, BAD_REQUEST, str(exc))
            return
        sha256 = request.sha256.lower()
        if not _SHA256.fullmatch(sha256):
            await _abort(context, code.INVALID_ARGUMENT, BAD_REQUEST,
                         f"sha256 must be 64 hex digits; got {request.sha256!r}")
            return
        size = await asyncio.to_thread(_regular_file_size, path)
        if size is None:
            await _abort(context, code.NOT_FOUND, NOT_FOUND, f"no model file {request.file!r} here")
            return
        if not await asyncio.to_thread(is_verified, path, sha256):
            await _abort(context, code.FAILED_PRECONDITION, UNVERIFIED,
                         f"{request.file} here is not verified to sha256 {sha256}")
            return
        if request.offset > size:
            await _abort(context, code.OUT_OF_RANGE, OUT_OF_RANGE,
                         f"offset {request.offset} is past the end of {request.file} ({size} bytes)")
            return
        f = await asyncio.to_thread(path.open, "rb")
        try:
            await asyncio.to_thread(f.seek, request.offset)
            offset = request.offset
            while True:
                data = await asyncio.to_thread(f.read, CHUNK_BYTES)
                if data or offset == request.offset:  # always one chunk: it carries the size
                    await context.write(mesh_pb2.ModelChunk(offset=offset, data=data, total_size=size))
                offset += len(data)
                if len(data) < CHUNK_BYTES:
                    return
        finally:
            await asyncio.to_thread(f.close)


def _regular_file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None
