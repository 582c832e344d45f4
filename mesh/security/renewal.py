"""Short-lived node certificates, renewed while the member runs.

A node certificate lasts `security.node_cert_days` (30). Once two thirds of its life have passed (or it is
from before certificates named the node id in their SAN), `Renewer` makes a new key and has an authority
sign a request for it (mesh/security/authority.py: here, or over the peer port with the current
certificate), checks the answer (this mesh's CA, this key, this node id), writes node.key and node.pem, and
hands the new identity to `LiveIdentity`, which every TLS user of this member reads:

- Raft (raft/tls.py RaftTls.reload): new connections use the new contexts;
- the peer port's server context and every peer client (mesh/security/peer_tls.py) load it in place, on the
  event loop that makes their connections;
- gRPC: the server's credentials fetch it at the next handshake (grpc_tls.server_credentials with a
  callable); clients make new channels with it (mesh/replicas/remote_shard.py).

Open connections keep the certificate they started with, valid for a third of its life still. A failed
renewal is retried every RETRY_S and logged; it never stops the member. A CA rotation (mesh/security/
ca_rotation.py) asks the renewer for a certificate from the new CA (`wake`) once every member trusts it; the
trusted CAs travel in NodeIdentity.ca_pem, and the peer port's server context switches to a fresh context
at each handshake, so dropping a CA takes effect there too (a context's trust store only grows).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import weakref
from pathlib import Path
from typing import Awaitable, Callable

import httpx

from mesh.security.authority import NoAuthority
from mesh.security.keygen import key_and_request
from mesh.security.own_cert import holds_from, own_issuer
from mesh.security.pki import (
    NodeIdentity,
    PkiError,
    lifetime,
    load_identity,
    node_id_of,
)

log = logging.getLogger("quorum.renewal")

RENEW_AT = 2 / 3  # of a certificate's life
RETRY_S = 60.0


class LiveIdentity:
    """This member's current key and certificate; a renewal replaces it and reloads every context made here."""

    def __init__(self, identity: NodeIdentity) -> None:
        self._current = identity
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._listeners: list[Callable[[NodeIdentity], None]] = []
        self._grpc: tuple[NodeIdentity, object] | None = None
        self._server: tuple[NodeIdentity, ssl.SSLContext] | None = None

    def __call__(self) -> NodeIdentity:
        return self._current

    def server_context(self) -> ssl.SSLContext:
        """A peer-port server context that follows renewals and the trusted CAs: each handshake switches (in
        the SNI callback, which OpenSSL runs for every ClientHello, with or without a name) to a context made
        from the identity held then, so a CA the mesh no longer trusts is refused at once (a context's trust
        store can only grow)."""
        ctx = self._current.server_context()
        self._contexts.add(ctx)
        ctx.sni_callback = self._switch
        return ctx

    def _switch(self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self._current
        if self._server is None or self._server[0] is not current:
            self._server = (current, current.server_context())
        ssl_object.context = self._server[1]

    def grpc_channel_credentials(self):
        """gRPC client credentials for the current certificate: the same object until it changes."""
        from mesh.security.grpc_tls import channel_credentials

        if self._grpc is None or self._grpc[0] is not self._current:
            self._grpc = (self._current, channel_credentials(self._current))
        return self._grpc[1]

    def on_change(self, listener: Callable[[NodeIdentity], None]) -> None:
        self._listeners.append(listener)

    def replace(self, identity: NodeIdentity) -> None:
        before, self._current = self._current, identity
        for ctx in list(self._contexts):
            load_identity(ctx, identity, before)
        for listener in self._listeners:
            listener(identity)


def due(cert_pem: bytes, now: float) -> bool:
    """Whether a node certificate should be renewed now: two thirds of its life gone (a CA rotation asks
    through Renewer.wake). Read without cryptography (mesh/security/cert_facts.py): it is this member's own."""
    start, end = lifetime(cert_pem)
    return node_id_of(cert_pem) is None or now >= start + (end - start) * RENEW_AT


class Renewer:
    """Renews this member's certificate through `sign(request body) -> certificate PEM`."""

    def __init__(self, live: LiveIdentity, data_dir: Path, node_id: str, sign: Callable[[dict], Awaitable[bytes]],
                 clock: Callable[[], float] = time.time) -> None:
        self.live = live
        self.data_dir = data_dir
        self.node_id = node_id
        self.sign = sign
        self.clock = clock
        self._wake = asyncio.Event()
        self._forced = False

    def wake(self) -> None:
        """Renews now, until a certificate from the signing CA is installed (a CA rotation asks, once every
        member trusts the new CA: mesh/security/ca_rotation.py)."""
        self._forced = True
        self._wake.set()

    async def renew(self) -> NodeIdentity:
        """A new key and certificate, written and installed. Raises PkiError, NoAuthority, httpx.HTTPError."""
        key, csr = await asyncio.to_thread(key_and_request, self.node_id)  # in a child: mesh/security/keygen.py
        cert = await self.sign({"kind": "node", "csr": csr.decode()})
        trusted = self.live().ca_pem  # the trusted CAs now (a rotation may have moved on meanwhile)
        # own_issuer: a CA trusted now signed it and it is valid now, for `key` (a TLS handshake in memory proves it).
        if own_issuer(cert, key, trusted) is None or node_id_of(cert) != self.node_id:
            raise PkiError("the authority's answer is not a certificate of this mesh for this node and key")
        _write(self.data_dir / "node.key", key, private=True)
        _write(self.data_dir / "node.pem", cert)
        identity = NodeIdentity(key_pem=key, cert_pem=cert, ca_pem=trusted)
        self.live.replace(identity)
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(lifetime(cert)[1]))
        log.info("renewed this member's certificate (valid until %s)", until)
        return identity

    async def run(self, every_s: float = 3600.0) -> None:
        """Checks every `every_s` (and at start); renews when due, retrying a failure every RETRY_S."""
        while True:
            wait = every_s
            if self._forced or due(self.live().cert_pem, self.clock()):
                try:
                    renewed = await self.renew()
                    if holds_from(renewed.cert_pem, renewed.key_pem, self.live().ca_pem):
                        self._forced = False
                    else:  # an authority that has not applied the rotation yet signed it: ask again soon
                        wait = min(every_s, RETRY_S)
                except (PkiError, NoAuthority, httpx.HTTPError, OSError, KeyError, ValueError) as exc:
                    # the old certificate still serves (a third of its life is left): try again soon
                    log.warning("certificate renewal failed (%s: %s); retrying in %.0f s", type(exc).__name__, exc,
                                RETRY_S)
                    wait = min(every_s, RETRY_S)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass  # the periodic check
            self._wake.clear()


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
