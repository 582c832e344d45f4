"""The replicated state: typed commands, a pure apply(), and the pysyncobj node that carries them."""
