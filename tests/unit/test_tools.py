"""Tool calls and JSON answers without a model: request checks, schema -> grammar over generated
schemas, the call parser, and the OpenAI shapes the gateway makes of a call (NullBackend replying
with a fixed text, read back through the official openai SDK)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core.config import GatewayConfig, MeshConfig
from mesh.core.errors import ApiError
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from mesh.gateway.tools import ToolShaper, parse_tool_use
from mesh.gateway.validation import parse_chat
from shards.backend_null import NullBackend
from shards.local import LocalShard
from shards.tools import (
    ArgsOut,
    CallParser,
    CallStart,
    SchemaError,
    TextOut,
    Tool,
    json_grammar,
    normalize_schema,
    tool_grammar,
)

MODEL = MeshConfig().models[0].name
LIMITS = GatewayConfig()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def bad(body: dict, param: str) -> str:
    with pytest.raises(ApiError) as err:
        parse_chat(body, LIMITS)
    assert err.value.status == 400, err.value.message
    assert err.value.param == param, (err.value.param, err.value.message)
    assert err.value.body()["error"]["type"] == "invalid_request_error"
    return err.value.message


# -- request checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("tools, param", [
    ("get_weather", "tools"),
    ([], "tools"),
    ([{"type": "code", "function": {"name": "x"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": "3"}}}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": 7}}}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}, "required": "ghost"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict"),
    ([WEATHER] * 129, "tools"),
])
def test_bad_tools_are_400_naming_the_param(tools, param):
    bad(chat(tools=tools), param)


def test_schemas_too_deep_or_large_are_400_and_recursive_ones_work():
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    msg = bad(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": deep}}]),
              "tools[0].function.parameters")
    assert "deep" in msg
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 40} for i in range(800)}}
    bad(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": wide}}]),
        "tools[0].function.parameters")
    loop = {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}},
            "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}}
    use = parse_tool_use(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": loop}}]))
    assert "call-arguments-node ::= " in use.grammar and "call-arguments-next-kv" in use.grammar


@pytest.mark.parametrize("choice, tools, param", [
    ({"type": "function", "function": {"name": "get_weather"}}, None, "tool_choice"),
    ({"type": "function", "function": {"name": "nope"}}, [WEATHER], "tool_choice"),
    ("required", None, "tool_choice"),
    ("sometimes", [WEATHER], "tool_choice"),
    ({"type": "function"}, [WEATHER], "tool_choice"),
])
def test_bad_tool_choice_is_400(choice, tools, param):
    bad(chat(tool_choice=choice, **({"tools": tools} if tools else {})), param)


@pytest.mark.parametrize("fmt, param", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "maximum": "4"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": 1}},
     "response_format.json_schema.strict"),
])
def test_bad_response_format_is_400(fmt, param):
    bad(chat(response_format=fmt), param)


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "18C"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "tool_call_id": "call_1"}], "messages[0].content"),
    ([{"role": "assistant", "content": None}], "messages[0].content"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages[0].tool_calls[0].id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f",
                                                                                       "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f",
                                                                                       "arguments": {}}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}], "messages[0].tool_calls"),
    ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
])
def test_bad_tool_messages_are_400(messages, param):
    bad({"model": MODEL, "messages": messages}, param)


def test_a_call_and_its_result_become_turns_the_model_reads():
    req = parse_chat({"model": MODEL, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Bergen"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "-3 C, snow"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "4 C, rain"}]},
    ]}, LIMITS)
    roles = [m.role for m in req.messages]
    assert roles == ["user", "assistant", "user"]
    assert req.messages[1].content == ('{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                       '{"name": "get_weather", "arguments": {"city": "Bergen"}}')
    assert "get_weather" in req.messages[2].content
    assert "-3 C, snow" in req.messages[2].content and "4 C, rain" in req.messages[2].content


def test_tool_use_sets_grammar_and_drops_stops_only_for_calls():
    req = parse_chat(chat(tools=[WEATHER], stop=["\n"]), LIMITS)
    assert req.tool_use.calls and req.tool_use.choice == "auto"
    assert req.sampling.grammar == req.tool_use.grammar and "get_weather" in req.sampling.grammar
    assert req.sampling.stop == ()
    assert "get_weather" in req.tool_use.preamble
    json_req = parse_chat(chat(response_format={"type": "json_object"}, stop=["x"]), LIMITS)
    assert json_req.sampling.grammar and json_req.sampling.stop == ("x",) and not json_req.tool_use.calls
    none = parse_chat(chat(tools=[WEATHER], tool_choice="none"), LIMITS)
    assert none.tool_use is None and none.sampling.grammar is None
    plain = parse_chat(chat(response_format={"type": "text"}, tool_choice="auto"), LIMITS)
    assert plain.tool_use is None and plain.sampling.grammar is None


def test_named_choice_grammar_allows_only_that_function():
    use = parse_tool_use(chat(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}}))
    assert use.choice == "add"
    assert '"\\"add\\""' in use.grammar and "get_weather" not in use.grammar
    assert "text ::=" not in use.grammar
    single = parse_tool_use(chat(tools=[WEATHER], tool_choice="required"))
    assert single.grammar.split("\n")[1] == "tool-calls ::= call"
    several = parse_tool_use(chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=True))
    assert several.grammar.split("\n")[1] == 'tool-calls ::= call ("\\n" call){0,7}'


# -- schemas and grammars ---------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
leaves = st.one_of(
    st.just({"type": "string"}),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 3), st.integers(0, 4)),
    st.just({"type": "integer"}), st.just({"type": "number"}), st.just({"type": "boolean"}),
    st.just({"type": ["string", "null"]}),
    st.lists(words, min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    st.builds(lambda v: {"const": v}, st.one_of(st.integers(-5, 5), words)),
)


def objects(children: st.SearchStrategy) -> st.SearchStrategy:
    def with_required(props: dict) -> st.SearchStrategy:
        keys = sorted(props)
        req = st.lists(st.sampled_from(keys), unique=True) if keys else st.just([])
        return req.map(lambda r: {"type": "object", "properties": props, **({"required": r} if r else {})})
    return st.dictionaries(st.one_of(names, words), children, max_size=4).flatmap(with_required)


def arrays(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo,
                                               "maxItems": lo + extra},
                     children, st.integers(0, 2), st.integers(0, 3))


schemas = st.recursive(leaves, lambda kids: st.one_of(objects(kids), arrays(kids)), max_leaves=10)
parameters = objects(schemas)


def rules(grammar: str) -> dict[str, str]:
    out = {}
    for line in grammar.strip().split("\n"):
        name, sep, body = line.partition(" ::= ")
        assert sep and re.fullmatch(r"[a-zA-Z0-9-]+", name), line
        assert name not in out, f"rule {name} defined twice"
        out[name] = body
    return out


def referenced(body: str) -> set[str]:
    """Rule names a GBNF body refers to (outside string literals and character classes)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', " ", body)
    return set(re.findall(r"[a-zA-Z][a-zA-Z0-9-]*", stripped))


def assert_well_formed(grammar: str) -> None:
    defined = rules(grammar)
    assert "root" in defined
    for name, body in defined.items():
        missing = referenced(body) - set(defined)
        assert not missing, f"{name} refers to undefined {missing}"
        assert body.count("(") == body.count(")") or '"' in body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(parameters, min_size=1, max_size=3), st.sampled_from(["auto", "required", "named"]), st.booleans())
def test_generated_schemas_make_well_formed_grammars(params, choice, parallel):
    tools = tuple(Tool(f"f{i}", "", p, normalize_schema(p, require_object=True)) for i, p in enumerate(params))
    grammar = tool_grammar(tools, "f0" if choice == "named" else choice, parallel=parallel)
    assert_well_formed(grammar)
    assert all(f'\\"f{i}\\"' in grammar for i in range(len(tools) if choice != "named" else 1))
    assert_well_formed(json_grammar(normalize_schema(params[0])))


@settings(max_examples=60, deadline=None)
@given(schemas)
def test_normalizing_twice_changes_nothing(schema):
    once = normalize_schema(schema)
    assert normalize_schema(once) == once


def test_refs_become_definitions_and_annotations_are_dropped():
    schema = {"type": "object", "title": "T", "properties": {"home": {"$ref": "#/$defs/Address"},
                                                             "work": {"allOf": [{"$ref": "#/$defs/Address"}]}},
              "$defs": {"Address": {"type": "object", "description": "where",
                                    "properties": {"street": {"type": "string", "format": "email"}}}}}
    out = normalize_schema(schema)
    street = {"type": "object", "properties": {"street": {"type": "string", "format": "email"}}}
    assert out == {"type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}, "work": street},
                   "$defs": {"Address": street}}
    assert normalize_schema(out) == out


@pytest.mark.parametrize("schema, grammar_schema", [
    ({"type": "object", "minProperties": 1}, {"type": "object"}),
    ({"type": "array", "items": [{"type": "string"}]},
     {"type": "array", "prefixItems": [{"type": "string"}], "items": {}, "minItems": 0, "maxItems": 0}),
    ({"type": "array", "uniqueItems": True}, {"type": "array", "items": {}, "minItems": 0}),
    ({"not": {"type": "string"}}, {}),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, {"type": "string", "maxLength": 3}),
    ({"type": "string", "maxLength": 100000}, {"type": "string"}),
    ({"type": "number", "multipleOf": 2}, {"type": "number"}),
    ({"type": "integer", "exclusiveMinimum": 0, "maximum": 9.5}, {"type": "integer", "minimum": 1, "maximum": 9}),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
     {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"type": "object", "properties": {"a": {"type": "string"}, "b": {}}, "required": ["b"]}]}),
])
def test_what_a_grammar_cannot_say_is_left_to_the_check_after(schema, grammar_schema):
    assert normalize_schema(schema) == grammar_schema


@pytest.mark.parametrize("schema", [
    {"$ref": "https://example.com/s.json"}, {"enum": []}, {"const": float("nan")},
    {"type": "integer", "minimum": 3, "maximum": 2}, {"type": "tuple"},
])
def test_unusable_schemas_are_refused(schema):
    with pytest.raises(SchemaError):
        normalize_schema(schema)


def test_json_strings_in_grammars_exclude_control_characters_and_escape_backslashes():
    grammar = json_grammar(normalize_schema({"enum": ['say "hi"\\', "tab\there"]}))
    assert r'[^"\\\x7F\x00-\x1F]' in json_grammar(None)
    assert r'"\"say \\\"hi\\\"\\\\\""' in grammar  # "say \"hi\"\\" as a GBNF literal


# -- the parser -------------------------------------------------------------------------------

def feed_all(parser: CallParser, text: str, step: int) -> list:
    out = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i:i + step])
    return out + parser.finish()


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_parser_releases_arguments_incrementally_in_any_split(step):
    text = ('{"name": "add", "arguments": {"a": 1, "s": "}\\"{"}}\n'
            '{"name":"get_weather","arguments":{"city":"Oslo"}} ')
    parser = CallParser(("get_weather", "add"), allow_text=True)
    events = feed_all(parser, text, step)
    starts = [e for e in events if isinstance(e, CallStart)]
    assert starts == [CallStart(0, "add"), CallStart(1, "get_weather")]
    args = {i: "".join(e.text for e in events if isinstance(e, ArgsOut) and e.index == i) for i in (0, 1)}
    assert args == {0: '{"a": 1, "s": "}\\"{"}', 1: '{"city":"Oslo"}'}
    assert json.loads(args[0]) == {"a": 1, "s": '}"{'}
    assert parser.calls == [("add", args[0]), ("get_weather", args[1])] and parser.complete
    assert not any(isinstance(e, TextOut) for e in events)
    if step == 1:
        assert sum(isinstance(e, ArgsOut) for e in events) > 10, "arguments come out as they arrive"


@pytest.mark.parametrize("text", ["Hello there", " {\"name\": \"add\"", '{"name": "subtract", "x": 1}', '{"nam',
                                  "{}"])
def test_parser_text_that_is_no_call_is_content(text):
    parser = CallParser(("add",), allow_text=True)
    events = feed_all(parser, text, 1)
    assert "".join(e.text for e in events if isinstance(e, TextOut)) == text
    assert parser.calls == [] and parser.text == text


def test_parser_truncated_call_is_incomplete():
    parser = CallParser(("add",), allow_text=False)
    feed_all(parser, '{"name": "add", "arguments": {"a": 1', 3)
    assert parser.calls == [("add", '{"a": 1')] and not parser.complete
    shaper = ToolShaper(parse_tool_use(chat(tools=[ADD], tool_choice="required")))
    shaper.feed('{"name": "add", "arguments": {"a": 1')
    assert shaper.finish_reason("length") == "length"
    done = ToolShaper(shaper.use)
    done.feed('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert done.finish_reason("stop") == "tool_calls"


def test_shaper_deltas_have_openai_shape():
    shaper = ToolShaper(parse_tool_use(chat(tools=[WEATHER, ADD])))
    deltas = shaper.feed('{"name": "get_weather", "arguments": {"ci') + shaper.feed('ty": "Oslo"}}')
    first, rest = deltas[0]["tool_calls"][0], [d["tool_calls"][0] for d in deltas[1:]]
    assert first["index"] == 0 and first["type"] == "function"
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first["id"])
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    assert first["function"]["arguments"] + "".join(d["function"]["arguments"] for d in rest) == '{"city": "Oslo"}'
    message = shaper.message()
    assert message["content"] is None and message["tool_calls"][0]["id"] == first["id"]


# -- through the gateway, read by the openai SDK ------------------------------------------------

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'


class Backend(NullBackend):
    """Remembers the grammar of the last request it served."""

    grammars: list

    def generate(self, prompt, sampling, seed, forced=(), **options):
        self.grammars = [*getattr(self, "grammars", []), sampling.grammar]
        yield from super().generate(prompt, sampling, seed, forced)


async def with_sdk(reply: str, work, tool_use_reply: str | None = None):
    gateway = Gateway(MeshConfig(), Metrics())
    shards = [LocalShard("reasoning", MODEL, Backend(reply=reply, n_ctx=4096), 4, "gemma")]
    if tool_use_reply is not None:
        shards.append(LocalShard("tool-use", MODEL, Backend(reply=tool_use_reply, n_ctx=4096), 4, "gemma"))
    for shard in shards:
        gateway.attach(shard)
    transport = httpx.ASGITransport(app=create_app(gateway))
    http = httpx.AsyncClient(transport=transport, base_url="http://test")
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
    try:
        return await work(client, [s.backend for s in shards], gateway)
    finally:
        await http.aclose()
        for shard in gateway.detach_all():
            await asyncio.to_thread(shard.close)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_sdk_reads_a_call_whole_and_streamed_alike():
    async def work(client, backends, gateway):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
        whole = await client.chat.completions.create(**kw)
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
        chunks = [c async for c in await client.chat.completions.create(**kw, stream=True)]
        assert len({c.id for c in chunks}) == 1
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert pieces[0].id and pieces[0].function.name == "get_weather"
        assert all(p.id is None and p.function.name is None for p in pieces[1:])
        assert len(pieces) > 3, "arguments are streamed in pieces"
        assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert finishes == ["tool_calls"]
        assert all(c.choices[0].delta.content is None for c in chunks)
        assert backends[0].grammars[-1] and "get_weather" in backends[0].grammars[-1]
    run(with_sdk(CALL, work))


def test_sdk_text_answer_with_tools_has_no_tool_calls():
    async def work(client, backends, gateway):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
        whole = await client.chat.completions.create(**kw)
        assert whole.choices[0].message.content == "Hello! How can I help?"
        assert whole.choices[0].message.tool_calls is None and whole.choices[0].finish_reason == "stop"
        raw = (await client.chat.completions.with_raw_response.create(**kw)).http_response.json()
        assert "tool_calls" not in raw["choices"][0]["message"]
        chunks = [c async for c in await client.chat.completions.create(**kw, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello! How can I help?"
        assert all(c.choices[0].delta.tool_calls is None for c in chunks)
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    run(with_sdk("Hello! How can I help?", work))


def test_tool_requests_go_to_a_tool_use_replica_when_there_is_one():
    async def work(client, backends, gateway):
        plain = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].message.content == "plain words"
        called = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      tools=[WEATHER], tool_choice="required")
        assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
        fmt = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   response_format={"type": "json_object"})
        assert fmt.choices[0].message.content == CALL
        assert backends[0].grammars == [None] and len(backends[1].grammars) == 2
        text = gateway.metrics.render().decode()
        assert 'quorum_routed_total{model="gemma-3-270m",role="tool-use"} 2.0' in text
    run(with_sdk("plain words", work, tool_use_reply=CALL))


def test_sdk_sees_400_for_a_bad_schema():
    async def work(client, backends, gateway):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
                    "n": {"type": "integer", "exclusiveMinimum": "0"}}}}}])
        assert err.value.body["param"] == "tools[0].function.parameters"
    run(with_sdk(CALL, work))


def test_grammar_crosses_grpc_and_is_bounded():
    from shards.grpc_service import BadRequest, request_from_proto, request_to_proto
    from shards.tools import MAX_GRAMMAR_CHARS
    from shards.types import GenerateRequest, Message, Sampling

    grammar = parse_tool_use(chat(tools=[WEATHER])).grammar
    req = GenerateRequest(sampling=Sampling(temperature=0.0, grammar=grammar), messages=(Message("user", "hi"),))
    assert request_from_proto(request_to_proto("tool-use", MODEL, req)).sampling.grammar == grammar
    plain = GenerateRequest(sampling=Sampling(), messages=(Message("user", "hi"),))
    assert request_from_proto(request_to_proto("reasoning", MODEL, plain)).sampling.grammar is None
    huge = request_to_proto("tool-use", MODEL, plain)
    huge.sampling.grammar = "x" * (MAX_GRAMMAR_CHARS + 1)
    with pytest.raises(BadRequest):
        request_from_proto(huge)
