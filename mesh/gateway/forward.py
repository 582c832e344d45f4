"""Any member's address is a valid base URL: a follower relays gateway requests to the leader.

An ASGI middleware in front of the gateway: on a follower, /v1/* requests (and control writes
that only the leader may perform) go to the leader's HTTP address unchanged, streaming included,
and the answer comes back byte for byte. A request is relayed at most once (a header marks it), so
two nodes that disagree about the leader cannot bounce it between them; such a request gets a 503.

When the leader dies or steps down before it has answered (connection refused or closed without
a response, or its "no leader" 503), the request goes again to whichever member is elected next,
for up to `failover_s`: a client of a surviving member does not see the election. A stream the
leader had started answering is not replayed: it ends early (see the README's limits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.core.errors import ApiError, too_large, unavailable
from mesh.gateway.disconnect import ClientGone, race_disconnect
from mesh.gateway.stream_resume import RESUME_HEADER, StreamState, split_events

log = logging.getLogger("quorum.forward")

FORWARDED = "x-quorum-forwarded"
_HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate"}


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
        self.failover_s = failover_s
        self.is_leader = is_leader
        self.leader_http = leader_url
        self.max_body = max_body_bytes
        self.retry_after = retry_after_s
        self._make_client = client or (lambda: httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)))
        self._client: httpx.AsyncClient | None = None

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
        try:
            outcome = await race_disconnect(receive, self._find_leader_and_send(scope, headers, body))
        except ClientGone:
            log.info("client left a relayed %s before the leader answered", scope["path"])
            return
        if outcome is _LOCAL:  # this member was elected while the request waited: answer it here
            await self.app(scope, _replay(body, receive), send)
        elif outcome is None:
            await self._no_leader(scope, receive, send, "no leader answered (an election is in progress, "
                                                      "or this member is cut off from the majority)")
        else:
            await self._stream(scope, receive, send, outcome, headers, body)

    async def _find_leader_and_send(self, scope: Scope, headers: dict[str, str], body: bytes):
        """The leader's response (or _LOCAL, or None after failover_s without any leader taking it)."""
        deadline = time.monotonic() + self.failover_s
        failed, failed_at = None, 0.0
        while True:
            if self.is_leader():
                return _LOCAL
            leader = self.leader_http()
            if leader is not None and (leader != failed or time.monotonic() - failed_at >= 1.0):
                response = await self._send(scope, leader, headers, body)
                if response is not None:
                    return response
                failed, failed_at = leader, time.monotonic()
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.1)

    async def _no_leader(self, scope: Scope, receive: Receive, send: Send, why: str) -> None:
        await unavailable(f"This member cannot serve the request now: {why}.", self.retry_after,
                          code="no_leader").response()(scope, receive, send)

    async def _send(self, scope: Scope, leader: str, headers: dict[str, str], body: bytes) -> httpx.Response | None:
        """Sends the request to `leader`; None if it did not take it (unreachable, closed without an
        answer, or itself without a leader), so another leader can be tried."""
        if self._client is None:
            self._client = self._make_client()
        url = f"{leader}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        out_headers = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        out_headers[FORWARDED] = "1"
        request = self._client.build_request(scope["method"], url, headers=out_headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("relay to leader %s failed (%s); waiting for a leader", leader, type(exc).__name__)
            return None
        if response.status_code == 503 and response.headers.get("content-type", "").startswith("application/json"):
            body_503 = await response.aread()
            await response.aclose()
            if b'"no_leader"' in body_503:
                return None
            return _Buffered(response, body_503)
        if scope["method"] != "GET" and not response.headers.get("content-type", "").startswith("text/event-stream"):
            # A plain answer is read whole before anything is sent on, so a leader that dies while
            # generating it costs the client nothing: the request goes to the next leader.
            watch = asyncio.ensure_future(self._close_when_deposed(response))  # a frozen leader: see there
            try:
                data = await response.aread()
            except httpx.HTTPError as exc:
                log.warning("leader %s died before answering (%s); waiting for the next", leader,
                            type(exc).__name__)
                return None
            finally:
                watch.cancel()
                await response.aclose()
            return _Buffered(response, data)
        return response

    async def _stream(self, scope: Scope, receive: Receive, send: Send, response, headers: dict[str, str],
                      body: bytes) -> None:
        if isinstance(response, _Buffered):
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": _headers(response.headers)})
            await send({"type": "http.response.body", "body": response.body, "more_body": False})
            return
        try:
            await race_disconnect(receive, self._stream_back(scope, response, send, headers, body))
        except ClientGone:
            log.info("client left a relayed %s; closing the leader's stream", scope["path"])

    async def _stream_back(self, scope: Scope, response: httpx.Response, send: Send, headers: dict[str, str],
                           body: bytes) -> None:
        """Relays the leader's stream; a chat stream whose leader dies goes on from the next one."""
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _headers(response.headers)})
        state = StreamState() if scope["path"] == "/v1/chat/completions" and response.status_code == 200 else None
        buffer = bytearray()
        resumes = 0
        watch: asyncio.Future | None = None
        try:
            while True:
                watch = asyncio.ensure_future(self._close_when_deposed(response))
                try:
                    async for raw in response.aiter_raw():
                        if state is None:
                            await send({"type": "http.response.body", "body": raw, "more_body": True})
                            continue
                        buffer += raw
                        for event in split_events(buffer):
                            await send({"type": "http.response.body", "body": state.observe(event),
                                        "more_body": True})
                    if state is None or state.done:
                        break
                    raise httpx.RemoteProtocolError("the stream ended before [DONE]")
                except httpx.HTTPError as exc:
                    watch.cancel()
                    if state is None or state.done or resumes >= 2:
                        log.warning("leader stream broke off: %s", exc)
                        break
                    resumes += 1
                    log.warning("leader stream broke off (%s); resuming %s on the next leader", exc, state.id)
                    await response.aclose()
                    buffer.clear()
                    resumed = {**headers, RESUME_HEADER: state.header()}
                    outcome = await self._find_leader_and_send(scope, resumed, body)
                    if outcome is _LOCAL:  # this member is the new leader: resume here
                        await self.app({**scope, "headers": _raw_headers({**resumed, FORWARDED: "1"})},
                                       _replay(body, _never), _Unwrapping(send, state))
                        break
                    if not isinstance(outcome, httpx.Response) or outcome.status_code != 200:
                        log.warning("no leader could resume stream %s", state.id)
                        break
                    response = outcome
        finally:
            if watch is not None:
                watch.cancel()
            await response.aclose()  # closing our side tells the leader to stop generating
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _close_when_deposed(self, response: httpx.Response, every_s: float = 0.1) -> None:
        """Closes a relayed stream once the member answering it is no longer the leader.

        A leader that is killed resets the connection, but a frozen one (SIGSTOP, a hung machine)
        just goes quiet: the read would wait forever. The Raft group notices within an election
        timeout and elects another leader; closing the stream here makes the read fail, so the
        stream resumes on the new leader like any broken one."""
        origin = response.request.url
        while True:
            await asyncio.sleep(every_s)
            current = self.leader_http()
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


class _Disconnected(Exception):
    pass


_LOCAL = object()  # "answer here": this member became the leader


class _Buffered:
    """A leader's whole answer, read before anything went to the client."""

    def __init__(self, response: httpx.Response, body: bytes) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.body = body


def _headers(headers: httpx.Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"]


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _never() -> dict:
    """A receive() for a request answered here on a client's behalf: the client's own disconnect
    is watched by the relay around it."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


class _Unwrapping:
    """A send() for a stream resumed on this member: the response head was sent already, and
    the chunks lose the fields only relaying members use."""

    def __init__(self, send: Send, state: StreamState) -> None:
        self.send = send
        self.state = state
        self.buffer = bytearray()

    async def __call__(self, message: dict) -> None:
        if message["type"] != "http.response.body":
            return
        self.buffer += message.get("body", b"")
        for event in split_events(self.buffer):
            await self.send({"type": "http.response.body", "body": self.state.observe(event), "more_body": True})


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

