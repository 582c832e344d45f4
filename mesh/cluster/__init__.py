"""Floor 2: the control plane over Raft: placement (pure) and the placer, profiles, discovery,
the witness, the session log, and the control API."""
