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
import json
import time
from dataclasses import dataclass
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
from mesh.gateway.leader_link import LeaderAnswer
from mesh.gateway.ollama_parse import chat_body, common, generate_messages, generate_prompt, parse, raw_request
from mesh.gateway.responses import sse_chunks
from mesh.gateway.route_start import start_run
from mesh.gateway.validation import parse_chat
from raft.vocab import GENERATING_ROLES, Role

VERSION = "0.12.0"  # the Ollama API version this surface follows (clients check for a recent one)
_NDJSON = "application/x-ndjson"



def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def ollama_routes(gateway, read_json: Callable[[Request], Awaitable[dict]]) -> list[Route]:
    """The /api/* routes over `gateway`; `read_json` is the app's bounded body reader."""
    return OllamaApi(gateway, read_json).routes()


def _handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A route whose ApiErrors are answered in Ollama's shape."""
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except LeaderAnswer as exc:  # the leader's refusal of a relayed stream: already in Ollama's shape
            return exc.response()
        except ApiError as exc:
            return error_response(exc)
    return wrapped


class OllamaApi:
    """Ollama's routes over one gateway, a method each."""

    def __init__(self, gateway, read_json: Callable[[Request], Awaitable[dict]]) -> None:
        self.gateway = gateway
        self.read_json = read_json

    def routes(self) -> list[Route]:
        return [
            Route("/api/version", _handler(self.version), methods=["GET"]),
            Route("/api/tags", _handler(self.tags), methods=["GET"]),
            Route("/api/ps", _handler(self.ps), methods=["GET"]),
            Route("/api/show", _handler(self.show), methods=["POST"]),
            Route("/api/chat", _handler(self.chat), methods=["POST"]),
            Route("/api/generate", _handler(self.generate), methods=["POST"]),
            Route("/api/embed", _handler(self.embed), methods=["POST"]),
            Route("/api/embeddings", _handler(self.embeddings), methods=["POST"]),
        ]

    # -- models ----------------------------------------------------------------------------------

    def model_of(self, body: dict) -> str:
        name = body.get("model")
        if name is None:
            name = body.get("name")  # older clients send the model as "name"
        if not isinstance(name, str) or not name:
            raise bad_request("'model' is required and must be a non-empty string.", "model")
        known = self.gateway.known_models()
        if name not in known and name.endswith(":latest") and name[: -len(":latest")] in known:
            return name[: -len(":latest")]
        return name

    def details(self, name: str) -> dict:
        spec = self.gateway.config.model(name)
        fmt = "onnx" if spec is not None and spec.file.endswith(".onnx") else "gguf"
        family = name.split("-")[0]
        return {"parent_model": "", "format": fmt, "family": family, "families": [family],
                "parameter_size": "", "quantization_level": ""}

    def entry(self, name: str) -> dict:
        spec = self.gateway.config.model(name)
        return {"name": name, "model": name, "modified_at": now(), "size": 0,
                "digest": spec.sha256 if spec is not None else "", "details": self.details(name)}

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self.entry(name) for name in self.gateway.known_models()]})

    async def ps(self, request: Request) -> Response:
        picker = self.gateway.picker
        ready = sorted(set(picker.ready_models(Role.REASONING)) | set(picker.ready_models(Role.CONTEXT)))
        return JSONResponse({"models": [{**self.entry(name), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}
                                        for name in ready]})

    async def show(self, request: Request) -> Response:
        name = self.model_of(await self.read_json(request))
        if name not in self.gateway.known_models():
            raise ApiError(404, f"model '{name}' not found")
        spec = self.gateway.config.model(name)
        roles = set(spec.roles if spec is not None else ()) | set(self.gateway.picker.model_roles(name))
        embeds = bool(roles) and not roles & GENERATING_ROLES
        info = {"general.architecture": self.details(name)["family"]}
        if spec is not None:
            info[f"{info['general.architecture']}.context_length"] = spec.context_length
        return JSONResponse({"modelfile": "", "parameters": "", "template": "", "license": "",
                             "details": self.details(name), "model_info": info, "modified_at": now(),
                             "capabilities": ["embedding"] if embeds else ["completion", "tools"]})

    # -- generation ------------------------------------------------------------------------------

    async def answer(self, request: Request, req: Any, way: _Way) -> Response:
        """Admits `req`; streams NDJSON lines shaped by `way` from the OpenAI stream, or answers the
        whole body it makes of the OpenAI answer."""
        started = time.perf_counter_ns()
        run = await start_run(request, req, way.start, self.gateway.metrics)  # see mesh/gateway/route_start.py
        if isinstance(run, Response):
            return run
        if req.stream:
            lines = _ndjson(way.stream(req, run), req.model, started, way.shape)
            return StreamingResponse(lines, media_type=_NDJSON)
        try:
            whole = await until_disconnect(request, way.collect(req, run))
        finally:
            run.cancel()
        choice, use = whole["choices"][0], whole["usage"]
        return JSONResponse({"model": req.model, "created_at": now(), **way.final(choice),
                             "done": True, "done_reason": _reason(choice["finish_reason"]),
                             **_timings(started, use["prompt_tokens"], use["completion_tokens"])})

    async def chat(self, request: Request) -> Response:
        body = await self.read_json(request)
        name = self.model_of(body)
        if body.get("messages") in (None, []):  # Ollama's way to load a model: nothing to say
            self.gateway.check_model(name)
            return JSONResponse({"model": name, "created_at": now(), "done": True, "done_reason": "load",
                                 "message": {"role": "assistant", "content": ""}})
        req = parse(lambda: parse_chat(chat_body(body, name), self.gateway.config.gateway))
        return await self.answer(request, req, _Way.chat(self.gateway))

    async def generate(self, request: Request) -> Response:
        body = await self.read_json(request)
        name = self.model_of(body)
        prompt = generate_prompt(body)
        if not prompt:  # Ollama's way to load a model
            self.gateway.check_model(name)
            return JSONResponse({"model": name, "created_at": now(), "response": "", "done": True,
                                 "done_reason": "load"})
        raw = body.get("raw", False)
        if not isinstance(raw, bool):
            raise bad_request("'raw' must be a boolean.", "raw")
        limits = self.gateway.config.gateway
        if raw:
            return await self.answer(request, raw_request(body, name, prompt, limits), _Way.raw(self.gateway))
        messages = generate_messages(body, prompt)
        req = parse(lambda: parse_chat({**common(body, name), "messages": messages}, limits))
        return await self.answer(request, req, _Way.generate(self.gateway))

    # -- embeddings ------------------------------------------------------------------------------

    async def embed(self, request: Request) -> Response:
        return await self._embed(request, legacy=False)

    async def embeddings(self, request: Request) -> Response:
        return await self._embed(request, legacy=True)

    async def _embed(self, request: Request, legacy: bool) -> Response:
        started = time.perf_counter_ns()
        body = await self.read_json(request)
        name = self.model_of(body)
        inputs = body.get("prompt" if legacy else "input")
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise bad_request("'truncate' must be a boolean.", "truncate")
        req = parse_embeddings({"model": name, "input": inputs, "dimensions": body.get("dimensions")}
                               if inputs is not None else {"model": name})
        check_encoder(self.gateway, name)
        embedded = await embed(self.gateway, name, list(req.inputs))
        vectors = _vectors(embedded, req.dimensions, truncate)
        if legacy:
            return JSONResponse({"embedding": vectors[0]})
        tokens = sum(min(c, embedded.n_ctx) for c in embedded.tokens)
        return JSONResponse({"model": name, "embeddings": vectors, "prompt_eval_count": tokens,
                             "total_duration": time.perf_counter_ns() - started, "load_duration": 0})


def _vectors(embedded, dimensions: int | None, truncate: bool) -> list[list[float]]:
    for i, count in enumerate(embedded.tokens):
        if count > embedded.n_ctx and not truncate:
            raise bad_request(f"input[{i}] has {count} tokens, more than the model's context length of "
                              f"{embedded.n_ctx}; send 'truncate': true to cut it.", "input")
    vectors = [v.tolist() for v in embedded.vectors]
    if dimensions is not None and dimensions != len(vectors[0]):
        raise bad_request(f"'dimensions' must be {len(vectors[0])} (vectors cannot be shortened).", "dimensions")
    return vectors


@dataclass(frozen=True)
class _Way:
    """How one kind of generation is admitted, collected, streamed and shaped into Ollama's bodies."""
    start: Callable
    collect: Callable
    stream: Callable
    shape: Callable[[str, list[dict] | None], dict]  # a stream line's body from text or whole tool calls
    final: Callable[[dict], dict]  # the whole answer's body from the OpenAI choice

    @staticmethod
    def chat(gateway) -> _Way:
        def shape(content: str, calls: list[dict] | None) -> dict:
            return {"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}}
        return _Way(gateway.start_chat, gateway.collect_chat, gateway.stream_chat, shape,
                    lambda choice: {"message": _message(choice["message"])})

    @staticmethod
    def generate(gateway) -> _Way:
        return _Way(gateway.start_chat, gateway.collect_chat, gateway.stream_chat, _response_line, _response_body)

    @staticmethod
    def raw(gateway) -> _Way:
        return _Way(gateway.start_completion, gateway.collect_completion, gateway.stream_completion,
                    _response_line, _response_body)


def _response_line(content: str, calls: list[dict] | None) -> dict:
    return {"response": content}


def _response_body(choice: dict) -> dict:
    text = choice.get("text") if "text" in choice else choice["message"].get("content")
    return {"response": text or ""}


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
