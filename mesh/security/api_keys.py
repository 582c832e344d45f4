"""Gateway API keys: `qk1.<id>.<secret>`, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`.

The mesh log keeps each key's id, name and the sha256 of its secret; a key is shown once, when
it is created. Policy (`gateway.api_keys` in mesh.toml): "auto" requires a key when the gateway
listens beyond loopback and checks nothing on loopback (the openai SDK always sends some key);
"required" always checks; "off" never does. /health and /metrics stay public; the control API is
not covered by these keys.

When no key is checked, the same middleware guards /v1/* and /api/* against web pages in the
user's browser: the `Host` must be a loopback address, `localhost`, the address the connection came
in on or a configured name of the node (403 otherwise: DNS rebinding, as in Ollama's
CVE-2024-28224). (Their POST bodies must also be `application/json`: mesh/gateway/app.py, 415.)
The key a request was admitted with owns the sessions it starts (`caller_key_id`, mesh/cluster/sessions.py).

Fairness: a key has at most `max_inflight` requests in progress at once on this member (a stream
counts until it ends); one more is a 429 with Retry-After in the API's error shape, before any work
is done for it. Requests relayed to the leader are counted there too, so the leader's count is the
mesh's (streams a member renders from the leader's events are counted by that member only).
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.core.error_shapes import shaped_for
from mesh.core.errors import ApiError
from mesh.security.credentials import matches, mint, parse
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


# The id of the API key the request being handled was admitted with; None when keys are not checked.
_CALLER: ContextVar[str | None] = ContextVar("quorum_api_key_id", default=None)


def caller_key_id() -> str | None:
    """The API key id of the request this code runs for (set by ApiKeyCheck), or None."""
    return _CALLER.get()


def key_id(state: MeshState, presented: str) -> str | None:
    """The id of `presented` if it is a valid, unrevoked key of this mesh."""
    parsed = parse(PREFIX, presented)
    if parsed is None:
        return None
    key = state.api_keys.get(parsed[0])
    return key.key_id if key is not None and not key.revoked and matches(key.secret_sha256, parsed[1]) else None


def valid_key(state: MeshState, presented: str) -> bool:
    return key_id(state, presented) is not None


def host_name(host_header: str) -> str:
    """The host part of a Host header, lower case, without port, brackets or a trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    return host.rstrip(".")


def local_host(host: str, own: Iterable[str] = ()) -> bool:
    """True for a loopback address, localhost, or one of `own` (the node's names and addresses)."""
    if host == "localhost" or host in own:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    or, as Anthropic's clients send it, `x-api-key`. Without keys, their `Host` must be local (403).
    `hosts`: names the node is reached by besides loopback and the address a connection arrived on
    (its listen and advertised hosts). `max_inflight`: requests in progress at once per key (0: no cap),
    beyond which a request gets 429 with `Retry-After: retry_after_s`."""

    def __init__(self, app: ASGIApp, state: Callable[[], MeshState], enforce: bool,
                 hosts: Iterable[str] = (), max_inflight: int = 0, retry_after_s: int = 1) -> None:
        self.app = app
        self.state = state
        self.enforce = enforce
        self.hosts = frozenset(host_name(h) for h in hosts if h)
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight: Counter[str] = Counter()  # requests in progress per key id (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/v1/", "/api/")):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        caller = None
        if not self.enforce and scope.get("scheme") == "http" and not self._host_allowed(scope, headers):
            # Over HTTPS (the peer port, or the gateway with gateway.tls on) a browser would not trust
            # the certificate for a rebound name, so the page never gets this far: the check is for
            # the plain HTTP gateway port.
            error = ApiError(403, "This gateway answers only requests addressed to localhost, a loopback address or "
                                  "its own host name (Host header refused: DNS rebinding?). Use one of those, or "
                                  "turn on API keys (gateway.api_keys = \"required\").",
                             type="permission_error", code="host_not_allowed")
            await shaped_for(path, error)(scope, receive, send)
            return
        if self.enforce:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, bearer = auth.partition(" ")
            presented = [k.strip() for k in (bearer if scheme.lower() == "bearer" else "",
                                             headers.get(b"x-api-key", b"").decode("latin-1")) if k.strip()]
            state = self.state()
            caller = next((kid for kid in (key_id(state, key) for key in presented) if kid is not None), None)
            if caller is None:
                message = ("You didn't provide an API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                           "(meshctl keys create makes one)." if not auth and not presented
                           else "Incorrect API key provided.")
                error = ApiError(401, message, type="authentication_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await shaped_for(path, error)(scope, receive, send)
                return
            if self.max_inflight and self.inflight[caller] >= self.max_inflight:
                error = ApiError(429, f"This API key has {self.max_inflight} requests in progress, the most it may "
                                      f"have at once (gateway.max_inflight_per_key); retry when one has finished.",
                                 type="rate_limit_error", code="too_many_requests_for_key",
                                 headers={"Retry-After": str(self.retry_after_s)})
                await shaped_for(path, error)(scope, receive, send)
                return
            self.inflight[caller] += 1
        token = _CALLER.set(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            _CALLER.reset(token)
            if caller is not None:
                self.inflight[caller] -= 1
                if self.inflight[caller] <= 0:
                    del self.inflight[caller]

    def _host_allowed(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        host = headers.get(b"host")
        if host is None:  # HTTP/1.0 without Host: not a browser
            return True
        server = scope.get("server")
        own = self.hosts | ({host_name(str(server[0]))} if server else set())
        return local_host(host_name(host.decode("latin-1")), own)
