"""Floor 3: the data plane to model shards: local shard processes and their supervisor, remote
shards over gRPC, model transfer between members, routing, and failover of a generation."""
