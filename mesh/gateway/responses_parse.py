"""A Responses API request body (POST /v1/responses) as the gateway's OpenAI chat body.

Only the shape is translated here; parse_chat (mesh/gateway/validation.py) checks everything the
two APIs share (types and ranges of the sampling fields, tools' schemas, the JSON answer's schema),
and its messages are renamed to the Responses API's fields (`max_output_tokens`, `text.format`).

Input: a string (one user message), or a list of input items: messages (`role` user, assistant,
system or developer; `content` a string or text parts: input_text, output_text), `function_call`
and `function_call_output` items; `reasoning` items are skipped (the model's own earlier thoughts).
Images, files, audio, hosted tools (web search, file search, ...), `background`, `conversation`
and `prompt` templates are a 400 naming the field: the mesh's models read text and call functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mesh.core.errors import ApiError, bad_request

_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
_RENAMES = (("response_format.json_schema.schema", "text.format.schema"),
            ("response_format.json_schema.name", "text.format.name"),
            ("response_format.json_schema.strict", "text.format.strict"),
            ("response_format.json_schema", "text.format"), ("response_format", "text.format"),
            ("max_tokens", "max_output_tokens"))
_NOT_SERVED = ("background", "conversation", "prompt")
_FLAT_TOOL = re.compile(r"(tools\[\d+\])\.function\.")


@dataclass(frozen=True)
class ResponsesAsk:
    """A Responses request: its chat body, and what the Response object repeats of it."""
    chat: dict
    instructions: str | None = None
    store: bool = True
    previous: str | None = None  # previous_response_id
    echo: dict = field(default_factory=dict)  # request fields the Response object reports back


def parse_responses(body: dict) -> ResponsesAsk:
    """The chat body of a Responses request; 400 for what the mesh does not serve."""
    for key in _NOT_SERVED:
        if body.get(key) not in (None, False):
            raise bad_request(f"'{key}' is not supported by this server.", key)
    if body.get("top_logprobs") not in (None, 0):
        raise bad_request("'top_logprobs' is not supported on /v1/responses; use /v1/chat/completions.",
                          "top_logprobs")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _input(body.get("input"))}
    for key in ("temperature", "top_p", "stream", "parallel_tool_calls", "seed"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}  # the usage response.completed reports
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    return ResponsesAsk(chat=chat, instructions=_optional_str(body, "instructions"), store=_store(body),
                        previous=_optional_str(body, "previous_response_id"), echo=_echo(body))


def renamed(exc: ApiError) -> ApiError:
    """An error of parse_chat with the chat API's field names as the Responses API's."""
    for old, new in _RENAMES:
        exc.message = exc.message.replace(f"'{old}'", f"'{new}'")
        if exc.param == old:
            exc.param = new
    exc.message = _FLAT_TOOL.sub(r"\1.", exc.message)  # tools[0].function.name: tools[0].name here
    if exc.param is not None:
        exc.param = _FLAT_TOOL.sub(r"\1.", exc.param)
    return exc


def _optional_str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{key}' must be a string.", key)
    return value


def _store(body: dict) -> bool:
    store = body.get("store")
    if store is None:
        return True  # as OpenAI: responses are stored unless asked not to
    if not isinstance(store, bool):
        raise bad_request("'store' must be a boolean.", "store")
    return store


def _echo(body: dict) -> dict:
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad_request("'metadata' must be an object of at most 16 string values.", "metadata")
    return {"metadata": metadata or {}, "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice") or "auto", "text": body.get("text") or {"format": {"type": "text"}},
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "user": body.get("user")}


# -- input ------------------------------------------------------------------------------------------

def _input(raw: Any) -> list[dict]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad_request("'input' must be a string or a non-empty array of input items.", "input")
    out: list[dict] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an input item object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            _add_call(out, _call(item, where))
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": _text(item.get("output"), f"{where}.output")})
        elif kind != "reasoning":  # the model's own reasoning from an earlier turn: not shown to it again
            raise bad_request(f"{where}.type: {kind!r} items are not supported (message, function_call, "
                              f"function_call_output).", f"{where}.type")
    return out


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(_MESSAGE_ROLES)}; got {role!r}.", f"{where}.role")
    return {"role": role, "content": _text(item.get("content"), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    """A string, or text parts joined; images, files and audio are a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content parts.", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind != "refusal":  # an earlier answer's refusal: not part of the conversation
            raise bad_request(f"{where}[{j}]: only text parts (input_text, output_text) are supported: the "
                              f"mesh's models read text only.", f"{where}[{j}]")
    return "\n".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where}.{key} must be a non-empty string.", f"{where}.{key}")
    return value


def _call(item: dict, where: str) -> dict:
    arguments = item.get("arguments")
    if not isinstance(arguments, str):
        raise bad_request(f"{where}.arguments must be a string (JSON).", f"{where}.arguments")
    return {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": arguments}}


def _add_call(out: list[dict], call: dict) -> None:
    """Consecutive function_call items are one assistant turn's calls (as the model wrote them)."""
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
        last["tool_calls"].append(call)
    elif last is not None and last["role"] == "assistant" and "tool_calls" not in last:
        last["tool_calls"] = [call]  # text the model wrote before its calls, then the calls
        last["content"] = last["content"] or None
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


# -- tools and format ---------------------------------------------------------------------------

def _tools(raw: Any) -> list[dict]:
    """Flat function tools ({"type", "name", "description", "parameters", "strict"}) as chat tools."""
    if not isinstance(raw, list):
        raise bad_request("'tools' must be an array.", "tools")
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"tools[{i}]: only function tools are supported (got {kind!r}).", f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(raw: Any) -> Any:
    if raw in ("none", "auto", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function":
        return {"type": "function", "function": {"name": raw.get("name")}}
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}.",
                      "tool_choice")


def _format(text: Any) -> dict | None:
    """text.format as a chat response_format (json_schema's fields are flat here, nested there)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'text.format.type' must be 'text', 'json_object' or 'json_schema'.", "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}
