"""A join can never take over an existing member's node id (issue 14, item 1), against a real meshd
(null backend): the join is sent the way `meshd join` sends it (mesh/node/bootstrap.py), but its body
names the leader's own id; and a join that names a fresh id still gets one the leader picks.

Hostile input tried here: a join with a valid token whose body (and certificate request) names the
leader's node id and the attacker's own addresses.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from mesh.core.errors import StartupError
from mesh.node.bootstrap import _join_through
from mesh.security.pki import certificate_request, common_name, new_key
from mesh.security.tokens import split_token
from tests.procs import Meshd, wait_until


def join_as(node: Meshd, token: str, node_id: str, name: str) -> dict:
    """Posts a join naming `node_id` to the leader's HTTPS peer port (checking its certificate
    against the token's CA fingerprint first, as bootstrap does); the leader's answer."""
    _, ca_fingerprint = split_token(token)
    body = {"token": token, "node_id": node_id, "name": name, "http_address": "127.0.0.1:9",
            "grpc_address": "127.0.0.1:10", "raft_address": "127.0.0.1:11", "peer_address": "127.0.0.1:12",
            "witness": False, "profile": {}, "csr": certificate_request(new_key(), node_id).decode()}
    answer, _ = asyncio.run(_join_through(node.address, ca_fingerprint, body, timeout=30))
    return answer


def leader(node: Meshd) -> dict:
    status = node.status()
    return next(m for m in status["members"] if m["node_id"] == status["node"]["id"])


@pytest.fixture
def node(tmp_path):
    a = Meshd(tmp_path / "a", command="start", backend="null")
    a.init()
    with a:
        def leading() -> bool:
            if a.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {a.proc.returncode}:\n{a.log()}")
            try:
                return a.status()["raft"]["is_leader"] and bool(a.status()["members"][0]["peer_address"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                return False

        wait_until(leading, 60, "the first member to lead")
        yield a


def test_a_join_naming_the_leaders_id_is_refused_and_spends_the_token(node):
    before = leader(node)
    token = node.post("/control/v1/tokens", {"ttl_s": 600, "uses": 1}).json()["token"]

    with pytest.raises(StartupError) as refused:
        join_as(node, token, before["node_id"], "mallory")
    assert "HTTP 409" in str(refused.value) and "already belongs" in str(refused.value), refused.value

    # The leader's record is untouched: same addresses, same name, still the only member.
    after = node.status()
    assert [m["node_id"] for m in after["members"]] == [before["node_id"]]
    mine = leader(node)
    for field in ("name", "http_address", "raft_address", "grpc_address", "peer_address", "joined_at"):
        assert mine[field] == before[field], field
    assert "mallory" not in {m["name"] for m in after["members"]}

    # The probe spent the token's only use: even an honest join with a fresh id is refused now.
    with pytest.raises(StartupError) as spent:
        join_as(node, token, "0123456789ab", "honest")
    assert "HTTP 403" in str(spent.value) and "expired or revoked" in str(spent.value), spent.value
    assert [m["node_id"] for m in node.status()["members"]] == [before["node_id"]]
    assert "node id" in node.log() and "already" in node.log()


def test_the_leader_assigns_a_joiners_id(node):
    """The id a join body names is never taken: the leader picks one no member has had and signs the
    certificate for it."""
    token = node.post("/control/v1/tokens", {"ttl_s": 600, "uses": 1}).json()["token"]
    answer = join_as(node, token, "0123456789ab", "honest")
    assigned = answer["node_id"]
    assert assigned != "0123456789ab" and common_name(answer["certificate"].encode()) == assigned
    members = {m["node_id"]: m["name"] for m in node.status()["members"]}
    assert members[assigned] == "honest" and "0123456789ab" not in members
