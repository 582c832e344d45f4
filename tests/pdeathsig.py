"""Runs a command that dies with the process that started it: `python -m tests.pdeathsig PARENT CMD...`.

Sets PR_SET_PDEATHSIG (SIGKILL) and execs CMD, so a meshd a test starts is killed by the kernel when
the test process dies, even by kill -9 (the setting survives exec). A launcher rather than Popen's
preexec_fn: Python code run between fork and exec in a threaded test process can deadlock the child
(a lock held by another thread at the fork), and gRPC's fork handlers run there too. PARENT is the
starter's pid: if it is already gone when the setting takes effect, this exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(f"{command[0]}: the process that started it is gone")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
