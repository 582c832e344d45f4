"""Resuming a relayed stream through a new leader, in process: mesh/gateway/event_wire.py (the leader's
typed events, the resume header) and mesh/gateway/leader_link.py (the relaying member renders the stream
and resumes it with mesh/replicas/failover.py when the leader's events break off)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.event_wire import RELAY_HEADER, RESUME_HEADER, BadFrame, BadResume, decode, encode, parse_resume
from mesh.gateway.forward import LeaderForwarder
from mesh.gateway.service import Gateway
from mesh.replicas.failover import ResumeAt
from shards.types import Failed, Finished, Piece, TokenLogprob
from tests.unit.test_gateway_app import MODEL, mesh


@pytest.mark.parametrize("index,event", [
    (0, Piece("Hel", (1, 2))),
    (3, Piece("lo", (3,), (TokenLogprob("lo", -0.5, (108, 111), (("la", -1.5, (108, 97)),)),))),
    (1, Finished("stop", 9, 4)),
    (0, Failed("lost", retryable=True)),
])
def test_events_cross_the_wire_typed(index, event):
    assert decode(encode(index, event)) == (index, event)


@pytest.mark.parametrize("line", [b"", b"[]", b'{"i": -1, "text": "a", "tokens": []}', b'{"i": 0}',
                                  b'{"i": true, "finish": "stop", "prompt_tokens": 1, "completion_tokens": 1}',
                                  b'{"i": 0, "text": "a", "tokens": ["x"]}', b"{" * 10_000])
def test_a_bad_line_from_the_leader_is_refused(line):
    with pytest.raises(BadFrame):
        decode(line)


def test_a_resume_header_round_trips():
    from mesh.gateway.event_wire import resume_header
    assert parse_resume(resume_header(ResumeAt(1, (5, 6))), choices=2) == ResumeAt(1, (5, 6))
    assert parse_resume(None, choices=1) is None


@pytest.mark.parametrize("text", [
    "", "nope", "[]", "[" * 100_000, "{" * 10_000, "x" * 300_000, json.dumps({"choice": 0}),
    json.dumps({"choice": 0, "tokens": [-1]}), json.dumps({"choice": 0, "tokens": [10 ** 12]}),
    json.dumps({"choice": 0, "tokens": [2 ** 64]}), json.dumps({"choice": 0, "tokens": [1.5]}),
    json.dumps({"choice": 0, "tokens": [True]}), json.dumps({"choice": 1, "tokens": []}),
    json.dumps({"choice": -1, "tokens": []}), json.dumps({"choice": 0, "tokens": list(range(40_000))}),
    json.dumps({"choice": 0, "tokens": [], "extra": 1}),
])
def test_malformed_or_hostile_resume_headers_are_refused(text):
    with pytest.raises(BadResume):
        parse_resume(text, choices=1)


class CutLeader(httpx.AsyncBaseTransport):
    """The leader's peer port, whose first typed answer breaks off after `keep` lines (a leader that
    dies mid-stream); every later request (the resumes) is answered whole."""

    def __init__(self, app, keep: int) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.keep = keep
        self.asked: list[dict] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(dict(request.headers))
        response = await self.inner.handle_async_request(request)
        if request.headers.get(RELAY_HEADER) != "events" or len(self.asked) > 1:
            return response
        lines = (await response.aread()).splitlines(keepends=True)[:self.keep]
        return httpx.Response(response.status_code, headers=response.headers, stream=_Broken(lines))


class _Broken(httpx.AsyncByteStream):
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    async def __aiter__(self):
        for line in self.lines:
            yield line
        raise httpx.ReadError("connection reset by the dying leader")


def sse_text(body: bytes, field) -> tuple[str, str, list]:
    """(text of choice 0.., ids seen, finish reasons) of an SSE stream ending in [DONE]."""
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    texts: dict[int, str] = {}
    finishes = []
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (field(choice) or "")
            if choice["finish_reason"]:
                finishes.append((choice["index"], choice["finish_reason"]))
    return "|".join(texts[i] for i in sorted(texts)), {c["id"] for c in chunks}, sorted(finishes)


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to ten."}], "n": 2},
     lambda c: c["delta"].get("content")),
    ("/v1/completions", {"prompt": ["One, two,", "Red, green,"], "n": 2, "echo": True},
     lambda c: c["text"]),
])
@pytest.mark.parametrize("keep", [1, 4, 9])
def test_a_relayed_stream_resumes_exactly_through_the_next_leader(path, body, field, keep):
    """The relaying member renders the leader's typed events; when they break off, it asks the leader
    again for the choice in progress with the token ids already sent, and every later choice fresh:
    the client's stream is the leader's own, one id, each token once."""
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **body}

    async def main():
        async with mesh() as leader:
            reference = await leader.client.post(path, json=body)
            cut = CutLeader(create_app(leader.gateway), keep)
            follower = Gateway(leader.gateway.config, Metrics())  # no replica of its own
            relay = LeaderForwarder(create_app(follower), lambda: False, lambda: "http://leader",
                                    leader.gateway.config.gateway.max_body_bytes, 1,
                                    client=lambda: httpx.AsyncClient(transport=cut, timeout=10))
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=relay), base_url="http://f",
                                             timeout=10) as client:
                    relayed = await client.post(path, json=body)
            finally:
                await relay.aclose()
            return reference, relayed, cut.asked

    reference, relayed, asked = asyncio.run(main())
    assert relayed.status_code == 200, relayed.text
    expected, got = sse_text(reference.content, field), sse_text(relayed.content, field)
    assert got[0] == expected[0] and got[2] == expected[2] and len(got[1]) == 1
    usage = [json.loads(e[6:]) for e in relayed.text.split("\n\n") if e.startswith("data: {")][-1]["usage"]
    assert usage == [json.loads(e[6:]) for e in reference.text.split("\n\n") if e.startswith("data: {")][-1]["usage"]
    resumes = [json.loads(h[RESUME_HEADER]) for h in asked if RESUME_HEADER in h]
    assert resumes and resumes[0]["tokens"], "the choice in progress resumed from its tokens"


def test_the_leaders_refusal_reaches_the_client_as_it_gave_it():
    async def main():
        async with mesh() as leader:
            follower = Gateway(leader.gateway.config, Metrics())
            transport = httpx.ASGITransport(app=create_app(leader.gateway))
            relay = LeaderForwarder(create_app(follower), lambda: False, lambda: "http://leader",
                                    leader.gateway.config.gateway.max_body_bytes, 1,
                                    client=lambda: httpx.AsyncClient(transport=transport, timeout=10))
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=relay), base_url="http://f",
                                             timeout=10) as client:
                    return await client.post("/v1/chat/completions", json={
                        "model": "no-such-model", "stream": True, "messages": [{"role": "user", "content": "x"}]})
            finally:
                await relay.aclose()

    reply = asyncio.run(main())
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
