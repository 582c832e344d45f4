"""The daemon, gateway, control API and CLIs: the top layer of Quorum."""
