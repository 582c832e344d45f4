"""Floor 6: the command lines, meshd and meshctl."""
