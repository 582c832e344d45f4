"""The wire format between nodes (mesh.proto and its generated modules).

Single-node Quorum has no traffic between nodes yet; the gRPC shard and node services land here
with the multi-node mesh, and nothing else may define what crosses the wire.
"""
