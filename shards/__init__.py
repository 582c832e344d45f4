"""Model shards: one backend interface, one file per backend, the engines that run them."""
