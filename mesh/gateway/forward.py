"""Any member's address is a valid base URL: a follower relays gateway requests to the leader.

An ASGI middleware in front of the gateway. On a follower, /v1/* and /api/* requests (and control
writes that only the leader may perform) go to the leader's HTTPS peer port (mesh/gateway/
leader_client.py). A request is relayed at most once (a header marks it), so two nodes that
disagree about the leader cannot bounce it between them; such a request gets a 503.

Streamed generations (OpenAI's chat and completions, Anthropic's messages, Ollama's chat and
generate) are not relayed byte for byte: this member's own routes answer them, with the leader
generating (mesh/gateway/leader_link.py, mesh/gateway/route_start.py): the leader sends typed events,
this member renders the stream in the client's API, and a stream whose leader dies or freezes resumes
exactly on the next leader. Any other request goes to the leader unchanged and its answer comes back
byte for byte; when the leader dies or steps down before it has answered, the request goes again to
whichever member is elected next, for up to `failover_s`, so a client of a surviving member does not
see the election. A Responses API stream (/v1/responses) is relayed byte for byte: the leader's
session log names its response, and it ends early if that leader is lost (see the README's limits).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.core.errors import ApiError, too_large, unavailable
from mesh.gateway.disconnect import ClientGone, race_disconnect
from mesh.gateway.leader_client import FORWARDED, HOP_BY_HOP, LOCAL, Buffered, LeaderClient
from mesh.gateway.leader_link import LEADER_LINK, LeaderLink

log = logging.getLogger("quorum.forward")

# Streams answered here from the leader's events: path -> whether a body that leaves out "stream" streams.
TYPED_RELAY = {"/v1/chat/completions": False, "/v1/completions": False, "/v1/messages": False,
               "/api/chat": True, "/api/generate": True}


def must_forward(path: str) -> bool:
    """Paths answered by the leader only: OpenAI's and Anthropic's /v1/*, Ollama's /api/*."""
    return path.startswith(("/v1/", "/api/")) or path == "/control/v1/remove"


class LeaderForwarder:
    """`leader_url()` is the base URL requests go to (the leader's HTTPS peer port in a daemon);
    `client()` makes the HTTP client for it (presenting this member's certificate)."""

    def __init__(self, app: ASGIApp, is_leader: Callable[[], bool], leader_url: Callable[[], str | None],
                 max_body_bytes: int, retry_after_s: int, failover_s: float = 10.0,
                 client: Callable[[], httpx.AsyncClient] | None = None) -> None:
        self.app = app
        self.is_leader = is_leader
        self.leader = LeaderClient(is_leader, leader_url, failover_s,
                                   client or (lambda: httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))))
        self.max_body = max_body_bytes
        self.retry_after = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not must_forward(scope["path"]) or self.is_leader():
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if FORWARDED in headers:
            await self._no_leader(scope, receive, send, "it was relayed here by a member that took this one "
                                                      "for the leader")
            return
        try:
            body = await _read_body(receive, self.max_body)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        except _Disconnected:
            return
        if _typed_relay(scope, body):  # this member renders the stream from the leader's typed events
            link = LeaderLink(self.leader, scope, headers, body, self.retry_after)
            await self.app({**scope, LEADER_LINK: link}, _replay(body, receive), send)
            return
        try:
            outcome = await race_disconnect(receive, self.leader.find_and_send(scope, headers, body))
        except ClientGone:
            log.info("client left a relayed %s before the leader answered", scope["path"])
            return
        if outcome is LOCAL:  # this member was elected while the request waited: answer it here
            await self.app(scope, _replay(body, receive), send)
        elif outcome is None:
            await self._no_leader(scope, receive, send, "no leader answered (an election is in progress, "
                                                      "or this member is cut off from the majority)")
        elif isinstance(outcome, Buffered):
            await send({"type": "http.response.start", "status": outcome.status_code,
                        "headers": _headers(outcome.headers)})
            await send({"type": "http.response.body", "body": outcome.body, "more_body": False})
        else:
            try:
                await race_disconnect(receive, self._stream_back(outcome, send))
            except ClientGone:
                log.info("client left a relayed %s; closing the leader's stream", scope["path"])

    async def _no_leader(self, scope: Scope, receive: Receive, send: Send, why: str) -> None:
        await unavailable(f"This member cannot serve the request now: {why}.", self.retry_after,
                          code="no_leader").response()(scope, receive, send)

    async def _stream_back(self, response: httpx.Response, send: Send) -> None:
        """Relays the leader's stream byte for byte (one that breaks off ends early)."""
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _headers(response.headers)})
        watch = asyncio.ensure_future(self.leader.close_when_deposed(response))
        try:
            async for raw in response.aiter_raw():
                await send({"type": "http.response.body", "body": raw, "more_body": True})
        except (httpx.HTTPError, httpx.StreamError) as exc:  # the leader was lost: the stream ends here
            log.warning("leader stream of %s broke off (%s); it ends early", response.request.url.path,
                        type(exc).__name__)
        finally:
            watch.cancel()
            await response.aclose()  # closing our side tells the leader to stop generating
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def aclose(self) -> None:
        await self.leader.aclose()


def _typed_relay(scope: Scope, body: bytes) -> bool:
    """A streamed generation: answered here from the leader's typed events."""
    if scope["method"] != "POST" or scope["path"] not in TYPED_RELAY:
        return False
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # not JSON: relayed as it is, the leader answers the 400
        return False
    if not isinstance(parsed, dict):
        return False
    stream = parsed.get("stream")
    return stream is True or (stream is None and TYPED_RELAY[scope["path"]])


class _Disconnected(Exception):
    pass


def _headers(headers: httpx.Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"]


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the body read already, then waits on the real one (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


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

