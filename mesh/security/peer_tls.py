"""The HTTPS peer port: what members send each other over HTTP, inside TLS with mesh certificates.

Two things travel here: joins (a new node, which has no certificate yet, sends its token secret and
certificate request only after checking this port's certificate against the token's CA fingerprint)
and requests a member relays to the leader (chat streams, completions, control calls), which carry
the member's own certificate. Everything but a join needs a client certificate from the mesh CA whose
node id is a live member, from a CA this member still trusts (checked on every request: a keep-alive
connection opened before a CA rotation retired its certificate's CA serves nothing after it); anything else is
refused with 403 before the app sees it.

The other way, `peer_client` sends a request only to the member the address belongs to
(`expect(host:port)` -> its node id, from the replicated member list): TLS must present that member's
certificate (the name `ID.quorum-node` in its SAN), so a removed member, or any other one, posing as the
leader's peer port is refused before a byte of the request (API keys, admin credentials) leaves. Once the
trusted CAs change, its connection pools built with the old trust take no request and are closed (at its next
request, or when the last response one carries is closed).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.core.errors import ApiError
from mesh.security.held_trust import still_trusted, verified_against
from mesh.security.http_guard import ConnectionLimits, GuardedH11Protocol, QuietServer, guarded, guarded_server
from mesh.security.pki import NodeIdentity, der_fingerprint, load_identity, node_dns_name
from raft.state import MeshState
from raft.vocab import MemberState

log = logging.getLogger("quorum.peer")

JOIN_PATH = "/control/v1/join"
PEER_KEY = "quorum.peer_node"  # scope key: the node id in the client's verified certificate, or None
PEER_CERT_KEY = "quorum.peer_cert"  # scope key: that certificate's fingerprint (pki.cert_fingerprint), or None
PEER_DER_KEY = "quorum.peer_der"  # scope key: that certificate (DER), or None
PEER_CAS_KEY = "quorum.peer_cas"  # scope key: the CAs (DER) its handshake trusted (held_trust), or None


class PeerProtocol(GuardedH11Protocol):
    """uvicorn's h11 protocol (with the request deadline and connection caps of http_guard) that tells
    the app which member (if any) is on the other end. A live member's connections are exempt from the
    per-address cap; every other one (joiners) counts in the small stranger pool."""
    is_member: ClassVar[Callable[[str], bool] | None] = None  # None: any mesh-signed certificate

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        ssl_object = transport.get_extra_info("ssl_object")
        self.peer_node = node_id = _common_name(ssl_object.getpeercert() if ssl_object is not None else None)
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None and node_id is not None else None
        cert = der_fingerprint(der) if der else None
        # The context the handshake ran with (the SNI callback may have switched it: mesh/security/renewal.py), so
        # the CAs it trusted then or since (a context's trust only grows): a superset of those that verified `der`.
        # Not for a resumed session: its certificate was verified in an earlier handshake, perhaps under CAs since
        # dropped (tickets outlive the switch), so it gets the full check.
        cas = verified_against(ssl_object.context) if der and not ssl_object.session_reused else None
        super().connection_made(transport)
        app = self.app

        async def with_peer(scope: Scope, receive: Receive, send: Send) -> None:
            scope[PEER_KEY], scope[PEER_CERT_KEY], scope[PEER_DER_KEY], scope[PEER_CAS_KEY] = node_id, cert, der, cas
            await app(scope, receive, send)

        self.app = with_peer

    def _limit_key(self) -> tuple[str, str] | None:
        if self.peer_node is not None and (self.is_member is None or self.is_member(self.peer_node)):
            return None
        return ("stranger", self.client[0]) if self.client else None


def _common_name(cert: dict | None) -> str | None:
    """The subject CN of a certificate the TLS layer verified against the mesh CA (getpeercert()
    returns an empty dict or None when the client sent none)."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class PeerGate:
    """ASGI middleware for the peer port: joins pass; the rest needs a live member's certificate, from a CA this
    member trusts now (`trusted()`: its ca.pem; held_trust.still_trusted)."""

    def __init__(self, app: ASGIApp, state: Callable[[], MeshState], trusted: Callable[[], bytes] | None = None
                 ) -> None:
        self.app = app
        self.state = state
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != JOIN_PATH:
            node_id = scope.get(PEER_KEY)
            member = self.state().members.get(node_id) if node_id else None
            if member is None or member.state == MemberState.GONE:
                why = "no client certificate" if node_id is None else f"node {node_id} is not a member"
                log.warning("peer request to %s refused: %s", scope["path"], why)
                await ApiError(403, f"This port serves mesh members only ({why}).", type="permission_error",
                               code="not_a_member").response()(scope, receive, send)
                return
            if self.trusted is not None and not still_trusted(scope.get(PEER_DER_KEY), self.trusted(),
                                                              scope.get(PEER_CAS_KEY)):
                log.warning("peer request to %s from %s refused: its certificate is from a CA the mesh no longer "
                            "trusts", scope["path"], node_id)
                await ApiError(403, "This connection's client certificate is from a CA this mesh no longer trusts "
                               "(retired by a CA rotation); connect again with a current certificate.",
                               type="permission_error", code="ca_retired").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class StripRelayHeaders:
    """ASGI middleware for the public HTTP port: the headers members use to relay requests and resume
    streams (x-quorum-*) are honoured only on the peer port, where a member's certificate vouches for
    them; from a client they are dropped, so nobody can feed a shard forged resume state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(k.startswith(b"x-quorum-") for k, _ in scope["headers"]):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if not k.startswith(b"x-quorum-")]}
        await self.app(scope, receive, send)


def peer_server(app: ASGIApp, identity: NodeIdentity, limits: ConnectionLimits = ConnectionLimits(),
                is_member: Callable[[str], bool] | None = None, context: ssl.SSLContext | None = None) -> QuietServer:
    """A uvicorn server for the peer port (serve it with `sockets=[bound socket]`); `is_member(node_id)`
    says whose certificate lifts the connection caps. `context`: a server context that a renewal reloads
    (mesh/security/renewal.py); by default one made from `identity`."""
    protocol = guarded(limits, PeerProtocol, is_member=staticmethod(is_member) if is_member else None)
    # our own context: client certificates optional but verified
    return guarded_server(app, protocol, context or identity.server_context())


Identity = NodeIdentity | Callable[[], NodeIdentity]


def peer_client(identity: Identity, timeout: httpx.Timeout | float = 30.0,
                expect: Callable[[str], str | None] | None = None) -> httpx.AsyncClient:
    """An HTTPS client to other members' peer ports, presenting this node's certificate (a callable: the one
    it holds at each request, so a renewal applies to new connections). With `expect(host:port)` -> node id,
    only that member's certificate is accepted at that address (None: no live member there: refused)."""
    if expect is None:
        fixed = identity() if callable(identity) else identity
        return httpx.AsyncClient(verify=fixed.client_context(), timeout=timeout)
    return httpx.AsyncClient(transport=MemberTransport(identity, expect), timeout=timeout)


class MemberTransport(httpx.AsyncBaseTransport):
    """Each request goes over TLS that accepts only the certificate of the member at its address (the SNI
    and hostname check name `ID.quorum-node`), in one connection pool per member id: a pooled connection
    verified for one member is never used for another. When this member's identity changes (a renewal, or new
    trusted CAs), the pools opened before are retired at the next request: none takes a new one, and each is closed
    then, or, while it carries requests, when the last of their responses is closed (a relayed stream finishes on
    the connection it started on). A pooled connection presents the certificate it was opened with: one opened
    before a renewal would still present the certificate of the CA a rotation is about to retire, and the peer
    refuses it from then on (403), so no new request takes it."""

    def __init__(self, identity: Identity, expect: Callable[[str], str | None]) -> None:
        self._identity = identity if callable(identity) else (lambda: identity)
        self._expect = expect
        self._loaded = self._identity()
        self._context = self._loaded.client_context()
        self._context.check_hostname = True  # against ID.quorum-node, sent as the SNI below
        self._pools: dict[str, httpx.AsyncHTTPTransport] = {}
        self._retired: set[httpx.AsyncHTTPTransport] = set()
        self._busy: dict[httpx.AsyncHTTPTransport, int] = {}  # pool -> requests whose response is not closed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        address = f"[{host}]:{request.url.port}" if ":" in host else f"{host}:{request.url.port}"
        node_id = self._expect(address)
        if node_id is None:
            raise httpx.ConnectError(f"no live member of this mesh listens at {address}", request=request)
        current = self._identity()
        if current is not self._loaded:
            if current.ca_pem != self._loaded.ca_pem:
                # The trusted CAs changed (a rotation): a context's trust store only grows, so a new context.
                self._context = current.client_context()
                self._context.check_hostname = True
            else:  # renewed: new handshakes present the new certificate
                load_identity(self._context, current, self._loaded)
            # Either way, new pools: their connections present the certificate held now (the old ones close once idle).
            self._retired.update(self._pools.values())
            self._pools = {}
            self._loaded = current
            await self._close_idle()
        pool = self._pools.get(node_id)
        if pool is None:
            pool = self._pools[node_id] = httpx.AsyncHTTPTransport(verify=self._context)
        request.extensions = {**request.extensions, "sni_hostname": node_dns_name(node_id)}
        self._busy[pool] = self._busy.get(pool, 0) + 1
        try:
            response = await pool.handle_async_request(request)
        except BaseException:
            await self._done(pool)
            raise
        response.stream = _Released(response.stream, lambda: self._done(pool))
        return response

    async def _done(self, pool: httpx.AsyncHTTPTransport) -> None:
        self._busy[pool] -= 1
        if not self._busy[pool]:
            del self._busy[pool]
            await self._close_idle()

    async def _close_idle(self) -> None:
        idle = [pool for pool in self._retired if pool not in self._busy]
        self._retired.difference_update(idle)
        for pool in idle:
            await pool.aclose()

    async def aclose(self) -> None:
        pools, self._pools = [*self._pools.values(), *self._retired], {}
        self._retired = set()
        for pool in pools:
            await pool.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that tells its transport when it is closed (the request no longer holds its pool)."""

    def __init__(self, inner: Any, done: Callable[[], Awaitable[None]]) -> None:
        self._inner, self._done, self._closed = inner, done, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._closed:
                self._closed = True
                await self._done()


def peer_url(address: str, path: str) -> str:
    return f"https://{address}{path}"
