"""mesh/security/peer_tls.py and mesh/security/admin.py as ASGI middleware: who gets through to the app."""

from __future__ import annotations

import asyncio
import json

from mesh.security.admin import AdminCheck
from mesh.security.peer_tls import PEER_KEY, PeerGate, StripRelayHeaders
from raft.commands import AddMember, InitMesh, SetMemberState
from raft.state import MeshState, apply

STATE = apply(apply(MeshState(), InitMesh("m", "m", 1.0)), AddMember("gone1", "g", "h:11", "h:13", {}, 1.0))
STATE = apply(apply(STATE, SetMemberState("gone1", "gone")), AddMember("n1", "a", "h:1", "h:3", {}, 1.0))


class Recorder:
    def __init__(self) -> None:
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def call(app, path: str, headers: list[tuple[bytes, bytes]] = (), **extra) -> tuple[int, dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": list(headers), "query_string": b"", **extra}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], (json.loads(body) if body else {})


def test_peer_port_lets_joins_through_and_members_only_otherwise():
    inner = Recorder()
    gate = PeerGate(inner, lambda: STATE)
    assert call(gate, "/control/v1/join")[0] == 204  # no certificate needed to join
    assert call(gate, "/v1/chat/completions", **{PEER_KEY: "n1"})[0] == 204
    for who in (None, "stranger", "gone1"):  # no certificate, not a member, removed
        status, body = call(gate, "/v1/chat/completions", **{PEER_KEY: who})
        assert status == 403 and body["error"]["code"] == "not_a_member"
    assert len(inner.scopes) == 2


def test_admin_credential_guards_control_routes_only():
    inner = Recorder()
    app = AdminCheck(inner, lambda: STATE, lambda: "qadm2.right")
    assert call(app, "/control/v1/status")[0] == 401
    assert call(app, "/control/v1/status", [(b"authorization", b"Bearer qadm2.wrong")])[0] == 401
    assert call(app, "/control/v1/status", [(b"authorization", b"Basic qadm2.right")])[0] == 401
    assert call(app, "/control/v1/status", [(b"authorization", b"Bearer qadm2.right")])[0] == 204
    assert call(app, "/control/v1/ca")[0] == 204 and call(app, "/control/v1/join")[0] == 204
    assert call(app, "/v1/models")[0] == 204 and call(app, "/health")[0] == 204


def test_clients_cannot_send_relay_headers_on_the_public_port():
    inner = Recorder()
    headers = [(b"x-quorum-forwarded", b"1"), (b"x-quorum-resume", b"{}"), (b"x-session-id", b"s1")]
    assert call(StripRelayHeaders(inner), "/v1/chat/completions", headers)[0] == 204
    assert inner.scopes[0]["headers"] == [(b"x-session-id", b"s1")]
