"""A TLS handshake between two raft/tls.py sessions in memory, for tests of Raft's TLS."""

from __future__ import annotations

from raft.tls import TlsSession


def handshake(client: TlsSession, server: TlsSession) -> None:
    """Runs the handshake between `client` and `server` to its end (bounded), asserting both are established."""
    for _ in range(10):  # a bounded handshake in memory
        if client.handshake() & server.handshake():
            break
        server.incoming.write(client.take())
        client.incoming.write(server.take())
    client.incoming.write(server.take())
    assert server.established and client.established and client.handshake()
