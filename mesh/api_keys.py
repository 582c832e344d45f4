"""Gateway API keys: `qk1.<id>.<secret>`, sent as `Authorization: Bearer <key>`.

The mesh log keeps each key's id, name and the sha256 of its secret; a key is shown once, when
it is created. Policy (`gateway.api_keys` in mesh.toml): "auto" requires a key when the gateway
listens beyond loopback and checks nothing on loopback (the openai SDK always sends some key);
"required" always checks; "off" never does. /health and /metrics stay public; the control API is
not covered by these keys.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.gateway.errors import ApiError
from raft.commands import CreateApiKey
from raft.state import MeshState

_FORMAT = re.compile(r"qk1\.([0-9a-f]{12})\.([A-Za-z0-9_-]{43})")
POLICIES = ("auto", "required", "off")


@dataclass(frozen=True)
class NewKey:
    text: str
    command: CreateApiKey


def new_key(name: str, now: float | None = None) -> NewKey:
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    cmd = CreateApiKey(key_id=key_id, name=name, secret_sha256=_digest(secret),
                       created_at=time.time() if now is None else now)
    return NewKey(text=f"qk1.{key_id}.{secret}", command=cmd)


def valid_key(state: MeshState, presented: str) -> bool:
    match = _FORMAT.fullmatch(presented)
    if match is None:
        return False
    key = state.api_keys.get(match.group(1))
    return key is not None and not key.revoked and hmac.compare_digest(key.secret_sha256, _digest(match.group(2)))


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
    """ASGI middleware: /v1/* requests need a valid key when the policy says so (401 otherwise)."""

    def __init__(self, app: ASGIApp, state: Callable[[], MeshState], enforce: bool) -> None:
        self.app = app
        self.state = state
        self.enforce = enforce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.enforce and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, presented = auth.partition(" ")
            if scheme.lower() != "bearer" or not valid_key(self.state(), presented.strip()):
                message = ("You didn't provide an API key: send it as 'Authorization: Bearer KEY' (meshctl keys "
                           "create makes one)." if not auth else "Incorrect API key provided.")
                await ApiError(401, message, type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
