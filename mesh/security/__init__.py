"""Floor 1: who may do what: the mesh CA and certificates, TLS for peers and shards, join tokens,
API keys, the admin credential, the data directory that holds the secrets, the HTTP guard."""
