"""A connection outlives the trust it was opened under; RetireCas must not (issue 14, CA rotation follow-ups).

The attacker: a removed authority's copy of the old CA key mints a certificate for a live member's id (ids are
public) during the cross-over, while the old CA is still trusted, and opens a keep-alive connection to the peer
port and an HTTP/2 connection to the gRPC port. After RetireCas it keeps using them. Real TLS on loopback, a
real uvicorn peer port (PeerGate), a real gRPC server (MemberOnly), real certificates, the member's trusted CAs
(ca.pem) in a real LiveIdentity, as TrustKeeper makes it follow the log. The other way: a member's own peer
client pools built with the old trust are closed once what they carry is done."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import grpc
import httpx
import pytest

from mesh.security.grpc_tls import MemberOnly, channel_credentials, server_credentials, target_for
from mesh.security.peer_tls import MemberTransport, PeerGate, peer_server
from mesh.security.pki import NodeIdentity, create_ca, fingerprint, issue_node_certificate, make_bundle
from mesh.security.renewal import LiveIdentity
from raft.commands import InitMesh
from raft.records import Member
from raft.state import MeshState, apply
from tests.asgi_serving import HANDS_OFF, serving

ECHO = "/quorum.test.Echo/Say"


@pytest.fixture(scope="module")
def cas():
    return create_ca("t"), create_ca("t", "next")


class Mesh:
    """Member a (its certificate from the new CA) mid-rotation: the log and a's ca.pem trust old and new; `retire`
    is RetireCas applied, and a following it (TrustKeeper._follow)."""

    def __init__(self, cas) -> None:
        (old, old_key), (new, new_key) = cas
        self.new = new
        self.both = make_bundle(new, [old])
        state = apply(MeshState(), InitMesh("m1", "t", 1.0))
        members = {i: Member(i, i, "", f"127.0.0.1:{n}", {}, "active", 1.0) for n, i in enumerate(("a", "c"))}
        self.state = dataclasses.replace(state, members=members, trusted_cas=((fingerprint(old), old.decode()),
                                                             (fingerprint(new), new.decode())),
                                         signing_ca=fingerprint(new))
        self.live = LiveIdentity(NodeIdentity(*issue_node_certificate(new, new_key, "a"), self.both))
        self.forged = NodeIdentity(*issue_node_certificate(old, old_key, "c"), self.both)  # the stolen old key
        self.honest = NodeIdentity(*issue_node_certificate(new, new_key, "c"), self.both)  # c's renewed one

    def is_member(self, node_id: str) -> bool:
        return node_id in self.state.members

    def retire(self) -> None:
        self.state = dataclasses.replace(self.state, trusted_cas=((fingerprint(self.new), self.new.decode()),))
        self.live.replace(dataclasses.replace(self.live(), ca_pem=self.new))


async def ok_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"served"})


def client_port(response: httpx.Response) -> int:
    """The client's own port of the connection that carried `response`: the same port, the same connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_a_peer_port_keep_alive_connection_from_a_retired_ca_serves_nothing_after_retirement(cas):
    mesh = Mesh(cas)
    server = peer_server(PeerGate(ok_app, lambda: mesh.state, lambda: mesh.live().ca_pem), mesh.live(),
                         is_member=mesh.is_member, context=mesh.live.server_context())

    async def check(port: int) -> None:
        url = f"https://127.0.0.1:{port}/control/v1/status"
        async with httpx.AsyncClient(verify=mesh.forged.client_context(), timeout=HANDS_OFF) as thief, \
                httpx.AsyncClient(verify=mesh.honest.client_context(), timeout=HANDS_OFF) as member:
            before, honest_before = await thief.get(url), await member.get(url)
            assert (before.status_code, honest_before.status_code) == (200, 200)  # the cross-over: both CAs
            mesh.retire()
            after = await thief.get(url)
            assert client_port(after) == client_port(before), "not the connection opened before RetireCas"
            assert after.status_code == 403 and after.json()["error"]["code"] == "ca_retired", after.text
            honest_after = await member.get(url)  # a member renewed under the new CA keeps its connection
            assert honest_after.status_code == 200 and client_port(honest_after) == client_port(honest_before)
        async with httpx.AsyncClient(verify=mesh.forged.client_context(), timeout=HANDS_OFF) as fresh:
            with pytest.raises(httpx.TransportError):  # a new connection: the handshake refuses it
                await fresh.get(url)

    asyncio.run(serving(server, check))


def test_a_grpc_connection_from_a_retired_ca_serves_no_call_after_retirement(cas):
    mesh = Mesh(cas)

    async def echo(request: bytes, context) -> bytes:
        return request

    async def go() -> None:
        server = grpc.aio.server(interceptors=[MemberOnly(mesh.is_member, lambda: mesh.live().ca_pem)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "quorum.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(echo)}),))
        address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', server_credentials(mesh.live))}"
        await server.start()
        try:
            async with grpc.aio.secure_channel(address, channel_credentials(mesh.forged), [target_for("a")]) as thief, \
                    grpc.aio.secure_channel(address, channel_credentials(mesh.honest), [target_for("a")]) as member:
                assert await thief.unary_unary(ECHO)(b"x", timeout=HANDS_OFF) == b"x"  # the cross-over
                assert await member.unary_unary(ECHO)(b"y", timeout=HANDS_OFF) == b"y"
                mesh.retire()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await thief.unary_unary(ECHO)(b"x", timeout=HANDS_OFF)
                # PERMISSION_DENIED, not UNAVAILABLE: the call came over the connection opened before (a new one
                # fails its handshake, below), and the server refused it
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
                assert "no longer trusts" in refused.value.details()
                assert await member.unary_unary(ECHO)(b"y", timeout=HANDS_OFF) == b"y"
            async with grpc.aio.secure_channel(address, channel_credentials(mesh.forged), [target_for("a")]) as fresh:
                with pytest.raises(grpc.aio.AioRpcError) as handshake:
                    await fresh.unary_unary(ECHO)(b"x", timeout=HANDS_OFF)
                assert handshake.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(go())


class Listener:
    """A real HTTPS/1.1 listener with a's certificate that says when each connection ends. GET /slow sends half its
    body, then the rest once `release` is set."""

    def __init__(self) -> None:
        self.ended: asyncio.Queue[int] = asyncio.Queue()
        self.release = asyncio.Event()
        self.opened = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        number = self.opened
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /slow "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nha")
                    await writer.drain()
                    await self.release.wait()
                    writer.write(b"lf")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the client closed the connection: what is recorded
        finally:
            writer.close()
            self.ended.put_nowait(number)


def test_peer_client_pools_built_with_the_old_trust_are_closed_once_what_they_carry_is_done(cas):
    (old, old_key), (new, new_key) = cas
    mesh = Mesh(cas)
    member = LiveIdentity(NodeIdentity(*issue_node_certificate(new, new_key, "c"), mesh.both))

    async def go() -> None:
        listener = Listener()
        server = await asyncio.start_server(listener.handle, "127.0.0.1", 0, ssl=mesh.live().server_context())
        base = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, httpx.AsyncClient(transport=MemberTransport(member, lambda address: "a"),
                                             timeout=HANDS_OFF) as client:
            async with client.stream("GET", f"{base}/slow") as streaming:  # connection 1, under the old trust
                member.replace(dataclasses.replace(member(), ca_pem=new))  # RetireCas followed: the trust changed
                assert (await client.get(f"{base}/fast")).text == "ok"  # connection 2, a new pool
                assert listener.ended.empty()
                listener.release.set()
                assert await streaming.aread() == b"half"  # the relayed stream finished on its own connection
            assert await asyncio.wait_for(listener.ended.get(), HANDS_OFF) == 1  # closed once the stream was done
            member.replace(dataclasses.replace(member(), ca_pem=make_bundle(new, [create_ca("t", "3")[0]])))
            assert (await client.get(f"{base}/fast")).text == "ok"  # connection 3; connection 2 was idle:
            assert await asyncio.wait_for(listener.ended.get(), HANDS_OFF) == 2  # closed at the change
            assert listener.opened == 3

    asyncio.run(go())
