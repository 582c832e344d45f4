"""Anthropic's and Ollama's streams through a dying leader, in process: a member relaying them renders
them from the leader's typed events (mesh/gateway/route_start.py) and resumes them through the next
leader exactly, as OpenAI's chat streams do (tests/unit/test_stream_resume.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.event_wire import RELAY_HEADER, RESUME_HEADER
from mesh.gateway.forward import LeaderForwarder
from mesh.gateway.service import Gateway
from tests.unit.test_gateway_app import MODEL, mesh
from tests.unit.test_stream_resume import CutLeader

ASK = [{"role": "user", "content": "Count to ten."}]


def anthropic_text(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    events = [json.loads(block.split("\n")[1][len("data: "):]) for block in reply.text.split("\n\n") if block]
    assert events[-1]["type"] == "message_stop" and not any(e["type"] == "error" for e in events), events[-3:]
    return "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")


def ollama_text(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines[-1]["done"] is True and not any("error" in line for line in lines), lines[-3:]
    return "".join(line.get("message", {}).get("content", "") + line.get("response", "") for line in lines)


async def relayed(leader, path: str, body: dict, keep: int) -> tuple[httpx.Response, list[dict]]:
    """`body` sent to a member with no replica, relaying to `leader` whose first answer breaks off
    after `keep` lines; the client's reply and the requests the leader saw."""
    cut = CutLeader(create_app(leader.gateway), keep)
    follower = Gateway(leader.gateway.config, Metrics())
    relay = LeaderForwarder(create_app(follower), lambda: False, lambda: "http://leader",
                            leader.gateway.config.gateway.max_body_bytes, 1,
                            client=lambda: httpx.AsyncClient(transport=cut, timeout=10))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=relay), base_url="http://f",
                                     timeout=10) as client:
            return await client.post(path, json=body), cut.asked
    finally:
        await relay.aclose()


@pytest.mark.parametrize("path,body,text", [
    ("/v1/messages", {"max_tokens": 8, "messages": ASK, "stream": True}, anthropic_text),
    ("/api/chat", {"messages": ASK, "options": {"num_predict": 8}}, ollama_text),  # streams by default
    ("/api/generate", {"prompt": "Count to ten.", "options": {"num_predict": 8}}, ollama_text),
    ("/api/generate", {"prompt": "One, two,", "raw": True, "options": {"num_predict": 8}}, ollama_text),
])
@pytest.mark.parametrize("keep", [1, 5])
def test_a_relayed_stream_resumes_exactly_through_the_next_leader(path, body, text, keep):
    body = {"model": MODEL, "temperature": 0, **body}
    body.setdefault("options", {})["temperature"] = 0

    async def main():
        async with mesh() as leader:
            reference = await leader.client.post(path, json=body)
            reply, asked = await relayed(leader, path, body, keep)
            return reference, reply, asked

    reference, reply, asked = asyncio.run(main())
    assert text(reply) == text(reference) and text(reference)
    assert asked[0].get(RELAY_HEADER) == "events", "the leader was asked for typed events"
    resumes = [json.loads(h[RESUME_HEADER]) for h in asked if RESUME_HEADER in h]
    assert resumes and resumes[0]["tokens"], "the choice in progress resumed from its tokens"


@pytest.mark.parametrize("path,body,shape", [
    ("/v1/messages", {"max_tokens": 8, "messages": ASK, "stream": True},
     lambda b: b["type"] == "error" and b["error"]["type"] == "not_found_error"),
    ("/api/chat", {"messages": ASK}, lambda b: set(b) == {"error"} and isinstance(b["error"], str)),
])
def test_the_leaders_refusal_reaches_the_client_in_its_apis_shape(path, body, shape):
    async def main():
        async with mesh() as leader:
            return await relayed(leader, path, {**body, "model": "no-such-model"}, keep=100)

    reply, _ = asyncio.run(main())
    assert reply.status_code == 404 and shape(reply.json()), reply.text
