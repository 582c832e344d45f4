"""shards/grpc_service.py ShardService and mesh/replicas/remote_shard.py RemoteShard over real loopback gRPC:
the remote stream equals the local one, refusals surface as the local exceptions, cancelling
stops the generation on the server, a lost or frozen peer ends the stream with Failed, and
malformed requests are refused with INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from typing import AsyncIterator, Iterator

import grpc
import pytest

from mesh.replicas.remote_shard import RemoteError, RemoteShard
from proto import mesh_pb2, mesh_pb2_grpc
from shards.backend_null import NullBackend
from shards.grpc_service import (
    CLIENT_OPTIONS,
    CONNECT_TIMEOUT_MS,
    REASON_KEY,
    SERVER_OPTIONS,
    ShardService,
    event_from_proto,
    event_to_proto,
    request_from_proto,
    request_to_proto,
)
from shards.local import LocalShard
from shards.templates import TemplateError
from shards.types import (
    ContextLengthExceeded,
    Failed,
    Finished,
    GenerateRequest,
    Message,
    NotReady,
    Piece,
    QueueFull,
    Sampling,
    TokenLogprob,
)
from tests.grpc_serving import grpc_server, shard_service

ROLE, MODEL = "reasoning", "gemma-3-270m"
WAIT_S = 10.0  # upper bound on any wait; tests normally finish far sooner


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


@contextlib.contextmanager
def local_shard(backend: NullBackend | None = None, queue_depth: int = 4, template: str | None = "gemma",
                on_finish=None, model: str = MODEL) -> Iterator[LocalShard]:
    shard = LocalShard(ROLE, model, backend or NullBackend(), queue_depth, template, on_finish)
    try:
        yield shard
    finally:
        shard.close()


@contextlib.asynccontextmanager
async def serving(*shards: LocalShard) -> AsyncIterator[tuple[grpc.aio.Server, str]]:
    async with grpc_server(shard_service(*shards)) as served:
        yield served


@contextlib.asynccontextmanager
async def remote(address: str, model: str = MODEL) -> AsyncIterator[RemoteShard]:
    shard = RemoteShard(address, ROLE, model, node_id="node-b")
    try:
        yield shard
    finally:
        await shard.close()


async def collect(opened) -> list:
    return [item async for item in opened.events]


def untimed(events: list) -> list:
    """Events with the timings (which differ between two runs) blanked."""
    return [(i, dataclasses.replace(e, first_token_s=None, decode_s=0.0) if isinstance(e, Finished) else e)
            for i, e in events]


class GatedBackend(NullBackend):
    """NullBackend whose generations wait for `gate` before their first token."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()

    def generate(self, prompt, sampling, seed, forced=(), **options):
        self.gate.wait(WAIT_S)
        yield from super().generate(prompt, sampling, seed, forced)


CHAT = (Message("system", "Be brief."), Message("user", "Name three letters."))
REQUESTS = {
    "chat, n=2, stop, logprobs": GenerateRequest(
        Sampling(temperature=0.8, seed=7, stop=("golf",), top_logprobs=2), n=2, messages=CHAT),
    "two prompts, n=2, logprobs 0": GenerateRequest(
        Sampling(seed=11, max_tokens=9, top_logprobs=0), n=2, prompts=("alpha", "beta gamma")),
    "greedy chat, no logprobs": GenerateRequest(Sampling(temperature=0.0), messages=CHAT),
}


@pytest.mark.parametrize("name", REQUESTS)
def test_remote_events_equal_local_events(name):
    req = REQUESTS[name]

    async def main():
        with local_shard() as shard:
            here = await shard.open(req)
            local_events = await collect(here)
            async with serving(shard) as (_, address), remote(address) as far:
                there = await far.open(req)
                assert far.load == 1
                remote_events = await collect(there)
                assert far.load == 0
        assert (there.prompt_tokens, there.choices) == (here.prompt_tokens, here.choices)
        assert untimed(remote_events) == untimed(local_events)
        assert {i for i, e in remote_events if isinstance(e, Finished)} == set(range(there.choices))
        assert any(isinstance(e, Piece) and e.logprobs for _, e in remote_events) == (
            req.sampling.top_logprobs is not None)

    run(main())


def test_events_survive_the_wire_exactly():
    events = [
        (3, Piece("é", (195, 169), (TokenLogprob("\ufffd", -0.25, (195,), (("\ufffd", -0.25, (195,)),)),))),
        (1, Finished("length", 7, 9, first_token_s=None, decode_s=0.5)),
        (0, Finished("stop", 7, 1, first_token_s=0.125, decode_s=0.0)),
        (2, Failed("the shard is shutting down", retryable=True)),
    ]
    for index, event in events:
        wire = mesh_pb2.GenerateEvent.FromString(event_to_proto(index, event).SerializeToString())
        assert event_from_proto(wire) == (index, event)
    req = REQUESTS["chat, n=2, stop, logprobs"]
    assert request_from_proto(request_to_proto(ROLE, MODEL, req)) == req


def test_queue_full_surfaces_as_queue_full():
    backend = GatedBackend()

    async def main():
        with local_shard(backend, queue_depth=1) as shard:
            try:
                async with serving(shard) as (_, address), remote(address) as far:
                    first = await far.open(GenerateRequest(Sampling(), n=2, prompts=("a",)))
                    with pytest.raises(QueueFull) as refused:
                        await far.open(GenerateRequest(Sampling(), prompts=("b",)))
                    assert refused.value.depth == 1
                    assert far.load == 1
                    backend.gate.set()
                    events = await collect(first)
                    assert [e.reason for _, e in events if isinstance(e, Finished)] == ["stop", "stop"]
            finally:
                backend.gate.set()

    run(main())


def test_context_too_long_surfaces_with_the_local_message():
    req = GenerateRequest(Sampling(max_tokens=40), prompts=("x" * 30,))

    async def main():
        with local_shard(NullBackend(n_ctx=64)) as shard:
            with pytest.raises(ContextLengthExceeded) as here:
                await shard.open(req)
            async with serving(shard) as (_, address), remote(address) as far:
                with pytest.raises(ContextLengthExceeded) as there:
                    await far.open(req)
                assert far.load == 0
        assert str(there.value) == str(here.value)

    run(main())


def test_template_error_surfaces_as_template_error():
    async def main():
        with local_shard(template=None, model="no-template") as shard:
            async with serving(shard) as (_, address), remote(address, "no-template") as far:
                with pytest.raises(TemplateError, match="no chat template"):
                    await far.open(GenerateRequest(Sampling(), messages=CHAT))

    run(main())


def test_unknown_model_and_unreachable_node_are_not_ready():
    with socket.socket() as s:  # a loopback port with nothing listening once closed
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def main():
        with local_shard() as shard:
            async with serving(shard) as (_, address), remote(address, "other-model") as far:
                with pytest.raises(NotReady, match="UNAVAILABLE"):
                    await far.open(GenerateRequest(Sampling(), messages=CHAT))
                assert far.load == 0
        async with remote(dead) as far:
            with pytest.raises(NotReady):
                await far.open(GenerateRequest(Sampling(), messages=CHAT))
            with pytest.raises(NotReady):
                await far.health(timeout_s=2.0)
            assert far.load == 0

    run(main())


def test_client_cancel_stops_the_generation_on_the_server():
    ended: list[Finished] = []
    done = threading.Event()

    def on_finish(finished: Finished) -> None:
        ended.append(finished)
        done.set()

    async def main():
        backend = NullBackend(n_ctx=1024, reply_tokens=500, delay_s=0.005)  # 2.5 s if not stopped
        with local_shard(backend, on_finish=on_finish) as shard:
            async with serving(shard) as (_, address), remote(address) as far:
                opened = await far.open(GenerateRequest(Sampling(), prompts=("go",)))
                _, first = await anext(opened.events)
                assert isinstance(first, Piece)
                opened.cancel()
                assert far.load == 0
                assert await asyncio.to_thread(done.wait, WAIT_S)
                assert await collect(opened) == []  # ends quietly after our own cancel

    run(main())
    [finished] = ended
    assert finished.reason == "cancelled"
    assert finished.completion_tokens < 100  # stopped within a few tokens, not run to the end


def test_server_stopped_mid_stream_ends_events_with_failed_quickly():
    async def main():
        backend = NullBackend(n_ctx=1024, reply_tokens=500, delay_s=0.005)
        with local_shard(backend) as shard:
            async with serving(shard) as (server, address), remote(address) as far:
                opened = await far.open(GenerateRequest(Sampling(), n=2, prompts=("go",)))
                _, first = await anext(opened.events)
                assert isinstance(first, Piece)
                started = time.perf_counter()
                await server.stop(None)
                rest = await collect(opened)
                assert time.perf_counter() - started < 2.0
                assert [(i, type(e)) for i, e in rest if not isinstance(e, Piece)] == [(0, Failed), (1, Failed)]
                assert far.load == 0

    run(main())


class FreezableProxy:
    """A loopback TCP proxy that can freeze: it stops forwarding without closing anything, as a
    SIGSTOPped peer or a cut cable would look to the other side."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def freeze(self) -> None:
        self.flowing.clear()

    async def _connect(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            await self.flowing.wait()
            writer.write(data)
            await writer.drain()


def test_frozen_peer_is_detected_by_keepalive():
    """LIBRARY-NOTES: the keepalive options detect a frozen peer in ~0.5 s (newer transports
    clamp keepalive: this is the regression test). The stream is idle when the peer freezes (the
    generation waits in the queue), so only keepalive pings can notice."""
    backend = GatedBackend()

    async def main():
        with local_shard(backend) as shard:
            try:
                async with serving(shard) as (_, address):
                    async with FreezableProxy(int(address.rsplit(":", 1)[1])) as proxy, \
                            remote(proxy.address) as far:
                        opened = await far.open(GenerateRequest(Sampling(), prompts=("go",)))
                        proxy.freeze()
                        frozen_at = time.perf_counter()
                        events = await collect(opened)
                        assert time.perf_counter() - frozen_at < 2.0  # 0.75 s measured
                        assert [type(e) for _, e in events] == [Failed]
                        assert far.load == 0
            finally:
                backend.gate.set()

    run(main())


def test_a_peer_that_accepts_and_never_answers_is_not_ready_within_the_connect_timeout():
    """A frozen member's kernel still accepts connections: without a connect deadline gRPC waits 20 s there
    before the router may try another replica (a resumed stream stalled that long after a lost leader)."""
    async def main():
        with socket.socket() as listener:  # accepts into its backlog, never speaks TLS or HTTP/2
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            far = RemoteShard(f"127.0.0.1:{listener.getsockname()[1]}", ROLE, MODEL, node_id="node-b",
                              credentials=grpc.ssl_channel_credentials())
            try:
                started = time.perf_counter()
                with pytest.raises(NotReady, match="UNAVAILABLE"):
                    await far.open(GenerateRequest(Sampling(), messages=CHAT))
                assert time.perf_counter() - started < CONNECT_TIMEOUT_MS / 1000 + 10.0  # 20 s without it
                assert far.load == 0
            finally:
                await far.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_health_reports_the_shard():
    async def main():
        with local_shard(NullBackend(n_ctx=256)) as shard:
            async with serving(shard) as (_, address), remote(address) as far:
                health = await far.health()
                assert health == {"node_id": "node-b", "address": address, "role": ROLE, "model": MODEL,
                                  "ready": True, "waiting": 0, "busy": False, "n_ctx": 256, "load": 0}
                assert far.n_ctx == 256
                async with remote(address, "other-model") as other:
                    assert (await other.health())["ready"] is False

    run(main())


def test_malformed_requests_are_refused_and_the_server_keeps_serving():
    chat = [mesh_pb2.Message(role="user", content="hi")]
    malformed = {
        "n=0": mesh_pb2.GenerateRequest(role=ROLE, model=MODEL, n=0, messages=chat),
        "n=10_000": mesh_pb2.GenerateRequest(role=ROLE, model=MODEL, n=10_000, messages=chat),
        "neither messages nor prompts": mesh_pb2.GenerateRequest(role=ROLE, model=MODEL, n=1),
        "bad role": mesh_pb2.GenerateRequest(role=ROLE, model=MODEL, n=1,
                                             messages=[mesh_pb2.Message(role="tool", content="x")]),
        "nan temperature": mesh_pb2.GenerateRequest(role=ROLE, model=MODEL, n=1, messages=chat,
                                                    sampling=mesh_pb2.Sampling(temperature=float("nan"))),
    }

    async def refused(call) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        return caught.value

    async def main():
        with local_shard() as shard:
            async with serving(shard) as (_, address):
                async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
                    stub = mesh_pb2_grpc.ShardStub(channel)
                    for name, request in malformed.items():
                        error = await refused(stub.Generate(request))
                        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                        assert dict(error.trailing_metadata())[REASON_KEY] == "bad_request", name
                    raw = channel.unary_stream("/quorum.mesh.v1.Shard/Generate")  # bytes in, bytes out
                    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x02\xc3\x28"):
                        error = await refused(raw(garbage))
                        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
                        assert dict(error.trailing_metadata())[REASON_KEY] == "bad_request", garbage
                async with remote(address) as far:
                    with pytest.raises(RemoteError) as bad:
                        await far.open(GenerateRequest(Sampling(), n=0, messages=CHAT))
                    assert bad.value.reason == "bad_request"
                    events = await collect(await far.open(GenerateRequest(Sampling(), messages=CHAT)))
                    assert isinstance(events[-1][1], Finished)

    run(main())


def test_generated_registration_serves_the_same_service():
    """mesh_pb2_grpc.add_ShardServicer_to_server works too (only garbage bytes then get UNKNOWN)."""
    async def main():
        with local_shard() as shard:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            mesh_pb2_grpc.add_ShardServicer_to_server(ShardService(lambda: {(ROLE, MODEL): shard}), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with remote(f"127.0.0.1:{port}") as far:
                    events = await collect(await far.open(GenerateRequest(Sampling(), messages=CHAT)))
                    assert isinstance(events[-1][1], Finished)
                    with pytest.raises(RemoteError, match="n must be at least 1"):
                        await far.open(GenerateRequest(Sampling(), n=0, messages=CHAT))
            finally:
                await server.stop(None)

    run(main())
