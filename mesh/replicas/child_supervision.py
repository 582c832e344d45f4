"""What meshd does for every child process it supervises (shard processes, pipeline stages).

A `SupervisedChild` spawns `python -m ...` in a session of its own (a Ctrl-C in meshd's terminal reaches meshd
alone, which then stops its children), with its stdout kept for the one "ready" line and its stderr logged line
by line under the child's name. Its last lines are kept, and apart from them the lines that say why a process
died (a faulthandler dump of every thread's stack would push them out of the tail): when the process ends on
its own (a crash, the OOM killer, a kill), `on_exit` gets an Exit that says how. `stop()` ends it on purpose:
SIGTERM, SIGKILL after STOP_GRACE_S, and `on_exit` is not called.

mesh/replicas/shard_process.py and mesh/replicas/stage_process.py build on it. `child_socket` names the Unix
socket a child listens on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import re
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

TAIL_LINES = 20  # stderr lines kept for the report of a crash
# Lines that say why a process died: Python's fatal errors, llama.cpp's asserts and aborts (ggml's RPC client's
# when a pipeline head loses a stage among them), C++ terminate.
FATAL = re.compile(r"Fatal Python error|GGML_ASSERT|GGML_ABORT|Error: |terminate called|Remote RPC server crashed")
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
DRAIN_S = 2.0  # how long the stderr pump may take to read what a dead process wrote last
STARTUP_EXIT_S = 10.0  # a process that wrote no ready line yet still runs: killed after this long
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux
_short_dirs: dict[Path | None, Path] = {}  # a run directory too deep for a socket path (or none) -> a short one


def child_socket(run_dir: Path | None, key: str, prefix: str = "") -> Path:
    """Where the child process named `key` ("reasoning/gemma", a stage's model) listens: PREFIX + 12 hex digits of
    its sha256 + ".sock" in meshd's private run directory (0700). Without one, or where that path would pass
    SOCKET_PATH_MAX, in a short private directory instead (mkdtemp: mode 0700), made once per run directory and
    kept for meshd's life, so every child of one run directory finds the same place."""
    name = f"{prefix}{hashlib.sha256(key.encode()).hexdigest()[:12]}.sock"
    if run_dir is not None and len(str(run_dir / name)) <= SOCKET_PATH_MAX:
        return run_dir / name
    if run_dir not in _short_dirs:
        _short_dirs[run_dir] = Path(tempfile.mkdtemp(prefix="quorum-run-"))
    return _short_dirs[run_dir] / name


@dataclass(frozen=True)
class Exit:
    """How a child process ended on its own."""
    returncode: int
    tail: tuple[str, ...]  # its last stderr lines
    fatal: tuple[str, ...] = ()  # its last lines that say why it died (FATAL)

    @property
    def how(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}"
        return f"exited with code {self.returncode}"

    def describe(self, lines: int = 3) -> str:
        said = self.fatal[-lines:] or tuple(line.strip() for line in self.tail[-lines:])
        return f"{self.how}" + (f"; last log: {' | '.join(said)}" if said else "")


class SupervisedChild:
    """The plumbing; a subclass names its logger (`log`), itself in the log (`what`, e.g. "reasoning/gemma") and
        its tasks (`label`), and may add to `_closing()` (before the tasks end on stop) and `_on_line(text)` (each
    stderr line)."""

    log: logging.Logger

    def __init__(self, on_exit: Callable[[Any, Exit], Awaitable[None]]) -> None:
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._fatal: collections.deque[str] = collections.deque(maxlen=3)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def what(self) -> str:
        raise NotImplementedError

    @property
    def label(self) -> str:
        raise NotImplementedError

    async def _spawn(self, *args: str) -> asyncio.subprocess.Process:
        self._proc = proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Its own session: a Ctrl-C in meshd's terminal reaches meshd alone, which then stops its children.
            start_new_session=True)
        self._tasks.append(asyncio.create_task(self._pump_stderr(), name=f"{self.label}-log"))
        return proc

    def _watch_from_now(self) -> None:
        self._tasks.append(asyncio.create_task(self._watch(), name=f"{self.label}-watch"))

    async def stop(self) -> None:
        """Stops the process (SIGTERM, SIGKILL after STOP_GRACE_S); on_exit is not called."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                self.log.warning("%r did not stop within %.0f s; killing it", self, STOP_GRACE_S)
                proc.kill()
                await proc.wait()
        await self._closing()
        await self._cancel_tasks()

    async def _closing(self) -> None:
        """What a subclass releases when its process ends (a client channel)."""

    async def _watch(self) -> None:
        code = await self._proc.wait()
        if self._stopping:
            return
        await self._drain_logs()
        exit_ = self._exit(code)
        self.log.error("%s process %d %s", self.what, self._proc.pid, exit_.describe())
        await self._closing()
        await self._on_exit(self, exit_)

    async def _startup_failed(self) -> Exit:
        """The process ended (or wrote something else than its ready line) before it was ready: how, with what it
        wrote (the watch was not started yet). One still running is killed after STARTUP_EXIT_S."""
        try:
            code = await asyncio.wait_for(self._proc.wait(), STARTUP_EXIT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                self._proc.kill()
            code = await self._proc.wait()
        await self._drain_logs()
        await self._cancel_tasks()
        return self._exit(code)

    def _exit(self, code: int) -> Exit:
        return Exit(code, tuple(self._tail), tuple(self._fatal))

    def _on_line(self, text: str) -> None:
        """Each line the process writes on stderr (after it is kept and logged)."""

    async def _pump_stderr(self) -> None:
        stream = self._proc.stderr
        prefix = f"[{self.what}] "
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._tail.append(text)
                if FATAL.search(text):
                    self._fatal.append(text.strip())
                self.log.info("%s%s", prefix, text)
                self._on_line(text)

    async def _drain_logs(self) -> None:
        """Lets the stderr pump read what the process wrote before it ended (bounded)."""
        pump = self._tasks[0] if self._tasks else None
        if pump is not None:
            await asyncio.wait({pump}, timeout=DRAIN_S)

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their CancelledError is the expected end
