"""Anthropic's Messages API (mesh/gateway/anthropic.py): in process over ASGI on a NullBackend shard,
and with the real `anthropic` SDK against the app served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager

import httpx
import pytest

from mesh.gateway.app import create_app
from mesh.security.api_keys import ApiKeyCheck, new_key
from raft.commands import InitMesh
from raft.state import MeshState, apply
from tests.unit.test_gateway_ollama import CALL, EVAL, MODEL, REPLY, client, close, make_gateway, run, served

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HI = [{"role": "user", "content": "Hi"}]


def events(reply: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event; the name must match the data's type."""
    assert reply.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in reply.text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == name[len("event: "):]
        out.append((payload["type"], payload))
    return out


def assert_error(reply: httpx.Response, status: int, kind: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


def test_message_whole_in_anthropic_shape():
    async def go():
        async with client() as (c, backend):
            reply = await c.post("/v1/messages", json={"model": MODEL, "max_tokens": 100, "messages": HI,
                                                       "system": [{"type": "text", "text": "Be brief."}],
                                                       "temperature": 0.3, "stop_sequences": ["zz"]},
                                 headers={"anthropic-version": "2023-06-01"})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
            assert body["content"] == [{"type": "text", "text": REPLY}]
            assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
            assert body["usage"]["output_tokens"] == EVAL and body["usage"]["input_tokens"] > 0
            sampling, prompt = backend.seen[-1]
            assert sampling.temperature == 0.3 and sampling.stop == ("zz",) and sampling.max_tokens == 100
            assert "Be brief." in prompt
            short = (await c.post("/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": HI})).json()
            assert short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] == 2
    run(go())


def test_stream_follows_anthropics_event_sequence():
    async def go():
        async with client() as (c, _):
            got = events(await c.post("/v1/messages", json={"model": MODEL, "max_tokens": 100, "messages": HI,
                                                            "stream": True}))
            names = [n for n, _ in got]
            assert names[:2] == ["message_start", "content_block_start"]
            assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
            assert set(names[2:-3]) == {"content_block_delta"}
            assert got[0][1]["message"]["usage"]["input_tokens"] > 0
            text = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
            assert text == REPLY
            delta = got[-2][1]
            assert delta["delta"]["stop_reason"] == "end_turn"
            assert delta["usage"]["output_tokens"] == EVAL
    run(go())


def test_tools_give_tool_use_blocks_whole_and_streamed_and_results_go_back():
    async def go():
        async with client(CALL) as (c, backend):
            ask = {"model": MODEL, "max_tokens": 200, "tools": [WEATHER], "messages": HI}
            body = (await c.post("/v1/messages", json={**ask, "tool_choice": {"type": "any"}})).json()
            (block,) = body["content"]
            assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
            assert block["name"] == "get_weather" and block["input"] == {"city": "Paris"}
            assert body["stop_reason"] == "tool_use"
            got = events(await c.post("/v1/messages", json={**ask, "stream": True}))
            starts = [d["content_block"] for n, d in got if n == "content_block_start"]
            assert starts[0]["type"] == "tool_use" and starts[0]["name"] == "get_weather"
            partial = "".join(d["delta"]["partial_json"] for n, d in got if n == "content_block_delta")
            assert json.loads(partial) == {"city": "Paris"}
            assert got[-2][1]["delta"]["stop_reason"] == "tool_use"
            history = [*HI, {"role": "assistant", "content": [block]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                                     "content": [{"type": "text", "text": "12 C"}]}]}]
            reply = await c.post("/v1/messages", json={**ask, "messages": history})
            assert reply.status_code == 200, reply.text
            assert "Result of get_weather:\n12 C" in backend.seen[-1][1]
    run(go())


@pytest.mark.parametrize("payload,status,kind", [
    ({"model": MODEL, "messages": HI}, 400, "invalid_request_error"),
    ({"model": "claude-nope", "max_tokens": 5, "messages": HI}, 404, "not_found_error"),
    ({"model": MODEL, "max_tokens": 0, "messages": HI}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": HI, "tool_choice": {"type": "tool"}}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": HI, "tools": [{"name": "f", "input_schema": {"type": 3}}]}, 400,
     "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": HI, "temperature": "hot"}, 400, "invalid_request_error"),
])
def test_bad_input_is_an_anthropic_error_never_a_5xx(payload, status, kind):
    async def go():
        async with client() as (c, _):
            assert_error(await c.post("/v1/messages", json=payload), status, kind)
            broken = await c.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
            assert_error(broken, 400, "invalid_request_error")
    run(go())


def test_x_api_key_is_a_gateway_key():
    key = new_key("t")
    state = apply(apply(MeshState(), InitMesh("m", "m", 1.0)), key.command)

    async def go():
        async with client(app=lambda app: ApiKeyCheck(app, lambda: state, enforce=True)) as (c, _):
            ask = {"model": MODEL, "max_tokens": 5, "messages": HI}
            assert_error(await c.post("/v1/messages", json=ask), 401, "authentication_error")
            assert_error(await c.post("/v1/messages", json=ask, headers={"x-api-key": "qk1.bad.bad"}), 401,
                         "authentication_error")
            assert (await c.post("/v1/messages", json=ask, headers={"x-api-key": key.text})).status_code == 200
            assert (await c.post("/v1/chat/completions", json=ask, headers={"x-api-key": key.text})).status_code == 200
            assert (await c.get("/v1/models", headers={"x-api-key": "wrong"})).json()["error"]["code"] == \
                "invalid_api_key"
    run(go())


# -- the real anthropic SDK --------------------------------------------------------------------------

@contextmanager
def sdk(reply: str = REPLY):
    anthropic = pytest.importorskip("anthropic")
    gateway, _ = make_gateway(reply)
    try:
        with served(create_app(gateway)) as url:
            yield anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=20)
    finally:
        asyncio.run(close(gateway))


def test_anthropic_sdk_create_and_stream():
    import anthropic

    with sdk() as c:
        message = c.messages.create(model=MODEL, max_tokens=100, messages=HI, system="Be brief.")
        assert message.content[0].text == REPLY and message.stop_reason == "end_turn"
        with c.messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == REPLY and final.content[0].text == REPLY and final.usage.output_tokens == EVAL
        with pytest.raises(anthropic.NotFoundError):
            c.messages.create(model="claude-nope", max_tokens=5, messages=HI)
        with pytest.raises(anthropic.BadRequestError):
            c.messages.create(model=MODEL, max_tokens=5, messages=[])


def test_anthropic_sdk_with_a_tool():
    with sdk(CALL) as c:
        message = c.messages.create(model=MODEL, max_tokens=200, messages=HI, tools=[WEATHER])
        (block,) = message.content
        assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
        assert message.stop_reason == "tool_use"
        with c.messages.stream(model=MODEL, max_tokens=200, messages=HI, tools=[WEATHER]) as stream:
            final = stream.get_final_message()
        assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris"}


def test_junk_in_any_field_is_never_a_5xx():
    """Each field of a valid request, and each block's, replaced by values of the wrong type or
    shape: an answer or an Anthropic error, never a 5xx."""
    from tests.unit.test_gateway_ollama import JUNK

    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny", "is_error": False}
    good = {"model": MODEL, "max_tokens": 3, "system": "s", "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["z"],
            "tools": [WEATHER], "tool_choice": {"type": "auto"}, "stream": False,
            "messages": [*HI, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]}

    async def go():
        async with client() as (c, _):
            async def check(payload: dict) -> None:
                reply = await c.post("/v1/messages", json=payload)
                assert reply.status_code < 500, (payload, reply.text)
                if reply.status_code != 200:
                    assert_error(reply, reply.status_code, reply.json()["error"]["type"])
            for key in good:
                for value in JUNK:
                    await check({**good, key: value})
            for value in JUNK:
                for key in call:
                    await check({**good, "messages": [*HI, {"role": "assistant", "content": [{**call, key: value}]},
                                                      {"role": "user", "content": [result]}]})
                for key in result:
                    await check({**good, "messages": [*HI, {"role": "assistant", "content": [call]},
                                                      {"role": "user", "content": [{**result, key: value}]}]})
                for key in WEATHER:
                    await check({**good, "tools": [{**WEATHER, key: value}]})
                await check({**good, "messages": [{"role": "user", "content": [value]}]})
    run(go())


def test_count_tokens_counts_the_rendered_prompt():
    async def go():
        async with client() as (c, _):
            ask = {"model": MODEL, "messages": HI}
            reply = await c.post("/v1/messages/count_tokens", json=ask)
            assert reply.status_code == 200, reply.text
            plain = reply.json()["input_tokens"]
            created = (await c.post("/v1/messages", json={**ask, "max_tokens": 5})).json()
            assert plain == created["usage"]["input_tokens"] > 0, "the count is the prompt a message is made from"
            system = (await c.post("/v1/messages/count_tokens", json={**ask, "system": "Be brief."})).json()
            tools = (await c.post("/v1/messages/count_tokens", json={**ask, "tools": [WEATHER]})).json()
            assert system["input_tokens"] > plain and tools["input_tokens"] > plain
            long = [{"role": "user", "content": "word " * 5000}]
            over = (await c.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": long})).json()
            assert over["input_tokens"] > 4096, "a prompt over the window is counted all the same"
            assert_error(await c.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": []}), 400,
                         "invalid_request_error")
            assert_error(await c.post("/v1/messages/count_tokens", json={"model": "nope", "messages": HI}), 404,
                         "not_found_error")
    run(go())


def test_anthropic_sdk_count_tokens():
    with sdk() as c:
        counted = c.messages.count_tokens(model=MODEL, messages=HI, system="Be brief.")
        assert counted.input_tokens == c.messages.create(model=MODEL, max_tokens=5, messages=HI,
                                                         system="Be brief.").usage.input_tokens
