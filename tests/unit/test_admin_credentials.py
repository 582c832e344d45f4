"""Admin credentials per operator and per member (issue 14, item 5): recorded in the log as digests,
revoked one by one or with their member's removal, checked by AdminCheck; the control API answers
plain HTTP only on loopback."""

from __future__ import annotations

import asyncio
import json

import pytest

from mesh.security.admin import AdminCheck, admin_id, credential_fields_ok, ensure_member_credential, new_admin
from raft.commands import AddMember, CreateToken, InitMesh, RevokeAdminCredential, SetMemberState
from raft.state import MeshState, Rejected, apply


def mesh() -> MeshState:
    """Members a and b (b joined with a token)."""
    state = apply(MeshState(), InitMesh("m", "admins", 1.0))
    state = apply(state, AddMember(node_id="a", name="a", http_address="127.0.0.1:10",
                                   raft_address="127.0.0.1:20", profile={}, joined_at=1.0))
    state = apply(state, CreateToken("000000000001", "0" * 64, 1.0, 1000.0))
    return apply(state, AddMember(node_id="b", name="b", http_address="127.0.0.1:11", raft_address="127.0.0.1:21",
                                  profile={}, joined_at=2.0, token_id="000000000001"))


def test_the_log_keeps_a_digest_and_a_credential_checks_against_it():
    cred = new_admin("ops")
    state = apply(mesh(), cred.command)
    assert cred.text.startswith("qadm2.") and cred.text.split(".")[2] not in repr(state)
    assert admin_id(state, cred.text) == cred.command.cred_id
    assert admin_id(state, cred.text[:-1] + ("A" if cred.text[-1] != "A" else "B")) is None
    assert admin_id(state, "qadm2.nope") is None and admin_id(MeshState(), cred.text) is None


def test_revoking_one_credential_leaves_the_others():
    ops, other = new_admin("ops"), new_admin("other")
    state = apply(apply(mesh(), ops.command), other.command)
    state = apply(state, RevokeAdminCredential(ops.command.cred_id))
    assert admin_id(state, ops.text) is None and admin_id(state, other.text) is not None
    with pytest.raises(Rejected):
        apply(state, RevokeAdminCredential("000000000000"))


def test_a_members_credential_dies_with_its_removal():
    """A lost phone's admin.token opens nothing once the phone is removed."""
    phone, ops = new_admin("member b", "b"), new_admin("ops")
    state = apply(apply(mesh(), phone.command), ops.command)
    state = apply(state, SetMemberState("b", "gone"))
    assert admin_id(state, phone.text) is None and admin_id(state, ops.text) is not None
    with pytest.raises(Rejected, match="no live member"):
        apply(state, new_admin("again", "b").command)


def test_a_joiners_credential_fields_are_checked():
    cmd = new_admin("x").command
    assert credential_fields_ok(cmd.cred_id, cmd.secret_sha256)
    for bad in (("", cmd.secret_sha256), (cmd.cred_id, "x" * 64), (1, cmd.secret_sha256), (cmd.cred_id, None)):
        assert not credential_fields_ok(*bad)


def test_a_member_records_a_credential_once():
    state = mesh()
    proposed = []

    async def propose(cmd):
        proposed.append(cmd)
        return {}

    fresh = asyncio.run(ensure_member_credential(state, "a", "a", "", propose))
    assert fresh and proposed[0].node_id == "a"
    state = apply(state, proposed[0])
    assert asyncio.run(ensure_member_credential(state, "a", "a", fresh, propose)) is None and len(proposed) == 1


def call(app, path: str, token: str = "", scheme: str = "http", client: str = "127.0.0.1") -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "query_string": b"",
             "scheme": scheme, "client": (client, 50000)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


async def ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_admin_check_takes_recorded_and_own_credentials_and_refuses_revoked_ones():
    ops, own = new_admin("ops"), new_admin("member a", "a")
    state = apply(mesh(), ops.command)
    app = AdminCheck(ok, lambda: state, lambda: own.text)
    assert call(app, "/control/v1/status", ops.text) == 204
    assert call(app, "/control/v1/status", own.text) == 204  # before the log has it: meshctl on this member
    assert call(app, "/control/v1/status") == 401 and call(app, "/control/v1/status", "qadm2.x") == 401
    state = apply(state, RevokeAdminCredential(ops.command.cred_id))
    assert call(app, "/control/v1/status", ops.text) == 401
    assert call(app, "/control/v1/ca") == 204 and call(app, "/v1/models") == 204


def test_plain_http_reaches_the_control_api_only_from_loopback():
    ops = new_admin("ops")
    state = apply(mesh(), ops.command)
    app = AdminCheck(ok, lambda: state)
    assert call(app, "/control/v1/status", ops.text, client="::1") == 204
    assert call(app, "/control/v1/status", ops.text, client="192.168.1.20") == 403
    assert call(app, "/control/v1/status", ops.text, scheme="https", client="192.168.1.20") == 204
    assert call(app, "/v1/models", client="192.168.1.20") == 204  # the gateway is not the control API


def test_a_refusal_says_how_to_fix_it():
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/control/v1/status", "headers": [], "query_string": b"",
             "scheme": "http", "client": ("10.0.0.9", 1)}
    asyncio.run(AdminCheck(ok, MeshState)(scope, receive, send))
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert body["error"]["code"] == "admin_needs_tls" and "HTTPS" in body["error"]["message"]
