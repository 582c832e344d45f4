"""mesh/gateway/validation.py: every bad request is an ApiError 400 naming the parameter; good ones parse."""

from __future__ import annotations

import json

import pytest

from mesh.core.config import GatewayConfig
from mesh.core.errors import ApiError
from mesh.core.json_body import parse_json
from mesh.gateway.validation import ChatRequest, parse_chat, parse_completion
from shards.templates import Message
from shards.types import Sampling

LIMITS = GatewayConfig()
USER = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"model": "m", "messages": USER, **fields}


def completion(**fields) -> dict:
    return {"model": "m", "prompt": "Once upon a time", **fields}


def chat_error(body: dict, limits: GatewayConfig = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat(body, limits)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


def completion_error(body: dict, limits: GatewayConfig = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_completion(body, limits)
    assert info.value.status == 400
    return info.value


# -- parse_json ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"", b"{", b"{'model': 1}", b"not json", b"\xff\xfe\x00", b"{\"a\": 1}}", b"[" * 100000, b"{\"a\":" * 100000,
    b"1" * 10000,
])
def test_parse_json_bad_bytes_is_400(raw):
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b"\"text\"", b"3", b"null", b"true"])
def test_parse_json_non_object_is_400(raw):
    with pytest.raises(ApiError, match="JSON object") as info:
        parse_json(raw)
    assert info.value.status == 400


def test_parse_json_object_parses():
    assert parse_json(b'{"model": "m", "n": 2}') == {"model": "m", "n": 2}


def test_api_error_body_is_openai_shaped():
    err = chat_error(chat(n=0))
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": "n",
                                    "code": "invalid_value"}}


# -- parse_chat: bad requests ----------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"messages": USER}, "model"),
    (chat(model=""), "model"),
    (chat(model=3), "model"),
    (chat(messages=[]), "messages"),
    (chat(messages=None), "messages"),
    (chat(messages="Hello"), "messages"),
    (chat(messages={"role": "user", "content": "x"}), "messages"),
    (chat(messages=["Hello"]), "messages[0]"),
    (chat(messages=[{"role": "user", "content": "a"}, None]), "messages[1]"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": "x", "name": 5}]), "messages[0].name"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": {"text": "x"}}]), "messages[0].content"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), "messages[0].content[0]"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "ok"}, {"type": "text", "text": 3}]}]), "messages[0].content[1]"),
    (chat(messages=[{"role": "user", "content": ["plain"]}]), "messages[0].content[0]"),
])
def test_bad_messages_are_400_naming_param(body, param):
    assert chat_error(body).param == param


def test_too_many_messages_is_400():
    limits = GatewayConfig(max_messages=2)
    assert chat_error(chat(messages=USER * 3), limits).param == "messages"
    parse_chat(chat(messages=USER * 2), limits)


@pytest.mark.parametrize("value", [-0.1, 2.01, 100, "1", "hot", True, [1], {"a": 1},
                                   float("nan"), float("inf"), float("-inf")])
def test_bad_temperature_is_400(value):
    assert chat_error(chat(temperature=value)).param == "temperature"


def test_huge_integer_temperature_is_400():
    body = parse_json(json.dumps(chat(temperature=10 ** 400)).encode())
    assert chat_error(body).param == "temperature"


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, "0.9"])
def test_bad_top_p_is_400(value):
    assert chat_error(chat(top_p=value)).param == "top_p"


@pytest.mark.parametrize("key", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [-2.5, 2.5, "0"])
def test_bad_penalty_is_400(key, value):
    assert chat_error(chat(**{key: value})).param == key


@pytest.mark.parametrize("value", [0, -1, LIMITS.max_n + 1, 1.0, "2", True])
def test_bad_n_is_400(value):
    assert chat_error(chat(n=value)).param == "n"


@pytest.mark.parametrize("value", [0, -5, "10", 1.5, False])
def test_bad_max_tokens_is_400(value):
    assert chat_error(chat(max_tokens=value)).param == "max_tokens"


@pytest.mark.parametrize("value", [0, -1, "10"])
def test_bad_max_completion_tokens_is_400(value):
    assert chat_error(chat(max_completion_tokens=value)).param == "max_completion_tokens"


def test_max_completion_tokens_preferred_over_max_tokens():
    assert parse_chat(chat(max_completion_tokens=7, max_tokens=99), LIMITS).sampling.max_tokens == 7
    assert parse_chat(chat(max_tokens=99), LIMITS).sampling.max_tokens == 99
    assert parse_chat(chat(), LIMITS).sampling.max_tokens is None


@pytest.mark.parametrize("value", [1.5, "42", 1 << 63, -(1 << 63) - 1])
def test_bad_seed_is_400(value):
    assert chat_error(chat(seed=value)).param == "seed"


def test_stop_as_string_and_list_parse():
    assert parse_chat(chat(stop="END"), LIMITS).sampling.stop == ("END",)
    assert parse_chat(chat(stop=["a", "b"]), LIMITS).sampling.stop == ("a", "b")
    assert parse_chat(chat(stop=["", "b"]), LIMITS).sampling.stop == ("b",)
    assert parse_chat(chat(stop=[]), LIMITS).sampling.stop == ()
    assert parse_chat(chat(stop=None), LIMITS).sampling.stop == ()


@pytest.mark.parametrize("stop", [
    ["a"] * (LIMITS.max_stop + 1),
    "x" * (LIMITS.max_stop_chars + 1),
    ["ok", "x" * (LIMITS.max_stop_chars + 1)],
    3, ["a", 3], {"a": 1},
])
def test_bad_stop_is_400(stop):
    assert chat_error(chat(stop=stop)).param == "stop"


def test_top_logprobs_without_logprobs_is_400():
    assert chat_error(chat(top_logprobs=2)).param == "top_logprobs"
    assert chat_error(chat(top_logprobs=2, logprobs=False)).param == "top_logprobs"


@pytest.mark.parametrize("value", [-1, LIMITS.max_top_logprobs + 1, "2"])
def test_top_logprobs_out_of_range_is_400(value):
    assert chat_error(chat(logprobs=True, top_logprobs=value)).param == "top_logprobs"


@pytest.mark.parametrize("value", ["true", 1, 0])
def test_logprobs_not_a_bool_is_400(value):
    assert chat_error(chat(logprobs=value)).param == "logprobs"


def test_stream_options_without_stream_is_400():
    assert chat_error(chat(stream_options={"include_usage": True})).param == "stream_options"
    assert chat_error(chat(stream=False, stream_options={"include_usage": True})).param == "stream_options"


def test_bad_stream_options_are_400():
    assert chat_error(chat(stream=True, stream_options="yes")).param == "stream_options"
    assert chat_error(chat(stream=True, stream_options={"include_usage": "yes"})).param == \
        "stream_options.include_usage"
    assert chat_error(chat(stream="yes")).param == "stream"


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def test_a_function_tool_is_accepted():
    assert parse_chat(chat(tools=TOOLS), LIMITS).tool_use  # (tests/unit/test_tools.py covers tools in depth)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "f"}}, "required"])
def test_tool_choice_needing_tools_without_tools_is_400(choice):
    assert chat_error(chat(tool_choice=choice)).param.startswith("tool_choice")


@pytest.mark.parametrize("choice", ["none", "auto", None])
def test_tool_choice_none_or_auto_is_accepted(choice):
    parse_chat(chat(tool_choice=choice, tools=TOOLS), LIMITS)


@pytest.mark.parametrize("fmt", [{"type": "json_schema", "json_schema": {}}, {"type": "yaml"}, "json", {}])
def test_bad_response_formats_are_400(fmt):
    assert chat_error(chat(response_format=fmt)).param.startswith("response_format")


def test_json_response_format_is_accepted():
    parse_chat(chat(response_format={"type": "json_object"}), LIMITS)


def test_response_format_text_is_accepted():
    parse_chat(chat(response_format={"type": "text"}), LIMITS)


def test_logit_bias_is_400():
    assert chat_error(chat(logit_bias={"50256": -100})).param == "logit_bias"
    parse_chat(chat(logit_bias={}), LIMITS)


# -- parse_chat: good requests ---------------------------------------------------------------

def test_minimal_chat_request_gets_defaults():
    req = parse_chat(chat(), LIMITS)
    assert req == ChatRequest(model="m", messages=(Message("user", "Hello"),), sampling=Sampling(), n=1,
                              stream=False, include_usage=False, logprobs=False)


def test_full_chat_request_parses_every_field():
    req = parse_chat({
        "model": "gemma-3-270m",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "developer", "content": "Rules."},
                     {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "ok"}],
        "temperature": 0, "top_p": 0.5, "seed": -3, "max_tokens": 12, "stop": ["\n\n"],
        "logprobs": True, "top_logprobs": 3, "presence_penalty": -1, "frequency_penalty": 1.5,
        "n": 3, "stream": True, "stream_options": {"include_usage": True},
        "user": "someone", "some_future_field": {"x": 1},
    }, LIMITS)
    assert req.model == "gemma-3-270m"
    assert req.messages == (Message("system", "Be brief."), Message("developer", "Rules."),
                            Message("user", "a\nb"), Message("assistant", "ok"))
    assert req.sampling == Sampling(temperature=0.0, top_p=0.5, seed=-3, max_tokens=12, stop=("\n\n",),
                                    top_logprobs=3, presence_penalty=-1.0, frequency_penalty=1.5)
    assert isinstance(req.sampling.temperature, float)
    assert (req.n, req.stream, req.include_usage, req.logprobs) == (3, True, True, True)


def test_logprobs_without_top_logprobs_asks_for_zero_alternatives():
    assert parse_chat(chat(logprobs=True), LIMITS).sampling.top_logprobs == 0
    assert parse_chat(chat(logprobs=False), LIMITS).sampling.top_logprobs is None


def test_stream_without_options_has_no_usage():
    req = parse_chat(chat(stream=True), LIMITS)
    assert req.stream and not req.include_usage


@pytest.mark.parametrize("value", [0, 2, 2.0, 1])
def test_temperature_bounds_are_inclusive(value):
    assert parse_chat(chat(temperature=value), LIMITS).sampling.temperature == float(value)


def test_n_at_max_is_accepted():
    assert parse_chat(chat(n=LIMITS.max_n), LIMITS).n == LIMITS.max_n


# -- parse_completion ------------------------------------------------------------------------

def test_completion_with_string_prompt():
    req = parse_completion(completion(), LIMITS)
    assert req.prompts == ("Once upon a time",)
    assert req.n == 1 and not req.echo and not req.stream
    assert req.sampling.max_tokens == 16, "the legacy endpoint's default max_tokens is 16"
    assert req.sampling.top_logprobs is None


def test_completion_with_list_prompt():
    req = parse_completion(completion(prompt=["a", "b", ""]), LIMITS)
    assert req.prompts == ("a", "b", "")


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]]])
def test_completion_token_id_prompt_is_400(prompt):
    assert completion_error(completion(prompt=prompt)).param == "prompt"


@pytest.mark.parametrize("prompt", [None, 3, [], ["a", 1], {"text": "a"}])
def test_completion_bad_prompt_is_400(prompt):
    assert completion_error(completion(prompt=prompt)).param == "prompt"


def test_completion_missing_model_is_400():
    assert completion_error({"prompt": "x"}).param == "model"


def test_completion_best_of_above_one_is_400():
    assert completion_error(completion(best_of=2)).param == "best_of"
    assert completion_error(completion(best_of=0)).param == "best_of"
    parse_completion(completion(best_of=1), LIMITS)


def test_completion_suffix_is_400():
    assert completion_error(completion(suffix="tail")).param == "suffix"
    parse_completion(completion(suffix=""), LIMITS)


def test_completion_echo():
    assert parse_completion(completion(echo=True), LIMITS).echo is True
    assert completion_error(completion(echo="yes")).param == "echo"


@pytest.mark.parametrize("value", [0, 3, 5])
def test_completion_logprobs_within_bound(value):
    assert parse_completion(completion(logprobs=value), LIMITS).sampling.top_logprobs == value


@pytest.mark.parametrize("value", [6, -1, True, "2"])
def test_completion_logprobs_out_of_bound_is_400(value):
    assert completion_error(completion(logprobs=value)).param == "logprobs"


def test_completion_logprobs_bound_follows_config_when_smaller():
    limits = GatewayConfig(max_top_logprobs=2)
    assert completion_error(completion(logprobs=3), limits).param == "logprobs"


def test_completion_n_times_prompts_above_max_n_is_400():
    limits = GatewayConfig(max_n=4)
    assert completion_error(completion(prompt=["a", "b"], n=3), limits).param == "n"
    req = parse_completion(completion(prompt=["a", "b"], n=2), limits)
    assert req.n == 2 and len(req.prompts) == 2


def test_completion_too_many_prompts_is_400():
    limits = GatewayConfig(max_n=2)
    assert completion_error(completion(prompt=["a", "b", "c"]), limits).param == "prompt"


def test_completion_max_tokens_and_stream_options():
    req = parse_completion(completion(max_tokens=5, stream=True, stream_options={"include_usage": True},
                                      stop="."), LIMITS)
    assert req.sampling.max_tokens == 5 and req.sampling.stop == (".",)
    assert req.stream and req.include_usage
    assert completion_error(completion(max_tokens=0)).param == "max_tokens"


def test_completion_rejects_tools_like_chat():
    assert completion_error(completion(tools=[{"type": "function"}])).param == "tools"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_json_number_is_400(literal):
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": ' + literal + b"}"
    assert chat_error(parse_json(raw)).param == "temperature"
