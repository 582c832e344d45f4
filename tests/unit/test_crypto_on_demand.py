"""cryptography only on demand (issue 15: a witness's memory): what a member does at start and while idle imports
none of it, and the checks of peers' certificates that skip their own signature check do so only while every CA
the connection's handshake trusted is still trusted (mesh/security/held_trust.py, raft/tls.py RaftTls.reload)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import ssl
import subprocess
import sys

import httpx
import pytest

import raft.tls
from mesh.security import held_trust
from mesh.security.peer_tls import PeerGate, peer_server
from mesh.security.pki import NodeIdentity, create_ca, issue_node_certificate, make_bundle
from mesh.security.renewal import LiveIdentity
from raft.commands import InitMesh
from raft.records import Member
from raft.state import MeshState, apply
from raft.tls import RaftTls, TlsSession
from tests.asgi_serving import HANDS_OFF, serving
from tests.procs import REPO
from tests.tls_sessions import handshake

STEADY = """
import json, sys, time
from pathlib import Path

given = {k: v.encode("latin-1") for k, v in json.loads(Path(sys.argv[1]).read_text()).items()}
import mesh.cli.meshd, mesh.node.bootstrap, mesh.node.daemon  # what meshd start imports
from mesh.security.held_trust import still_trusted, verified_against
from mesh.security.own_cert import holds_from, own_issuer
from mesh.security.pki import NodeIdentity, fingerprint, lifetime, node_id_of
from mesh.security.renewal import LiveIdentity, due
from raft.tls import RaftTls

me = NodeIdentity(given["key"], given["cert"], given["bundle"])
live = LiveIdentity(me)
server = live.server_context()
assert me.node_id == "w1" and node_id_of(me.cert_pem) == "w1" and not due(me.cert_pem, time.time())
assert lifetime(me.cert_pem)[0] < time.time() and len(fingerprint(me.ca_pem)) == 43
assert holds_from(me.cert_pem, me.key_pem, me.ca_pem) and own_issuer(me.cert_pem, me.key_pem, me.ca_pem)
raft_tls = RaftTls.from_pem(me.cert_pem, me.key_pem, me.ca_pem)
raft_tls.reload(me.cert_pem, me.key_pem, me.ca_pem)
live.replace(NodeIdentity(me.key_pem, me.cert_pem, me.ca_pem))
assert still_trusted(given["peer"], me.ca_pem, verified_against(server))
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] == "cryptography")))
"""


def test_a_members_start_and_idle_checks_import_no_cryptography(tmp_path):
    ca, ca_key = create_ca("lean")
    key, cert = issue_node_certificate(ca, ca_key, "w1")
    peer = ssl.PEM_cert_to_DER_cert(issue_node_certificate(ca, ca_key, "a")[1].decode())
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"key": key.decode(), "cert": cert.decode(), "bundle": ca.decode(),
                                 "peer": peer.decode("latin-1")}))
    done = subprocess.run([sys.executable, "-c", STEADY, str(given)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


async def ok_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def cas():
    return create_ca("t"), create_ca("t", "next")


def test_the_peer_port_checks_signatures_only_once_a_ca_its_connection_trusted_is_dropped(cas, monkeypatch):
    (old, old_key), (new, new_key) = cas
    checked: list[bytes] = []
    signature_check = held_trust._issued_by_any
    monkeypatch.setattr(held_trust, "_issued_by_any", lambda cert, trusted: checked.append(trusted) or
                        signature_check(cert, trusted))
    state = apply(MeshState(), InitMesh("m1", "t", 1.0))
    state = dataclasses.replace(state, members={i: Member(i, i, "", f"127.0.0.1:{n}", {}, "active", 1.0)
                                                for n, i in enumerate(("a", "c"))})
    live = LiveIdentity(NodeIdentity(*issue_node_certificate(old, old_key, "a"), old))
    member = NodeIdentity(*issue_node_certificate(old, old_key, "c"), old)
    renewed = NodeIdentity(*issue_node_certificate(new, new_key, "c"), make_bundle(new, [old]))
    server = peer_server(PeerGate(ok_app, lambda: state, lambda: live().ca_pem), live(),
                         is_member=lambda node_id: node_id in state.members, context=live.server_context())

    async def check(port: int) -> None:
        url = f"https://127.0.0.1:{port}/control/v1/status"
        async with httpx.AsyncClient(verify=member.client_context(), timeout=HANDS_OFF) as held, \
                httpx.AsyncClient(verify=renewed.client_context(), timeout=HANDS_OFF) as fresh:
            assert (await held.get(url)).status_code == 200
            live.replace(dataclasses.replace(live(), ca_pem=make_bundle(new, [old])))  # a rotation: trust grows
            assert (await held.get(url)).status_code == 200 and (await fresh.get(url)).status_code == 200
            assert checked == []  # every CA those handshakes trusted is trusted: OpenSSL's verification holds
            live.replace(dataclasses.replace(live(), ca_pem=new))  # the old CA retired
            refused = await held.get(url)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "ca_retired"
            assert (await fresh.get(url)).status_code == 200  # from the new CA: checked, and kept
            assert checked == [new, new]

    asyncio.run(serving(server, check))


def get(context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> tuple[int, ssl.SSLSession, bool]:
    """GET / over a connection of its own, resuming `session` if given: (status, session, whether it resumed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANDS_OFF) as raw, \
            context.wrap_socket(raw, session=session) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        # No answer at all: the server ended the connection (a TLS 1.3 server refuses a client certificate after
        # the client's side of the handshake is done).
        return (int(answer.split()[1]) if answer else 0), tls.session, tls.session_reused


def test_the_peer_port_resumes_no_session_from_before_a_ca_was_dropped(cas):
    """The peer port offers no session to resume (TLS 1.3 without tickets): a client that kept its session from
    before RetireCas makes a full handshake, which the retired CA's certificate fails. (A resumed session, were one
    offered, would get the full signature check: PeerProtocol passes held_trust no verified set for it.)"""
    (old, old_key), (new, new_key) = cas
    state = apply(MeshState(), InitMesh("m1", "t", 1.0))
    state = dataclasses.replace(state, members={"c": Member("c", "c", "", "127.0.0.1:1", {}, "active", 1.0)})
    both = make_bundle(new, [old])
    live = LiveIdentity(NodeIdentity(*issue_node_certificate(new, new_key, "a"), both))
    forged = NodeIdentity(*issue_node_certificate(old, old_key, "c"), both).client_context()  # the old key's copy
    server = peer_server(PeerGate(ok_app, lambda: state, lambda: live().ca_pem), live(),
                         is_member=lambda node_id: node_id in state.members, context=live.server_context())

    async def check(port: int) -> None:
        status, session, resumed = await asyncio.to_thread(get, forged, port)
        assert status == 200 and not resumed  # the cross-over: both CAs trusted
        live.replace(dataclasses.replace(live(), ca_pem=new))  # the old CA retired
        try:
            status, _, resumed = await asyncio.to_thread(get, forged, port, session)
        except (ssl.SSLError, ConnectionError):
            return  # the full handshake refused the retired CA's certificate
        assert not resumed and status in (0, 403), (status, resumed)

    asyncio.run(serving(server, check))
    assert held_trust.still_trusted(b"not a certificate", new, None) is False  # no verified set: the full check


def test_raft_reloads_check_signatures_only_once_a_ca_a_session_trusted_is_dropped(cas, monkeypatch):
    (old, old_key), (new, new_key) = cas
    checked: list[bytes | None] = []
    signature_check = raft.tls._issued
    monkeypatch.setattr(raft.tls, "_issued", lambda der, ca: checked.append(der) or signature_check(der, ca))
    server_key, server_cert = issue_node_certificate(old, old_key, "a")
    raft_tls = RaftTls.from_pem(server_cert, server_key, old)
    key, cert = issue_node_certificate(old, old_key, "c")
    client, session = TlsSession(RaftTls.from_pem(cert, key, old).client_context, False), \
        TlsSession(raft_tls.server_context, True)
    handshake(client, session)
    raft_tls.reload(server_cert, server_key, old)  # a renewal: the same CA
    raft_tls.reload(server_cert, server_key, make_bundle(new, [old]))  # a rotation: trust grows
    assert checked == [] and not session.revoked
    raft_tls.reload(server_cert, server_key, new)  # the old CA retired: this session's peer is checked, and dropped
    assert checked == [session.peer_der] and session.revoked  # one CA trusted now: one signature check
