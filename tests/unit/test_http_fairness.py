"""Connection caps (mesh/security/http_guard.py) on real sockets: connections per client address,
and the peer port's own small pool for connections without a live member's certificate (joins),
from which members (real TLS, mesh certificates) are exempt.

Hostile input tried here: more connections from one address than the cap; more certificate-less
(joining) connections to the peer port than its pool, and a removed member's certificate among them.
"""

from __future__ import annotations

import asyncio
import ssl

from mesh.security import http_guard
from mesh.security.http_guard import ConnectionLimits, public_server
from mesh.security.peer_tls import peer_server
from mesh.security.pki import NodeIdentity, create_ca, issue_node_certificate, trusting
from tests.asgi_serving import HANDS_OFF, serving


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def status_of(port: int, context: ssl.SSLContext | None = None) -> tuple[int, asyncio.StreamWriter]:
    """Opens a connection and asks for /; the status (a refused connection is answered at once) and the
    still-open writer (close it to free the slot)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="quorum-node" if context else None)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    line = await asyncio.wait_for(reader.readuntil(b"\r\n"), HANDS_OFF)
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDS_OFF)
    return int(line.split()[1]), writer


async def until_status(port: int, wanted: int, context: ssl.SSLContext | None = None) -> None:
    """Waits (bounded) until a new connection is answered `wanted` (a closed one frees its slot a
    moment after the client closes)."""
    for _ in range(200):
        status, writer = await status_of(port, context)
        writer.close()
        if status == wanted:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never answered {wanted}")


def test_connections_per_address_are_capped_and_a_closed_one_frees_its_slot(monkeypatch):
    """Tests connect over loopback, which is not capped by address (see the next test): here it is
    taken for a LAN neighbour's address."""
    monkeypatch.setattr(http_guard, "_loopback", lambda address: False)
    limits = ConnectionLimits(request_timeout_s=30, max_per_address=3)

    async def check(port):
        held = [await status_of(port) for _ in range(3)]
        assert [s for s, _ in held] == [200, 200, 200]  # kept alive: they stay open and count
        refused, writer = await status_of(port)
        assert refused == 429
        writer.close()
        held[0][1].close()
        await until_status(port, 200)
        for _, w in held[1:]:
            w.close()
    asyncio.run(serving(public_server(app, limits), check))


def test_loopback_clients_are_not_capped_by_address():
    """Every local program shares 127.0.0.1: a runaway local script must not lock meshctl out."""
    assert http_guard._loopback("127.0.0.1") and http_guard._loopback("::1")
    assert not http_guard._loopback("192.168.1.7") and not http_guard._loopback("fe80::1%eth0")
    limits = ConnectionLimits(request_timeout_s=30, max_per_address=2)

    async def check(port):
        held = [await status_of(port) for _ in range(4)]
        assert [s for s, _ in held] == [200] * 4
        for _, w in held:
            w.close()
    asyncio.run(serving(public_server(app, limits), check))


def identities():
    ca, ca_key = create_ca("test")
    made = {}
    for node_id in ("leader", "member", "removed"):
        key, cert = issue_node_certificate(ca, ca_key, node_id)
        made[node_id] = NodeIdentity(key_pem=key, cert_pem=cert, ca_pem=ca)
    return made


def client_context(identity: NodeIdentity | None, ca: bytes) -> ssl.SSLContext:
    return identity.client_context() if identity is not None else trusting(ca)


def test_the_peer_port_keeps_strangers_in_a_small_pool_and_members_outside_every_cap():
    ids = identities()
    ca = ids["leader"].ca_pem
    limits = ConnectionLimits(request_timeout_s=30, max_per_address=2, stranger_pool=2)
    server = peer_server(app, ids["leader"], limits, is_member=lambda node_id: node_id in ("leader", "member"))

    async def check(port):
        joiners = [await status_of(port, client_context(None, ca)) for _ in range(2)]
        assert [s for s, _ in joiners] == [200, 200]
        # The pool is full: another joiner, and a removed member (a certificate, but no member), get 503.
        for who in (None, ids["removed"]):
            status, writer = await status_of(port, client_context(who, ca))
            writer.close()
            assert status == 503
        # A member is served however many connections strangers and it hold from this address.
        members = [await status_of(port, client_context(ids["member"], ca)) for _ in range(5)]
        assert [s for s, _ in members] == [200] * 5
        for _, w in joiners + members:
            w.close()
        await until_status(port, 200, client_context(None, ca))
    asyncio.run(serving(server, check))


def test_each_server_counts_its_own_connections():
    limits = ConnectionLimits(max_per_address=1)
    first, second = public_server(app, limits), public_server(app, limits)
    assert first.config.http._open is not second.config.http._open
