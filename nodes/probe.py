"""How probes reach the machine: files under a root, an environ mapping, and a command runner.

Every probe in this package takes some of these so that tests can point it at captured fixtures:

- `root`: a directory standing in for "/" (`Path("/")` on the real machine);
- `environ`: a mapping standing in for `os.environ`;
- `run`: a `Runner`, `run(argv) -> str | None`: the command's standard output, or None when the
  tool is missing, exits non-zero or runs past its timeout. `run_command` is the real one (2 s).

A root other than the real "/" means "a captured machine": probes then take what they would ask
psutil or `os` (memory, cores, battery) from the files under that root, or report nothing, so the
machine running the tests never leaks into a fixture's profile.

Probes never raise for a missing file or a failing tool: they report nothing instead (None, an
empty list, 0). `call` and `read_text` are where that tolerance lives.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

COMMAND_TIMEOUT_S = 2.0
"""How long a probe's command may run before it is killed and counted as failed."""

Runner = Callable[[Sequence[str]], "str | None"]


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> str | None:
    """Run `argv`, return its stdout if it exits 0 within `timeout`, else None.

    The command runs in its own session and, on timeout, its whole process group is killed: a
    tool that leaves a child holding the output pipe (termux-api's helpers do when the Termux:API
    app is missing) cannot keep us waiting.
    """
    if not argv or shutil.which(argv[0]) is None:
        return None
    posix = os.name == "posix"
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=posix)
    except (OSError, ValueError):
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, posix)
        return None
    if proc.returncode != 0:
        return None
    return out.decode("utf-8", errors="replace")


def _kill(proc: subprocess.Popen, posix: bool) -> None:
    try:
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except OSError:  # already gone
        pass
    try:
        proc.communicate(timeout=1.0)
    except subprocess.TimeoutExpired:  # unkillable (uninterruptible sleep): give up on it
        pass


def call(run: Runner, argv: Sequence[str]) -> str | None:
    """`run(argv)`, with any failure of the runner itself (an exception, a non-text result) as None."""
    try:
        out = run(list(argv))
    except Exception:  # noqa: BLE001 - a probe reports nothing rather than break the profile
        return None
    if isinstance(out, bytes):
        out = out.decode("utf-8", errors="replace")
    return out if isinstance(out, str) else None


def read_text(root: Path, relative: str) -> str | None:
    """The text of `root/relative`, or None if it is missing or unreadable."""
    try:
        return (Path(root) / relative).read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return None


def exists(root: Path, relative: str) -> bool:
    try:
        return (Path(root) / relative).exists()
    except (OSError, ValueError):
        return False


def is_live(root: Path) -> bool:
    """Whether `root` is this machine's own "/" (rather than a captured machine's files)."""
    try:
        return Path(root).resolve() == Path("/").resolve()
    except (OSError, RuntimeError):
        return False
