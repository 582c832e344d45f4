"""One model shard in a child process (shards/host.py), as meshd sees it.

`start()` spawns `python -m shards.host`, waits for its "ready" line, and connects a RemoteShard
client to its Unix socket, so a local replica is used exactly like one on another member (the
same gRPC Shard protocol, the same refusals, the same broken-stream Failed events that make the
gateway resume a stream elsewhere). The process's stderr is logged line by line under the shard's
name, and its last lines are kept: when the process dies on its own (a crash, the OOM killer), the
`on_exit` callback gets an Exit that says how (signal or exit code) with those lines.

GeneratorProcess serves `open()` (chat and completions), EncoderProcess `embed()` (the context
role); both count their finished generations or calls in the node's metrics.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import grpc

from mesh.core.metrics import Metrics
from mesh.replicas.remote_shard import RemoteShard
from shards.host import HostSpec
from shards.types import Event, Failed, Finished, GenerateRequest, NotReady, Opened, Piece, ShardKind

log = logging.getLogger("quorum.shard-process")

TAIL_LINES = 20  # stderr lines kept for the report of a crash
# Lines that say why a process died, kept apart from the tail (a faulthandler dump of every thread's
# stack would push them out): Python's fatal errors, llama.cpp's asserts and aborts, C++ terminate.
_FATAL = re.compile(r"Fatal Python error|GGML_ASSERT|GGML_ABORT|Error: |terminate called")
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


class ShardStartError(RuntimeError):
    """The shard process exited or timed out before it was serving; the message says how."""


@dataclass(frozen=True)
class Exit:
    """How a shard process ended on its own."""
    returncode: int
    tail: tuple[str, ...]  # its last stderr lines
    fatal: tuple[str, ...] = ()  # its last lines that say why it died (_FATAL)

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


class ShardProcess:
    kind: ShardKind

    def __init__(self, spec: HostSpec, metrics: Metrics,
                 on_exit: Callable[["ShardProcess", Exit], Awaitable[None]]) -> None:
        self.spec = spec
        self.role = spec.role
        self.model = spec.model
        self.metrics = metrics
        self.n_ctx = 0
        self.started_at = 0.0
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._client: RemoteShard | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._fatal: collections.deque[str] = collections.deque(maxlen=3)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role}/{self.model}, pid {self.pid})"

    # -- what the router and the gRPC service read -----------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        return self._client is not None and self._proc is not None and self._proc.returncode is None

    @property
    def load(self) -> int:
        return self._client.load if self._client is not None else 0

    @property
    def busy(self) -> bool:
        return self.load > 0

    @property
    def waiting(self) -> int:
        return max(0, self.load - 1)

    def rss(self) -> int:
        """Resident memory of the process in bytes (0 once it is gone)."""
        pid = self.pid
        if pid is None:
            return 0
        import psutil

        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:  # exited between the check and the read
            return 0

    def client(self) -> RemoteShard:
        if self._client is None or not self.ready:
            raise NotReady(f"the {self.role} shard process of {self.model} is not running")
        return self._client

    # -- lifetime --------------------------------------------------------------------------

    async def start(self, timeout_s: float) -> None:
        """Spawns the process and returns once it serves; ShardStartError if it dies or times out."""
        loop = asyncio.get_running_loop()
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shards.host", self.spec.to_json(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Its own session: a Ctrl-C in meshd's terminal reaches meshd alone, which then stops its shards.
            start_new_session=True)
        self.started_at = loop.time()
        self._tasks.append(asyncio.create_task(self._pump_stderr(), name=f"shard-log-{self.role}"))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise ShardStartError(f"the shard process did not start within {timeout_s:.0f} s") from None
        if not line:
            code = await proc.wait()
            await self._drain_logs()
            await self._cancel_tasks()
            raise ShardStartError(f"the shard process {self._exit(code).describe()}")
        ready = json.loads(line)
        self.n_ctx = int(ready["n_ctx"])
        self._client = RemoteShard(f"unix:{self.spec.socket}", self.role, self.model,
                                   f"{self.role} shard process {proc.pid}",
                                   credentials=grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"shard-watch-{self.role}"))
        log.info("%s/%s serving in process %d (%.1f s to start)", self.role, self.model, proc.pid,
                 loop.time() - self.started_at)

    async def stop(self) -> None:
        """Stops the process (SIGTERM, SIGKILL after STOP_GRACE_S); on_exit is not called."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("%r did not stop within %.0f s; killing it", self, STOP_GRACE_S)
                proc.kill()
                await proc.wait()
        if self._client is not None:
            await self._client.close()
        await self._cancel_tasks()

    async def _watch(self) -> None:
        code = await self._proc.wait()
        if self._stopping:
            return
        await self._drain_logs()
        exit_ = self._exit(code)
        log.error("%s/%s process %d %s", self.role, self.model, self._proc.pid, exit_.describe())
        if self._client is not None:
            await self._client.close()
        await self._on_exit(self, exit_)

    def _exit(self, code: int) -> Exit:
        return Exit(code, tuple(self._tail), tuple(self._fatal))

    async def _pump_stderr(self) -> None:
        stream = self._proc.stderr
        prefix = f"[{self.role}/{self.model}] "
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._tail.append(text)
                if _FATAL.search(text):
                    self._fatal.append(text.strip())
                log.info("%s%s", prefix, text)

    async def _drain_logs(self) -> None:
        """Lets the stderr pump read what the process wrote before it ended (bounded)."""
        pump = self._tasks[0] if self._tasks else None
        if pump is not None:
            await asyncio.wait({pump}, timeout=2.0)

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their CancelledError is the expected end


class GeneratorProcess(ShardProcess):
    kind = ShardKind.GENERATOR

    async def open(self, req: GenerateRequest) -> Opened:
        opened = await self.client().open(req)
        tally = _Tally(self.metrics, self.model, opened.prompt_tokens, opened.choices)

        def cancel() -> None:
            opened.cancel()
            tally.settle()

        return Opened(opened.prompt_tokens, opened.choices, tally.count(opened.events), cancel,
                      opened.prompt_token_ids)


class _Tally:
    """Counts a request's generations in the node's metrics as they end: each Finished as the shard
    reports it, and every choice still running or queued when the caller stops listening as
    "cancelled" (the shard's own Finished("cancelled") never crosses a cancelled call)."""

    def __init__(self, metrics: Metrics, model: str, prompt_tokens: int, choices: int) -> None:
        self.metrics, self.model, self.prompt_tokens = metrics, model, prompt_tokens
        self.open = set(range(choices))
        self.tokens = collections.Counter()

    async def count(self, events: AsyncIterator[tuple[int, Event]]) -> AsyncIterator[tuple[int, Event]]:
        try:
            async for index, event in events:
                if isinstance(event, Piece):
                    self.tokens[index] += len(event.tokens)
                elif isinstance(event, Finished):
                    self.metrics.record_generation(self.model, event)
                    self.open.discard(index)
                elif isinstance(event, Failed):
                    self.open.discard(index)  # lost with its process: resumed elsewhere, counted there
                yield index, event
        finally:
            self.settle()

    def settle(self) -> None:
        for index in sorted(self.open):
            self.metrics.record_generation(self.model, Finished("cancelled", self.prompt_tokens, self.tokens[index]))
        self.open.clear()


class EncoderProcess(ShardProcess):
    kind = ShardKind.ENCODER

    async def embed(self, texts: list[str]):
        return await self.client().embed(texts)


def shard_process(spec: HostSpec, metrics: Metrics,
                  on_exit: Callable[[ShardProcess, Exit], Awaitable[None]]) -> ShardProcess:
    cls = EncoderProcess if spec.kind == "onnx" else GeneratorProcess
    return cls(spec, metrics, on_exit)


def run_dir(data_dir: Path) -> Path:
    """The private directory for shard sockets (0700: only meshd's user may connect)."""
    path = data_dir / "run"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path
