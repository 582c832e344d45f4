"""Anthropic's Messages API (POST /v1/messages) on the gateway, for Claude-style agents and the
`anthropic` SDKs.

Nothing here generates: a request is translated into the gateway's ChatRequest, so admission
(429), routing, failover, sessions (X-Session-Id) and validation are the chat API's, and the answer
or the stream is translated back. Accepted: `model`, `max_tokens` (required), `system` (a string or
text blocks), `messages` whose content is a string or blocks (`text`; `tool_use` in assistant turns;
`tool_result` in user turns, its content a string or text blocks), `stop_sequences`, `temperature`,
`top_p`, `tools` (`name`, `description`, `input_schema`), `tool_choice` (auto, any, tool, none),
`stream`. `top_k`, `metadata`, `thinking` and `service_tier` are accepted and ignored; image and
document blocks are a 400 (the mesh's models read text only).

Streams are Anthropic's server-sent events, each with its `event:` line: message_start,
content_block_start / content_block_delta (text_delta, input_json_delta) / content_block_stop per
block, message_delta (stop_reason, usage), message_stop; an error inside a stream is an `error`
event. Errors are {"type": "error", "error": {"type", "message"}} with the gateway's status. The
key is taken from `x-api-key` as well as `Authorization: Bearer` (mesh/security/api_keys.py);
`anthropic-version` is accepted whatever its value.

`POST /v1/messages/count_tokens` answers {"input_tokens": N} for a Messages body (without
`max_tokens`), counted by the replica that would answer it. `stop_sequence` is always null: the
shards do not yet report which stop sequence ended an answer (stop_reason is "end_turn" then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh.cluster.sessions import check_session_id
from mesh.core.error_shapes import anthropic_error as error_response
from mesh.core.error_shapes import anthropic_error_body as error_body
from mesh.core.errors import ApiError, bad_request
from mesh.gateway.disconnect import until_disconnect
from mesh.gateway.leader_link import LeaderAnswer
from mesh.gateway.responses import sse_chunks
from mesh.gateway.route_start import start_run
from mesh.gateway.session_turns import conversation
from mesh.gateway.validation import parse_chat
from shards.types import ContextLengthExceeded, GenerateRequest

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}



def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def anthropic_routes(gateway, read_json: Callable[[Request], Awaitable[dict]]) -> list[Route]:
    """POST /v1/messages over `gateway`; `read_json` is the app's bounded body reader."""

    async def messages(request: Request) -> Response:
        try:
            return await _messages(request)
        except LeaderAnswer as exc:  # the leader's refusal of a relayed stream: already in this API's shape
            return exc.response()
        except ApiError as exc:
            return error_response(exc)

    async def _messages(request: Request) -> Response:
        body = await read_json(request)
        req = parse_chat(chat_body(body), gateway.config.gateway)
        session = request.headers.get("x-session-id")
        if session is not None:
            req = dataclasses.replace(req, session_id=check_session_id(session))
        # Admission (a 429 comes before any byte of a stream), or the leader's typed events when a member
        # relays the stream (mesh/gateway/route_start.py).
        run = await start_run(request, req, gateway.start_chat, gateway.metrics)
        if isinstance(run, Response):
            return run
        headers = {"X-Session-Id": session} if session is not None else {}
        if req.stream:
            events = _stream(gateway.stream_chat(req, run), req.model, run.prompt_tokens)
            return StreamingResponse(events, media_type="text/event-stream", headers={**_STREAM_HEADERS, **headers})
        try:
            whole = await until_disconnect(request, gateway.collect_chat(req, run))
        finally:
            run.cancel()
        return JSONResponse(_message(whole, req.model), headers=headers)

    async def count(request: Request) -> Response:
        try:
            return JSONResponse(await count_tokens(gateway, await read_json(request)))
        except ApiError as exc:
            return error_response(exc)

    return [Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count, methods=["POST"])]


# -- requests ---------------------------------------------------------------------------------------

def chat_body(body: dict) -> dict:
    """An Anthropic Messages body as an OpenAI chat body (parse_chat checks the rest)."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise bad_request("max_tokens: Field required", "max_tokens")
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": max_tokens}
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stream") is True:
        out["stream_options"] = {"include_usage": True}  # the usage that message_delta reports
    if body.get("stop_sequences") is not None:
        out["stop"] = body["stop_sequences"]
    if not isinstance(out.get("stop", []), list):
        raise bad_request("stop_sequences: must be an array of strings.", "stop_sequences")
    system = _text(body.get("system"), "system") if body.get("system") is not None else ""
    out["messages"] = ([{"role": "system", "content": system}] if system else []) + _messages(body.get("messages"))
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is not None:
        out["tool_choice"], parallel = _choice(choice)
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    return out


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise bad_request(f"{where}.{j}: only text blocks ({{\"type\": \"text\", \"text\": ...}}) are "
                                  f"supported here.", f"{where}.{j}")
            parts.append(block["text"])
        return "\n".join(parts)
    raise bad_request(f"{where}: must be a string or an array of text blocks.", where)


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages: must be a non-empty array.", "messages")
    out: list[dict] = []
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role: must be 'user' or 'assistant'.", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content: must be a string or an array of content blocks.", f"{where}.content")
        texts: list[str] = []
        calls: list[dict] = []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and m["role"] == "assistant":
                calls.append(_call(block, at))
            elif kind == "tool_result" and m["role"] == "user":
                out.append(_result(block, at))
            elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
                continue  # the model's own reasoning from an earlier turn: not shown to it again
            else:
                raise bad_request(f"{at}: a {json.dumps(kind)} block is not supported in a {m['role']} message "
                                  f"(text, tool_use in assistant turns, tool_result in user turns).", at)
        if calls:
            out.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
        elif texts or not any(r.get("role") == "tool" for r in out[-1:]):
            out.append({"role": m["role"], "content": "\n".join(texts)})
    return out


def _call(block: dict, at: str) -> dict:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise bad_request(f"{at}: a tool_use block needs 'id' and 'name' strings.", at)
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise bad_request(f"{at}.input: must be an object.", f"{at}.input")
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _result(block: dict, at: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise bad_request(f"{at}.tool_use_id: required for a tool_result block.", f"{at}.tool_use_id")
    content = block.get("content", "")
    text = _text(content if content is not None else "", f"{at}.content")
    if block.get("is_error"):
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _tools(raw: Any) -> list[dict]:
    if not isinstance(raw, list):
        raise bad_request("tools: must be an array.", "tools")
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise bad_request(f"tools.{i}: must be an object with 'name' and 'input_schema'.", f"tools.{i}")
        if tool.get("type") not in (None, "custom"):
            raise bad_request(f"tools.{i}.type: server tools ({tool['type']}) are not supported; "
                              f"describe the tool with 'name' and 'input_schema'.", f"tools.{i}.type")
        function = {"name": tool["name"], "parameters": tool.get("input_schema", {"type": "object"})}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _choice(raw: Any) -> tuple[Any, bool | None]:
    if not isinstance(raw, dict) or raw.get("type") not in ("auto", "any", "tool", "none"):
        raise bad_request("tool_choice: must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}.", "tool_choice")
    disable = raw.get("disable_parallel_tool_use")
    parallel = None if disable is None else not disable
    kind = raw["type"]
    if kind == "tool":
        if not isinstance(raw.get("name"), str):
            raise bad_request("tool_choice.name: required when type is 'tool'.", "tool_choice.name")
        return {"type": "function", "function": {"name": raw["name"]}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


# -- answers ----------------------------------------------------------------------------------------

def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:  # a call cut short by max_tokens (stop_reason says so)
        return {}
    return value if isinstance(value, dict) else {}


def _message(whole: dict, model: str) -> dict:
    """An OpenAI chat.completion as an Anthropic message."""
    choice = whole["choices"][0]
    message = choice["message"]
    content: list[dict] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        content.append({"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"),
                        "name": call["function"]["name"], "input": _input(call["function"]["arguments"])})
    return {"id": _id("msg"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": _STOP.get(choice["finish_reason"], "end_turn"), "stop_sequence": None,
            "usage": {"input_tokens": whole["usage"]["prompt_tokens"],
                      "output_tokens": whole["usage"]["completion_tokens"]}}


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()


async def _stream(events: AsyncIterator[bytes], model: str, prompt_tokens: int) -> AsyncIterator[bytes]:
    """The gateway's OpenAI SSE stream (one event per item) as Anthropic's event sequence."""
    yield _event("message_start", {"message": {
        "id": _id("msg"), "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
    blocks = _Blocks()
    async with contextlib.aclosing(sse_chunks(events)) as chunks:
        async for chunk in chunks:
            if "error" in chunk:
                status = 503 if chunk["error"].get("type") == "service_unavailable" else 500
                yield _event("error", {"error": error_body(status, chunk["error"]["message"])["error"]})
                return
            for out in blocks.chunk(chunk):
                yield out
    for out in blocks.close():
        yield out
    stop = {"stop_reason": _STOP.get(blocks.reason, "end_turn"), "stop_sequence": None}
    yield _event("message_delta", {"delta": stop, "usage": {"output_tokens": blocks.completion}})
    yield _event("message_stop", {})


class _Blocks:
    """The content blocks of a stream: one chat chunk at a time as Anthropic's block events."""

    def __init__(self) -> None:
        self.index, self.kind = -1, None  # the open content block's index and type
        self.reason: str | None = None
        self.completion = 0

    def chunk(self, chunk: dict) -> list[bytes]:
        if chunk.get("usage"):
            self.completion = chunk["usage"]["completion_tokens"]
        if not chunk.get("choices") or chunk["choices"][0]["index"] != 0:
            return []
        choice = chunk["choices"][0]
        delta = choice["delta"]
        out = []
        if delta.get("content"):
            out += self._open("text", {"type": "text", "text": ""}) if self.kind != "text" else []
            out.append(_event("content_block_delta", {"index": self.index, "delta": {
                "type": "text_delta", "text": delta["content"]}}))
        for piece in delta.get("tool_calls") or ():
            fn = piece.get("function") or {}
            if piece.get("id"):
                out += self._open("tool_use", {"type": "tool_use", "id": "toolu_" + piece["id"].removeprefix("call_"),
                                               "name": fn.get("name") or "", "input": {}})
            if fn.get("arguments"):
                out.append(_event("content_block_delta", {"index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": fn["arguments"]}}))
        self.reason = choice.get("finish_reason") or self.reason
        return out

    def _open(self, kind: str, block: dict) -> list[bytes]:
        out = self.close()
        self.index, self.kind = self.index + 1, kind
        return [*out, _event("content_block_start", {"index": self.index, "content_block": block})]

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"index": self.index})]


# -- counting ---------------------------------------------------------------------------------------

async def count_tokens(gateway, body: dict) -> dict:
    """{"input_tokens": N}: the prompt of a Messages body (system, tools, messages) as the model's
    template renders and its tokenizer counts it. Counted by the replica that would answer it: the
    request is opened there and cancelled before it generates (admission's 429 and 503 apply)."""
    req = parse_chat(chat_body({**body, "max_tokens": 1, "stream": False}), gateway.config.gateway)
    gateway.check_model(req.model)
    request = GenerateRequest(sampling=dataclasses.replace(req.sampling, max_tokens=1), n=1,
                              messages=conversation(req, ()))
    try:
        _, opened = await gateway.admission.admit(req.model, request, set(), fit=True)
    except ContextLengthExceeded as exc:  # over the window: counted all the same
        return {"input_tokens": exc.prompt}
    opened.cancel()
    return {"input_tokens": opened.prompt_tokens}
