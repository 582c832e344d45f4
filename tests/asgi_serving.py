"""Runs a uvicorn server (mesh/security/http_guard.py builds them) on a free loopback port for one check."""

from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable

HANDS_OFF = 10.0  # the most a test waits for the server to answer, close or stop (a hang bound, not a timing check)


async def serving(server, check: Callable[[int], Awaitable[None]]) -> None:
    """Serves until `check(port)` returns, then stops the server (bounded)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):  # bounded: the server binds at once
            if server.started:
                break
            await asyncio.sleep(0.01)
        await check(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, HANDS_OFF)
        sock.close()
