"""One ApiError in the shape of each API the gateway speaks: OpenAI's (ApiError.response), Anthropic's
and Ollama's. Here, below every floor that refuses a request (the API-key check refuses before any
route runs), so a refusal is shaped the same wherever it is made."""

from __future__ import annotations

from starlette.responses import JSONResponse

from mesh.core.errors import ApiError

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def anthropic_error(exc: ApiError) -> JSONResponse:
    """{"type": "error", "error": {"type", "message"}}, same status and headers."""
    return JSONResponse(anthropic_error_body(exc.status, exc.message), status_code=exc.status,
                        headers=exc.headers)


def ollama_error(exc: ApiError) -> JSONResponse:
    """{"error": "message"}, same status and headers."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def shaped_for(path: str, exc: ApiError) -> JSONResponse:
    """The refusal in the error shape of the API at `path`."""
    if path.startswith("/api/"):
        return ollama_error(exc)
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_error(exc)
    return exc.response()
