"""What every model child process of meshd does first: die with its parent, and go first when memory runs out.

Shared by the shard process (shards/host.py), a pipeline head (shards/rpc_head.py) and a stage
(shards/rpc_stage.py); kept apart from them so that none imports another for it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("quorum.child")

PR_SET_PDEATHSIG = 1
OOM_SCORE_ADJ = 1000  # the most killable: a shard, never meshd, goes when memory runs out


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:
        sys.exit("the parent meshd is gone")


def offer_to_oom_killer() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:  # not Linux, or /proc read-only: the OOM killer picks by size alone
        log.info("could not raise oom_score_adj: %s", exc)
