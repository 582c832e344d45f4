"""mesh/replicas/rpc_tunnel.py: the only way between members to a pipeline stage (llama.cpp RPC has no
authentication). An echo server stands in for the stage process; certificates come from a real mesh CA."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from mesh.replicas.rpc_tunnel import HeadTunnel, StageTunnelServer, peer_node_id
from mesh.security.pki import NodeIdentity, create_ca, issue_node_certificate, node_dns_name

CA = create_ca("tunnel-test")
OTHER_CA = create_ca("another-mesh")
WAIT_S = 10.0


def identity(node_id: str, ca=CA) -> NodeIdentity:
    key, cert = issue_node_certificate(ca[0], ca[1], node_id)
    return NodeIdentity(key, cert, ca[0])


HEAD, STAGE, OTHER = identity("head1"), identity("stage1"), identity("other1")


async def echo_stage() -> tuple[asyncio.AbstractServer, str]:
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def with_tunnel(body, stage_identity: NodeIdentity = STAGE) -> StageTunnelServer:
    """Runs `body(server, stage endpoint)` with an echo stage behind a StageTunnelServer that lets only head1
    through, for model "m"."""
    stage, endpoint = await echo_stage()
    server = StageTunnelServer("127.0.0.1", 0, stage_identity.server_context(),
                               lambda caller, model: endpoint if (caller, model) == ("head1", "m") else None)
    await server.start()
    try:
        await asyncio.wait_for(body(server), WAIT_S)
    finally:
        await server.close()
        stage.close()
        await stage.wait_closed()
    return server


async def through_head_tunnel(server: StageTunnelServer, who: NodeIdentity, stage_id: str = "stage1",
                              model: str = "m") -> bytes:
    """What comes back through a HeadTunnel (as `who`, expecting `stage_id`) after sending b"ping"."""
    tunnel = HeadTunnel(model, lambda: (f"127.0.0.1:{server.bound_port}", stage_id), who.client_context)
    endpoint = await tunnel.start()
    try:
        host, port = endpoint.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"ping")
        await writer.drain()
        got = await reader.read(4)  # b"" when the tunnel closed the connection
        writer.close()
        return got
    finally:
        await tunnel.close()


def test_the_head_member_reaches_its_stage():
    async def body(server):
        assert await through_head_tunnel(server, HEAD) == b"ping"

    asyncio.run(with_tunnel(body))


def test_a_member_that_is_not_the_head_is_refused_before_reaching_the_stage():
    async def body(server):
        assert await through_head_tunnel(server, OTHER) == b""
        assert await through_head_tunnel(server, HEAD, model="another-model") == b""
        assert server.refused == 2

    asyncio.run(with_tunnel(body))


def test_a_head_checks_it_reached_the_stage_member_it_meant():
    """A listener holding another member's certificate (or a stage expected under another id) never gets the
    head's bytes: the TLS handshake fails on the name ID.quorum-node."""
    async def body(server):
        assert await through_head_tunnel(server, HEAD, stage_id="someone-else") == b""
        assert server.refused == 0  # the handshake failed on the head's side: nothing reached the authorization

    asyncio.run(with_tunnel(body))


@pytest.mark.parametrize("client", ["no certificate", "another mesh's certificate"])
def test_a_stranger_cannot_open_the_tunnel(client):
    """Reference: issue #17, "a stranger without a member certificate cannot reach a stage"."""
    async def body(server):
        if client == "no certificate":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = identity("head1", OTHER_CA).client_context()  # even one naming the head
            context.verify_mode = ssl.CERT_NONE
        got = b""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port, ssl=context)
            writer.write(b"m\nping")
            await writer.drain()
            got = await reader.read(4)
            writer.close()
        except (ssl.SSLError, ConnectionError):
            pass  # refused during or right after the handshake (TLS 1.3 reports a client alert on first read)
        assert got == b""

    asyncio.run(with_tunnel(body))


def test_peer_node_id_needs_the_name_in_the_san():
    cert = {"subject": ((("commonName", "n1"),),), "subjectAltName": (("DNS", node_dns_name("n1")),)}
    assert peer_node_id(cert) == "n1"
    assert peer_node_id({"subject": ((("commonName", "n1"),),), "subjectAltName": ()}) is None
    assert peer_node_id(None) is None


def test_the_head_tunnel_knows_who_connects_locally():
    """The loopback port speaks for the member: it looks up the connecting socket's owner (this test's user)."""
    import os
    from pathlib import Path

    from mesh.replicas.rpc_tunnel import peer_uid

    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp here")
    seen = []

    async def body():
        async def record(reader, writer):
            seen.append(peer_uid(writer))
            writer.close()

        server = await asyncio.start_server(record, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await reader.read()  # closed by the server once it looked
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(body(), WAIT_S))
    assert seen == [os.getuid()]
