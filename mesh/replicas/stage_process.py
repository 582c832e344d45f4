"""One pipeline stage (`python -m shards.rpc_stage`) as meshd runs it: a child process on loopback.

The stage holds the last layers of a split model for the head on another member (or this one) and is
reached only through the mutual-TLS tunnel (mesh/replicas/rpc_tunnel.py). Like a shard process it dies
with meshd (PR_SET_PDEATHSIG, set by the stage itself from `--parent`), runs in a session of its own and
has its stderr logged and its last lines kept (mesh/replicas/child_supervision.py), so `on_exit` can say how
it died.

Two faults are watched here beyond an exit:
- A stage that cannot allocate its share: ggml logs "failed to allocate ... buffer of size N" and answers the
  head with no buffer (the head's load then fails). `on_fault(stage, reason)` gets a one-line reason.
- A frozen stage (SIGSTOP, a debugger): the head would wait on it for good, since the kernel still holds its
  connection open. A stage seen stopped for FROZEN_S is killed (SIGKILL), which closes the tunnel, so the head
  process aborts within milliseconds and its streams resume elsewhere (mesh/replicas/failover.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Awaitable, Callable

from mesh.replicas.child_supervision import Exit, SupervisedChild

log = logging.getLogger("quorum.stage-process")

START_TIMEOUT_S = 60.0  # python, ggml and the listening socket; a stage loads no weights until a head connects
FROZEN_S = 1.0  # a stage stopped this long is killed
FREEZE_POLL_S = 0.25
_ALLOC_FAILED = re.compile(r"failed to allocate (?:(\S+) )?(?:buffer of size (\d+)|(\d+) bytes)")


class StageStartError(RuntimeError):
    """The stage process exited or timed out before it listened."""


def allocation_fault(line: str) -> str | None:
    """The one-line reason a ggml log line says an allocation failed, or None."""
    match = _ALLOC_FAILED.search(line)
    if match is None:
        return None
    size = int(match.group(2) or match.group(3))
    return f"cannot allocate its share: {size / (1 << 20):.1f} MiB refused by this member's memory"


def is_stopped(pid: int) -> bool:
    """True while process `pid` is stopped (SIGSTOP, SIGTSTP, a tracer)."""
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:  # gone: the watch reports the exit
        return False


class StageProcess(SupervisedChild):
    log = log

    def __init__(self, model: str, layers: int, threads: int, cache_dir: Path | None,
                 on_exit: Callable[["StageProcess", Exit], Awaitable[None]],
                 on_fault: Callable[["StageProcess", str], None] | None = None, socket: Path | None = None) -> None:
        """`socket`: serve through a Unix socket at this path (in meshd's 0700 run directory), the RPC server in
        a network namespace of its own where the system allows (shards/stage_isolation.py)."""
        super().__init__(on_exit)
        self.model, self.layers, self.threads, self.cache_dir = model, layers, threads, cache_dir
        self.socket = socket
        self.endpoint = ""  # 127.0.0.1:PORT, or unix:PATH with `socket`, once it listens
        self.isolated = False  # its RPC port out of reach of the machine's other users
        self.fault = ""  # why it cannot serve (allocation), or why it was killed (frozen)
        self._on_fault = on_fault

    def __repr__(self) -> str:
        return f"StageProcess({self.model}, {self.layers} layers, pid {self.pid}, {self.endpoint or 'starting'})"

    @property
    def what(self) -> str:
        return f"stage {self.model}"

    @property
    def label(self) -> str:
        return f"stage-{self.model}"

    @property
    def running(self) -> bool:
        return bool(self.endpoint) and self.alive

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        args = [sys.executable, "-m", "shards.rpc_stage", "--endpoint", "127.0.0.1:0", "--threads",
                str(self.threads), "--parent", str(os.getpid())]
        if self.cache_dir is not None:
            args += ["--cache-dir", str(self.cache_dir)]
        if self.socket is not None:
            args += ["--socket", str(self.socket)]
        proc = await self._spawn(*args)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise StageStartError(f"the stage process did not listen within {timeout_s:.0f} s") from None
        try:
            ready = json.loads(line) if line else {}
            endpoint = ready["endpoint"] if isinstance(ready, dict) and ready.get("ready") else None
        except (ValueError, KeyError, TypeError):  # not its ready line: the process is not the stage we expect
            endpoint = None
        if not isinstance(endpoint, str):
            raise StageStartError(f"the stage process {(await self._startup_failed()).describe()}")
        self.endpoint = endpoint
        self.isolated = bool(ready.get("isolated"))
        self._watch_from_now()
        self._tasks.append(asyncio.create_task(self._freeze_watch(), name=f"{self.label}-freeze"))
        log.info("stage of %s (%d layers) serving on %s in process %d%s", self.model, self.layers, self.endpoint,
                 proc.pid, "" if self.isolated else " (its RPC port is reachable by this machine's other users)")

    def _on_line(self, text: str) -> None:
        if (reason := allocation_fault(text)) is not None:
            self.fault = reason
            log.error("stage of %s: %s", self.model, reason)
            if self._on_fault is not None:
                self._on_fault(self, reason)

    async def _freeze_watch(self) -> None:
        stopped_since = None
        loop = asyncio.get_running_loop()
        while self.alive:
            if not is_stopped(self._proc.pid):
                stopped_since = None
            elif stopped_since is None:
                stopped_since = loop.time()
            elif loop.time() - stopped_since >= FROZEN_S:
                self.fault = f"frozen (stopped for {FROZEN_S:.0f} s): killed so that its head fails over"
                log.error("stage of %s (process %d): %s", self.model, self._proc.pid, self.fault)
                self._proc.kill()  # a stopped process dies of SIGKILL too; the watch reports the exit
                return
            await asyncio.sleep(FREEZE_POLL_S)  # polling the process state (no event for a stop)
