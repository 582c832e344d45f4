"""A witness in a real mesh: two model nodes (a, b: the real default model, a replica each) and a
witness (w) running on the base install only (grpc, numpy, llama_cpp and onnxruntime refused at
import, see tests/base_install.py). The witness votes, holds no shard, relays the API to the leader,
and the mesh keeps answering through it and directly when a model node is killed (-9)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.base_install import heavy_attempts, mapped_heavy_libraries, witness
from tests.procs import Meshd, join_token, kill_all, ready_replicas, wait_until

MODEL = "gemma-3-270m"
ASK = [{"role": "user", "content": "Name a colour."}]
HANDED_OVER = "this witness was elected leader; leadership handed to"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("witness")
    a = Meshd(root / "a", command="start")
    a.init()
    nodes = {"a": a}
    try:
        a.start().wait_ready()
        nodes["b"] = Meshd(root / "b", "--peer", a.address, "--token", join_token(a), command="join").start()
        nodes["w"] = witness(root / "w", peer=a.address, token=join_token(a)).start()
        for name in ("b", "w"):
            wait_until(lambda n=nodes[name]: n.health() == 200, 120, f"{name} to join")
        a.post("/control/v1/replicas", {"role": "reasoning", "count": 2}).raise_for_status()
        for name in ("a", "b"):
            a.post("/control/v1/assign", {"role": "reasoning", "node": name}).raise_for_status()
        wait_until(lambda: ready_replicas(a) == ["a", "b"], 180, "replicas on a and b")
        yield nodes
    finally:
        kill_all(nodes)


def chat(node: Meshd, stream: bool = False) -> str:
    """One short greedy answer through `node`'s address (no client retries: the mesh must answer)."""
    client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=90)
    if stream:
        chunks = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    return reply.choices[0].message.content


def assert_base_install_only(w: Meshd) -> None:
    assert w.status()["node"]["heavy_modules"] == []
    assert heavy_attempts(w) == []
    assert mapped_heavy_libraries(w.proc.pid) == []


def test_the_witness_votes_holds_no_shard_and_imports_no_heavy_module(mesh):
    w = mesh["w"]
    status = w.status()
    me = next(m for m in status["members"] if m["name"] == "w")
    assert status["node"]["witness"] and me["witness"]
    assert me["connected"] and status["raft"]["has_quorum"]
    assert not [s for s in status["shards"] if s["node_id"] == me["node_id"]]
    assert status["local_shards"] == []
    # The model nodes load llama.cpp and gRPC; the witness maps none of it.
    assert mapped_heavy_libraries(mesh["a"].proc.pid)
    assert_base_install_only(w)


def test_the_witness_relays_chat_to_the_leader_without_grpc(mesh):
    w = mesh["w"]
    assert chat(w) == chat(mesh["a"])
    assert chat(w, stream=True)
    assert MODEL in [m["id"] for m in httpx.get(f"{w.base_url}/v1/models", timeout=10).json()["data"]]
    assert_base_install_only(w)  # the relay path (mesh/gateway/forward.py) is plain HTTP


def test_a_witness_made_leader_hands_leadership_back_while_requests_wait(mesh):
    """The leader's control API (/control/v1/transfer) moves leadership to the witness; the witness hands
    it to a model node, and requests sent meanwhile, to it or to b, are answered."""
    b, w = mesh["b"], mesh["w"]

    def to_witness() -> bool:
        if HANDED_OVER in w.log():
            return True
        leader = _leader_name(w)
        if leader in ("a", "b"):
            reply = mesh[leader].post("/control/v1/transfer", {"to": "w"}, timeout=15)
            assert reply.status_code in (200, 503), reply.text  # 503: w not caught up yet; ask again
        return False

    with ThreadPoolExecutor(4) as pool:
        wait_until(to_witness, 30, "the witness to be elected and hand leadership over", every=0.2)
        answers = [pool.submit(chat, node) for node in (w, b, w, b)]
        assert all(f.result(timeout=120) for f in answers)
    assert _leader_name(w) in ("a", "b")
    assert_base_install_only(w)


def test_chat_goes_on_through_the_witness_and_directly_when_the_leader_model_node_dies(mesh):
    a, b, w = mesh["a"], mesh["b"], mesh["w"]
    leader = next(m["name"] for m in w.status()["members"] if m["leader"])
    assert leader in ("a", "b")  # a witness never stays leader
    victim, survivor = (a, b) if leader == "a" else (b, a)
    victim.kill()  # SIGKILL: the leader and a replica holder, at once
    # The first request after the kill waits (bounded) for the next leader; whichever of the two
    # survivors wins, a model node ends up leading: a witness hands leadership over.
    assert chat(w)
    assert chat(survivor)
    wait_until(lambda: _leader_name(w) == survivor.name, 30, "the surviving model node to lead")
    assert chat(w, stream=True) and chat(survivor, stream=True)
    assert _leader_name(survivor) == survivor.name
    assert_base_install_only(w)


def _leader_name(node: Meshd) -> str | None:
    try:
        return next((m["name"] for m in node.status()["members"] if m["leader"]), None)
    except httpx.HTTPError:
        return None
