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

from mesh.replicas.remote_shard import RemoteShard
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


def test_after_a_renewal_new_peer_requests_present_the_new_certificate_not_a_pooled_connection(ca):
    """A keep-alive connection presents the certificate it was opened with. One opened before a renewal still
    presents a certificate of the CA that a rotation retires next, which the peer refuses from then on (403): so a
    renewal retires the pools, and the next request opens a connection with the certificate held now."""
    leader, live = ident(ca, "leader"), LiveIdentity(ident(ca, "member"))
    seen: list[bytes] = []  # the client certificate of each connection the server accepted

    async def go() -> None:
        async def handle(reader, writer):
            seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            while await reader.readuntil(b"\r\n\r\n"):  # keep-alive: one answer per request, until the client goes
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=leader.server_context())
        port = server.sockets[0].getsockname()[1]
        async with server, peer_client(live, 5, expect=lambda address: "leader") as client:
            assert (await client.get(f"https://127.0.0.1:{port}/")).status_code == 200
            assert (await client.get(f"https://127.0.0.1:{port}/")).status_code == 200
            assert len(seen) == 1, "the second request reuses the pooled connection"
            live.replace(ident(ca, "member"))  # renewed: a new key and certificate, the same CA
            assert (await client.get(f"https://127.0.0.1:{port}/")).status_code == 200

    asyncio.run(go())
    first, renewed = (x509.load_der_x509_certificate(der).serial_number for der in seen)
    assert len(seen) == 2 and first != renewed
    assert renewed == x509.load_pem_x509_certificate(live().cert_pem).serial_number


def test_a_busy_remote_shard_takes_a_new_channel_for_new_calls_after_a_renewal():
    """gRPC likewise: new calls take a channel made with the renewed credentials even while calls run on the old
    one, which is kept (dropping it would cancel them) until no call runs."""
    creds = [grpc.ssl_channel_credentials()]
    shard = RemoteShard("127.0.0.1:1", "reasoning", "m", "n1", credentials=lambda: creds[0])

    async def go() -> None:
        old = shard.channel()
        shard.load = 2  # calls running on it
        creds[0] = grpc.ssl_channel_credentials()  # renewed
        new = shard.channel()
        assert new is not old and shard.channel() is new
        assert shard._retired == [old], "the old channel is dropped while calls run on it"
        shard.load = 0
        assert shard.channel() is new and shard._retired == []
        await shard.close()

    asyncio.run(go())
