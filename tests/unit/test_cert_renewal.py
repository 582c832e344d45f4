"""Short-lived node certificates that name their member (mesh/security/pki.py), renewed in place
(mesh/security/renewal.py), and clients that accept only the member they meant to reach (peer_tls, grpc_tls)."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.security.authority import Authority, qualifies
from mesh.security.grpc_tls import channel_credentials, server_credentials, target_for
from mesh.security.peer_tls import peer_client
from mesh.security.pki import (
    NodeIdentity,
    PkiError,
    certificate_request,
    create_ca,
    issue_node_certificate,
    lifetime,
    new_key,
    node_id_of,
    sign_request,
)
from mesh.security.renewal import LiveIdentity, Renewer, due
from proto import mesh_pb2
from raft.state import MeshState
from raft.tls import RaftTls


@pytest.fixture(scope="module")
def ca():
    return create_ca("t")


def ident(ca, node_id: str, days: float = 30) -> NodeIdentity:
    key, cert = issue_node_certificate(ca[0], ca[1], node_id, days)
    return NodeIdentity(key, cert, ca[0])


def test_a_node_certificate_names_its_id_and_lasts_30_days(ca):
    cert = ident(ca, "abc123").cert_pem
    start, end = lifetime(cert)
    assert node_id_of(cert) == "abc123"
    assert abs((end - start) - (30 * 86400 + 300)) < 5
    assert not due(cert, time.time()) and due(cert, start + (end - start) * 0.67)
    with pytest.raises(PkiError):
        sign_request(ca[0], ca[1], certificate_request(new_key(), "x"), "not an id.x")


def test_authorities_auto_are_desktop_server_and_pi_voters_only():
    assert qualifies("auto", "n", "desktop", False) and qualifies("auto", "n", "raspberry-pi", False)
    assert not qualifies("auto", "n", "termux-phone", False) and not qualifies("auto", "n", "openwrt-router", False)
    assert not qualifies("auto", "n", "desktop", True)
    assert qualifies(("pi5",), "pi5", "termux-phone", False) and not qualifies(("pi5",), "tower", "desktop", False)


def test_renewal_writes_a_new_key_and_every_context_follows(ca, tmp_path):
    old = ident(ca, "n1")
    live = LiveIdentity(old)
    raft_tls = RaftTls.from_pem(old.cert_pem, old.key_pem, old.ca_pem)
    live.on_change(lambda i: raft_tls.reload(i.cert_pem, i.key_pem, i.ca_pem))
    before = raft_tls.server_context
    authority = Authority("n1", lambda: ca[0], lambda: ca[1], MeshState, list, lambda: None, days=30)

    async def go() -> tuple[bytes, bytes]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=live.server_context())
        port = server.sockets[0].getsockname()[1]
        async with server:
            new = await Renewer(live, tmp_path, "n1", authority.sign).renew()
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ident(ca, "n2").client_context())
            served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            return new.cert_pem, served

    cert, served = asyncio.run(go())
    assert x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER) == served, \
        "the peer port's context still serves the old certificate"
    assert live().cert_pem == cert != old.cert_pem and (tmp_path / "node.pem").read_bytes() == cert
    assert (tmp_path / "node.key").stat().st_mode & 0o077 == 0
    assert raft_tls.server_context is not before, "Raft's contexts were not swapped"
    assert live.grpc_channel_credentials() is live.grpc_channel_credentials()


def test_peer_clients_accept_only_the_member_at_the_address(ca):
    server_id, member = ident(ca, "leader"), ident(ca, "member")

    async def go() -> list[str]:
        async def handle(reader, writer):
            await reader.read(1)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_id.server_context())
        port = server.sockets[0].getsockname()[1]
        outcomes = []
        async with server:
            for expected in ("leader", "someone-else", None):
                async with peer_client(member, 5, expect=lambda address, e=expected: e) as client:
                    try:
                        outcomes.append(str((await client.get(f"https://127.0.0.1:{port}/")).status_code))
                    except httpx.ConnectError as exc:
                        outcomes.append("refused: " + str(exc)[:60])
        return outcomes

    ok, other, nobody = asyncio.run(go())
    assert ok == "200" and other.startswith("refused") and nobody.startswith("refused: no live member")


def test_grpc_server_serves_the_renewed_certificate_and_clients_check_the_id(ca):
    live = LiveIdentity(ident(ca, "old-id"))
    client = channel_credentials(ident(ca, "caller"))

    async def health(port: int, node_id: str) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client, options=[target_for(node_id)]) as channel:
            call = channel.unary_unary("/quorum.mesh.v1.Shard/Health",
                                       request_serializer=mesh_pb2.HealthRequest.SerializeToString,
                                       response_deserializer=mesh_pb2.HealthReply.FromString)
            try:
                await call(mesh_pb2.HealthRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    async def go() -> list[grpc.StatusCode]:
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", server_credentials(live))
        await server.start()
        try:
            first = [await health(port, "old-id"), await health(port, "new-id")]
            live.replace(ident(ca, "new-id"))  # a stand-in for a renewal that makes the change visible
            return first + [await health(port, "new-id"), await health(port, "old-id")]
        finally:
            await server.stop(0)

    past_tls, refused, after, refused_after = asyncio.run(go())
    assert past_tls == after == grpc.StatusCode.UNIMPLEMENTED  # TLS done; the bare server has no Shard service
    assert refused == refused_after == grpc.StatusCode.UNAVAILABLE
