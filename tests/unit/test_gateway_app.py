"""mesh/gateway/app.py over a Gateway with a LocalShard on NullBackend, driven in process through ASGI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterator

import httpx

from mesh.core.config import GatewayConfig, MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from shards.backend_null import NullBackend
from shards.local import LocalShard
from shards.templates import Message, render
from shards.types import Sampling, TokenStep

MODEL = MeshConfig().models[0].name  # "gemma-3-270m"
WAIT_S = 10.0
CHAT = "/v1/chat/completions"


class Backend(NullBackend):
    """NullBackend with the close() the Backend protocol asks for (NullBackend itself lacks one)."""

    def close(self) -> None:
        pass


class GatedBackend(Backend):
    """Holds every generation before its first token until `gate` opens; `started` says one is held."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.started = threading.Event()
        self.gate = threading.Event()

    def generate(self, prompt: list[int], sampling: Sampling, seed: int, forced=(), **options) -> Iterator[TokenStep]:
        self.started.set()
        self.gate.wait(WAIT_S)
        yield from super().generate(prompt, sampling, seed, forced)


def config(**gateway) -> MeshConfig:
    return dataclasses.replace(MeshConfig(), gateway=GatewayConfig(**gateway))


@dataclasses.dataclass
class Mesh:
    gateway: Gateway
    client: httpx.AsyncClient
    backend: NullBackend | None
    shard: LocalShard | None

    def attach(self, backend: NullBackend) -> LocalShard:
        self.backend = backend
        self.shard = LocalShard("reasoning", MODEL, backend, self.gateway.config.gateway.queue_depth, "gemma")
        self.gateway.attach(self.shard)
        return self.shard


@asynccontextmanager
async def mesh(cfg: MeshConfig | None = None, backend: NullBackend | None = None,
               attach: bool = True) -> AsyncIterator[Mesh]:
    gateway = Gateway(cfg or MeshConfig(), Metrics())
    app = create_app(gateway)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 timeout=WAIT_S) as client:
        m = Mesh(gateway, client, None, None)
        if attach:
            m.attach(backend or Backend())
        try:
            yield m
        finally:
            if isinstance(m.backend, GatedBackend):
                m.backend.gate.set()
            for shard in gateway.detach_all():
                await asyncio.to_thread(shard.close)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def body(content: str = "Hello", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def sse_events(text: str) -> list:
    """The data of each server-sent event; '[DONE]' stays a string."""
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(reply: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


async def assert_still_serves(client: httpx.AsyncClient) -> None:
    reply = await client.post(CHAT, json=body(max_tokens=3))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"


def prompt_tokens(text: str) -> int:
    """What NullBackend counts for a one-message chat under the gemma template (BOS + UTF-8 bytes)."""
    rendered = render([Message("user", text)], gguf_template=None, named="gemma")
    return 1 + len(rendered.text.encode())


# -- health, models, metrics -----------------------------------------------------------------

def test_health_503_with_retry_after_before_shard_then_200():
    async def main():
        async with mesh(attach=False) as m:
            reply = await m.client.get("/health")
            assert reply.status_code == 503
            assert reply.headers["retry-after"] == "1"
            assert reply.json()["status"] == "loading"
            assert reply.json()["error"]["code"] == "loading"
            m.attach(Backend())
            reply = await m.client.get("/health")
            assert reply.status_code == 200
            assert reply.json() == {"status": "ok", "models": [MODEL]}
    run(main())


def test_chat_before_shard_is_503_loading_with_retry_after():
    async def main():
        async with mesh(attach=False) as m:
            m.gateway.loading_detail = "loading weights"
            reply = await m.client.post(CHAT, json=body())
            err = assert_error(reply, 503, "loading")
            assert "loading weights" in err["message"]
            assert reply.headers["retry-after"] == "1"
    run(main())


def test_models_lists_catalog_model():
    async def main():
        async with mesh() as m:
            reply = await m.client.get("/v1/models")
            assert reply.status_code == 200
            listing = reply.json()
            assert listing["object"] == "list"
            assert [d["id"] for d in listing["data"]] == sorted(m.name for m in MeshConfig().models)
            assert MODEL in [d["id"] for d in listing["data"]]
            assert listing["data"][0]["object"] == "model" and listing["data"][0]["owned_by"] == "quorum"
            one = await m.client.get(f"/v1/models/{MODEL}")
            assert one.status_code == 200 and one.json()["id"] == MODEL
            assert_error(await m.client.get("/v1/models/nope"), 404, "model_not_found", "model")
    run(main())


def test_metrics_expose_request_counter_and_queue_depth():
    async def main():
        async with mesh() as m:
            assert (await m.client.post(CHAT, json=body(max_tokens=2))).status_code == 200
            assert (await m.client.post(CHAT, json={"model": MODEL})).status_code == 400
            reply = await m.client.get("/metrics")
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/plain")
            text = reply.text
            assert 'quorum_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
            assert 'quorum_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0' in text
            assert f'quorum_queue_depth{{model="{MODEL}",role="reasoning"}} 0.0' in text
            assert "quorum_requests_in_flight" in text
    run(main())


def test_gateway_alone_serves_no_control_api():
    """The control API comes from the daemon's extra routes; a bare gateway answers 404 there."""
    async def main():
        async with mesh() as m:
            reply = await m.client.get("/control/v1/status")
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "unknown_url"
    run(main())


# -- chat completions ------------------------------------------------------------------------

def test_chat_non_streamed_has_openai_shape():
    async def main():
        async with mesh() as m:
            reply = await m.client.post(CHAT, json=body(seed=1))
            assert reply.status_code == 200, reply.text
            data = reply.json()
            assert data["id"].startswith("chatcmpl-")
            assert data["object"] == "chat.completion"
            assert data["model"] == MODEL
            assert isinstance(data["created"], int) and abs(data["created"] - time.time()) < 60
            [choice] = data["choices"]
            assert choice["index"] == 0
            assert choice["message"]["role"] == "assistant"
            assert isinstance(choice["message"]["content"], str) and len(choice["message"]["content"]) == 24
            assert choice["finish_reason"] == "stop"
            assert choice["logprobs"] is None
            usage = data["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert usage["prompt_tokens"] == prompt_tokens("Hello")
            assert usage["completion_tokens"] >= 24
    run(main())


def test_chat_logprobs_are_returned_per_token():
    async def main():
        async with mesh() as m:
            reply = await m.client.post(CHAT, json=body(logprobs=True, top_logprobs=2, max_tokens=5))
            choice = reply.json()["choices"][0]
            entries = choice["logprobs"]["content"]
            assert len(entries) == 5
            assert "".join(e["token"] for e in entries) == choice["message"]["content"]
            assert all(len(e["top_logprobs"]) == 2 and e["bytes"] for e in entries)
    run(main())


def test_chat_max_tokens_gives_length():
    async def main():
        async with mesh() as m:
            data = (await m.client.post(CHAT, json=body(max_tokens=4))).json()
            assert data["choices"][0]["finish_reason"] == "length"
            assert len(data["choices"][0]["message"]["content"]) == 4
            assert data["usage"]["completion_tokens"] == 4
    run(main())


def check_stream(events: list, n: int, include_usage: bool) -> dict[int, str]:
    """Checks a chat stream's shape; returns each choice's text."""
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == []
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
        assert all("usage" in c and c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    seen_first: set[int] = set()
    for c in chunks:
        [choice] = c["choices"]
        i = choice["index"]
        delta = choice["delta"]
        if i not in seen_first:
            seen_first.add(i)
            assert delta.get("role") == "assistant", "the first delta of a choice carries the role"
        else:
            assert "role" not in delta
        assert finishes.get(i, 0) == 0, "nothing follows a choice's finish_reason"
        texts[i] = texts.get(i, "") + delta.get("content", "")
        if choice["finish_reason"] is not None:
            finishes[i] = finishes.get(i, 0) + 1
    assert sorted(seen_first) == list(range(n))
    assert finishes == {i: 1 for i in range(n)}
    return texts


def test_chat_streamed_has_openai_chunk_shape():
    async def main():
        async with mesh() as m:
            plain = (await m.client.post(CHAT, json=body(seed=5))).json()
            reply = await m.client.post(CHAT, json=body(seed=5, stream=True))
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = sse_events(reply.text)
            texts = check_stream(events, n=1, include_usage=False)
            assert texts[0] == plain["choices"][0]["message"]["content"]
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
    run(main())


def test_chat_streamed_usage_chunk_only_when_asked():
    async def main():
        async with mesh() as m:
            reply = await m.client.post(CHAT, json=body(stream=True, stream_options={"include_usage": True},
                                                        max_tokens=6))
            events = sse_events(reply.text)
            check_stream(events, n=1, include_usage=True)
            usage = events[-2]["usage"]
            assert usage["completion_tokens"] == 6
            assert usage["prompt_tokens"] == prompt_tokens("Hello")
            reply = await m.client.post(CHAT, json=body(stream=True, stream_options={"include_usage": False}))
            check_stream(sse_events(reply.text), n=1, include_usage=False)
    run(main())


def test_chat_n_2_gives_choices_0_and_1():
    async def main():
        async with mesh() as m:
            data = (await m.client.post(CHAT, json=body(n=2, seed=11))).json()
            assert [c["index"] for c in data["choices"]] == [0, 1]
            assert all(c["finish_reason"] == "stop" for c in data["choices"])
            assert data["choices"][0]["message"]["content"] != data["choices"][1]["message"]["content"], \
                "choice i uses seed + i"
            assert data["usage"]["completion_tokens"] == 2 * 25
            reply = await m.client.post(CHAT, json=body(n=2, seed=11, stream=True,
                                                        stream_options={"include_usage": True}))
            texts = check_stream(sse_events(reply.text), n=2, include_usage=True)
            assert [texts[0], texts[1]] == [c["message"]["content"] for c in data["choices"]]
    run(main())


def test_chat_stop_sequence_cuts_reply():
    async def main():
        async with mesh() as m:
            full = (await m.client.post(CHAT, json=body(temperature=0))).json()["choices"][0]["message"]["content"]
            stop = full.split(" ")[1][:3]
            data = (await m.client.post(CHAT, json=body(temperature=0, stop=[stop, "zzz"]))).json()
            choice = data["choices"][0]
            assert choice["finish_reason"] == "stop"
            assert choice["message"]["content"] == full[:full.index(stop)]
            reply = await m.client.post(CHAT, json=body(temperature=0, stop=stop, stream=True))
            assert check_stream(sse_events(reply.text), 1, False)[0] == full[:full.index(stop)]
    run(main())


def test_completions_endpoint_with_echo_and_two_prompts():
    async def main():
        async with mesh() as m:
            reply = await m.client.post("/v1/completions", json={"model": MODEL, "prompt": ["A", "B"],
                                                                 "echo": True, "max_tokens": 3})
            assert reply.status_code == 200, reply.text
            data = reply.json()
            assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
            assert [c["text"][0] for c in data["choices"]] == ["A", "B"]
            assert all(len(c["text"]) == 4 and c["finish_reason"] == "length" for c in data["choices"])
            assert data["usage"]["prompt_tokens"] == 4  # BOS + one byte, twice
    run(main())


# -- errors ----------------------------------------------------------------------------------

def test_unknown_model_is_404_model_not_found():
    async def main():
        async with mesh() as m:
            assert_error(await m.client.post(CHAT, json={**body(), "model": "gpt-9"}), 404, "model_not_found",
                         "model")
            await assert_still_serves(m.client)
    run(main())


def test_malformed_json_is_400():
    async def main():
        async with mesh() as m:
            for raw in (b"{not json", b"[1,2]", b"[" * 100000, b""):
                reply = await m.client.post(CHAT, content=raw, headers={"content-type": "application/json"})
                assert_error(reply, 400)
                await assert_still_serves(m.client)
    run(main())


def test_invalid_field_is_400_naming_param():
    async def main():
        async with mesh() as m:
            assert_error(await m.client.post(CHAT, json=body(n=0)), 400, "invalid_value", "n")
            assert_error(await m.client.post(CHAT, json=body(tools=[{"type": "function"}])), 400, None,
                         "tools[0].function")
            await assert_still_serves(m.client)
    run(main())


def test_body_over_limit_with_content_length_is_413():
    async def main():
        async with mesh(config(max_body_bytes=2048)) as m:
            raw = json.dumps(body("x" * 3000)).encode()
            reply = await m.client.post(CHAT, content=raw, headers={"content-type": "application/json"})
            assert "content-length" in {k.lower() for k in reply.request.headers}
            assert_error(reply, 413, "request_too_large")
            await assert_still_serves(m.client)
    run(main())


def test_body_over_limit_without_length_is_413():
    async def main():
        async with mesh(config(max_body_bytes=2048)) as m:
            async def chunks():
                yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
                for _ in range(10):
                    yield b"x" * 500
                yield b'"}]}'
            reply = await m.client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
            assert "content-length" not in {k.lower() for k in reply.request.headers}
            assert reply.request.headers.get("transfer-encoding") == "chunked"
            assert_error(reply, 413, "request_too_large")
            await assert_still_serves(m.client)
    run(main())


def test_body_at_limit_is_accepted():
    async def main():
        raw = json.dumps(body(max_tokens=1)).encode()
        async with mesh(config(max_body_bytes=len(raw))) as m:
            reply = await m.client.post(CHAT, content=raw, headers={"content-type": "application/json"})
            assert reply.status_code == 200, reply.text
    run(main())


def test_prompt_longer_than_context_is_400_context_length_exceeded():
    async def main():
        async with mesh() as m:
            assert m.shard.n_ctx == 512
            err = assert_error(await m.client.post(CHAT, json=body("y" * 600)), 400, "context_length_exceeded",
                               "messages")
            assert "512" in err["message"]
            # A prompt that fits but leaves no room for max_tokens is refused too.
            assert_error(await m.client.post(CHAT, json=body("short", max_tokens=500)), 400,
                         "context_length_exceeded")
            await assert_still_serves(m.client)
    run(main())


def test_queue_full_is_429_with_retry_after():
    async def main():
        backend = GatedBackend()
        async with mesh(config(queue_depth=1, retry_after_s=3), backend) as m:
            running = asyncio.create_task(m.client.post(CHAT, json=body(max_tokens=3)))
            assert await asyncio.to_thread(backend.started.wait, WAIT_S), "first request never started"
            waiting = asyncio.create_task(m.client.post(CHAT, json=body(max_tokens=3, stream=True)))
            deadline = time.monotonic() + WAIT_S
            while m.shard.waiting < 1:
                assert time.monotonic() < deadline and not waiting.done(), "second request never queued"
                await asyncio.sleep(0.005)
            depth = (await m.client.get("/metrics")).text
            assert f'quorum_queue_depth{{model="{MODEL}",role="reasoning"}} 1.0' in depth

            for extra in (body(), body(stream=True)):
                reply = await m.client.post(CHAT, json=extra)
                err = assert_error(reply, 429, "queue_full")
                assert err["type"] == "rate_limit_error"
                assert reply.headers["retry-after"] == "3"

            backend.gate.set()
            first, second = await running, await waiting
            assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "length"
            assert second.status_code == 200 and sse_events(second.text)[-1] == "[DONE]"
            await assert_still_serves(m.client)
            metrics = (await m.client.get("/metrics")).text
            assert 'quorum_requests_total{endpoint="/v1/chat/completions",status="429"} 2.0' in metrics
    run(main())


def test_unknown_path_is_404_openai_error():
    async def main():
        async with mesh() as m:
            for reply in (await m.client.get("/v2/nothing"), await m.client.post("/v1/engines", json={})):
                assert_error(reply, 404, "unknown_url")
            await assert_still_serves(m.client)
    run(main())


def test_wrong_method_is_405_openai_error():
    async def main():
        async with mesh() as m:
            assert_error(await m.client.get(CHAT), 405, "method_not_allowed")
            assert_error(await m.client.post("/health"), 405, "method_not_allowed")
            await assert_still_serves(m.client)
    run(main())


def test_wrong_method_405_names_allowed_methods():
    async def main():
        async with mesh() as m:
            reply = await m.client.get(CHAT)
            assert reply.status_code == 405
            assert reply.headers.get("allow") == "POST"
    run(main())


def test_huge_integer_parameter_is_400_not_500():
    async def main():
        async with mesh() as m:
            raw = json.dumps(body(temperature=10 ** 400)).encode()
            reply = await m.client.post(CHAT, content=raw, headers={"content-type": "application/json"})
            assert_error(reply, 400, None, "temperature")
    run(main())


# -- JSON bodies only (a web page cannot POST application/json cross-origin without a preflight) ----

def test_a_post_body_not_declared_json_is_415_in_each_apis_shape():
    async def main():
        async with mesh() as m:
            raw = json.dumps(body(max_tokens=2)).encode()
            for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/jsonx", "text/json"):
                headers = {"content-type": content_type} if content_type else {}
                reply = await m.client.post(CHAT, content=raw, headers=headers)
                assert_error(reply, 415, "unsupported_media_type", "Content-Type")
                anthropic = await m.client.post("/v1/messages", content=raw, headers=headers)
                assert anthropic.status_code == 415 and anthropic.json()["type"] == "error"
                ollama = await m.client.post("/api/chat", content=raw, headers=headers)
                assert ollama.status_code == 415 and isinstance(ollama.json()["error"], str)
                embed = await m.client.post("/v1/embeddings", content=raw, headers=headers)
                assert embed.status_code == 415
            for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
                reply = await m.client.post(CHAT, content=raw, headers={"content-type": content_type})
                assert reply.status_code == 200, reply.text
            # A body over the limit is still a 413, whatever its type.
            big = await m.client.post(CHAT, content=b"x" * (GatewayConfig().max_body_bytes + 1),
                                      headers={"content-type": "text/plain"})
            assert_error(big, 413, "request_too_large")
    run(main())


def test_the_sdks_send_json():
    """The clients the gateway serves declare their JSON bodies (other POST bodies get the 415)."""
    import anthropic
    import ollama
    import openai
    import pytest

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("content-type", ""))
        return httpx.Response(500, json={"error": "stop"})

    transport = httpx.MockTransport(handler)
    with pytest.raises(Exception):
        openai.OpenAI(api_key="x", base_url="http://h/v1", max_retries=0,
                      http_client=httpx.Client(transport=transport)).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
    # This anthropic SDK takes only clients of its own fork of httpx (httpx2); older ones take httpx's.
    http2 = getattr(anthropic._base_client, "httpx2", httpx)

    def handler2(request) -> object:
        seen.append(request.headers.get("content-type", ""))
        return http2.Response(500, json={"error": "stop"})

    with pytest.raises(Exception):
        anthropic.Anthropic(api_key="x", base_url="http://h", max_retries=0,
                            http_client=http2.Client(transport=http2.MockTransport(handler2))).messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(Exception):
        ollama.Client(host="http://h", transport=transport).chat(model="m", messages=[{"role": "user",
                                                                                      "content": "hi"}])
    assert len(seen) == 3 and all(ct.startswith("application/json") for ct in seen), seen


def test_a_model_nothing_can_hold_is_503_at_once_with_the_placers_reason():
    """The 503 (and /health) say why no replica serves, from the replicated state: the placement's shortfall
    for the model (here a split that found no members), else its shards that are not ready."""
    from mesh.cluster.readiness import why_no_replica
    from raft.state import MeshState, Shard, Unplaced

    reason = "split across members: a head needs 250 MiB for the embeddings and one layer"
    state = MeshState(mesh_id="m", unplaced=(Unplaced("reasoning", MODEL, 1, reason),))

    async def main():
        async with mesh(attach=False) as m:
            m.gateway.admission.unready_reason = lambda model: why_no_replica(state, model)
            reply = await m.client.post(CHAT, json=body())
            assert reason in assert_error(reply, 503, "loading")["message"]
            health = await m.client.get("/health")
            assert health.status_code == 503 and reason in health.json()["detail"]
    run(main())
    loading = MeshState(mesh_id="m", shards={("reasoning", MODEL, "n1"): Shard("reasoning", MODEL, "n1", "loading",
                                                                              "waiting for its stages: n2")})
    assert why_no_replica(loading, MODEL) == "reasoning on n1: loading (waiting for its stages: n2)"
    ready = MeshState(mesh_id="m", shards={("reasoning", MODEL, "n1"): Shard("reasoning", MODEL, "n1", "ready")})
    assert why_no_replica(ready, MODEL) is None  # the state explains nothing: the gateway's own detail
    assert why_no_replica(MeshState(mesh_id="m"), MODEL) == "no member holds it yet"
