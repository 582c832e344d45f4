"""Floor 0: what every floor above shares: errors in the API's shape, metrics, logging, mesh.toml."""
