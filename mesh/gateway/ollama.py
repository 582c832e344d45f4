"""Ollama's API (/api/*) on the gateway, for the tools that speak it (Open WebUI, Continue, the
`ollama` Python and JS clients, scripts).

Nothing here generates: each request is translated into the gateway's own ChatRequest,
CompletionRequest or embeddings call, so admission (429), routing, failover, session rules and
validation are the chat API's; answers and streams are translated back into Ollama's shapes.

Routes: GET /api/version, /api/tags, /api/ps; POST /api/show, /api/chat, /api/generate, /api/embed
and the legacy /api/embeddings. Streams are NDJSON (one JSON object a line) and `stream` defaults
to true, as in Ollama. `options` maps temperature, top_p, seed, num_predict (-1/-2: no limit), stop,
presence_penalty and frequency_penalty; other options (num_ctx, top_k, ...) are accepted and ignored.
When `options` leaves them out, temperature is 0.8 and top_p 0.9 (Ollama's defaults). `format`
"json" asks for a JSON object, a JSON schema for an answer matching it (grammar-enforced as
response_format is). `tools` use OpenAI's shape (as Ollama's do); calls come back as
`message.tool_calls` with `arguments` an object. A model name may carry Ollama's ":latest" tag.

Errors are Ollama's: {"error": "message"} with the gateway's status (400, 404, 413, 429 and 503
with Retry-After); an error inside a stream is a last line {"error": "..."}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh.core.error_shapes import ollama_error as error_response
from mesh.core.errors import ApiError, bad_request
from mesh.gateway.disconnect import until_disconnect
from mesh.gateway.embeddings import _check_model as check_encoder
from mesh.gateway.embeddings import embed, parse_embeddings
from mesh.gateway.responses import sse_chunks
from mesh.gateway.validation import parse_chat, parse_completion

VERSION = "0.12.0"  # the Ollama API version this surface follows (clients check for a recent one)
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
_ROLES = ("system", "user", "assistant", "tool")
_NDJSON = "application/x-ndjson"
_OPTION_MAP = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}



def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def ollama_routes(gateway, read_json: Callable[[Request], Awaitable[dict]]) -> list[Route]:
    """The /api/* routes over `gateway`; `read_json` is the app's bounded body reader."""

    def handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:
                return error_response(exc)
        return wrapped

    def model_of(body: dict, key: str = "model") -> str:
        name = body.get(key)
        if name is None and key == "model":
            name = body.get("name")  # older clients send the model as "name"
        if not isinstance(name, str) or not name:
            raise bad_request("'model' is required and must be a non-empty string.", "model")
        known = gateway.known_models()
        if name not in known and name.endswith(":latest") and name[: -len(":latest")] in known:
            return name[: -len(":latest")]
        return name

    def details(name: str) -> dict:
        spec = gateway.config.model(name)
        fmt = "onnx" if spec is not None and spec.file.endswith(".onnx") else "gguf"
        family = name.split("-")[0]
        return {"parent_model": "", "format": fmt, "family": family, "families": [family],
                "parameter_size": "", "quantization_level": ""}

    def entry(name: str) -> dict:
        spec = gateway.config.model(name)
        return {"name": name, "model": name, "modified_at": now(), "size": 0,
                "digest": spec.sha256 if spec is not None else "", "details": details(name)}

    async def version(request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def tags(request: Request) -> Response:
        return JSONResponse({"models": [entry(name) for name in gateway.known_models()]})

    async def ps(request: Request) -> Response:
        ready = sorted(set(gateway.picker.ready_models("reasoning")) | set(gateway.picker.ready_models("context")))
        return JSONResponse({"models": [{**entry(name), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}
                                        for name in ready]})

    async def show(request: Request) -> Response:
        name = model_of(await read_json(request))
        if name not in gateway.known_models():
            raise ApiError(404, f"model '{name}' not found")
        spec = gateway.config.model(name)
        roles = set(spec.roles if spec is not None else ()) | set(gateway.picker.model_roles(name))
        embeds = bool(roles) and not roles & {"reasoning", "tool-use"}
        info = {"general.architecture": details(name)["family"]}
        if spec is not None:
            info[f"{info['general.architecture']}.context_length"] = spec.context_length
        return JSONResponse({"modelfile": "", "parameters": "", "template": "", "license": "",
                             "details": details(name), "model_info": info, "modified_at": now(),
                             "capabilities": ["embedding"] if embeds else ["completion", "tools"]})

    async def answer(request: Request, req: Any, start, collect, stream, shape, final) -> Response:
        """Admits `req`; streams NDJSON lines made by `shape` from the OpenAI stream, or answers
        the whole body `final` makes of the OpenAI answer."""
        started = time.perf_counter_ns()
        run = await start(req)
        if req.stream:
            lines = _ndjson(stream(req, run), req.model, started, shape)
            return StreamingResponse(lines, media_type=_NDJSON)
        try:
            whole = await until_disconnect(request, collect(req, run))
        finally:
            run.cancel()
        choice, use = whole["choices"][0], whole["usage"]
        return JSONResponse({"model": req.model, "created_at": now(), **final(choice),
                             "done": True, "done_reason": _reason(choice["finish_reason"]),
                             **_timings(started, use["prompt_tokens"], use["completion_tokens"])})

    async def chat(request: Request) -> Response:
        body = await read_json(request)
        name = model_of(body)
        if body.get("messages") in (None, []):  # Ollama's way to load a model: nothing to say
            gateway.check_model(name)
            return JSONResponse({"model": name, "created_at": now(), "done": True, "done_reason": "load",
                                 "message": {"role": "assistant", "content": ""}})
        req = _parse(lambda: parse_chat(_chat_body(body, name), gateway.config.gateway))

        def shape(content: str, calls: list[dict] | None) -> dict:
            return {"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}}

        return await answer(request, req, gateway.start_chat, gateway.collect_chat, gateway.stream_chat,
                            shape, lambda choice: {"message": _message(choice["message"])})

    async def generate(request: Request) -> Response:
        body = await read_json(request)
        name = model_of(body)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string.", "prompt")
        if body.get("images"):
            raise bad_request("'images' is not supported: the mesh's models read text only.", "images")
        if body.get("suffix"):
            raise bad_request("'suffix' is not supported.", "suffix")
        if not prompt:  # Ollama's way to load a model
            gateway.check_model(name)
            return JSONResponse({"model": name, "created_at": now(), "response": "", "done": True,
                                 "done_reason": "load"})
        raw = body.get("raw", False)
        if not isinstance(raw, bool):
            raise bad_request("'raw' must be a boolean.", "raw")
        if raw:
            if body.get("format"):
                raise bad_request("'format' cannot be used with 'raw'; send the prompt without 'raw'.", "format")
            fields = _common(body, name)
            req = _parse(lambda: parse_completion({**fields, "prompt": prompt}, gateway.config.gateway))
            # parse_completion's default max_tokens is OpenAI's 16; Ollama's is no limit
            req = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling,
                                                                       max_tokens=fields.get("max_tokens")))
            start, collect, stream = gateway.start_completion, gateway.collect_completion, gateway.stream_completion
        else:
            messages = [{"role": "user", "content": prompt}]
            system = body.get("system")
            if system is not None and not isinstance(system, str):
                raise bad_request("'system' must be a string.", "system")
            if system:
                messages.insert(0, {"role": "system", "content": system})
            req = _parse(lambda: parse_chat({**_common(body, name), "messages": messages}, gateway.config.gateway))
            start, collect, stream = gateway.start_chat, gateway.collect_chat, gateway.stream_chat

        def final(choice: dict) -> dict:
            text = choice.get("text") if "text" in choice else choice["message"].get("content")
            return {"response": text or ""}

        def shape(content: str, calls: list[dict] | None) -> dict:
            return {"response": content}

        return await answer(request, req, start, collect, stream, shape, final)

    async def embed_route(request: Request, legacy: bool) -> Response:
        started = time.perf_counter_ns()
        body = await read_json(request)
        name = model_of(body)
        key = "prompt" if legacy else "input"
        inputs = body.get(key)
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise bad_request("'truncate' must be a boolean.", "truncate")
        req = parse_embeddings({"model": name, "input": inputs, "dimensions": body.get("dimensions")}
                               if inputs is not None else {"model": name})
        check_encoder(gateway, name)
        embedded = await embed(gateway, name, list(req.inputs))
        for i, count in enumerate(embedded.tokens):
            if count > embedded.n_ctx and not truncate:
                raise bad_request(f"input[{i}] has {count} tokens, more than the model's context length of "
                                  f"{embedded.n_ctx}; send 'truncate': true to cut it.", "input")
        vectors = [v.tolist() for v in embedded.vectors]
        if req.dimensions is not None and req.dimensions != len(vectors[0]):
            raise bad_request(f"'dimensions' must be {len(vectors[0])} (vectors cannot be shortened).", "dimensions")
        if legacy:
            return JSONResponse({"embedding": vectors[0]})
        tokens = sum(min(c, embedded.n_ctx) for c in embedded.tokens)
        return JSONResponse({"model": name, "embeddings": vectors, "prompt_eval_count": tokens,
                             "total_duration": time.perf_counter_ns() - started, "load_duration": 0})

    return [
        Route("/api/version", handler(version), methods=["GET"]),
        Route("/api/tags", handler(tags), methods=["GET"]),
        Route("/api/ps", handler(ps), methods=["GET"]),
        Route("/api/show", handler(show), methods=["POST"]),
        Route("/api/chat", handler(chat), methods=["POST"]),
        Route("/api/generate", handler(generate), methods=["POST"]),
        Route("/api/embed", handler(lambda r: embed_route(r, legacy=False)), methods=["POST"]),
        Route("/api/embeddings", handler(lambda r: embed_route(r, legacy=True)), methods=["POST"]),
    ]


# -- requests ---------------------------------------------------------------------------------------

def _parse(build: Callable[[], Any]) -> Any:
    """Runs the gateway's parser; its messages name OpenAI's fields, renamed here to Ollama's."""
    try:
        return build()
    except ApiError as exc:
        exc.message = (exc.message.replace("response_format.json_schema.schema", "format")
                       .replace("'max_tokens'", "'options.num_predict'"))
        raise


def _common(body: dict, name: str) -> dict:
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


def _chat_body(body: dict, name: str) -> dict:
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
    fields = _common(body, name)
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


# -- answers ----------------------------------------------------------------------------------------

def _reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


def _timings(started_ns: int, prompt: int, completion: int) -> dict:
    total = time.perf_counter_ns() - started_ns
    return {"total_duration": total, "load_duration": 0, "prompt_eval_count": prompt, "prompt_eval_duration": 0,
            "eval_count": completion, "eval_duration": total}


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:  # a call cut short by the token limit (done_reason says "length")
        return {}
    return value if isinstance(value, dict) else {}


def _message(message: dict) -> dict:
    """An OpenAI chat.completion message as Ollama's."""
    out = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                           "arguments": _arguments(c["function"]["arguments"])}}
                             for c in message["tool_calls"]]
    return out


async def _ndjson(events: AsyncIterator[bytes], model: str, started_ns: int,
                  shape: Callable[[str, list[dict] | None], dict]) -> AsyncIterator[bytes]:
    """The gateway's OpenAI SSE stream (one event per item) as Ollama's NDJSON lines: a line per
    piece of text, the tool calls whole once they are, then the `done` line with the counts."""
    calls: dict[int, dict] = {}
    reason, prompt, completion = None, 0, 0
    async with contextlib.aclosing(sse_chunks(events)) as chunks:
        async for chunk in chunks:
            if "error" in chunk:
                yield _line({"error": chunk["error"]["message"]})
                return
            if chunk.get("usage"):
                prompt, completion = chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or chunk["choices"][0]["index"] != 0:
                continue
            choice = chunk["choices"][0]
            text = choice.get("text") if "text" in choice else choice["delta"].get("content")
            for piece in choice.get("delta", {}).get("tool_calls") or ():
                call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
                call["name"] += piece.get("function", {}).get("name") or ""
                call["arguments"] += piece.get("function", {}).get("arguments") or ""
            if text:
                yield _line({"model": model, "created_at": now(), **shape(text, None), "done": False})
            reason = choice.get("finish_reason") or reason
    if calls:
        made = [{"function": {"name": c["name"], "arguments": _arguments(c["arguments"])}}
                for _, c in sorted(calls.items())]
        yield _line({"model": model, "created_at": now(), **shape("", made), "done": False})
    yield _line({"model": model, "created_at": now(), **shape("", None), "done": True,
                 "done_reason": _reason(reason), **_timings(started_ns, prompt, completion)})
