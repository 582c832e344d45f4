"""Ollama's API (mesh/gateway/ollama.py): in process over ASGI on a NullBackend shard, and with the
real `ollama` Python client against the app served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest

from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from mesh.security.api_keys import ApiKeyCheck, new_key
from raft.commands import InitMesh
from raft.state import MeshState, apply
from shards.backend_null import NullBackend
from shards.context import ContextShard
from shards.local import LocalShard

MODEL = MeshConfig().models[0].name  # "gemma-3-270m"
ENCODER = "all-minilm-l6-v2"
REPLY = "Hello there, friend."
EVAL = len(REPLY.encode()) + 1  # completion tokens: the text's bytes and the end token
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


class Backend(NullBackend):
    """Remembers the sampling and prompt of each generation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list = []

    def generate(self, prompt, sampling, seed, forced=(), **options):
        self.seen.append((sampling, bytes(t for t in prompt if t < 256).decode("utf-8", "replace")))
        yield from super().generate(prompt, sampling, seed, forced)


class Encoder:
    n_ctx, dimensions = 8, 3

    def embed(self, texts):
        return np.ones((len(texts), 3), dtype=np.float32) / np.sqrt(3), [len(str(t).split()) for t in texts]

    def close(self) -> None:
        pass


def make_gateway(reply: str = REPLY) -> tuple[Gateway, Backend]:
    gateway = Gateway(MeshConfig(), Metrics())
    backend = Backend(reply=reply, n_ctx=4096)
    gateway.attach(LocalShard("reasoning", MODEL, backend, 4, "gemma"))
    gateway.attach(ContextShard("context", ENCODER, Encoder(), queue_depth=2))
    return gateway, backend


async def close(gateway: Gateway) -> None:
    for shard in gateway.detach_all():
        await asyncio.to_thread(shard.close)


@asynccontextmanager
async def client(reply: str = REPLY, app=None) -> AsyncIterator[tuple[httpx.AsyncClient, Backend]]:
    gateway, backend = make_gateway(reply)
    transport = httpx.ASGITransport(app=app(create_app(gateway)) if app else create_app(gateway))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=20) as c:
            yield c, backend
    finally:
        await close(gateway)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def lines(reply: httpx.Response) -> list[dict]:
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in reply.text.splitlines()]


def assert_error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


# -- in process ---------------------------------------------------------------------------------------

def test_version_tags_ps_and_show():
    async def go():
        async with client() as (c, _):
            assert (await c.get("/api/version")).json()["version"]
            tags = (await c.get("/api/tags")).json()["models"]
            assert {m["name"] for m in tags} >= {MODEL, ENCODER}
            assert all(m["model"] == m["name"] and "details" in m and "modified_at" in m for m in tags)
            ps = (await c.get("/api/ps")).json()["models"]
            assert {m["name"] for m in ps} == {MODEL, ENCODER}
            shown = (await c.post("/api/show", json={"model": MODEL})).json()
            assert "completion" in shown["capabilities"] and shown["model_info"]["gemma.context_length"] == 4096
            assert (await c.post("/api/show", json={"model": ENCODER})).json()["capabilities"] == ["embedding"]
            assert "not found" in assert_error(await c.post("/api/show", json={"model": "nope"}), 404)
    run(go())


def test_chat_whole_answer_in_ollama_shape():
    async def go():
        async with client() as (c, backend):
            reply = await c.post("/api/chat", json={"model": MODEL, "stream": False, "messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
            body = reply.json()
            assert reply.status_code == 200, reply.text
            assert body["message"] == {"role": "assistant", "content": REPLY}
            assert body["done"] is True and body["done_reason"] == "stop" and body["model"] == MODEL
            assert body["eval_count"] == EVAL and body["prompt_eval_count"] > 0
            assert body["created_at"].endswith("Z") and body["total_duration"] > 0
            sampling, prompt = backend.seen[-1]
            assert sampling.temperature == 0.8 and sampling.top_p == 0.9  # Ollama's defaults
            assert "Be brief." in prompt and "Hi" in prompt
    run(go())


def test_chat_streams_ndjson_by_default():
    async def go():
        async with client() as (c, _):
            reply = await c.post("/api/chat", json={"model": MODEL + ":latest",
                                                    "messages": [{"role": "user", "content": "Hi"}]})
            assert reply.status_code == 200, reply.text
            got = lines(reply)
            assert all(not g["done"] for g in got[:-1]) and got[-1]["done"] is True
            assert "".join(g["message"]["content"] for g in got) == REPLY
            assert len(got) > 2 and got[-1]["done_reason"] == "stop"
            assert got[-1]["eval_count"] == EVAL and got[-1]["prompt_eval_count"] > 0
    run(go())


def test_options_map_onto_sampling_and_num_predict_gives_length():
    async def go():
        async with client() as (c, backend):
            options = {"temperature": 0.2, "top_p": 0.5, "seed": 7, "num_predict": 3, "stop": ["zz"], "num_ctx": 99}
            body = (await c.post("/api/chat", json={"model": MODEL, "stream": False, "options": options,
                                                    "messages": [{"role": "user", "content": "Hi"}]})).json()
            assert body["done_reason"] == "length" and body["eval_count"] == 3
            sampling = backend.seen[-1][0]
            assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.max_tokens, sampling.stop) == \
                (0.2, 0.5, 7, 3, ("zz",))
            await c.post("/api/chat", json={"model": MODEL, "stream": False, "options": {"num_predict": -1},
                                            "messages": [{"role": "user", "content": "Hi"}]})
            assert backend.seen[-1][0].max_tokens is None
    run(go())


def test_format_json_and_schema_are_grammar_constrained():
    async def go():
        async with client('{"a": 1}') as (c, backend):
            for fmt in ("json", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}):
                body = (await c.post("/api/chat", json={"model": MODEL, "stream": False, "format": fmt,
                                                        "messages": [{"role": "user", "content": "Hi"}]})).json()
                assert json.loads(body["message"]["content"]) == {"a": 1}
                assert backend.seen[-1][0].grammar
    run(go())


def test_tools_come_back_as_ollama_tool_calls_whole_and_streamed():
    async def go():
        async with client(CALL) as (c, backend):
            ask = {"model": MODEL, "tools": [WEATHER], "messages": [{"role": "user", "content": "Weather?"}]}
            body = (await c.post("/api/chat", json={**ask, "stream": False})).json()
            assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]
            got = lines(await c.post("/api/chat", json=ask))
            calls = [call for g in got for call in g["message"].get("tool_calls", [])]
            assert calls == body["message"]["tool_calls"] and got[-1]["done"] is True
            # the call and its result, sent back as Ollama clients do
            history = [*ask["messages"], {"role": "assistant", "content": "", "tool_calls": calls},
                       {"role": "tool", "content": "12 C and sunny", "tool_name": "get_weather"}]
            reply = await c.post("/api/chat", json={**ask, "stream": False, "messages": history})
            assert reply.status_code == 200, reply.text
            assert "Result of get_weather:\n12 C and sunny" in backend.seen[-1][1]
    run(go())


def test_generate_whole_streamed_raw_and_load():
    async def go():
        async with client() as (c, backend):
            body = (await c.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "system": "Sys",
                                                        "stream": False})).json()
            assert body["response"] == REPLY and body["done"] is True and "Sys" in backend.seen[-1][1]
            got = lines(await c.post("/api/generate", json={"model": MODEL, "prompt": "Hi"}))
            assert "".join(g["response"] for g in got) == REPLY and got[-1]["done"] is True
            raw = (await c.post("/api/generate", json={"model": MODEL, "prompt": "Once upon", "raw": True,
                                                       "stream": False})).json()
            assert raw["response"] == REPLY and backend.seen[-1][1] == "Once upon"
            assert backend.seen[-1][0].max_tokens is None  # not OpenAI's 16
            loaded = (await c.post("/api/generate", json={"model": MODEL})).json()
            assert loaded["done_reason"] == "load"
    run(go())


def test_embed_and_legacy_embeddings():
    async def go():
        async with client() as (c, _):
            body = (await c.post("/api/embed", json={"model": ENCODER, "input": ["a b", "c"]})).json()
            assert len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == 3
            assert body["prompt_eval_count"] == 3 and body["model"] == ENCODER
            legacy = await c.post("/api/embeddings", json={"model": ENCODER, "prompt": "x"})
            assert len(legacy.json()["embedding"]) == 3
            long = {"model": ENCODER, "input": " ".join(["w"] * 20)}
            assert (await c.post("/api/embed", json=long)).status_code == 200
            assert_error(await c.post("/api/embed", json={**long, "truncate": False}), 400)
            assert_error(await c.post("/api/embed", json={"model": MODEL, "input": "x"}), 400)
            assert_error(await c.post("/api/embed", json={"model": "nope", "input": "x"}), 404)
    run(go())


@pytest.mark.parametrize("path,payload,status", [
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}},
     400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 0}},
     400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "format": "yaml"}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400),
    ("/api/chat", {"messages": []}, 400),
    ("/api/generate", {"model": MODEL, "prompt": 5}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "format": "json"}, 400),
    ("/api/show", {}, 400),
])
def test_bad_input_is_an_ollama_error_never_a_5xx(path, payload, status):
    async def go():
        async with client() as (c, _):
            assert_error(await c.post(path, json=payload), status)
            assert_error(await c.post(path, content=b"{not json", headers={"content-type": "application/json"}), 400)
    run(go())


def test_api_paths_need_the_gateway_key_when_enforced():
    key = new_key("t")
    state = apply(apply(MeshState(), InitMesh("m", "m", 1.0)), key.command)

    async def go():
        async with client(app=lambda app: ApiKeyCheck(app, lambda: state, enforce=True)) as (c, _):
            assert_error(await c.get("/api/tags"), 401)
            assert (await c.get("/api/tags", headers={"Authorization": f"Bearer {key.text}"})).status_code == 200
    run(go())


# -- the real ollama client --------------------------------------------------------------------------

@contextmanager
def served(app) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port, in a thread; always stopped."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@contextmanager
def ollama_client(reply: str = REPLY):
    ollama = pytest.importorskip("ollama")
    gateway, _ = make_gateway(reply)
    try:
        with served(create_app(gateway)) as url:
            yield ollama.Client(host=url, timeout=20)
    finally:
        asyncio.run(close(gateway))


def test_ollama_client_list_show_chat_generate_embed():
    import ollama

    with ollama_client() as c:
        assert MODEL in [m.model for m in c.list().models]
        assert "completion" in c.show(MODEL).capabilities
        answer = c.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options={"temperature": 0})
        assert answer.message.content == REPLY and answer.done and answer.eval_count == EVAL
        parts = list(c.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True))
        assert "".join(p.message.content for p in parts) == REPLY and parts[-1].done
        assert c.generate(model=MODEL, prompt="Hi").response == REPLY
        assert "".join(p.response for p in c.generate(model=MODEL, prompt="Hi", stream=True)) == REPLY
        assert len(c.embed(model=ENCODER, input=["a", "b"]).embeddings) == 2
        with pytest.raises(ollama.ResponseError) as err:
            c.chat(model="nope", messages=[{"role": "user", "content": "Hi"}])
        assert err.value.status_code == 404 and "nope" in err.value.error


def test_ollama_client_tool_calls():
    def get_weather(city: str) -> str:
        """Weather in a city.

        Args:
          city: the city
        """
        return "sunny"

    with ollama_client(CALL) as c:
        answer = c.chat(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather])
        (call,) = answer.message.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
        parts = list(c.chat(model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[get_weather],
                            stream=True))
        assert [tc.function.name for p in parts for tc in (p.message.tool_calls or [])] == ["get_weather"]


JUNK = (None, 0, -1, 1.5, 1e308, True, "", "x", [], [1], ["x"], {}, {"a": 1}, [{}], [{"role": "user"}])


def test_junk_in_any_field_is_never_a_5xx():
    """Each field of a valid request replaced by values of the wrong type or shape: an answer or an
    Ollama error, never a 5xx."""
    good = {"/api/chat": {"model": MODEL, "stream": False, "options": {"num_predict": 2}, "tools": [WEATHER],
                          "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "",
                                                                            "tool_calls": [{"function": {
                                                                                "name": "f", "arguments": {}}}]},
                                       {"role": "tool", "content": "r", "tool_name": "f"}]},
            "/api/generate": {"model": MODEL, "prompt": "Hi", "stream": False, "system": "s", "raw": False,
                              "options": {"num_predict": 2}},
            "/api/embed": {"model": ENCODER, "input": "x", "truncate": True}}

    async def go():
        async with client() as (c, _):
            for path, payload in good.items():
                for key in payload:
                    for value in JUNK:
                        reply = await c.post(path, json={**payload, key: value})
                        assert reply.status_code < 500, (path, key, value, reply.text)
                        if reply.status_code != 200:
                            assert_error(reply, reply.status_code)
                for value in JUNK:
                    for key in ("temperature", "top_p", "seed", "stop", "num_predict"):
                        reply = await c.post(path, json={**payload, "options": {key: value}})
                        assert reply.status_code < 500, (path, key, value, reply.text)
                    if path == "/api/chat":
                        messages = [{"role": "user", "content": value}, {"role": "assistant", "tool_calls": value},
                                    {"role": "tool", "content": "x", "tool_name": value}]
                        reply = await c.post(path, json={**payload, "messages": messages})
                        assert reply.status_code < 500, (value, reply.text)
    run(go())
