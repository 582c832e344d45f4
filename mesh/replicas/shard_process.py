"""One model shard in a child process (shards/host.py), as meshd sees it.

`start()` spawns `python -m shards.host`, waits for its "ready" line, and connects a RemoteShard
client to its Unix socket, so a local replica is used exactly like one on another member (the
same gRPC Shard protocol, the same refusals, the same broken-stream Failed events that make the
gateway resume a stream elsewhere). Spawning, the stderr log, the watch and stop are the supervision
every child of meshd gets (mesh/replicas/child_supervision.py): when the process dies on its own (a
crash, the OOM killer), the `on_exit` callback gets an Exit that says how, with its last log lines.

GeneratorProcess serves `open()` (chat and completions), EncoderProcess `embed()` (the context
role); both count their finished generations or calls in the node's metrics.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import grpc

from mesh.core.metrics import Metrics
from mesh.replicas.child_supervision import Exit, SupervisedChild
from mesh.replicas.remote_shard import RemoteShard
from shards.host import HostSpec
from shards.types import Event, Failed, Finished, GenerateRequest, NotReady, Opened, Piece, ShardKind

log = logging.getLogger("quorum.shard-process")


class ShardStartError(RuntimeError):
    """The shard process exited or timed out before it was serving; the message says how."""


class ShardProcess(SupervisedChild):
    kind: ShardKind
    log = log

    def __init__(self, spec: HostSpec, metrics: Metrics,
                 on_exit: Callable[["ShardProcess", Exit], Awaitable[None]]) -> None:
        super().__init__(on_exit)
        self.spec = spec
        self.role = spec.role
        self.model = spec.model
        self.metrics = metrics
        self.n_ctx = 0
        self.started_at = 0.0
        self._client: RemoteShard | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role}/{self.model}, pid {self.pid})"

    @property
    def what(self) -> str:
        return f"{self.role}/{self.model}"

    @property
    def label(self) -> str:
        return f"shard-{self.role}"

    # -- what the router and the gRPC service read -----------------------------------------

    @property
    def ready(self) -> bool:
        return self._client is not None and self.alive

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
        proc = await self._spawn(sys.executable, "-m", "shards.host", self.spec.to_json())
        self.started_at = loop.time()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise ShardStartError(f"the shard process did not start within {timeout_s:.0f} s") from None
        if not line:
            raise ShardStartError(f"the shard process {(await self._startup_failed()).describe()}")
        ready = json.loads(line)
        self.n_ctx = int(ready["n_ctx"])
        self._client = RemoteShard(f"unix:{self.spec.socket}", self.role, self.model,
                                   f"{self.role} shard process {proc.pid}",
                                   credentials=grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))
        self._watch_from_now()
        log.info("%s/%s serving in process %d (%.1f s to start)", self.role, self.model, proc.pid,
                 loop.time() - self.started_at)

    async def _closing(self) -> None:
        if self._client is not None:
            await self._client.close()


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
