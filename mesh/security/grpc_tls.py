"""Mutual TLS for the gRPC data plane (shards, model transfer).

Both ends present a certificate from the mesh CA (mesh/security/pki.py); a peer from another mesh fails the
handshake. The server also checks, on every call, that the certificate's node id belongs to a live
member of the replicated member list, so a removed member's certificate, still validly signed, is
refused with PERMISSION_DENIED.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable

import grpc

from mesh.security.pki import NODE_DNS_NAME, NodeIdentity

log = logging.getLogger("quorum.grpc")

# Channels ask for the name every node certificate carries (members are reached by address).
TARGET_NAME_OPTION = ("grpc.ssl_target_name_override", NODE_DNS_NAME)


def server_credentials(identity: NodeIdentity) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem,
                                       require_client_auth=True)


def channel_credentials(identity: NodeIdentity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)


def peer_node_id(context: Any) -> str | None:
    """The node id (certificate common name) of the verified client of a call, if any."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


class MemberOnly(grpc.aio.ServerInterceptor):
    """Refuses every call whose client certificate does not name a live member."""

    def __init__(self, is_member: Callable[[str], bool]) -> None:
        self.is_member = is_member

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
