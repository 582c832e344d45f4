"""The node daemon: data dir, Raft, model file, shard and gateway, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from mesh.config import MeshConfig, ModelSpec
from mesh.datadir import DataDir
from mesh.gateway.app import create_app
from mesh.gateway.metrics import Metrics
from mesh.gateway.service import Gateway
from nodes.profile import local_profile
from raft.commands import AddMember, AssignShard, Command, InitMesh, RegisterModel, SetShardState
from raft.node import RaftNode, RaftTiming
from raft.state import MeshState
from shards.backend import load_backend
from shards.local import LocalShard
from shards.model_files import ensure_model

log = logging.getLogger("quorum.node")

# Runtime memory beyond the model file and its KV cache (llama.cpp buffers, Python, gateway).
_RUNTIME_OVERHEAD = 150 * 1024 * 1024
_KV_BYTES_PER_TOKEN = 18 * 1024  # Gemma 3 270M; a rough default for models not yet measured


class StartupError(RuntimeError):
    """The node cannot start (port taken, bad model file, ...); the message says why."""


@dataclass(frozen=True)
class NodeOptions:
    data_dir: Path
    config: MeshConfig
    name: str | None = None
    backend: str = "llama"  # "null" serves without weights (tests of everything around the model)
    progress: bool = True


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class NodeDaemon:
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.cfg = opts.config
        self.dd = DataDir(opts.data_dir)
        self.raft: RaftNode | None = None
        self.gateway = Gateway(self.cfg, Metrics())
        self.identity = None

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        self.dd.prepare()
        self.identity = self.dd.identity(self.opts.name)
        sock = _bind(cfg.node.host, cfg.node.port)
        raft_host, _, raft_port = cfg.node.raft_address.rpartition(":")
        _bind(raft_host, int(raft_port)).close()  # a clear error now rather than pysyncobj retrying forever
        log.info("node %s (%s) starting in %s", self.identity.name, self.identity.node_id, self.dd.path)
        self.raft = RaftNode(cfg.node.raft_address, [], self.dd.raft_dir, self.dd.secret(), _timing(cfg))
        app = create_app(self.gateway, self.status)
        server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                        timeout_graceful_shutdown=3, timeout_keep_alive=30))
        try:
            async with asyncio.TaskGroup() as tasks:
                serving = tasks.create_task(server.serve(sockets=[sock]), name="http")
                log.info("gateway listening on http://%s/v1", cfg.node.listen)
                starting = tasks.create_task(self._start_shards(), name="startup")
                stopping = tasks.create_task(stop.wait(), name="stop-signal")
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                log.info("shutting down")
                starting.cancel()
                stopping.cancel()
                server.should_exit = True
        finally:
            await self._stop_shards()
            self.raft.close()
            sock.close()
            log.info("node %s stopped", self.identity.name)

    async def _start_shards(self) -> None:
        """Records this node, its model and its reasoning shard in the log, then loads the model."""
        cfg, raft, ident = self.cfg, self.raft, self.identity
        self.gateway.loading_detail = "waiting for the Raft leader"
        await _until(lambda: raft.is_leader() and raft.is_ready(), what="Raft leadership")
        spec = cfg.models_for("reasoning")[0]
        self.gateway.loading_detail = f"preparing model file {spec.file}"
        path = await asyncio.to_thread(ensure_model, self.dd.models_dir, spec.file, spec.sha256,
                                       spec.package, self.opts.progress)
        size = path.stat().st_size
        state = raft.state
        if not state.initialised:
            await self._propose(InitMesh(mesh_id=uuid.uuid4().hex, name=ident.name, created_at=time.time()))
        await self._propose(AddMember(node_id=ident.node_id, name=ident.name, http_address=cfg.node.listen,
                                      raft_address=cfg.node.raft_address, profile=local_profile(),
                                      joined_at=time.time()))
        model = raft.state.models.get(spec.name)
        if model is None or model.sha256 != spec.sha256 or model.size != size:
            await self._propose(_register(spec, size))
        await self._propose(AssignShard(role="reasoning", model=spec.name, node_id=ident.node_id))
        await self._propose(SetShardState("reasoning", spec.name, ident.node_id, "loading"))
        self.gateway.loading_detail = f"loading {spec.name}"
        try:
            backend = await asyncio.to_thread(load_backend, self.opts.backend, path=str(path),
                                              n_ctx=spec.context_length, threads=cfg.node.resolved_threads())
        except Exception as exc:  # a model that will not load is reported in the log and the state
            await self._propose(SetShardState("reasoning", spec.name, ident.node_id, "failed", str(exc)[:500]))
            self.gateway.loading_detail = f"model failed to load: {exc}"
            raise StartupError(f"cannot load {path}: {exc}") from exc
        metrics = self.gateway.metrics
        shard = LocalShard("reasoning", spec.name, backend, cfg.gateway.queue_depth, spec.chat_template,
                           on_finish=lambda f: metrics.record_generation(spec.name, f))
        # The log says "ready" before /health does, so a client that saw 200 sees a ready shard too.
        await self._propose(SetShardState("reasoning", spec.name, ident.node_id, "ready"))
        self.gateway.attach(shard)
        log.info("ready: %s serving %s", ident.name, spec.name)

    async def _stop_shards(self) -> None:
        shards = self.gateway.detach_all()
        for shard in shards:
            await asyncio.to_thread(shard.close)
            with contextlib.suppress(Exception):
                # Best effort: the log records the shard as no longer serving. A failure here
                # (no leader while shutting down) changes nothing: a restart re-records it.
                await asyncio.wait_for(self._propose(
                    SetShardState(shard.role, shard.model, self.identity.node_id, "assigned")), 1.0)

    async def _propose(self, cmd: Command) -> dict:
        return await asyncio.wrap_future(self.raft.propose(cmd))

    def status(self) -> dict[str, Any]:
        state: MeshState = self.raft.state
        return {
            "mesh": {"id": state.mesh_id, "name": state.name, "created_at": state.created_at},
            "node": {"id": self.identity.node_id, "name": self.identity.name, "listen": self.cfg.node.listen},
            "raft": self.raft.status(),
            "members": [dataclasses.asdict(m) for m in sorted(state.members.values(), key=lambda m: m.name)],
            "models": [dataclasses.asdict(m) for m in sorted(state.models.values(), key=lambda m: m.name)],
            "shards": [dataclasses.asdict(s) for s in sorted(state.shards.values(), key=lambda s: s.key)],
            "health": {"ready": self.gateway.ready, "detail": "ok" if self.gateway.ready
                       else self.gateway.loading_detail},
        }


def _register(spec: ModelSpec, size: int) -> RegisterModel:
    memory = size + spec.context_length * _KV_BYTES_PER_TOKEN + _RUNTIME_OVERHEAD
    return RegisterModel(name=spec.name, file=spec.file, sha256=spec.sha256, size=size, roles=spec.roles,
                         context_length=spec.context_length, chat_template=spec.chat_template,
                         memory_bytes=memory)


def _timing(cfg: MeshConfig) -> RaftTiming:
    r = cfg.raft
    return RaftTiming(heartbeat_s=r.heartbeat_ms / 1000, election_min_s=r.election_min_ms / 1000,
                      election_max_s=r.election_max_ms / 1000, connection_retry_s=r.connection_retry_ms / 1000,
                      leader_fallback_s=r.leader_fallback_ms / 1000,
                      compaction_min_entries=r.compaction_min_entries)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


async def _until(condition, what: str, timeout: float = 60.0, every: float = 0.02) -> None:
    """Waits for a condition (bounded), checking every `every` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise StartupError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
