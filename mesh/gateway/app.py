"""HTTP routes of the gateway (Starlette): /v1/*, /health, /metrics, and the control API."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh.cluster.sessions import check_session_id
from mesh.core.errors import ApiError, too_large, unavailable
from mesh.core.json_body import parse_json
from mesh.core.metrics import Metrics
from mesh.gateway.anthropic import anthropic_routes
from mesh.gateway.disconnect import ClientGone, until_disconnect
from mesh.gateway.embeddings import create_embeddings
from mesh.gateway.ollama import ollama_routes
from mesh.gateway.openapi import openapi
from mesh.gateway.responses_api import responses_routes
from mesh.gateway.route_start import STREAM_HEADERS, start_run
from mesh.gateway.runs import Run
from mesh.gateway.service import Gateway
from mesh.gateway.validation import parse_chat, parse_completion

log = logging.getLogger("quorum.http")

def create_app(gateway: Gateway, extra_routes: list[Route] = ()) -> ASGIApp:
    """The gateway's routes plus `extra_routes` (the control API), behind the request log."""
    api = OpenAIRoutes(gateway)
    routes = [*api.routes(),
              *ollama_routes(gateway, api.read_json),
              *anthropic_routes(gateway, api.read_json),
              *responses_routes(gateway, api.read_json),
              *extra_routes]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: _api_error, ClientGone: _client_gone, 404: _not_found, 405: _bad_method,
        Exception: _internal_error})
    return RequestLog(BodyLimit(app, gateway.config.gateway.max_body_bytes), gateway.metrics)


class OpenAIRoutes:
    """OpenAI's routes (/v1/chat/completions, completions, embeddings, models) and the gateway's own
    (/health, /metrics, /openapi.json); `read_json` is the bounded body reader every API's routes use."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.limits = gateway.config.gateway

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/openapi.json", self.openapi_json, methods=["GET"]),
        ]

    async def read_json(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and _declared_length(declared) > limit:
            raise too_large(limit)
        if not _json_type(request.headers.get("content-type", "")):
            # A web page may POST text/plain or a form to any origin without a CORS preflight;
            # application/json needs one, which this gateway never grants.
            raise ApiError(415, "Request bodies must be JSON, sent with 'Content-Type: application/json'.",
                           param="Content-Type", code="unsupported_media_type")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large(limit)
        except ClientDisconnect:
            raise ClientGone() from None
        return parse_json(bytes(body))

    async def chat_completions(self, request: Request) -> Response:
        gateway = self.gateway
        req = parse_chat(await self.read_json(request), self.limits)
        session = request.headers.get("x-session-id")
        if session is not None:
            req = dataclasses.replace(req, session_id=check_session_id(session))
        response = await self.answer(request, req, gateway.start_chat, gateway.collect_chat, gateway.stream_chat)
        if session is not None:
            response.headers["X-Session-Id"] = session
        return response

    async def completions(self, request: Request) -> Response:
        gateway = self.gateway
        req = parse_completion(await self.read_json(request), self.limits)
        return await self.answer(request, req, gateway.start_completion, gateway.collect_completion,
                                 gateway.stream_completion)

    async def answer(self, request: Request, req: Any, start: Callable[..., Awaitable[Run]],
                     collect: Callable[[Any, Run], Awaitable[dict]], stream: Callable) -> Response:
        run = await start_run(request, req, start, self.gateway.metrics)
        if isinstance(run, Response):  # the leader's typed events for a relaying member
            return run
        if req.stream:
            # Starlette cancels the body iterator when the client disconnects; its finally cancels the run.
            return StreamingResponse(stream(req, run), media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            return JSONResponse(await until_disconnect(request, collect(req, run)))
        finally:
            run.cancel()

    async def embeddings(self, request: Request) -> Response:
        return JSONResponse(await create_embeddings(self.gateway, await self.read_json(request)))

    async def list_models(self, request: Request) -> Response:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "quorum"}
                for name in self.gateway.known_models()]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        self.gateway.check_model(name)
        return JSONResponse({"id": name, "object": "model", "created": int(time.time()), "owned_by": "quorum"})

    async def health(self, request: Request) -> Response:
        gateway = self.gateway
        if not gateway.ready:
            detail = gateway.unready_detail()
            body = unavailable(f"No reasoning replica is ready ({detail}).", self.limits.retry_after_s, code="loading")
            return JSONResponse({"status": "loading", "detail": detail, **body.body()},
                                status_code=503, headers=body.headers)
        return JSONResponse({"status": "ok", "models": gateway.served_models()})

    async def metrics(self, request: Request) -> Response:
        return Response(self.gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(openapi(self.limits))


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # A bug, not bad input: the traceback goes to the log, the client gets an OpenAI-shaped 500.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "Internal error in the gateway.", type="server_error").response()


async def _not_found(request: Request, exc: Exception) -> Response:
    return ApiError(404, f"Unknown path {request.url.path}", code="unknown_url").response()


async def _bad_method(request: Request, exc: HTTPException) -> Response:
    return ApiError(405, f"Method {request.method} is not allowed on {request.url.path}",
                    code="method_not_allowed", headers=exc.headers).response()


def _json_type(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _declared_length(value: str) -> int:
    """A Content-Length header's value; -1 when it is not a plain decimal number (no server in
    front checked it: '²'.isdigit() is true but int('²') fails)."""
    return int(value) if value.isascii() and value.isdigit() else -1


class BodyLimit:
    """ASGI middleware: no route reads more than `limit` bytes of body (the control API's routes
    included), whatever Content-Length says or whether it is chunked: 413 instead."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and _declared_length(declared.decode("latin-1")) > self.limit:
            await too_large(self.limit).response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)  # raised inside the route's read: answered by its handler
            return message

        await self.app(scope, counted, send)


class RequestLog:
    """ASGI middleware: one log line and one metric sample per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            # Starlette has already answered with internal_error's 500 and logged the traceback;
            # it re-raises only so servers can see it. Nothing more to do for this request.
            status = status or 500
        finally:
            self.metrics.in_flight.dec()
            endpoint = _endpoint(scope["path"])
            self.metrics.requests.labels(endpoint, str(status or 499)).inc()
            log.info("%s %s -> %s in %.0f ms", scope["method"], scope["path"], status or 499,
                     (time.perf_counter() - started) * 1000)


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
             "/control/v1/status", "/v1/messages", "/v1/responses", "/api/chat", "/api/generate", "/api/embed")
    return next((k for k in known if path == k or path.startswith(k + "/")), "other")
