"""A compact OpenAPI 3.1 description of the gateway, served at GET /openapi.json.

It names the request bodies the gateway accepts (the subset of OpenAI's API it implements) so
generic API tools and the fuzz tests can build valid requests and mutate them. Bounds that come
from mesh.toml (n, stop, logprobs, message count) are filled in from the running config.
"""

from __future__ import annotations

from typing import Any

from mesh.core.config import GatewayConfig

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_ERRORS = {str(s): {"description": d, "content": _ERROR_BODY}
           for s, d in ((400, "bad request"), (401, "bad API key"), (404, "unknown model"), (413, "body too large"),
                        (429, "queue full (Retry-After)"), (503, "no replica ready (Retry-After)"))}


def _sampling(limits: GatewayConfig) -> dict[str, Any]:
    return {
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
        "seed": {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string", "maxLength": limits.max_stop_chars},
                           {"type": "array", "maxItems": limits.max_stop,
                            "items": {"type": "string", "maxLength": limits.max_stop_chars}}]},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    }


def _schemas(limits: GatewayConfig) -> dict[str, Any]:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]},
        "name": {"type": "string"}}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "maxItems": limits.max_messages, "items": message},
        **_sampling(limits),
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": limits.max_top_logprobs},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "response_format": {"type": "object", "required": ["type"],
                            "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}}},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
        "user": {"type": "string"}}}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": {"type": "string", "minLength": 1},
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "maxItems": limits.max_n,
                                                  "items": {"type": "string"}}]},
        **_sampling(limits),
        "echo": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": min(5, limits.max_top_logprobs)},
        "best_of": {"const": 1},
        "user": {"type": "string"}}}
    embeddings = {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]},
        "encoding_format": {"enum": ["float", "base64"]},
        "user": {"type": "string"}}}
    return {"Error": _ERROR, "ChatRequest": chat, "CompletionRequest": completion,
            "EmbeddingsRequest": embeddings}


def _post(summary: str, schema: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": {"description": "the answer (JSON, or text/event-stream when stream is true)"},
                      **_ERRORS}}}


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok"}, **_ERRORS}}}


def openapi(limits: GatewayConfig) -> dict[str, Any]:
    """The OpenAPI document for a gateway running with these limits."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quorum gateway (OpenAI-compatible)", "version": "1"},
        "paths": {
            "/v1/chat/completions": _post("Chat completion", "ChatRequest"),
            "/v1/completions": _post("Text completion", "CompletionRequest"),
            "/v1/embeddings": _post("Embeddings (served by the context role)", "EmbeddingsRequest"),
            "/v1/models": _get("Models this mesh serves"),
            "/health": _get("200 once a reasoning replica is ready, 503 before"),
        },
        "components": {"schemas": _schemas(limits)},
    }
