"""Hostile input against one real meshd (null backend): its Raft port, its control API and
meshctl, and its HTTP server below the gateway (lying Content-Length, huge headers, silent
connections). The node must answer 4xx (or close), keep serving, and keep committing.

tests/unit/test_raft_hostile.py drives in-process Raft groups through a recording proxy
(replay, duplicated frames); this file checks the same Raft port on the daemon.
"""

from __future__ import annotations

import json
import pickle
import random
import socket
import struct
import subprocess
import sys
import zlib

import httpx
import pytest

from tests.procs import REPO, Meshd, wait_until

WAIT_S = 30.0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hostile") / "a"
    meshd = Meshd(data_dir, backend="null", command="start", name="a")
    meshd.init()
    with meshd:
        meshd.wait_ready()
        yield meshd


def admin_headers(node: Meshd) -> dict[str, str]:
    token = node.data_dir / "admin.token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}


def control(node: Meshd, path: str, content: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{node.base_url}{path}", content=content, timeout=WAIT_S,
                      headers={"content-type": "application/json", **admin_headers(node), **headers})


def meshctl(node: Meshd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh.cli.meshctl", "--mesh", node.address, "--data-dir",
                           str(node.data_dir), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def commit_index(node: Meshd) -> int:
    return node.status()["raft"]["commit_index"]


def still_commits(node: Meshd, count: int) -> None:
    """A write through the control API commits and shows in the status."""
    before = commit_index(node)
    reply = control(node, "/control/v1/replicas", json.dumps({"role": "reasoning", "count": count}).encode())
    assert reply.status_code == 200, reply.text
    wait_until(lambda: commit_index(node) > before, WAIT_S, "the write to commit")


def still_serves(node: Meshd) -> None:
    reply = httpx.post(f"{node.base_url}/v1/chat/completions", timeout=WAIT_S, json={
        "model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def pins(node: Meshd) -> list:
    return node.status()["pins"]


@pytest.mark.parametrize("model", ["../x", "/etc/passwd", "gemma-3-270m/../../x"])
def test_meshctl_assign_with_a_path_for_model_is_refused(node, model):
    before = pins(node)
    done = meshctl(node, "assign", "reasoning", "--node", "a", "--model", model)
    assert done.returncode != 0, done.stdout
    assert "unknown model" in done.stderr, done.stderr
    assert pins(node) == before
    still_commits(node, 1)


@pytest.mark.parametrize("model", ["../x", "/etc/passwd", "a\x00b", {"x": 1}, [{"x": 1}], ["../x"], 5, True, ""])
def test_control_assign_with_a_hostile_model_is_4xx_and_raft_keeps_applying(node, model):
    body = json.dumps({"role": "reasoning", "node": "a", "model": model}).encode()
    reply = control(node, "/control/v1/assign", body)
    assert 400 <= reply.status_code < 500, reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    still_commits(node, 1)


def test_control_body_over_the_limit_is_413(node):
    big = json.dumps({"ttl_s": 60, "pad": "x" * (2 * 1024 * 1024)}).encode()
    reply = control(node, "/control/v1/tokens", big)
    assert reply.status_code == 413, reply.text
    still_commits(node, 1)


def raw_http(node: Meshd, data: bytes, half_close: bool = True, limit_s: float = 10.0) -> bytes:
    host, port = node.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=limit_s) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before reading everything: read what it said
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):  # the server stopped talking: what came is the answer
            pass
    return out


def statuses(answer: bytes) -> list[int]:
    return [int(line.split(b" ")[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def test_http_layer_refuses_malformed_requests_without_5xx(node):
    body = json.dumps({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = {
        "length larger than body": head + b"Content-Length: 5000\r\n\r\n" + body,
        "length smaller than body": head + b"Content-Length: 10\r\n\r\n" + body,
        "two lengths": head + b"Content-Length: 10\r\nContent-Length: 20\r\n\r\n" + body,
        "length and chunked": head + b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "bad chunk size": head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "huge chunk size": head + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nhello",
        "header of 200 KB": head + b"X-Junk: " + b"j" * 200_000 + b"\r\n\r\n",
        "5000 headers": head + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n",
        "non-latin header": head + b"X-Session-Id: \xff\xfe\r\nContent-Length: 2\r\n\r\n{}",
        "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
        "NUL in path": b"GET /v1/models/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    for name, data in cases.items():
        answer = raw_http(node, data)
        assert all(s < 500 for s in statuses(answer)), (name, answer[:300])
        still_serves(node)


def test_silent_http_connections_do_not_block_the_gateway(node):
    host, port = node.address.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(100)]
    try:
        half = [socket.create_connection((host, int(port)), timeout=5) for _ in range(50)]
        for s in half:  # a request that never finishes its headers
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        still_serves(node)
        still_commits(node, 1)
    finally:
        for s in silent + half:
            s.close()


def test_garbage_on_the_raft_port_leaves_the_node_serving_and_committing(node):
    host, port = node.address.rsplit(":", 1)
    raft_port = int(port) + 2
    rng = random.Random(5)
    payloads = [rng.randbytes(300), struct.pack("i", 64) + rng.randbytes(64),
                struct.pack("i", 40) + zlib.compress(pickle.dumps(["status"])).ljust(40, b"\0"), struct.pack("i", -9)]
    for _ in range(6):  # each connection costs the node a tick to accept (see tests/unit/test_raft_hostile.py)
        for p in payloads:
            with socket.create_connection((host, raft_port), timeout=5) as s:
                s.sendall(p)
    still_commits(node, 1)
    still_serves(node)
