"""A gRPC server on a free loopback port for in-process tests (no TLS: the mesh's mutual TLS is tested
with real meshd processes in tests/integration/test_security.py)."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from shards.grpc_service import SERVER_OPTIONS, ShardService


@contextlib.asynccontextmanager
async def grpc_server(*services) -> AsyncIterator[tuple[grpc.aio.Server, str]]:
    """(server, "127.0.0.1:PORT") serving every service given (anything with `add_to(server)`)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    for service in services:
        service.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def shard_service(*shards) -> ShardService:
    """A ShardService serving these shards (each with .role and .model)."""
    table = {(s.role, s.model): s for s in shards}
    return ShardService(lambda: table)
