"""raft/tls.py: the Raft port is mutual TLS with one certificate per member, and the node id in a certificate must
be a live member bound to that Raft address in the replicated state. Real RaftNodes on loopback, their tick
threads running (tests/unit/raft_tls_mesh.py builds the mesh the way meshd does)."""

from __future__ import annotations

import pickle
import socket
import ssl
import struct
import time
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor

from raft.commands import AddMember, CreateToken, InitMesh, SetAuthority, SetMemberState, SetReplicas
from raft.node import ProposalFailed, RaftNode
from raft.state import MeshState, apply
from raft.tls import member_authorizer
from raft.transport import TransportLimits
from tests.procs import wait_until
from tests.unit.raft_tls_mesh import (
    SECRET,
    TIMING,
    WAIT_S,
    Authority,
    Boom,
    add_member,
    addresses,
    build_mesh,
    close_all,
    closed_by_peer,
    commit,
    frame,
    leader_of,
    port_of,
    tls_client,
    transport_of,
    typed_frame,
)


@pytest.fixture
def mesh(tmp_path):
    ca = Authority()
    ids, addrs = ["a", "b", "c"], addresses(3)
    nodes = build_mesh(tmp_path, ca, ids, addrs, password=SECRET)
    try:
        yield ca, nodes, dict(zip(ids, addrs))
    finally:
        close_all(nodes)


def still_serving(nodes: dict[str, RaftNode], leader_before: RaftNode, count: int) -> None:
    commit(nodes, SetReplicas("reasoning", count))
    assert leader_of(nodes) is leader_before, "a hostile connection caused a leader change"
    states = [n.state for n in nodes.values()]
    assert all(s == states[0] for s in states)


def test_three_members_over_tls_elect_replicate_and_elect_again(mesh):
    _ca, nodes, addrs = mesh
    for i in range(5):
        commit(nodes, SetReplicas("reasoning", i))
    for node in nodes.values():
        assert node._obj.encryptor is None, "Fernet is still on: the mesh secret would still guard the log"
        assert all(node.partners().values())
        peers = {c.peer_id for c in transport_of(node)._connections.values()}
        assert peers == set(addrs) - {node_id for node_id, a in addrs.items() if a == node.address}
    old = leader_of(nodes)
    old.close()
    rest = {k: n for k, n in nodes.items() if n is not old}
    commit(rest, SetReplicas("reasoning", 9))
    assert all(n.state.replicas == rest[next(iter(rest))].state.replicas for n in rest.values())


def test_strangers_without_a_mesh_certificate_cannot_complete_a_handshake(mesh, tmp_path):
    _ca, nodes, addrs = mesh
    leader = leader_of(nodes)
    marker = tmp_path / "pwned"
    other_ca = Authority("another mesh")
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    foreign = other_ca.issue("b").tls().client_context  # a live member's id, signed by another CA
    foreign.check_hostname, foreign.verify_mode = False, ssl.CERT_NONE
    for i, target in enumerate(addrs.values()):
        for payload in [typed_frame(addrs["b"]), frame(zlib.compress(pickle.dumps(Boom(marker)))),
                        frame(getEncryptor(SECRET).encrypt(zlib.compress(pickle.dumps(Boom(marker))))),
                        b"\x16\x03\x01" + b"\x00" * 300]:
            with socket.create_connection(("127.0.0.1", port_of(target)), timeout=5) as s:
                s.sendall(payload)
                assert closed_by_peer(s), f"plain connection kept open after {payload[:12]!r}"
        for context in (no_cert, foreign):
            try:
                with tls_client(target, context) as s:
                    s.sendall(typed_frame(addrs["b"]))
                    assert closed_by_peer(s), "a TLS client without a mesh certificate stayed connected"
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                pass  # refused during the handshake itself
        still_serving(nodes, leader, i)
    assert not marker.exists(), "a member unpickled a stranger's frame"


def test_a_lost_phone_is_refused_by_every_member_once_removed(mesh, tmp_path):
    """A removed member's process keeps its certificate, its key and the old mesh secret: members drop it as soon
    as the state says GONE (before it leaves the Raft group), it cannot connect again, and a frame whose pickle
    would run code, sent over TLS with its certificate, runs nothing."""
    ca, nodes, addrs = mesh
    phone = nodes["c"]
    live = {k: n for k, n in nodes.items() if k != "c"}
    leader_of(nodes).propose(SetMemberState("c", "gone")).result(timeout=WAIT_S)  # c itself may be the leader
    wait_until(lambda: all(n.state.members["c"].state == "gone" for n in live.values()), WAIT_S, "c marked gone")
    # Still in pysyncobj's configuration: only the certificate check keeps it out.
    assert addrs["c"] in live["a"].partners()
    wait_until(lambda: not any(n.partners()[addrs["c"]] for n in live.values()), WAIT_S, "members to drop c")
    leader = leader_of(live)
    seen = phone.state.applied
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # pysyncobj retries every 0.1 s: every retry is refused
        assert not any(n.partners()[addrs["c"]] for n in live.values())
        time.sleep(0.05)
    commit(live, SetReplicas("reasoning", 2))
    assert phone.state.applied == seen, "the removed member still receives the log"
    leader.remove_partner(addrs["c"]).result(timeout=WAIT_S)
    marker = tmp_path / "pwned"
    stolen = ca.issue("c")  # the same id and CA: what a copy of the phone's data dir holds
    fernet = getEncryptor(SECRET)
    for target in (addrs["a"], addrs["b"]):
        for payload in [typed_frame(addrs["c"]), typed_frame(addrs["b"]), typed_frame(addrs["a"]),
                        frame(zlib.compress(pickle.dumps(Boom(marker)))),
                        frame(fernet.encrypt(zlib.compress(pickle.dumps(Boom(marker))))),
                        frame(fernet.encrypt(zlib.compress(pickle.dumps(["status"]))))]:
            with tls_client(target, stolen.client_context()) as s:
                s.sendall(payload)
                assert closed_by_peer(s), f"the removed member's connection stayed open after {payload[:12]!r}"
    still_serving(live, leader, 3)
    assert not marker.exists(), "a member unpickled the removed member's frame"
    assert phone.state.applied == seen


def test_a_member_cannot_speak_for_another_members_address(mesh):
    ca, nodes, addrs = mesh
    leader = leader_of(nodes)
    b = ca.issue("b")
    for target, claimed in [(addrs["a"], addrs["c"]), (addrs["b"], addrs["c"])]:
        with tls_client(target, b.client_context()) as s:
            s.sendall(typed_frame(claimed))
            assert closed_by_peer(s), f"b's certificate was taken for {claimed}"
    still_serving(nodes, leader, 1)


def test_tls_handshakes_and_frames_keep_the_transports_bounds(tmp_path):
    ca = Authority()
    addrs = addresses(2)
    limits = TransportLimits(handshake_timeout_s=0.5)
    node = RaftNode(addrs[1], [addrs[0]], tmp_path / "b", "", TIMING, limits=limits, tls=ca.issue("b").tls())
    try:
        wait_until(lambda: transport_of(node).ready, WAIT_S, "the listener")
        member = ca.issue("a").client_context()
        silent_tcp = socket.create_connection(("127.0.0.1", port_of(addrs[1])), timeout=5)
        silent_tls = tls_client(addrs[1], member)  # TLS done, never says who it is
        started = time.monotonic()
        assert closed_by_peer(silent_tcp, 5) and closed_by_peer(silent_tls, 5)
        assert 0.3 < time.monotonic() - started < 3, "not closed at the handshake deadline"
        silent_tcp.close()
        silent_tls.close()
        with tls_client(addrs[1], member) as s:  # a 2 GiB length prefix inside TLS: refused at once
            s.sendall(struct.pack("i", 2 ** 31 - 1) + b"\x00" * 1000)
            started = time.monotonic()
            assert closed_by_peer(s, 5) and time.monotonic() - started < 1
    finally:
        node.close()


# ---- the rule, and the client side of it ------------------------------------------------------------------

def fixed_state(members: dict[str, str], gone: tuple[str, ...] = ()) -> MeshState:
    """A replicated state naming `members` (node id -> Raft address), the first one creating the mesh."""
    ids = list(members)
    cmds = [InitMesh("m", "fixed", 100.0), add_member(ids[0], members[ids[0]], None),
            CreateToken("t", "0" * 64, 0.0, 1e12, uses=len(ids))]
    cmds += [add_member(i, members[i], "t") for i in ids[1:]]
    cmds += [SetMemberState(i, "gone") for i in gone]
    state = MeshState()
    for cmd in cmds:
        state = apply(state, cmd)
    return state


def test_the_rule_refuses_removed_ids_always_and_wants_the_bound_address_once_caught_up():
    state = fixed_state({"a": "h:1", "b": "h:2", "d": "h:4"}, gone=("d",))
    caught_up = member_authorizer(lambda: state, lambda: True)
    catching_up = member_authorizer(lambda: state, lambda: False)
    new_mesh = member_authorizer(lambda: apply(MeshState(), InitMesh("m", "new", 1.0)), lambda: True)
    assert caught_up("a", "h:1") and caught_up("b", "h:2")
    assert not caught_up("a", "h:2"), "a live member speaking for another member's address"
    assert not caught_up("z", "h:9"), "an id the state does not know"
    assert not caught_up("d", "h:4") and not catching_up("d", "h:4"), "a removed id"
    assert catching_up("z", "h:9") and catching_up("a", "h:2"), "bootstrapping: the CA signature suffices"
    assert new_mesh("z", "h:9"), "a mesh with no member yet"


def serve_once(listener: socket.socket, cert) -> bytes:
    """Accepts the member's next dial with `cert` as the server's certificate; what the member sent after TLS
    (b"" if it closed instead)."""
    listener.settimeout(WAIT_S)
    raw, _ = listener.accept()
    raw.settimeout(5)
    try:
        with cert.server_context().wrap_socket(raw, server_side=True) as s:  # the member may close in it
            return s.recv(65536)
    except (ConnectionResetError, ssl.SSLError):
        return b""
    finally:
        raw.close()


def test_as_client_a_member_refuses_a_server_not_bound_to_the_address_it_dialled(tmp_path):
    ca = Authority()
    low, high, other, spare = addresses(4)  # pysyncobj: `high` dials `low`
    state = fixed_state({"x": low, "a": high, "b": other, "d": spare}, gone=("d",))
    authorize = member_authorizer(lambda: state, lambda: True)
    listener = socket.create_server(("127.0.0.1", port_of(low)))
    node = RaftNode(high, [low], tmp_path / "a", "", TIMING, tls=ca.issue("a").tls(authorize))
    try:
        assert serve_once(listener, ca.issue("b")) == b"", "took a live member's certificate at another's address"
        assert serve_once(listener, ca.issue("d")) == b"", "took a removed member's certificate"
        assert serve_once(listener, ca.issue("x")) != b"", "refused the member bound to the address"
    finally:
        node.close()
        listener.close()


def test_a_member_changes_only_its_own_addresses_profile_and_authority(mesh):
    """Issue 14, item 1: a follower forwarding a re-announce of another member (its addresses pointed
    elsewhere), or another member's SetAuthority (clearing an authority's flag would make its removal owe no
    CA rotation), is refused on the leader; its own re-announce and SetAuthority go through."""
    _, nodes, addrs = mesh
    leader = leader_of(nodes)
    follower_id, follower = next((k, n) for k, n in nodes.items() if n is not leader)
    victim = next(k for k, n in nodes.items() if n is not follower)
    before = leader.state.members[victim]
    forged = AddMember(node_id=victim, name=victim, http_address="10.9.9.9:1", raft_address=addrs[victim],
                       profile={}, joined_at=time.time())
    with pytest.raises((ProposalFailed, TimeoutError)):  # refused at the leader: the forward is dropped
        follower.propose(forged).result(timeout=3)
    own = AddMember(node_id=follower_id, name=follower_id, http_address="127.0.0.1:7",
                    raft_address=addrs[follower_id], profile={"cores": 3}, joined_at=time.time())
    wait_until(lambda: _proposed(follower, own), 30, "the follower's own re-announce to commit")
    assert leader.state.members[follower_id].http_address == "127.0.0.1:7"
    with pytest.raises((ProposalFailed, TimeoutError)):
        follower.propose(SetAuthority(victim, not before.authority)).result(timeout=3)
    wait_until(lambda: _proposed(follower, SetAuthority(follower_id, True)), 30, "the follower's own SetAuthority")
    assert leader.state.members[follower_id].authority
    still_serving(nodes, leader, 5)
    assert leader.state.members[victim] == before  # checked after later entries committed: it never was


def _proposed(node: RaftNode, cmd) -> bool:
    """Proposes `cmd` once; True when it committed (False while the connection the refusal dropped is back)."""
    try:
        node.propose(cmd).result(timeout=5)
        return True
    except (ProposalFailed, TimeoutError):  # while the follower reconnects: the caller retries (bounded)
        return False


def test_the_proposer_rule():
    from raft.wire import proposer_may_send

    assert proposer_may_send("a", {"kind": "add_member", "node_id": "a", "token_id": None})
    assert not proposer_may_send("a", {"kind": "add_member", "node_id": "b", "token_id": None})
    assert not proposer_may_send("a", {"kind": "add_member", "node_id": "a", "token_id": "t"})  # joins: the leader's
    assert proposer_may_send("a", {"kind": "update_profile", "node_id": "a"})
    assert not proposer_may_send("a", {"kind": "update_profile", "node_id": "b"})
    assert proposer_may_send("a", {"kind": "set_replicas", "role": "reasoning", "count": 1})
