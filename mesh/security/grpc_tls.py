"""Mutual TLS for the gRPC data plane (shards, model transfer).

Both ends present a certificate from the mesh CA (mesh/security/pki.py); a peer from another mesh fails the
handshake. The server also checks, on every call, that the certificate's node id belongs to a live
member of the replicated member list, so a removed member's certificate, still validly signed, is
refused with PERMISSION_DENIED, and that its CA is one this member still trusts: an HTTP/2 connection opened
before a CA rotation retired its certificate's CA (a removed authority's copy of the old key) serves no call
after it.

A client asks for the certificate of the member it means to reach (`target_for(node_id)`: the DNS name
`ID.quorum-node` only that member's certificate holds), so a removed member, or any other member, cannot
pose as a shard or a model source: the TLS handshake fails. The server presents whatever certificate
this member holds now (`server_credentials` takes a callable: a renewal applies to the next handshake).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable

import grpc

from mesh.security.held_trust import still_trusted
from mesh.security.pki import NODE_DNS_NAME, NodeIdentity, node_dns_name

log = logging.getLogger("quorum.grpc")

# The name every node certificate carries: any member of this mesh. Only for tools and tests that do
# not care which member answers; members dial each other with `target_for(node_id)`.
TARGET_NAME_OPTION = ("grpc.ssl_target_name_override", NODE_DNS_NAME)


def target_for(node_id: str) -> tuple[str, str]:
    """The channel option that makes TLS accept only `node_id`'s certificate."""
    return ("grpc.ssl_target_name_override", node_dns_name(node_id))


def server_credentials(identity: NodeIdentity | Callable[[], NodeIdentity]) -> grpc.ServerCredentials:
    """Mutual TLS for the gRPC port. With a callable, each new handshake presents the identity it returns
    then (a renewed certificate is served without a restart)."""
    if isinstance(identity, NodeIdentity):
        return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem,
                                           require_client_auth=True)
    current = identity
    served = current()

    def config(who: NodeIdentity) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(who.key_pem, who.cert_pem)], root_certificates=who.ca_pem)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        now = current()
        if now is served:
            return None  # unchanged: gRPC keeps the configuration it has
        served = now
        return config(now)

    return grpc.dynamic_ssl_server_credentials(config(served), fetch, require_client_authentication=True)


def channel_credentials(identity: NodeIdentity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)


def peer_node_id(context: Any) -> str | None:
    """The node id (certificate common name) of the verified client of a call, if any."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


class MemberOnly(grpc.aio.ServerInterceptor):
    """Refuses every call whose client certificate does not name a live member, or (with `trusted()`: the CAs
    this member trusts now, its ca.pem) is from a CA it no longer trusts."""

    def __init__(self, is_member: Callable[[str], bool], trusted: Callable[[], bytes] | None = None) -> None:
        self.is_member = is_member
        self.trusted = trusted

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._guard(behavior, details.method)})
        return handler

    def _guard(self, behavior: Callable, method: str) -> Callable:
        async def check(context: Any) -> None:
            node_id = peer_node_id(context)
            if node_id is None or not self.is_member(node_id):
                log.warning("gRPC %s refused: %s", method,
                            "no client certificate" if node_id is None else f"node {node_id} is not a member")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a member of this mesh")
            cert = (context.auth_context().get("x509_pem_cert") or [None])[0]
            if self.trusted is not None and not still_trusted(cert, self.trusted()):
                log.warning("gRPC %s from %s refused: its certificate is from a CA the mesh no longer trusts", method,
                            node_id)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    "the client certificate is from a CA this mesh no longer trusts")

        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: Any):
                await check(context)
                async for item in behavior(request, context):
                    yield item
            return stream

        async def call(request: Any, context: Any) -> Any:
            await check(context)
            return await behavior(request, context)
        return call
