"""Request bodies -> typed requests, or an ApiError naming the bad parameter.

Everything a client sends is checked here, before any shard sees it: JSON shape, types, ranges,
and the configured bounds (n, stop lists, logprobs, message count). Unknown top-level fields are
ignored, as llama.cpp's server and Ollama do, so newer clients keep working.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from mesh.core.config import GatewayConfig
from mesh.core.errors import bad_request
from mesh.gateway.tools import ToolUse, lower_message, parse_tool_use
from shards.templates import Message
from shards.types import Sampling

_ROLES = ("system", "developer", "user", "assistant")
_INT64 = 1 << 63


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    session_id: str | None = None  # X-Session-Id: messages are this turn's; history comes from the log
    tool_use: ToolUse | None = None  # tools the model may call, or a JSON answer (mesh/gateway/tools.py)
    # System messages that lead this turn's conversation but are not recorded in its session
    # (the Responses API's `instructions`: a follow-up brings its own).
    instructions: tuple[Message, ...] = ()


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[str, ...]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    echo: bool



def parse_chat(body: dict[str, Any], limits: GatewayConfig) -> ChatRequest:
    model = _model(body)
    messages = _messages(body, limits)
    _unsupported(body)
    tool_use = parse_tool_use(body)
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, limits.max_top_logprobs)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    stream, include_usage = _stream(body)
    max_tokens = _int(body, "max_completion_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1, None)
    sampling = _sampling(body, limits, max_tokens, (top or 0) if logprobs else None)
    if tool_use is not None:
        # Stop sequences could cut a call in the middle: a call ends when its grammar does.
        sampling = dataclasses.replace(sampling, grammar=tool_use.grammar,
                                       stop=() if tool_use.calls else sampling.stop)
    return ChatRequest(model=model, messages=messages, sampling=sampling,
                       n=_int(body, "n", 1, 1, limits.max_n), stream=stream,
                       include_usage=include_usage, logprobs=logprobs, tool_use=tool_use)


def parse_completion(body: dict[str, Any], limits: GatewayConfig) -> CompletionRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: tuple[str, ...] = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise bad_request("Token-id prompts are not supported; send the prompt as text.", "prompt")
    else:
        raise bad_request("'prompt' must be a string or a non-empty list of strings.", "prompt")
    if len(prompts) > limits.max_n:
        raise bad_request(f"At most {limits.max_n} prompts per request.", "prompt")
    for key in ("tools", "tool_choice", "response_format"):
        if body.get(key) is not None:
            raise bad_request(f"'{key}' is only supported on /v1/chat/completions.", key)
    for key in ("suffix",):
        if body.get(key) not in (None, ""):
            raise bad_request(f"'{key}' is not supported.", key)
    if _int(body, "best_of", 1, 1, None) != 1:
        raise bad_request("'best_of' other than 1 is not supported.", "best_of")
    top = _int(body, "logprobs", None, 0, min(5, limits.max_top_logprobs))
    stream, include_usage = _stream(body)
    n = _int(body, "n", 1, 1, limits.max_n)
    if n * len(prompts) > limits.max_n:
        raise bad_request(f"n times the number of prompts must be at most {limits.max_n}.", "n")
    _unsupported(body)
    sampling = _sampling(body, limits, _int(body, "max_tokens", 16, 1, None), top)
    return CompletionRequest(model=model, prompts=prompts, sampling=sampling, n=n, stream=stream,
                             include_usage=include_usage, echo=_bool(body, "echo", False))


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", "model")
    return model


def _messages(body: dict, limits: GatewayConfig) -> tuple[Message, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' is required and must be a non-empty array.", "messages")
    if len(raw) > limits.max_messages:
        raise bad_request(f"At most {limits.max_messages} messages per request.", "messages")
    out: list[Message] = []
    calls_by_id: dict[str, str] = {}  # tool call id -> function name, from assistant messages
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'.", where)
        role = m.get("role")
        if role == "function" or m.get("function_call") is not None:
            raise bad_request(f"{where}: function messages are deprecated and not supported; use tool messages.",
                              f"{where}.role")
        if role not in (*_ROLES, "tool"):
            raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)}, tool; got {role!r}.",
                              f"{where}.role")
        if "name" in m and not isinstance(m["name"], str):
            raise bad_request(f"{where}.name must be a string.", f"{where}.name")
        if m.get("tool_calls") is not None and role != "assistant":
            raise bad_request(f"{where}: only assistant messages carry tool_calls.", f"{where}.tool_calls")
        optional = role == "assistant" and m.get("tool_calls") is not None and m.get("content") is None
        content = None if optional else _content(m.get("content"), f"{where}.content")
        lowered = lower_message(m, where, content, calls_by_id)
        if lowered is not None and role == "tool" and out and raw[i - 1].get("role") == "tool":
            # Results of parallel calls: one turn, as the calls were one turn.
            lowered = Message("user", f"{out.pop().content}\n\n{lowered.content}")
        out.append(lowered or Message(role, content))
    return tuple(out)


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                  f"supported.", f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{where} must be a string or an array of text parts.", where)


def _unsupported(body: dict) -> None:
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to biases.", "logit_bias")
    if bias:  # an empty map asks for no bias, as OpenAI reads it
        raise bad_request("'logit_bias' is not supported yet.", "logit_bias")


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    return stream, _bool(opts, "include_usage", False, "stream_options.include_usage")


def _sampling(body: dict, limits: GatewayConfig, max_tokens: int | None, top_logprobs: int | None) -> Sampling:
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_int(body, "seed", None, -_INT64, _INT64 - 1),
        max_tokens=max_tokens,
        stop=_stop(body, limits),
        top_logprobs=top_logprobs,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def _stop(body: dict, limits: GatewayConfig) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or an array of strings.", "stop")
    if len(stops) > limits.max_stop:
        raise bad_request(f"'stop' may hold at most {limits.max_stop} sequences.", "stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise bad_request(f"Each stop sequence may be at most {limits.max_stop_chars} characters.", "stop")
    return tuple(s for s in stops if s)


def _bool(body: dict, key: str, default: bool, name: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name or key}' must be a boolean; got {_show(value)}.", name or key)
    return value


def _int(body: dict, key: str, default: Any, low: int | None, high: int | None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer; got {_show(value)}.", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad_request(f"'{key}' must be {bounds}; got {value}.", key, "invalid_value")
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise bad_request(f"'{key}' must be a number; got {_show(value)}.", key)
    if value > high or value < low or (open_low and value <= low):
        raise bad_request(f"'{key}' must be {'above' if open_low else 'at least'} {low} and at most "
                          f"{high}; got {value}.", key, "invalid_value")
    return float(value)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
