"""Tool calls and JSON answers from the real default model, through a real meshd and the openai SDK.

The node serves the model twice: a reasoning replica and a tool-use replica, so requests with
tools or a JSON response_format are seen to go to the tool-use one. Arguments are checked against
their schemas with a small validator for the schemas used here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Literal

import httpx
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core.config import MeshConfig
from tests.procs import REPO, Meshd, wait_until

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node with a reasoning and a tool-use replica of the default model (overrides conftest's)."""
    data_dir = tmp_path_factory.mktemp("tools") / "node"
    data_dir.mkdir()
    m = MeshConfig().models[0]
    (data_dir / "mesh.toml").write_text(
        f'[replicas]\nreasoning = 1\n"tool-use" = 1\ncontext = 0\n\n[[models]]\nname = "{m.name}"\n'
        f'package = "{m.package}"\nfile = "{m.file}"\nsha256 = "{m.sha256}"\nroles = ["reasoning", "tool-use"]\n'
        f'context_length = 2048\nchat_template = "gemma"\n')
    with Meshd(data_dir) as meshd:
        meshd.wait_ready()

        def both_ready() -> bool:
            shards = meshd.status()["shards"]
            return {s["role"] for s in shards if s["state"] == "ready"} >= {"reasoning", "tool-use"}
        wait_until(both_ready, 120, "the tool-use replica")
        yield meshd


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def conforms(value, schema: dict) -> bool:
    """JSON Schema validation for the subset the gateway accepts (type, properties, required,
    items, minItems/maxItems, minLength/maxLength, enum, const, anyOf)."""
    if "const" in schema:
        return value == schema["const"] and type(value) is type(schema["const"])
    if "enum" in schema:
        return any(value == v and type(value) is type(v) for v in schema["enum"])
    if "anyOf" in schema:
        return any(conforms(value, s) for s in schema["anyOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(conforms(value, {**schema, "type": k}) for k in kind)
    checks = {"string": lambda v: isinstance(v, str), "integer": lambda v: type(v) is int,
              "number": lambda v: type(v) in (int, float), "boolean": lambda v: type(v) is bool,
              "null": lambda v: v is None, "object": lambda v: isinstance(v, dict),
              "array": lambda v: isinstance(v, list)}
    if kind is not None and not checks[kind](value):
        return False
    if kind == "string":
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
    if kind == "object":
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(conforms(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(conforms(v, schema.get("items", {})) for v in value)
    return True


def call_of(reply) -> tuple[str, str]:
    (call,) = reply.choices[0].message.tool_calls
    return call.function.name, call.function.arguments


def streamed(client, **kw):
    """(name, arguments joined, finish_reason, content) of a streamed one-call answer."""
    name, args, finish, content = None, "", None, ""
    ids = set()
    for c in client.chat.completions.create(**kw, stream=True):
        choice = c.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            assert tc.index == 0
            name = name or tc.function.name
            if tc.id:
                ids.add(tc.id)
            args += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    assert len(ids) <= 1, "the id comes once per call"
    return name, args, finish, content


# -- calls ------------------------------------------------------------------------------------

def test_required_call_validates_and_streams_the_same(client):
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=48, temperature=0)
    reply = client.chat.completions.create(**kw)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    name, args = call_of(reply)
    assert name == "get_weather"
    assert conforms(json.loads(args), WEATHER["function"]["parameters"]), args
    assert streamed(client, **kw) == (name, args, "tool_calls", "")


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
leaves = st.one_of(
    st.just({"type": "string", "maxLength": 12}), st.just({"type": "integer"}), st.just({"type": "boolean"}),
    st.just({"type": "number"}), st.just({"type": ["string", "null"], "maxLength": 8}),
    st.lists(names, min_size=1, max_size=3, unique=True).map(lambda v: {"enum": v}),
)


def objects(children: st.SearchStrategy) -> st.SearchStrategy:
    def with_required(props: dict) -> st.SearchStrategy:
        keys = sorted(props)
        req = st.lists(st.sampled_from(keys), unique=True) if keys else st.just([])
        return req.map(lambda r: {"type": "object", "properties": props, "required": r})
    return st.dictionaries(names, children, max_size=3).flatmap(with_required)


inner = st.recursive(leaves, lambda kids: st.one_of(
    objects(kids), st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, kids,
                             st.integers(1, 3))), max_leaves=4)
MAX_TOKENS = 40


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=objects(inner), stream_first=st.booleans())
def test_generated_schemas_give_valid_arguments(client, params, stream_first):
    tool = {"type": "function", "function": {"name": "record", "description": "Record the details",
                                             "parameters": params}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Record a made-up example."}], tools=[tool],
              tool_choice={"type": "function", "function": {"name": "record"}}, max_tokens=MAX_TOKENS,
              temperature=0)
    first = streamed(client, **kw) if stream_first else None
    reply = client.chat.completions.create(**kw)
    choice = reply.choices[0]
    name, args = call_of(reply)
    assert name == "record"
    if choice.finish_reason == "tool_calls":
        assert conforms(json.loads(args), params), (args, params)
    else:  # cut by max_tokens: said so, never passed off as a whole call
        assert choice.finish_reason == "length" and reply.usage.completion_tokens == MAX_TOKENS
    assert (first or streamed(client, **kw)) == (name, args, choice.finish_reason, "")


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_auto_without_a_call_is_plain_text(client):
    kw = dict(model=MODEL, tools=[WEATHER], max_tokens=24, temperature=0,
              messages=[{"role": "user", "content": "Say hello to my friend Anna."}])
    reply = client.chat.completions.create(**kw)
    choice = reply.choices[0]
    if choice.message.tool_calls is None:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
        raw = client.chat.completions.with_raw_response.create(**kw).http_response.json()
        assert "tool_calls" not in raw["choices"][0]["message"]
        name, args, finish, content = streamed(client, **kw)
        assert (name, args, finish, content) == (None, "", choice.finish_reason, choice.message.content)
    else:
        assert choice.finish_reason == "tool_calls"
        assert conforms(json.loads(call_of(reply)[1]), WEATHER["function"]["parameters"])


def test_a_tool_result_flows_into_the_next_turn(client):
    def turn(result: str):
        return client.chat.completions.create(model=MODEL, tools=[WEATHER], max_tokens=16, temperature=0, messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ])
    short = turn("sunny")
    long = turn("sunny, 24 degrees celsius, light wind from the north-west, humidity 40 percent")
    assert long.usage.prompt_tokens - short.usage.prompt_tokens >= 15, "the result is in the prompt"
    for reply in (short, long):
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


# -- JSON answers -----------------------------------------------------------------------------

def test_json_object_answer_parses(client):
    ask = 'What is the capital of France? Answer as JSON with the key "capital".'
    reply = client.chat.completions.create(model=MODEL, max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"},
                                           messages=[{"role": "user", "content": ask}])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_answer_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer"}, "pets": {"type": "array", "items": {
                                                   "enum": ["cat", "dog"]}, "maxItems": 2}},
              "required": ["name", "age", "pets"], "additionalProperties": False}
    kw = dict(model=MODEL, max_tokens=48, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                      "strict": True}},
              messages=[{"role": "user", "content": "Invent a person."}])
    reply = client.chat.completions.create(**kw)
    assert reply.choices[0].finish_reason == "stop"
    assert conforms(json.loads(reply.choices[0].message.content), schema)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
    assert text == reply.choices[0].message.content


# -- refusals and routing ---------------------------------------------------------------------

@pytest.mark.parametrize("kw, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "number", "minimum": "0"}}}}}]), "tools[0].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}),
     "response_format.json_schema.schema"),
])
def test_bad_requests_are_400_naming_the_param(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)
    assert err.value.status_code == 400 and err.value.body["param"] == param


def test_grammar_requests_went_to_the_tool_use_replica(client, node):
    client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=4)
    text = httpx.get(f"{node.base_url}/metrics", timeout=5).text
    counts = {role: sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                        if line.startswith("quorum_routed_total{") and f'role="{role}"' in line)
              for role in ("tool-use", "reasoning")}
    assert counts["tool-use"] >= 1, counts


# -- the backend: grammar state across a resumed generation ------------------------------------

@pytest.fixture(scope="module")
def backend(node):
    """The model in this process (the node's verified file), for what only the backend shows."""
    from shards.backend_llama import LlamaBackend

    loaded = LlamaBackend(str(node.data_dir / "models" / MeshConfig().models[0].file), n_ctx=512, threads=1)
    yield loaded
    loaded.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.lists(objects(inner), min_size=1, max_size=3), choice=st.sampled_from(["auto", "required", "f0"]),
       parallel=st.booleans())
def test_llama_cpp_parses_every_grammar_built(backend, params, choice, parallel):
    import llama_cpp

    from shards.tools import Tool, json_grammar, normalize_schema, tool_grammar

    tools = tuple(Tool(f"f{i}", "", p, normalize_schema(p, require_object=True)) for i, p in enumerate(params))
    for grammar in (tool_grammar(tools, choice, parallel=parallel), json_grammar(tools[0].normalized),
                    json_grammar(None)):
        llama_cpp.llama_sampler_free(backend._grammar(grammar))


def test_resumed_generation_replays_through_the_grammar(backend):
    """A replica resuming a constrained generation replays the sent tokens through the grammar
    and continues exactly as the original would have; a replayed token the grammar forbids is an
    error, not a crash."""
    from shards.templates import render
    from shards.tools import Tool, normalize_schema, tool_grammar, tools_preamble
    from shards.types import Message, Sampling

    params = WEATHER["function"]["parameters"]
    tools = (Tool("get_weather", "", params, normalize_schema(params, require_object=True)),)
    grammar = tool_grammar(tools, "required")
    text = render([Message("system", tools_preamble(tools, "required")), Message(*ASK[0].values())],
                  gguf_template=None, named="gemma").text
    prompt = backend.tokenize(text, add_bos=True)

    def run(sampling: Sampling, forced: tuple[int, ...] = ()) -> list[int]:
        out = []
        for step in backend.generate(prompt, sampling, 7, forced):
            out.append(step.token)
            if backend.is_end(step.token) or len(out) == 80:
                return out
        return out

    for sampling, cuts in ((Sampling(temperature=0.0, grammar=grammar), (1, 0.5)),
                           (Sampling(temperature=1.0, top_p=0.9, grammar=grammar), (0.5,))):
        full = run(sampling)
        assert backend.is_end(full[-1]), "the grammar completes and the model may then end"
        call = json.loads(b"".join(backend.token_bytes(t) for t in full[:-1]).decode())
        assert call["name"] == "get_weather" and conforms(call["arguments"], params)
        for cut in (c if isinstance(c, int) else int(len(full) * c) for c in cuts):
            assert run(sampling, tuple(full[:cut])) == full
    stray = backend.tokenize("Hello", add_bos=False)[0]
    with pytest.raises(ValueError, match="not allowed by the grammar"):
        run(Sampling(temperature=0.0, grammar=grammar), (stray,))


def test_the_greedy_shortcut_picks_what_the_full_grammar_pass_picks(backend):
    """At temperature 0 the backend tries the highest logits one grammar check at a time instead of
    masking the whole vocabulary: the tokens must be the ones the full pass gives."""
    from shards.templates import render
    from shards.tools import Tool, json_grammar, normalize_schema, tool_grammar, tools_preamble
    from shards.types import Message, Sampling

    params = WEATHER["function"]["parameters"]
    tools = (Tool("get_weather", "", params, normalize_schema(params, require_object=True)),)
    text = render([Message("system", tools_preamble(tools, "required")), Message(*ASK[0].values())],
                  gguf_template=None, named="gemma").text
    prompt = backend.tokenize(text, add_bos=True)

    def run(grammar: str, shortcut: bool) -> list[int]:
        backend.greedy_shortcut = shortcut
        out = []
        try:
            for step in backend.generate(prompt, Sampling(temperature=0.0, grammar=grammar), 7, ()):
                out.append(step.token)
                if backend.is_end(step.token) or len(out) == 60:
                    break
        finally:
            backend.greedy_shortcut = True
        return out

    for grammar in (tool_grammar(tools, "required"), json_grammar(None)):
        assert run(grammar, True) == run(grammar, False)


# -- Real clients' own ways of asking for tools and structured answers (issue 16) ---------------------

class DayWeather(pydantic.BaseModel):
    """The weather in a city on one day of the month."""
    city: str = pydantic.Field(max_length=20)
    day: int = pydantic.Field(ge=1, le=31)
    unit: Literal["celsius", "fahrenheit"] = "celsius"


ASK_DAY = "What is the weather in Paris on the 14th? Answer with the tool."


def langchain_chat(node):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=f"{node.base_url}/v1", api_key="x", temperature=0, max_tokens=80,
                      max_retries=0, timeout=120)


def test_langchain_binds_a_pydantic_tool_with_field_constraints(node):
    """`bind_tools` with a pydantic model whose fields carry ge/le and max_length: what LangChain sends
    (minimum, maximum, maxLength) is enforced, not refused."""
    reply = langchain_chat(node).bind_tools([DayWeather], tool_choice="DayWeather").invoke(ASK_DAY)
    [call] = reply.tool_calls
    assert call["name"] == "DayWeather"
    DayWeather.model_validate(call["args"])  # raises if a constraint is broken


def test_langchain_structured_output_gives_a_valid_model(node):
    for method in ("json_schema", "function_calling"):
        answer = langchain_chat(node).with_structured_output(DayWeather, method=method).invoke(ASK_DAY)
        assert isinstance(answer, DayWeather), method
        assert 1 <= answer.day <= 31 and len(answer.city) <= 20, (method, answer)


def test_langchain_streams_text(node):
    chunks = [c.content for c in langchain_chat(node).stream("Name three colours.")]
    assert len(chunks) > 2 and "".join(chunks).strip()


def test_openai_parse_helper_returns_the_pydantic_model(client):
    """The SDK's own structured-output helper: a strict json_schema response_format, parsed client-side."""
    reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": ASK_DAY}],
                                          response_format=DayWeather, max_tokens=80, temperature=0)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, DayWeather) and 1 <= parsed.day <= 31


JS = REPO / "tests" / "js"


def test_the_ai_sdk_generates_a_zod_object_streams_and_calls_a_tool(node):
    """The AI SDK's openai-compatible provider (what opencode uses): generateObject with a constrained
    zod schema, streamText, and a required tool call (tests/js/ai_sdk.mjs; installed by run-tests when
    node is on the machine, scripts/ensure-js-clients)."""
    if shutil.which("node") is None or not (JS / "node_modules" / "ai").is_dir():
        pytest.skip("node or the AI SDK is not installed here (scripts/ensure-js-clients)")
    done = subprocess.run(["node", str(JS / "ai_sdk.mjs"), f"{node.base_url}/v1", MODEL], capture_output=True,
                          text=True, timeout=240, cwd=JS)
    assert done.returncode == 0, done.stderr[-2000:]
    checks = {line["check"]: line for line in map(json.loads, done.stdout.splitlines())}
    obj = checks["generateObject"]["object"]
    DayWeather.model_validate(obj)  # the same constraints as the zod schema
    assert checks["streamText"]["text"].strip() and checks["streamText"]["parts"] > 1
    [call] = checks["toolCall"]["calls"]
    assert call["name"] == "get_weather" and isinstance(call["input"]["city"], str)
