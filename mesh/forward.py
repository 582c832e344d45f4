"""Any member's address is a valid base URL: a follower relays gateway requests to the leader.

An ASGI middleware in front of the gateway: on a follower, /v1/* requests (and control writes
that only the leader may perform) go to the leader's HTTP address unchanged, streaming included,
and the answer comes back byte for byte. A request is relayed at most once (a header marks it), so
two nodes that disagree about the leader cannot bounce it between them; such a request gets a 503.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.gateway.errors import ApiError, too_large, unavailable

log = logging.getLogger("quorum.forward")

FORWARDED = "x-quorum-forwarded"
_HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate"}


def must_forward(path: str) -> bool:
    """Paths answered by the leader only."""
    return path.startswith("/v1/") or path in ("/control/v1/join", "/control/v1/remove")


class LeaderForwarder:
    def __init__(self, app: ASGIApp, is_leader: Callable[[], bool], leader_http: Callable[[], str | None],
                 max_body_bytes: int, retry_after_s: int) -> None:
        self.app = app
        self.is_leader = is_leader
        self.leader_http = leader_http
        self.max_body = max_body_bytes
        self.retry_after = retry_after_s
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not must_forward(scope["path"]) or self.is_leader():
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        leader = self.leader_http()
        if leader is None or FORWARDED in headers:
            why = "no leader is known (an election is in progress, or this member is cut off from the majority)"
            await unavailable(f"This member cannot serve the request now: {why}.", self.retry_after,
                              code="no_leader").response()(scope, receive, send)
            return
        try:
            body = await _read_body(receive, self.max_body)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        except _Disconnected:
            return
        await self._relay(scope, receive, send, leader, headers, body)

    async def _relay(self, scope: Scope, receive: Receive, send: Send, leader: str, headers: dict[str, str],
                     body: bytes) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        url = f"http://{leader}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        out_headers = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        out_headers[FORWARDED] = "1"
        request = self._client.build_request(scope["method"], url, headers=out_headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("relay to leader %s failed: %s", leader, exc)
            await unavailable(f"The leader at {leader} did not answer ({type(exc).__name__}); retry shortly.",
                              self.retry_after, code="leader_unreachable").response()(scope, receive, send)
            return
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        relay = asyncio.ensure_future(self._stream_back(response, send))
        try:
            done, _ = await asyncio.wait({watcher, relay}, return_when=asyncio.FIRST_COMPLETED)
            if relay in done:
                relay.result()
            else:
                log.info("client left a relayed %s; closing the leader's stream", scope["path"])
        finally:
            for task in (watcher, relay):
                task.cancel()
            await asyncio.gather(watcher, relay, return_exceptions=True)
            await response.aclose()  # closing our side tells the leader to stop generating

    async def _stream_back(self, response: httpx.Response, send: Send) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
                   if k.lower() not in _HOP_BY_HOP]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            # The leader went away mid-answer; the client sees the stream end early.
            log.warning("leader stream broke off: %s", exc)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected()
        body += message.get("body", b"")
        if len(body) > limit:
            raise too_large(limit)
        if not message.get("more_body"):
            return bytes(body)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
