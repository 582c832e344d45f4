"""Gateway API keys: `qk1.<id>.<secret>`, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`.

The mesh log keeps each key's id, name and the sha256 of its secret; a key is shown once, when
it is created. Policy (`gateway.api_keys` in mesh.toml): "auto" requires a key when the gateway
listens beyond loopback and checks nothing on loopback (the openai SDK always sends some key);
"required" always checks; "off" never does. /health and /metrics stay public; the control API is
not covered by these keys.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.credentials import matches, mint, parse
from mesh.gateway.errors import ApiError
from raft.commands import CreateApiKey
from raft.state import MeshState

PREFIX = "qk1"
POLICIES = ("auto", "required", "off")


@dataclass(frozen=True)
class NewKey:
    text: str
    command: CreateApiKey


def new_key(name: str, now: float | None = None) -> NewKey:
    cred = mint(PREFIX)
    cmd = CreateApiKey(key_id=cred.id, name=name, secret_sha256=cred.digest,
                       created_at=time.time() if now is None else now)
    return NewKey(text=cred.text, command=cmd)


def valid_key(state: MeshState, presented: str) -> bool:
    parsed = parse(PREFIX, presented)
    if parsed is None:
        return False
    key = state.api_keys.get(parsed[0])
    return key is not None and not key.revoked and matches(key.secret_sha256, parsed[1])


def required(policy: str, listen_host: str) -> bool:
    if policy != "auto":
        return policy == "required"
    if listen_host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(listen_host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from outside
        return True


class ApiKeyCheck:
    """ASGI middleware: /v1/* and Ollama's /api/* requests need a valid key when the policy says so
    (401 otherwise, in the error shape of the API asked). The key comes as `Authorization: Bearer`
    or, as Anthropic's clients send it, `x-api-key`."""

    def __init__(self, app: ASGIApp, state: Callable[[], MeshState], enforce: bool) -> None:
        self.app = app
        self.state = state
        self.enforce = enforce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.enforce and scope["type"] == "http" and path.startswith(("/v1/", "/api/")):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, bearer = auth.partition(" ")
            presented = [k.strip() for k in (bearer if scheme.lower() == "bearer" else "",
                                             headers.get(b"x-api-key", b"").decode("latin-1")) if k.strip()]
            if not any(valid_key(self.state(), key) for key in presented):
                message = ("You didn't provide an API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                           "(meshctl keys create makes one)." if not auth and not presented
                           else "Incorrect API key provided.")
                error = ApiError(401, message, type="authentication_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await _shaped(path, error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _shaped(path: str, error: ApiError) -> ASGIApp:
    """The 401 in the error shape of the API at `path` (OpenAI's, Anthropic's or Ollama's)."""
    if path.startswith("/api/"):
        from mesh.gateway.ollama import error_response
        return error_response(error)
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        from mesh.gateway.anthropic import error_response
        return error_response(error)
    return error.response()
