"""The admin credential: what the control API (/control/v1/*, meshctl's API) asks for.

It is derived from the mesh secret (mesh/security/datadir.py admin_token_for), so every member checks it
without a lookup and `meshd init` / `meshd join` / `meshd start` write it to the data dir
(admin.token, 0600), where meshctl on the same machine finds it. It is sent as
`Authorization: Bearer qadm1.…`. Two routes stay open: /control/v1/ca (the CA certificate is
public) and /control/v1/join (a join token is the credential there, and it is only accepted on the
HTTPS peer port).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.core.errors import ApiError

PUBLIC = frozenset({"/control/v1/ca", "/control/v1/join"})


def bearer(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class AdminCheck:
    """ASGI middleware: control routes need the admin credential (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/control/") and scope["path"] not in PUBLIC:
            presented = bearer(scope)
            if not hmac.compare_digest(presented.encode(), self.token.encode()):
                message = ("The control API needs the mesh's admin credential: meshctl reads it from the data "
                           "dir (admin.token), --admin-token or $QUORUM_ADMIN_TOKEN." if not presented
                           else "Incorrect admin credential.")
                await ApiError(401, message, type="authentication_error", code="invalid_admin_token",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
