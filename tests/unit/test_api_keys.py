"""mesh/api_keys.py: the gateway's API keys and when they are required."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mesh.api_keys import ApiKeyCheck, new_key, required, valid_key
from raft.commands import InitMesh, RevokeApiKey
from raft.state import MeshState, apply


@pytest.mark.parametrize("policy, host, expected", [
    ("auto", "127.0.0.1", False), ("auto", "localhost", False), ("auto", "::1", False),
    ("auto", "0.0.0.0", True), ("auto", "192.168.1.20", True), ("auto", "pi.local", True),
    ("required", "127.0.0.1", True), ("off", "0.0.0.0", False),
])
def test_keys_are_required_beyond_loopback_by_default(policy, host, expected):
    assert required(policy, host) is expected


def state_with(*keys) -> MeshState:
    state = apply(MeshState(), InitMesh("m", "m", 1.0))
    for key in keys:
        state = apply(state, key.command)
    return state


def test_only_a_created_unrevoked_key_is_valid():
    key, other = new_key("laptop"), new_key("phone")
    state = state_with(key)
    assert valid_key(state, key.text)
    assert not valid_key(state, other.text)
    assert not valid_key(state, key.text[:-1] + ("A" if key.text[-1] != "A" else "B"))
    for junk in ("", "x", "qk1.", "qk1." + "0" * 12 + "." + "A" * 43, key.text + " ", "Bearer " + key.text):
        assert not valid_key(state, junk)
    assert not valid_key(apply(state, RevokeApiKey(key.command.key_id)), key.text)


def test_the_log_keeps_no_secret():
    key = new_key("laptop")
    assert key.text.split(".")[2] not in repr(state_with(key))


def call(state: MeshState, path: str, auth: str | None, enforce: bool = True) -> httpx.Response:
    app = Starlette(routes=[Route("/v1/models", lambda r: PlainTextResponse("ok")),
                            Route("/health", lambda r: PlainTextResponse("ok"))])

    async def main():
        transport = httpx.ASGITransport(app=ApiKeyCheck(app, lambda: state, enforce))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers={"Authorization": auth} if auth else {})
    return asyncio.run(main())


def test_missing_or_wrong_key_is_401_with_an_openai_body():
    key = new_key("laptop")
    state = state_with(key)
    for auth in (None, "Bearer x", "Basic abc", f"Bearer {new_key('other').text}"):
        reply = call(state, "/v1/models", auth)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        assert reply.headers["www-authenticate"] == "Bearer"
    assert call(state, "/v1/models", f"Bearer {key.text}").status_code == 200
    assert call(state, "/v1/models", f"bearer {key.text}").status_code == 200


def test_health_is_public_and_off_means_off():
    state = state_with()
    assert call(state, "/health", None).status_code == 200
    assert call(state, "/v1/models", None, enforce=False).status_code == 200
