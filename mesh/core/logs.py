"""One log line per event, the same format for every part of the daemon."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pysyncobj and uvicorn are chatty at INFO about things our own lines already say.
    for noisy in ("pysyncobj", "uvicorn.error", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
