"""OpenAI's Responses API (mesh/gateway/responses_api.py) with the real `openai` SDK against the app
served by uvicorn on a loopback port, over a NullBackend shard; the session log is a raft stand-in
applying raft/state.py, so previous_response_id runs through the real session code."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager

import httpx
import openai
import pydantic
import pytest

from mesh.cluster.sessions import SessionLog
from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from raft.commands import InitMesh
from raft.state import MeshState, apply
from shards.local import LocalShard
from tests.unit.test_gateway_ollama import CALL, EVAL, JUNK, MODEL, REPLY, Backend, close, run, served
from tests.unit.test_session_scope import LocalRaft

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TEXT_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"]


class Mesh:
    """A gateway with a session log over one NullBackend shard."""

    def __init__(self, reply: str) -> None:
        self.raft = LocalRaft(apply(MeshState(), InitMesh("m", "m", 1.0)))
        self.gateway = Gateway(MeshConfig(), Metrics(), sessions=SessionLog(self.raft))
        self.backend = Backend(reply=reply, n_ctx=4096)
        self.gateway.attach(LocalShard("reasoning", MODEL, self.backend, 4, "gemma"))

    @property
    def prompt(self) -> str:
        return self.backend.seen[-1][1]


@contextmanager
def sdk(reply: str = REPLY):
    mesh = Mesh(reply)
    try:
        with served(create_app(mesh.gateway)) as url:
            yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=20), mesh
    finally:
        asyncio.run(close(mesh.gateway))


def test_create_answers_a_response_object():
    with sdk() as (c, mesh):
        r = c.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=100,
                               temperature=0.3, metadata={"k": "v"})
        assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
        assert r.output_text == REPLY and r.output[0].type == "message" and r.output[0].role == "assistant"
        assert r.usage.output_tokens == EVAL and r.usage.input_tokens > 0
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        assert r.instructions == "Be brief." and r.metadata == {"k": "v"} and r.max_output_tokens == 100
        sampling, prompt = mesh.backend.seen[-1]
        assert sampling.temperature == 0.3 and sampling.max_tokens == 100
        assert "Be brief." in prompt and "Hi" in prompt
        short = c.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Hi"}]}], max_output_tokens=2)
        assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_stream_follows_openais_event_sequence():
    with sdk() as (c, _):
        got = list(c.responses.create(model=MODEL, input="Hi", stream=True))
        types = [e.type for e in got]
        assert types[:4] == TEXT_EVENTS and types[-4:] == TEXT_END
        assert set(types[4:-4]) == {"response.output_text.delta"}
        assert [e.sequence_number for e in got] == list(range(len(got)))
        assert len({e.response.id for e in got if hasattr(e, "response")}) == 1
        assert "".join(e.delta for e in got if e.type == "response.output_text.delta") == REPLY
        done = got[-1].response
        assert done.status == "completed" and done.output_text == REPLY and done.usage.output_tokens == EVAL
        item_ids = {e.item_id for e in got if hasattr(e, "item_id")}
        assert item_ids == {done.output[0].id} and got[2].item.id == done.output[0].id
        with c.responses.stream(model=MODEL, input="Hi") as stream:
            text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final = stream.get_final_response()
        assert text == REPLY and final.output_text == REPLY


def test_a_function_tool_and_its_output():
    with sdk(CALL) as (c, mesh):
        r = c.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
        (call,) = r.output
        assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
        assert json.loads(call.arguments) == {"city": "Paris"}
        got = list(c.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], stream=True))
        types = [e.type for e in got]
        assert types[2] == "response.output_item.added" and got[2].item.type == "function_call"
        assert "response.function_call_arguments.delta" in types
        (args_done,) = [e for e in got if e.type == "response.function_call_arguments.done"]
        assert json.loads(args_done.arguments) == {"city": "Paris"}
        assert types[-2:] == ["response.output_item.done", "response.completed"]
        # The whole history sent again: the call and its output as items.
        history = ["Weather in Paris?", {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                         "arguments": call.arguments},
                   {"type": "function_call_output", "call_id": call.call_id, "output": "12 C"}]
        c.responses.create(model=MODEL, input=[{"role": "user", "content": history[0]}, *history[1:]],
                           tools=[WEATHER], tool_choice="none")
        assert "Result of get_weather:\n12 C" in mesh.prompt
        # Or only the output, continuing the response that made the call.
        c.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
                           input=[{"type": "function_call_output", "call_id": call.call_id, "output": "13 C"}])
        assert "Weather in Paris?" in mesh.prompt and '"get_weather"' in mesh.prompt and "13 C" in mesh.prompt


def test_previous_response_id_continues_in_the_session_log():
    with sdk() as (c, mesh):
        first = c.responses.create(model=MODEL, input="My name is Ada.", instructions="SECRET-RULES")
        (session_id,) = mesh.raft.state.sessions
        second = c.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id)
        assert "My name is Ada." in mesh.prompt and REPLY in mesh.prompt
        assert "SECRET-RULES" not in mesh.prompt, "instructions are not carried over"
        assert second.previous_response_id == first.id and second.id != first.id
        assert list(mesh.raft.state.sessions) == [session_id] and len(mesh.raft.state.sessions[session_id].turns) == 2
        # A branch from the first response: its own session, without the second turn.
        branch = c.responses.create(model=MODEL, input="Spell it.", previous_response_id=first.id)
        assert "My name is Ada." in mesh.prompt and "What is my name?" not in mesh.prompt
        assert len(mesh.raft.state.sessions) == 2
        c.responses.create(model=MODEL, input="And again?", previous_response_id=branch.id)
        assert "Spell it." in mesh.prompt and "What is my name?" not in mesh.prompt
        # store: false carries the conversation but records nothing.
        unstored = c.responses.create(model=MODEL, input="Last one.", previous_response_id=second.id, store=False)
        assert "What is my name?" in mesh.prompt and len(mesh.raft.state.sessions) == 2
        assert unstored.store is False
        with pytest.raises(openai.BadRequestError) as caught:
            c.responses.create(model=MODEL, input="x", previous_response_id=unstored.id)
        assert caught.value.code == "previous_response_not_found"


def test_text_format_json_schema():
    class City(pydantic.BaseModel):
        city: str

    with sdk('{"city": "Paris"}') as (c, mesh):
        fmt = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
        r = c.responses.create(model=MODEL, input="Capital of France?", text=fmt)
        assert json.loads(r.output_text) == {"city": "Paris"} and r.text.format.type == "json_schema"
        assert mesh.backend.seen[-1][0].grammar
        parsed = c.responses.parse(model=MODEL, input="Capital of France?", text_format=City)
        assert parsed.output_parsed == City(city="Paris")
        c.responses.create(model=MODEL, input="JSON please", text={"format": {"type": "json_object"}})
        assert mesh.backend.seen[-1][0].grammar


def test_bad_input_through_the_sdk_is_a_4xx():
    with sdk() as (c, _):
        with pytest.raises(openai.NotFoundError):
            c.responses.create(model="gpt-nope", input="Hi")
        with pytest.raises(openai.BadRequestError) as caught:
            c.responses.create(model=MODEL, input="Hi", max_output_tokens=0)
        assert caught.value.param == "max_output_tokens" and "max_output_tokens" in caught.value.message


@pytest.mark.parametrize("payload,param", [
    ({"input": "Hi"}, "model"),
    ({"model": MODEL}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": MODEL, "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": MODEL, "input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": MODEL, "input": "Hi", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"model": MODEL, "input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"model": MODEL, "input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"model": MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"model": MODEL, "input": "Hi", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "input": "Hi", "store": "yes"}, "store"),
    ({"model": MODEL, "input": "Hi", "background": True}, "background"),
    ({"model": MODEL, "input": "Hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"model": MODEL, "input": "Hi", "previous_response_id": 7}, "previous_response_id"),
])
def test_bad_input_is_a_400_in_openais_shape(payload, param):
    async def go():
        async with _client() as c:
            reply = await c.post("/v1/responses", json=payload)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            assert error["param"] == param, error
    run(go())


def test_junk_in_any_field_is_never_a_5xx():
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    good = {"model": MODEL, "instructions": "s", "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 3,
            "tools": [WEATHER], "tool_choice": "auto", "stream": False, "store": False, "metadata": {},
            "text": {"format": {"type": "text"}}, "parallel_tool_calls": False,
            "input": [{"role": "user", "content": "Hi"}, call, output]}

    async def go():
        async with _client() as c:
            async def check(payload: dict) -> None:
                reply = await c.post("/v1/responses", json=payload)
                assert reply.status_code < 500, (payload, reply.text)
            for key in good:
                for value in JUNK:
                    await check({**good, key: value})
            for value in JUNK:
                for item in (call, output):
                    for key in item:
                        await check({**good, "input": [{**item, key: value}]})
                for key in WEATHER:
                    await check({**good, "tools": [{**WEATHER, key: value}]})
                await check({**good, "input": [value]})
                await check({**good, "text": {"format": value}})
    run(go())


class _client:
    """An in-process client of a Mesh's app (ASGI, no socket)."""

    async def __aenter__(self) -> httpx.AsyncClient:
        self.mesh = Mesh(REPLY)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(self.mesh.gateway)),
                                      base_url="http://test", timeout=20)
        return self.http

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await close(self.mesh.gateway)
