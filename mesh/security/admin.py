"""Admin credentials: what the control API (/control/v1/*, meshctl's API) asks for.

One per operator (`meshctl admin create NAME`) and one per member (its `admin.token`, 0600, where meshctl
on that machine finds it), each `qadm2.<id>.<secret>`, sent as `Authorization: Bearer …`. The Raft log
keeps each credential's id, name, owner and the sha256 of its secret, never the secret; nothing is
derived from a mesh-wide secret. A member's credential is revoked with the member's removal, so the
copy on a lost or removed device opens nothing on the mesh; an operator's is revoked with
`meshctl admin revoke`.

A member also accepts its own credential before its log has caught up (meshctl on the same machine
works on a member cut off from the majority); everything it relays to the leader is checked there
against the log.

Over plain HTTP the control API answers only clients on loopback: anywhere else the credential would
cross the network in clear (serve the gateway over HTTPS, `gateway.tls`, or use meshctl on a member).

Two routes stay open: /control/v1/ca (the CA certificate is public) and /control/v1/join (a join token
is the credential there, and it is only accepted on the HTTPS peer port).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.core.errors import ApiError
from mesh.security.credentials import matches, mint, parse
from raft.commands import CreateAdminCredential
from raft.state import MeshState

PREFIX = "qadm2"
PUBLIC = frozenset({"/control/v1/ca", "/control/v1/join",
                    # a live member's certificate on the peer port, checked by the route
                    "/control/v1/sign", "/control/v1/ca-key"})


@dataclass(frozen=True)
class NewAdmin:
    text: str  # shown once
    command: CreateAdminCredential


def new_admin(name: str, node_id: str = "", now: float | None = None) -> NewAdmin:
    """A fresh credential and the command that records it (`node_id`: the member it belongs to)."""
    cred = mint(PREFIX)
    return NewAdmin(cred.text, CreateAdminCredential(cred_id=cred.id, name=name, secret_sha256=cred.digest,
                                                     created_at=time.time() if now is None else now,
                                                     node_id=node_id))


def admin_id(state: MeshState, presented: str) -> str | None:
    """The id of `presented` if it is a live admin credential of this mesh."""
    parsed = parse(PREFIX, presented)
    if parsed is None:
        return None
    cred = state.admins.get(parsed[0])
    return cred.cred_id if cred is not None and not cred.revoked and matches(cred.secret_sha256, parsed[1]) else None


def credential_fields_ok(cred_id: object, sha256: object) -> bool:
    """A credential id and secret digest as a joiner sends them (12 and 64 lowercase hex digits)."""
    return (isinstance(cred_id, str) and re.fullmatch(r"[0-9a-f]{12}", cred_id) is not None
            and isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256) is not None)


async def ensure_member_credential(state: MeshState, node_id: str, name: str, current: str,
                                   propose: Callable[[CreateAdminCredential], Awaitable[dict]]) -> str | None:
    """This member's credential, recorded: None when `current` is live in `state`, else a new one minted,
    recorded through `propose`, and returned (for admin.token). A data dir from before credentials were
    recorded in the log, or a join whose credential was not recorded, ends up here once."""
    if current and admin_id(state, current) is not None:
        return None
    fresh = new_admin(f"member {name}", node_id)
    await propose(fresh.command)
    return fresh.text


def bearer(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0]).partition("%")[0]).is_loopback
    except ValueError:  # a unix socket path or a test client's name: not a network peer
        return str(client[0]) in ("testclient", "")


class AdminCheck:
    """ASGI middleware: control routes need a live admin credential (401 otherwise), and over plain
    HTTP a loopback client (403 otherwise)."""

    def __init__(self, app: ASGIApp, state: Callable[[], MeshState], own: Callable[[], str] = str) -> None:
        self.app = app
        self.state = state
        self.own = own  # this member's own credential (admin.token); "" when it has none

    def allowed(self, presented: str) -> bool:
        mine = self.own()
        own = bool(mine) and hmac.compare_digest(presented.encode(), mine.encode())
        return own or admin_id(self.state(), presented) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/control/") and scope["path"] not in PUBLIC:
            if scope.get("scheme") == "http" and not _loopback(scope):
                await ApiError(403, "The control API answers plain HTTP only on loopback, where the admin credential "
                                    "does not cross the network: serve the gateway over HTTPS (gateway.tls in "
                                    "mesh.toml) or run meshctl on a member.", type="permission_error",
                               code="admin_needs_tls").response()(scope, receive, send)
                return
            presented = bearer(scope)
            if not presented or not self.allowed(presented):
                message = ("The control API needs an admin credential: meshctl reads it from the data dir "
                           "(admin.token), --admin-token or $QUORUM_ADMIN_TOKEN." if not presented
                           else "Incorrect or revoked admin credential.")
                await ApiError(401, message, type="authentication_error", code="invalid_admin_token",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
