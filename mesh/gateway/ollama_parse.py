"""Ollama's request bodies (/api/chat, /api/generate) as the gateway's OpenAI bodies and requests
(mesh/gateway/ollama.py serves them; parse_chat and parse_completion check the rest)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from mesh.core.errors import ApiError, bad_request
from mesh.gateway.validation import parse_completion

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
_ROLES = ("system", "user", "assistant", "tool")
_OPTION_MAP = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def generate_prompt(body: dict) -> str | None:
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string.", "prompt")
    if body.get("images"):
        raise bad_request("'images' is not supported: the mesh's models read text only.", "images")
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported.", "suffix")
    return prompt


def raw_request(body: dict, name: str, prompt: str, limits) -> Any:
    """A raw /api/generate as a completion: the prompt as it is, no template."""
    if body.get("format"):
        raise bad_request("'format' cannot be used with 'raw'; send the prompt without 'raw'.", "format")
    fields = common(body, name)
    req = parse(lambda: parse_completion({**fields, "prompt": prompt}, limits))
    # parse_completion's default max_tokens is OpenAI's 16; Ollama's is no limit
    return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, max_tokens=fields.get("max_tokens")))


def generate_messages(body: dict, prompt: str) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise bad_request("'system' must be a string.", "system")
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def parse(build: Callable[[], Any]) -> Any:
    """Runs the gateway's parser; its messages name OpenAI's fields, renamed here to Ollama's."""
    try:
        return build()
    except ApiError as exc:
        exc.message = (exc.message.replace("response_format.json_schema.schema", "format")
                       .replace("'max_tokens'", "'options.num_predict'"))
        raise


def common(body: dict, name: str) -> dict:
    """The OpenAI fields for Ollama's stream, options and format."""
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    fields: dict[str, Any] = {"model": name, "stream": stream}
    if stream:
        fields["stream_options"] = {"include_usage": True}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_request("'options' must be an object.", "options")
    fields["temperature"] = DEFAULT_TEMPERATURE
    fields["top_p"] = DEFAULT_TOP_P
    for key, field in _OPTION_MAP.items():
        if options.get(key) is not None:
            fields[field] = options[key]
    predict = options.get("num_predict")
    if predict is not None:
        if isinstance(predict, bool) or not isinstance(predict, int) or predict == 0 or predict < -2:
            raise bad_request("'options.num_predict' must be a positive integer, or -1 (no limit).",
                              "options.num_predict")
        if predict > 0:
            fields["max_tokens"] = predict
    fmt = body.get("format")
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad_request("'format' must be \"json\" or a JSON schema object.", "format")
    return fields


def chat_body(body: dict, name: str) -> dict:
    """An Ollama /api/chat body as an OpenAI chat body."""
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise bad_request("'messages' must be an array.", "messages")
    messages: list[dict] = []
    pending: list[tuple[str, str]] = []  # (call id, name) of calls not answered yet
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'.", where)
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)}; got {json.dumps(role)}.",
                              f"{where}.role")
        if m.get("images"):
            raise bad_request(f"{where}.images is not supported: the mesh's models read text only.", f"{where}.images")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string.", f"{where}.content")
        out: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            out["tool_calls"] = _calls_in(m["tool_calls"], f"{where}.tool_calls", i, pending)
            out["content"] = content or None
        elif role == "tool":
            tool = m.get("tool_name") or m.get("name")
            match = next((p for p in pending if p[1] == tool), pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
            out["tool_call_id"] = match[0] if match else f"call_{i}"
        messages.append(out)
    fields = common(body, name)
    fields["messages"] = messages
    if body.get("tools"):
        fields["tools"] = body["tools"]
    return fields


def _calls_in(calls: Any, where: str, turn: int, pending: list[tuple[str, str]]) -> list[dict]:
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be an array.", where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}.", f"{where}[{j}]")
        arguments = fn.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, (dict, str)):
            raise bad_request(f"{where}[{j}].function.arguments must be an object.", f"{where}[{j}].function.arguments")
        call_id = f"call_{turn}_{j}"
        pending.append((call_id, fn["name"]))
        out.append({"id": call_id, "type": "function", "function": {
            "name": fn["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return out
