"""Floor 5: one member: the daemon that composes the floors below, and bootstrap (init and join)."""
