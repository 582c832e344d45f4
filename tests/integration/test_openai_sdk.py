"""A real meshd process with the real default model, driven by the official openai SDK."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from tests.procs import wait_until

MODEL = "gemma-3-270m"
HELLO = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def metric(node, name: str, **labels) -> float:
    """Sum of the samples of one metric whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{node.base_url}/metrics", timeout=5).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_models_lists_the_default_model(client):
    assert MODEL in [m.id for m in client.models.list().data]


def test_chat_completion_returns_real_model_text(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content.strip(), "the model produced no text"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_answers_are_repeatable(client):
    texts = {client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
             .choices[0].message.content for _ in range(2)}
    assert len(texts) == 1


def test_seeded_sampling_is_repeatable(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first


def test_streamed_chat_has_openai_shape_and_matches_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0,
                                                 stream=True))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content


def test_stream_usage_chunk_only_when_asked(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_n_two_gives_two_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content is not None for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 16


def test_n_two_streamed_finishes_each_choice_once(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=2, stream=True))
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices[0].finish_reason]
    assert sorted(i for i, _ in finishes) == [0, 1]
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role]
    assert sorted(roles) == [0, 1]


def test_max_tokens_limits_the_answer(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_stop_sequence_ends_the_answer_before_it(client):
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    words = [w for w in text.split() if len(w) > 2]
    assert words, f"need a word to stop on in {text!r}"
    stop = words[min(2, len(words) - 1)]
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]


def test_logprobs_are_reported_per_token(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy decoding picks the most likely token.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_completions_plain_and_streamed(client):
    plain = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert err.value.body["code"] == "model_not_found"


def test_prompt_longer_than_context_is_400(client):
    long = "word " * 6000  # well over the 4096-token window
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    assert err.value.body["code"] == "context_length_exceeded"


def test_max_tokens_beyond_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    assert err.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": -3}, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": HELLO, "n": 1000}, "n"),
    ({"messages": HELLO}, "model"),
])
def test_bad_requests_are_400_with_the_parameter_named(node, body, param):
    r = httpx.post(f"{node.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"[" * 200_000])
def test_malformed_json_is_400_and_the_server_keeps_serving(node, client, raw):
    r = httpx.post(f"{node.base_url}/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code in (400, 413)
    assert "error" in r.json()
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_body_over_the_limit_is_413(node):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    r = httpx.post(f"{node.base_url}/v1/chat/completions", content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_full_queue_answers_429_with_retry_after(node):
    # This node runs with queue_depth = 1: its shard's slots (node.parallel: up to 4, by memory) decoding,
    # one waiting, the rest refused. Twice the most it can hold arrive at once.
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 64, "temperature": 0}

    def post(_):
        return httpx.post(f"{node.base_url}/v1/chat/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"


def test_client_disconnect_stops_a_stream(node, client):
    before = metric(node, "quorum_generations_total", reason="cancelled")
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3000, temperature=0.8,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_until(lambda: metric(node, "quorum_generations_total", reason="cancelled") > before, 60,
               "the abandoned stream's generation to be cancelled")
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_client_disconnect_stops_a_plain_request(node, client):
    before = metric(node, "quorum_generations_total", reason="cancelled")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{node.base_url}/v1/chat/completions", timeout=1.0,
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 3000, "temperature": 0.8})
    wait_until(lambda: metric(node, "quorum_generations_total", reason="cancelled") > before, 60,
               "the abandoned request's generation to be cancelled")


def test_metrics_count_requests_tokens_and_latency(node, client):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert metric(node, "quorum_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert metric(node, "quorum_requests_total", status="400") >= 1
    assert metric(node, "quorum_prompt_tokens_total", model=MODEL) > 0
    assert metric(node, "quorum_completion_tokens_total", model=MODEL) > 0
    assert metric(node, "quorum_time_to_first_token_seconds_count", model=MODEL) > 0
    assert metric(node, "quorum_tokens_per_second_count", model=MODEL) > 0
    body = httpx.get(f"{node.base_url}/metrics").text
    assert "quorum_queue_depth{" in body


def test_responses_api_streamed_and_with_a_tool(client):
    """The Responses API (issue 16): a streamed answer in OpenAI's event order, and a function call
    (this node serves no tool-use replica: its reasoning replica applies the same grammar)."""
    events = list(client.responses.create(model=MODEL, input="Name three colours.", max_output_tokens=16,
                                          temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] in (
        "response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() and events[-1].response.output_text == text
    weather = {"type": "function", "name": "get_weather", "description": "Get the weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                              "required": ["city"]}}
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[weather],
                                tool_choice="required", max_output_tokens=48, temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, max_output_tokens=16, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "Sunny, 21 C"}])
    assert follow.status in ("completed", "incomplete") and follow.previous_response_id == r.id


def test_anthropic_sdk_against_the_live_model(node):
    """Anthropic's Messages API with its own SDK: plain, streamed, and a tool call (issue 16)."""
    import anthropic

    # This SDK (2.x) no longer takes `temperature` as an argument; the API still does.
    claude = anthropic.Anthropic(base_url=node.base_url, api_key="unused", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Name three colours."}]
    whole = claude.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ask)
    assert whole.content[0].type == "text" and whole.content[0].text.strip()
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.usage.output_tokens > 0
    with claude.messages.stream(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ask) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == whole.content[0].text  # greedy: the same answer either way
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                             "required": ["city"]}}
    called = claude.messages.create(model=MODEL, max_tokens=48, extra_body=GREEDY, tools=[tool],
                                    tool_choice={"type": "any"},
                                    messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    uses = [b for b in called.content if b.type == "tool_use"]
    assert called.stop_reason == "tool_use" and uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str)


def test_ollama_client_against_the_live_model(node):
    """Ollama's API with its own Python client: list, chat (streamed too), generate, embed."""
    import ollama

    client = ollama.Client(host=node.base_url, timeout=120)
    assert MODEL in {m.model for m in client.list().models}
    chat = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 16})
    assert chat.message.role == "assistant" and chat.message.content.strip() and chat.done
    pieces = [p.message.content for p in client.chat(model=MODEL, messages=HELLO, stream=True,
                                                      options={"temperature": 0, "num_predict": 16})]
    assert "".join(pieces) == chat.message.content
    generated = client.generate(model=MODEL, prompt="The sky is", options={"temperature": 0, "num_predict": 8})
    assert generated.response.strip() and generated.done
    encoders = [m.model for m in client.list().models if m.model != MODEL]
    if encoders:  # the default mesh serves an encoder too (the context role)
        embedded = client.embed(model=encoders[0], input=["red", "blue"])
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 8
