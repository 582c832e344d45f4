"""One pipeline stage (`python -m shards.rpc_stage`) as meshd runs it: a child process on loopback.

The stage holds the last layers of a split model for the head on another member (or this one) and is
reached only through the mutual-TLS tunnel (mesh/replicas/rpc_tunnel.py). Like a shard process it dies
with meshd (PR_SET_PDEATHSIG, set by the stage itself from `--parent`) and runs in a session of its own;
its stderr is logged line by line and its last lines kept, so `on_exit` can say how it died.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
from pathlib import Path
from typing import Awaitable, Callable

from mesh.replicas.shard_process import STOP_GRACE_S, TAIL_LINES, Exit

log = logging.getLogger("quorum.stage-process")

START_TIMEOUT_S = 60.0  # python, ggml and the listening socket; a stage loads no weights until a head connects


class StageStartError(RuntimeError):
    """The stage process exited or timed out before it listened."""


class StageProcess:
    def __init__(self, model: str, layers: int, threads: int, cache_dir: Path | None,
                 on_exit: Callable[["StageProcess", Exit], Awaitable[None]]) -> None:
        self.model, self.layers, self.threads, self.cache_dir = model, layers, threads, cache_dir
        self.endpoint = ""  # 127.0.0.1:PORT once it listens
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def __repr__(self) -> str:
        return f"StageProcess({self.model}, {self.layers} layers, pid {self.pid}, {self.endpoint or 'starting'})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return bool(self.endpoint) and self._proc is not None and self._proc.returncode is None

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        args = [sys.executable, "-m", "shards.rpc_stage", "--endpoint", "127.0.0.1:0", "--threads",
                str(self.threads), "--parent", str(os.getpid())]
        if self.cache_dir is not None:
            args += ["--cache-dir", str(self.cache_dir)]
        self._proc = proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self._tasks.append(asyncio.create_task(self._pump_stderr(), name=f"stage-log-{self.model}"))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise StageStartError(f"the stage process did not listen within {timeout_s:.0f} s") from None
        ready = json.loads(line) if line else {}
        if not ready.get("ready"):
            code = await proc.wait()
            await self._cancel_tasks()
            raise StageStartError(f"the stage process {Exit(code, tuple(self._tail)).describe()}")
        self.endpoint = ready["endpoint"]
        self._tasks.append(asyncio.create_task(self._watch(), name=f"stage-watch-{self.model}"))
        log.info("stage of %s (%d layers) serving on %s in process %d", self.model, self.layers, self.endpoint,
                 proc.pid)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; on_exit is not called."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await self._cancel_tasks()

    async def _watch(self) -> None:
        code = await self._proc.wait()
        if self._stopping:
            return
        pump = self._tasks[0]
        await asyncio.wait({pump}, timeout=2.0)  # the last lines it wrote, for the report
        exit_ = Exit(code, tuple(self._tail))
        log.error("stage of %s (process %d) %s", self.model, self._proc.pid, exit_.describe())
        await self._on_exit(self, exit_)

    async def _pump_stderr(self) -> None:
        while line := await self._proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._tail.append(text)
                log.info("[stage %s] %s", self.model, text)

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their CancelledError is the expected end
