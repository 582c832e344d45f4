"""Sending a request to whichever member leads now, over its HTTPS peer port.

Used by the relay of a follower (mesh/gateway/forward.py) for every request it passes on, and by
the typed relay of a stream (mesh/gateway/leader_link.py) for its first request and each resume.
A request goes again to the next leader when the one it went to did not take it (connection
refused or closed without a response, or its own "no leader" 503), for up to `failover_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import httpx
from starlette.types import Scope

log = logging.getLogger("quorum.forward")

FORWARDED = "x-quorum-forwarded"
HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
              "upgrade", "proxy-authorization", "proxy-authenticate"}
_STREAMED = ("text/event-stream", "application/x-ndjson")  # answers passed on as they come

LOCAL = object()  # "answer here": this member became the leader


class Buffered:
    """A leader's whole answer, read before anything went to the client."""

    def __init__(self, response: httpx.Response, body: bytes) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.body = body


class LeaderClient:
    """`leader_url()` is the base URL requests go to (the leader's HTTPS peer port in a daemon);
    `client()` makes the HTTP client for it (presenting this member's certificate)."""

    def __init__(self, is_leader: Callable[[], bool], leader_url: Callable[[], str | None], failover_s: float,
                 client: Callable[[], httpx.AsyncClient]) -> None:
        self.is_leader = is_leader
        self.leader_url = leader_url
        self.failover_s = failover_s
        self._make_client = client
        self._client: httpx.AsyncClient | None = None

    async def find_and_send(self, scope: Scope, headers: dict[str, str], body: bytes):
        """The leader's response (streamed, or Buffered), LOCAL when this member was elected, or None
        after failover_s without any leader taking it."""
        deadline = time.monotonic() + self.failover_s
        failed, failed_at = None, 0.0
        while True:
            if self.is_leader():
                return LOCAL
            leader = self.leader_url()
            if leader is not None and (leader != failed or time.monotonic() - failed_at >= 1.0):
                response = await self._send(scope, leader, headers, body)
                if response is not None:
                    return response
                failed, failed_at = leader, time.monotonic()
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.1)

    async def _send(self, scope: Scope, leader: str, headers: dict[str, str], body: bytes):
        """Sends the request to `leader`; None if it did not take it (unreachable, closed without an
        answer, or itself without a leader), so another leader can be tried."""
        if self._client is None:
            self._client = self._make_client()
        url = f"{leader}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        out_headers = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
        out_headers[FORWARDED] = "1"
        request = self._client.build_request(scope["method"], url, headers=out_headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("relay to leader %s failed (%s); waiting for a leader", leader, type(exc).__name__)
            return None
        content_type = response.headers.get("content-type", "")
        if response.status_code == 503 and content_type.startswith("application/json"):
            body_503 = await response.aread()
            await response.aclose()
            if b'"no_leader"' in body_503:
                return None
            return Buffered(response, body_503)
        if scope["method"] != "GET" and not content_type.startswith(_STREAMED):
            # A plain answer is read whole before anything is sent on, so a leader that dies while
            # generating it costs the client nothing: the request goes to the next leader.
            watch = asyncio.ensure_future(self.close_when_deposed(response))  # a frozen leader: see there
            try:
                data = await response.aread()
            except httpx.HTTPError as exc:
                log.warning("leader %s died before answering (%s); waiting for the next", leader,
                            type(exc).__name__)
                return None
            finally:
                watch.cancel()
                await response.aclose()
            return Buffered(response, data)
        return response

    async def close_when_deposed(self, response: httpx.Response, every_s: float = 0.1) -> None:
        """Closes a relayed stream once the member answering it is no longer the leader.

        A leader that is killed resets the connection, but a frozen one (SIGSTOP, a hung machine)
        just goes quiet: the read would wait forever. The Raft group notices within an election
        timeout and elects another leader; closing the stream here makes the read end, so the
        stream resumes on the new leader like any broken one."""
        origin = response.request.url
        while True:
            await asyncio.sleep(every_s)
            current = self.leader_url()
            if self.is_leader() or (current is not None and not _same_origin(httpx.URL(current), origin)):
                log.warning("the leader relaying stream %s was replaced; closing it to resume on the new one",
                            response.request.url.path)
                await response.aclose()
                return

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)
