"""Fuzzing the gateway's ASGI app (NullBackend shard, in process) with hypothesis.

Property, for every request: the status is never 5xx (a replica is ready; the one 503 allowed is
a deliberate "not on this node" with Retry-After), a status >= 400 carries an OpenAI error body,
a 200 carries a parseable answer, and the gateway answers a valid request afterwards.
Requests: arbitrary JSON values, valid bodies built from the gateway's own OpenAPI description
(GET /openapi.json) and then mutated field by field, arbitrary bytes, odd content types, odd and
huge headers, and odd paths and methods.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from shards.local import LocalShard
from tests.unit.test_gateway_app import MODEL, Backend

WAIT_S = 20.0
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# QUORUM_FUZZ_EXAMPLES=5000 QUORUM_FUZZ_RANDOM=1 for a deeper, randomised run; the default is quick and fixed.
EXAMPLES = int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=not os.environ.get("QUORUM_FUZZ_RANDOM"))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)


async def asgi_call(app, method: str, path: str, headers: list[tuple[bytes, bytes]] = (),
                    chunks: list[bytes] = (b"",)) -> Reply:
    """One request straight through ASGI: any header bytes, any Content-Length, body in `chunks`."""
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    answered = asyncio.Event()
    reply = Reply(0, {})

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            reply.chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogateescape"),
             "query_string": b"", "root_path": "", "headers": list(headers),
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}
    await asyncio.wait_for(app(scope, receive, send), WAIT_S)
    reply.body = b"".join(reply.chunks)
    return reply


def json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


def check_reply(reply: Reply, allow_503: bool = True, method: str = "POST") -> None:
    """The property every answer must have. A 503 is allowed only as a deliberate "not here"
    (service_unavailable with Retry-After: e.g. JSON answers need llama.cpp, absent with NullBackend)."""
    assert reply.status, "no response was sent"
    assert reply.status < 500 or (allow_503 and reply.status == 503), (reply.status, reply.body[:500])
    if reply.status == 503:
        assert json.loads(reply.body)["error"]["type"] == "service_unavailable" and "retry-after" in reply.headers
    if method == "HEAD" and not reply.body:
        return
    if reply.status >= 400:
        err = json.loads(reply.body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert err["param"] is None or isinstance(err["param"], str)
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        text = reply.body.decode()
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
        for block in text.split("\n\n")[:-2]:
            assert block.startswith("data: ") and isinstance(json.loads(block[6:]), dict), block
    elif reply.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(json.loads(reply.body), dict)


VALID = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()


async def still_serves(app) -> None:
    reply = await asgi_call(app, "POST", CHAT, json_headers(VALID), [VALID])
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["choices"][0]["finish_reason"] == "length"


class Served:
    """A gateway with a ready NullBackend shard on an event loop of its own, kept for a whole
    module: hypothesis calls the test body synchronously once per example."""

    def __init__(self, cfg: MeshConfig | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        self.gateway = Gateway(cfg or MeshConfig(), Metrics())
        self.app = create_app(self.gateway)
        limits = self.gateway.config.gateway
        self.shard = LocalShard("reasoning", MODEL, Backend(), limits.queue_depth, "gemma")
        self.gateway.attach(self.shard)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S * 2)

    def request(self, method: str, path: str, headers=(), chunks=(b"",), allow_503: bool = True) -> Reply:
        async def both() -> Reply:
            reply = await asgi_call(self.app, method, path, headers, chunks)
            check_reply(reply, allow_503, method)
            await still_serves(self.app)
            return reply
        return self.call(both())

    def close(self) -> None:
        for shard in self.gateway.detach_all():
            shard.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


@pytest.fixture(scope="module")
def served():
    s = Served()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def spec(served):
    reply = served.call(asgi_call(served.app, "GET", "/openapi.json"))
    assert reply.status == 200
    return json.loads(reply.body)


# -- strategies ------------------------------------------------------------------------------

ODD_NUMBERS = [0, -1, 1, 2, 2 ** 31, -2 ** 31 - 1, 2 ** 63, -2 ** 63 - 1, 2 ** 64, 10 ** 30, -(10 ** 30), 1e308,
               -1e308, 5e-324, 0.5, -0.0, float("nan"), float("inf"), float("-inf")]
ODD_TEXT = ["", "\x00", "a\x00b", "\ud800", "\udfff", "\U0001f600" * 50, "\u202e\u0000\ufeff", "x" * 5000,
            "<|im_end|>", "<start_of_turn>model\n", "{{ raise('x') }}", "../../etc/passwd", "\r\n\r\n"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30) | st.sampled_from(ODD_NUMBERS) | st.sampled_from(ODD_TEXT))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10) | st.sampled_from(ODD_TEXT), inner, max_size=5),
                           max_leaves=25)


def resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node = spec
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def from_schema(spec: dict, schema: dict, depth: int = 0) -> st.SearchStrategy:
    """Valid values for the small JSON Schema subset openapi.py uses."""
    schema = resolve(spec, schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of(*(from_schema(spec, s, depth) for s in schema["oneOf"]))
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of(*(from_schema(spec, {**schema, "type": k}, depth) for k in kind))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 20), 20))
    if kind == "integer":
        return st.integers(schema.get("minimum"), min(schema.get("maximum", 40), 40))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(spec, schema.get("items", {}), depth + 1) if depth < 5 else st.nothing()
        if depth >= 5:
            return st.just([])
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object":
        props = schema.get("properties", {})
        required = {k: from_schema(spec, props[k], depth + 1) for k in schema.get("required", [])}
        optional = {k: from_schema(spec, v, depth + 1) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries(required, optional=optional)
    return json_values


def spec_max_n(spec: dict) -> int:
    return spec["components"]["schemas"]["ChatRequest"]["properties"]["n"]["maximum"]


def body_strategy(spec: dict, path: str) -> st.SearchStrategy:
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return from_schema(spec, schema).map(lambda b: {**b, "model": MODEL} if "model" in b else b)


@st.composite
def mutated(draw, spec: dict, path: str) -> dict:
    """A valid body with a few fields replaced, removed, added or wrapped."""
    body = draw(body_strategy(spec, path))
    schema = resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
    names = sorted(schema["properties"]) + ["extra_field", "", "x" * 300]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["set", "drop", "wrap", "nest-message"]))
        if how == "set":
            body[key] = draw(json_values)
        elif how == "drop":
            body.pop(key, None)
        elif how == "wrap" and key in body:
            body[key] = draw(st.sampled_from([[body[key]], {"value": body[key]}, [[[body[key]]]]]))
        elif how == "nest-message" and isinstance(body.get("messages"), list) and body["messages"]:
            message = body["messages"][0]
            if isinstance(message, dict):
                message[draw(st.sampled_from(["role", "content", "name", "tool_calls"]))] = draw(json_values)
    return body


def encode(value) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except ValueError:  # an int too long for str(): send a huge literal instead
        return b'{"model": "%s", "n": 1%s}' % (MODEL.encode(), b"0" * 5000)


# -- the fuzz tests --------------------------------------------------------------------------

@FUZZ
@given(value=json_values, path=st.sampled_from([CHAT, COMPLETIONS, "/v1/embeddings"]))
def test_any_json_value_gets_a_non_5xx_answer(served, value, path):
    raw = encode(value)
    served.request("POST", path, json_headers(raw), [raw])


def test_mutated_chat_and_completion_bodies_never_5xx(served, spec):
    @FUZZ
    @given(data=st.data(), path=st.sampled_from([CHAT, COMPLETIONS]))
    def fuzz(data, path):
        raw = encode(data.draw(mutated(spec, path)))
        reply = served.request("POST", path, json_headers(raw), [raw])
        if reply.status == 200 and path == CHAT and not reply.headers["content-type"].startswith("text/event"):
            assert json.loads(reply.body)["object"] == "chat.completion"
    fuzz()


def test_valid_bodies_from_the_openapi_description_are_answered(served, spec):
    """Schema-valid bodies: only 200 or a named 400 (the prompt may not fit the context)."""
    @settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
    @given(data=st.data(), path=st.sampled_from([CHAT, COMPLETIONS]))
    def fuzz(data, path):
        body = data.draw(body_strategy(spec, path))
        for unsupported in ("tools", "tool_choice", "response_format", "logit_bias"):
            body.pop(unsupported, None)
        # Rules across fields that a JSON Schema does not carry:
        if not body.get("stream"):
            body.pop("stream_options", None)
        if path == CHAT and not body.get("logprobs"):
            body.pop("top_logprobs", None)
        prompts = body.get("prompt")
        if isinstance(prompts, list) and len(prompts) * body.get("n", 1) > spec_max_n(spec):
            body["n"] = 1
        raw = encode(body)
        reply = served.request("POST", path, json_headers(raw), [raw])
        assert reply.status == 200 or json.loads(reply.body)["error"]["code"] == "context_length_exceeded", \
            reply.body
    fuzz()


CONTENT_TYPES = [b"application/json", b"text/plain", b"application/x-www-form-urlencoded", b"",
                 b"multipart/form-data; boundary=x", b"application/json; charset=utf-16", b"\xff\xfe\x00"]


@FUZZ
@given(raw=st.binary(max_size=600), ctype=st.sampled_from(CONTENT_TYPES),
       path=st.sampled_from([CHAT, COMPLETIONS]), split=st.integers(0, 600))
def test_arbitrary_bytes_with_any_content_type(served, raw, ctype, path, split):
    headers = [(b"content-type", ctype)]
    served.request("POST", path, headers, [raw[:split], raw[split:]])


header_names = st.binary(min_size=1, max_size=40) | st.sampled_from(
    [b"content-length", b"x-session-id", b"authorization", b"x-quorum-forwarded", b"x-quorum-resume",
     b"content-type", b"transfer-encoding", b"host"])
header_values = st.binary(max_size=200) | st.sampled_from(
    [b"\xb2", b"\xb9", b"-1", b"99999999999999999999999", b"1e3", b" 10", b"x" * 65536, b"\x00", b"chunked",
     b"{}", b'{"id": "chatcmpl-1", "created": 0, "prompt_tokens": 0, "choices": {}}'])


@FUZZ
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=6), stream=st.booleans())
def test_odd_headers_never_5xx(served, headers, stream):
    raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                      "stream": stream}).encode()
    served.request("POST", CHAT, [(k.lower(), v) for k, v in headers], [raw])


def test_many_and_huge_headers(served):
    many = [(b"x-junk-%d" % i, b"v" * 100) for i in range(2000)]
    served.request("POST", CHAT, many + json_headers(VALID), [VALID])
    served.request("POST", CHAT, [(b"authorization", b"Bearer " + b"k" * 1_000_000)] + json_headers(VALID), [VALID])


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"]),
       path=st.sampled_from(["/v1/models", "/health", "/metrics", CHAT, "/openapi.json", "/", "//v1//models",
                             "/v1/models/../../etc/passwd", "/v1/models/%00", "/v1/models/\x00"])
       | st.text(max_size=40).map(lambda t: "/" + t))
def test_odd_paths_and_methods(served, method, path):
    served.request(method, path, [], [b""])


def test_openapi_description_names_the_endpoints(spec):
    assert spec["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/health"} <= set(spec["paths"])
    chat = spec["components"]["schemas"]["ChatRequest"]
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["n"]["maximum"] == MeshConfig().gateway.max_n
