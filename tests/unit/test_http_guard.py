"""mesh/security/http_guard.py: one deadline for a whole request, head and body, with a minimum rate.
A connection that does not deliver its request head, or trickles its body, is closed (408 when part of
it came); one that delivers in time is served, a body arriving at the minimum rate is never cut, and a
kept-alive connection gets the same deadline for its next request.

Hostile input tried here: a silent connection, half a request head, a body trickled a byte at a time
(to an app that waits for it, and to one that refused the request without reading it)."""

from __future__ import annotations

import asyncio

from mesh.security.http_guard import ConnectionLimits, guarded, guarded_server
from tests.asgi_serving import HANDS_OFF, serving

QUICK = ConnectionLimits(request_timeout_s=0.5, min_bytes_per_s=1000, max_per_address=0)


async def app(scope, receive, send):
    """Reads the whole body (unless the path is /refuse) and answers its length."""
    size = 0
    if scope["path"] != "/refuse":
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 403 if scope["path"] == "/refuse" else 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def with_server(check, limits: ConnectionLimits = QUICK):
    await serving(guarded_server(app, guarded(limits)), check)


async def rest(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), HANDS_OFF)


def head(path: str = "/", length: int | None = None) -> bytes:
    size = b"" if length is None else b"content-length: %d\r\n" % length
    return b"POST %s HTTP/1.1\r\nhost: x\r\n%s\r\n" % (path.encode(), size)


def test_silent_and_half_sent_connections_are_closed():
    async def check(port):
        silent = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert await rest(silent[0]) == b""  # nothing came: closed without a word
        assert (await rest(half[0])).startswith(b"HTTP/1.1 408 ")
    asyncio.run(with_server(check))


def test_a_complete_request_is_served_and_the_next_one_gets_the_same_deadline():
    async def check(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.1)  # in two pieces, within the deadline
        writer.write(b"\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDS_OFF)
        assert answer.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(1), HANDS_OFF) == b"0"
        writer.write(b"GET / HTTP/1.1\r\n")  # the next request, never finished
        assert (await rest(reader)).startswith(b"HTTP/1.1 408 ")
    asyncio.run(with_server(check))


async def trickle(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, every: float) -> bytes:
    """Sends a byte every `every` s until the server answers or closes; all it sent until it closed."""
    got = b""
    for _ in range(int(HANDS_OFF / every)):  # bounded: the server must close long before
        writer.write(b"x")
        try:
            got = await asyncio.wait_for(reader.read(1), every)
            break  # an answer, or b"" for a close
        except asyncio.TimeoutError:
            continue
    return got + await rest(reader)


def test_a_trickled_body_is_cut_at_the_deadline_even_after_the_head_arrived():
    async def check(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("/", 10_000))
        started = asyncio.get_running_loop().time()
        answer = await trickle(writer, reader, 0.05)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
        assert asyncio.get_running_loop().time() - started < HANDS_OFF
    asyncio.run(with_server(check))


def test_a_trickled_body_after_an_early_refusal_is_cut_too():
    async def check(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("/refuse", 10_000))
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDS_OFF)
        assert answer.startswith(b"HTTP/1.1 403")
        assert await asyncio.wait_for(reader.readexactly(1), HANDS_OFF) == b"0"
        assert await trickle(writer, reader, 0.05) == b""  # it kept sending its body: closed all the same
    asyncio.run(with_server(check))


def test_a_body_at_the_minimum_rate_outlives_the_base_deadline():
    """3000 bytes at ~2000 B/s (the minimum is 1000): 1.5 s, three times the 0.5 s base deadline."""
    async def check(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("/", 3000))
        for _ in range(15):
            writer.write(b"y" * 200)
            await asyncio.sleep(0.1)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDS_OFF)
        assert answer.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(4), HANDS_OFF) == b"3000"
        writer.close()
    asyncio.run(with_server(check))


def test_a_tls_handshake_that_never_comes_is_cut_at_the_deadline():
    """A connection to an HTTPS port that sends nothing (or half a ClientHello) is closed after
    request_timeout_s, not asyncio's 60 s."""
    from mesh.security.pki import create_ca, issue_node_certificate, server_only_context

    ca, ca_key = create_ca("t")
    key, cert = issue_node_certificate(ca, ca_key, "n1")

    async def check(port):
        silent = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
        started = asyncio.get_running_loop().time()
        assert await rest(silent[0]) == b"" and await rest(half[0]) == b""
        assert asyncio.get_running_loop().time() - started < HANDS_OFF  # not asyncio's 60 s

    asyncio.run(serving(guarded_server(app, guarded(QUICK), server_only_context(cert, key)), check))


def test_two_https_servers_starting_at_once_both_bound_the_handshake():
    """meshd starts the gateway and the peer port together: on asyncio's own loop (no uvloop) the handshake
    patch of one must not be taken away under the other (it ended meshd with an AttributeError)."""
    import socket

    from mesh.security.pki import create_ca, issue_node_certificate, server_only_context

    ca, ca_key = create_ca("t")
    key, cert = issue_node_certificate(ca, ca_key, "n1")

    async def both():
        servers = [guarded_server(app, guarded(QUICK), server_only_context(cert, key)) for _ in range(2)]
        socks = [socket.socket() for _ in servers]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in zip(servers, socks)]
        try:
            for _ in range(1000):  # bounded: both bind at once
                if all(server.started for server in servers) or any(task.done() for task in tasks):
                    break
                await asyncio.sleep(0.01)
            assert not any(task.done() for task in tasks), [task.exception() for task in tasks if task.done()]
            for sock in socks:
                silent = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
                started = asyncio.get_running_loop().time()
                assert await rest(silent[0]) == b""
                assert asyncio.get_running_loop().time() - started < HANDS_OFF  # not asyncio's 60 s
        finally:
            for server in servers:
                server.should_exit = True
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANDS_OFF)
            for sock in socks:
                sock.close()
        assert "create_server" not in vars(asyncio.get_running_loop())  # the loop's own method again

    asyncio.run(both())
