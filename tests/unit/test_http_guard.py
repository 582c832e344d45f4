"""mesh/security/http_guard.py: a connection that does not deliver a request head in time is closed; one that
does is served, and a kept-alive connection gets the same deadline for its next request."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn

from mesh.security.http_guard import GuardedH11Protocol

HANDS_OFF = 10.0  # the most a test waits for the server to close (a hang bound, not a timing check)


class QuickGuard(GuardedH11Protocol):
    header_timeout_s = 0.3


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def with_server(check):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(app, http=QuickGuard, log_config=None, lifespan="off", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        await check(sock.getsockname()[1])
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, 10)
        sock.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), HANDS_OFF) == b""


def test_silent_and_half_sent_connections_are_closed():
    async def check(port):
        silent = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert await closed_by_server(silent[0])
        assert await closed_by_server(half[0])
    asyncio.run(with_server(check))


def test_a_complete_request_is_served_and_the_next_one_gets_the_same_deadline():
    async def check(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.1)  # in two pieces, within the deadline
        writer.write(b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDS_OFF)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(2), HANDS_OFF) == b"ok"
        writer.write(b"GET / HTTP/1.1\r\n")  # the next request, never finished
        assert await closed_by_server(reader)
    asyncio.run(with_server(check))
