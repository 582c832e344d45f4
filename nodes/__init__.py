"""What this machine is: memory, cores, architecture, device class."""
