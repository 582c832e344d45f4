"""The gateway against web pages and other keys (issue 14, item 6), on real meshd processes (null
backend): a second key cannot continue the first key's session (404), and with keys off a request
addressed to a foreign Host (DNS rebinding) is refused, as is a POST body not declared JSON.

Hostile inputs tried here: a session id of another key's session, with and without streaming; a
rebinding Host header on the OpenAI, Anthropic and Ollama routes; text/plain and form bodies.
"""

from __future__ import annotations

import httpx
import pytest

from tests.procs import kill_all, start_mesh
from tests.unit.test_gateway_app import MODEL


def chat(node, key: str | None, session: str, text: str, stream: bool = False, **headers) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{node.base_url}/v1/chat/completions", timeout=60,
                      headers={"X-Session-Id": session, **auth, **headers},
                      json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4,
                            "stream": stream})


@pytest.fixture
def keyed(tmp_path):
    root = tmp_path / "keyed"
    (root / "a").mkdir(parents=True)
    (root / "a" / "mesh.toml").write_text('[gateway]\napi_keys = "required"\n')
    nodes = start_mesh(root, ["a"], ["a"], backend="null")
    try:
        yield nodes["a"]
    finally:
        kill_all(nodes)


def test_a_second_key_cannot_continue_or_read_the_first_keys_session(keyed):
    a = keyed
    alice = a.post("/control/v1/keys", {"name": "alice"}).json()
    bob = a.post("/control/v1/keys", {"name": "bob"}).json()
    first = chat(a, alice["key"], "plan-1", "remember TANGERINE")
    assert first.status_code == 200, first.text
    for stream in (False, True):
        other = chat(a, bob["key"], "plan-1", "what did I ask you to remember?", stream=stream)
        assert other.status_code == 404, other.text
        assert other.json()["error"]["code"] == "session_not_found"
    assert chat(a, None, "plan-1", "and me?").status_code == 401
    again = chat(a, alice["key"], "plan-1", "and now?")
    assert again.status_code == 200, again.text
    logged = a.get_json("/control/v1/sessions/plan-1")  # the admin still reads every session
    assert logged["api_key_id"] == alice["key_id"] and len(logged["turns"]) == 2
    assert "TANGERINE" in str(logged["turns"][0]) and "remember?" not in str(logged["turns"])


@pytest.fixture
def open_node(tmp_path):
    nodes = start_mesh(tmp_path / "open", ["a"], ["a"], backend="null")
    try:
        yield nodes["a"]
    finally:
        kill_all(nodes)


def test_without_keys_a_rebinding_host_and_non_json_bodies_are_refused(open_node):
    a = open_node
    evil = {"Host": f"attacker.example:{a.port}"}
    refused = chat(a, None, "s", "hi", **evil)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{a.base_url}/v1/models", headers=evil, timeout=10).status_code == 403
    ollama = httpx.post(f"{a.base_url}/api/chat", headers=evil, timeout=10,
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert ollama.status_code == 403 and isinstance(ollama.json()["error"], str)
    anthropic = httpx.post(f"{a.base_url}/v1/messages", headers=evil, timeout=10,
                           json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"
    # A form or text/plain POST (what a page may send cross-origin without asking) is refused.
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        reply = httpx.post(f"{a.base_url}/v1/chat/completions", content=body, timeout=10,
                           headers={"Content-Type": content_type})
        assert reply.status_code == 415, reply.text
    # Loopback and localhost are served; sessions stay shared without keys, as before.
    assert chat(a, None, "s", "hi").status_code == 200
    assert chat(a, None, "s", "again", Host=f"localhost:{a.port}").status_code == 200
    assert httpx.get(f"{a.base_url}/health", headers=evil, timeout=10).status_code == 200
