"""mesh/security/api_keys.py: the gateway's API keys and when they are required."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mesh.security.api_keys import ApiKeyCheck, NewKey, new_key, required, valid_key
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


# -- browsers: the Host header (DNS rebinding) when no key is checked -----------------------------

def request(state: MeshState, method: str, path: str, headers: dict[str, str], enforce: bool = False,
            hosts: tuple[str, ...] = (), body: bytes = b"{}") -> httpx.Response:
    from mesh.security.api_keys import caller_key_id

    async def echo(request):
        return PlainTextResponse(f"ok {caller_key_id()}")

    app = Starlette(routes=[Route(p, echo, methods=["GET", "POST"])
                            for p in ("/v1/models", "/v1/chat/completions", "/v1/messages", "/api/chat",
                                      "/api/tags", "/health", "/control/v1/ca")])

    async def main():
        transport = httpx.ASGITransport(app=ApiKeyCheck(app, lambda: state, enforce, hosts))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
            return await client.request(method, path, headers=headers, content=body if method == "POST" else None)
    return asyncio.run(main())


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "127.9.8.7", "localhost:8080", "LOCALHOST.", "[::1]:8080",
                                  "[::1]", "pi.local:8080", "192.168.1.20:8080"])
def test_without_keys_a_local_or_own_host_is_served(host):
    reply = request(state_with(), "GET", "/v1/models", {"Host": host}, hosts=("pi.local", "192.168.1.20"))
    assert reply.status_code == 200 and reply.text == "ok None"


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "localhost.attacker.example",
                                  "127.0.0.1.nip.io:8080", "192.168.1.99:8080", "[::2]:8080"])
def test_without_keys_a_foreign_host_is_403_in_each_apis_shape(host):
    state = state_with()
    openai_reply = request(state, "GET", "/v1/models", {"Host": host})
    assert openai_reply.status_code == 403
    assert openai_reply.json()["error"]["code"] == "host_not_allowed"
    assert openai_reply.json()["error"]["type"] == "permission_error"
    post = request(state, "POST", "/v1/chat/completions", {"Host": host, "Content-Type": "application/json"})
    assert post.status_code == 403
    anthropic_reply = request(state, "POST", "/v1/messages", {"Host": host, "Content-Type": "application/json"})
    assert anthropic_reply.status_code == 403 and anthropic_reply.json()["type"] == "error"
    ollama_reply = request(state, "POST", "/api/chat", {"Host": host, "Content-Type": "application/json"})
    assert ollama_reply.status_code == 403 and isinstance(ollama_reply.json()["error"], str)
    # Outside the model APIs nothing changes (the control API has its own credential).
    assert request(state, "GET", "/health", {"Host": host}).status_code == 200
    assert request(state, "GET", "/control/v1/ca", {"Host": host}).status_code == 200


def test_with_keys_the_host_is_not_checked_and_the_caller_is_known():
    key = new_key("laptop")
    state = state_with(key)
    reply = request(state, "GET", "/v1/models", {"Host": "gateway.example", "Authorization": f"Bearer {key.text}"},
                    enforce=True)
    assert reply.status_code == 200 and reply.text == f"ok {key.command.key_id}"
    reply = request(state, "GET", "/v1/models", {"Host": "gateway.example", "x-api-key": key.text}, enforce=True)
    assert reply.text == f"ok {key.command.key_id}"


# -- fairness: requests in progress per key -------------------------------------------------------

def test_a_key_over_its_in_flight_cap_gets_429_with_retry_after_in_the_apis_shape_and_others_pass():
    """Two requests of one key hold their slots (their answers wait on an event); the key's third
    request is a 429 at once, in OpenAI's, Anthropic's or Ollama's shape; another key is served;
    once the two end, the first key is served again."""
    first, second = new_key("greedy"), new_key("polite")
    state = state_with(first, second)
    release = asyncio.Event()
    entered = []

    async def slow(request):
        entered.append(request.url.path)
        await release.wait()
        return PlainTextResponse("done")

    app = Starlette(routes=[Route(p, slow, methods=["POST"]) for p in ("/v1/chat/completions", "/v1/messages",
                                                                       "/api/chat")])
    check = ApiKeyCheck(app, lambda: state, True, max_inflight=2, retry_after_s=3)

    async def main():
        transport = httpx.ASGITransport(app=check)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
            def post(path: str, key: NewKey):
                return client.post(path, json={}, headers={"Authorization": f"Bearer {key.text}"})
            held = [asyncio.create_task(post("/v1/chat/completions", first)) for _ in range(2)]
            for _ in range(500):  # bounded: both reach the app at once
                if len(entered) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(entered) == 2
            over = {path: await post(path, first) for path in ("/v1/chat/completions", "/v1/messages", "/api/chat")}
            polite = asyncio.create_task(post("/v1/chat/completions", second))
            for _ in range(500):
                if len(entered) == 3:
                    break
                await asyncio.sleep(0.01)
            assert len(entered) == 3  # the other key reached the app while the first held its two slots
            release.set()
            done = await asyncio.gather(*held, polite)
            again = await post("/v1/chat/completions", first)
            return over, done, again

    over, done, again = asyncio.run(main())
    openai_reply = over["/v1/chat/completions"]
    assert openai_reply.status_code == 429 and openai_reply.headers["retry-after"] == "3"
    assert openai_reply.json()["error"]["type"] == "rate_limit_error"
    assert openai_reply.json()["error"]["code"] == "too_many_requests_for_key"
    anthropic_reply = over["/v1/messages"]
    assert anthropic_reply.status_code == 429 and anthropic_reply.json()["error"]["type"] == "rate_limit_error"
    assert anthropic_reply.json()["type"] == "error"
    ollama_reply = over["/api/chat"]
    assert ollama_reply.status_code == 429 and isinstance(ollama_reply.json()["error"], str)
    assert [r.status_code for r in done] == [200, 200, 200]  # the other key was never held back
    assert again.status_code == 200 and check.inflight == {}  # every slot given back
