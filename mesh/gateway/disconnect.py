"""Work raced against the client going away: written once for every route and the leader relay.

A generation whose client disconnected is cancelled at once, so its replica's slot frees for the next
request instead of decoding an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, TypeVar

from starlette.requests import Request
from starlette.types import Receive

log = logging.getLogger("quorum.http")

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the ASGI server reports the client gone (every other message is ignored)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled and ClientGone
    raised. Both tasks are finished before this returns."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """race_disconnect for a route's request, logged."""
    try:
        return await race_disconnect(request.receive, work)
    except ClientGone:
        log.info("client disconnected from %s; its generation is cancelled", request.url.path)
        raise
