"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status.

Clients (the openai SDK among them) retry 5xx and 429, so bad input must never become a 5xx.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist or is not served by this mesh.",
                    param="model", code="model_not_found")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body is larger than the limit of {limit} bytes.",
                    code="request_too_large")


def queue_full(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def unavailable(message: str, retry_after: int, code: str = "no_replica") -> ApiError:
    return ApiError(503, message, type="service_unavailable", code=code,
                    headers={"Retry-After": str(retry_after)})


class StartupError(RuntimeError):
    """A member cannot start, join or leave (port taken, not initialised, no quorum...); the message says
    why. Not an API error: meshd prints it and exits, the control API turns it into a 503."""
