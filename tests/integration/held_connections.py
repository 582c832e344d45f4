"""A thief's connections to a member, held open across a CA rotation (tests/integration/test_lost_phone.py).

Opened while the certificate's CA is trusted, and kept busy (a request every `every` s, well inside uvicorn's
keep-alive and gRPC's pings) until stopped: one keep-alive HTTPS connection to the peer port, one HTTP/2
connection to the gRPC port. Each request's outcome is recorded, with the client port of the peer connection
that carried it, so a test can tell a refusal on the connection opened before from a new connection's."""

from __future__ import annotations

import threading

import grpc
import httpx

from mesh.security.grpc_tls import channel_credentials
from mesh.security.pki import NodeIdentity
from proto import mesh_pb2

HEALTH = "/quorum.mesh.v1.Shard/Health"


class HeldConnections(threading.Thread):
    def __init__(self, identity: NodeIdentity, peer: str, grpc_address: str, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.identity, self.peer_url, self.grpc_address, self.every = identity, f"https://{peer}/control/v1/ca", \
            grpc_address, every
        self.peer: list[tuple[int | str, int | None]] = []  # (status, or the error's name; the client port)
        self.grpc: list[grpc.StatusCode] = []
        self.stop = threading.Event()

    def run(self) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(verify=self.identity.client_context(), timeout=10, limits=limits) as client, \
                grpc.secure_channel(self.grpc_address, channel_credentials(self.identity),
                                    options=[("grpc.ssl_target_name_override", "quorum-node")]) as channel:
            health = channel.unary_unary(HEALTH, request_serializer=mesh_pb2.HealthRequest.SerializeToString,
                                         response_deserializer=mesh_pb2.HealthReply.FromString)
            while not self.stop.is_set():
                try:
                    reply = client.get(self.peer_url)
                    self.peer.append((reply.status_code,
                                      reply.extensions["network_stream"].get_extra_info("client_addr")[1]))
                except httpx.HTTPError as exc:  # recorded: the test asserts on what the connection did
                    self.peer.append((type(exc).__name__, None))
                try:
                    health(mesh_pb2.HealthRequest(), timeout=10)
                    self.grpc.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:  # recorded, as above
                    self.grpc.append(exc.code())
                self.stop.wait(self.every)
