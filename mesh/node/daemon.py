"""The node daemon: Raft, the gateway and control API, the gRPC data plane, placement (while
leader) and this node's shards, started and stopped in order."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from mesh.cluster.catalog import register_models
from mesh.cluster.control import Control, ControlPlane
from mesh.cluster.placer import Placer, battery_policy
from mesh.cluster.profile_refresh import ProfileRefresher
from mesh.cluster.readiness import why_no_replica
from mesh.cluster.sessions import SessionLog, recorded_replica
from mesh.cluster.witness import LeadershipHandoff
from mesh.core.config import MeshConfig
from mesh.core.errors import StartupError
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.forward import LeaderForwarder
from mesh.gateway.service import Gateway
from mesh.node.credentials import AuthorityKeeper, trust_keeper
from mesh.node.leave import leave_mesh
from mesh.node.startup import bind, peer_address_of, raft_limits, raft_timing, until
from mesh.node.status import status_view
from mesh.replicas.router import Router
from mesh.security.admin import AdminCheck, ensure_member_credential
from mesh.security.api_keys import ApiKeyCheck
from mesh.security.api_keys import required as api_keys_required
from mesh.security.authority import Authority, NoAuthority, authority_peers
from mesh.security.datadir import DataDir, NodeRecord
from mesh.security.gateway_tls import MeshGatewayCertificate, gateway_context, gateway_names
from mesh.security.http_guard import limits_from, public_server
from mesh.security.peer_tls import PeerGate, StripRelayHeaders, peer_client, peer_server
from mesh.security.pki import PkiError
from mesh.security.renewal import LiveIdentity, Renewer
from nodes.profile import local_profile
from raft.commands import AddMember, Command
from raft.node import ProposalFailed, RaftNode
from raft.state import MeshState, Rejected
from raft.tls import RaftTls
from raft.vocab import MemberState

log = logging.getLogger("quorum.node")



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
        self.live = LiveIdentity(self.identity)  # this member's certificate as renewals replace it
        if self.dd.retire_secret():  # a data dir from before the mesh secret was retired
            log.info("deleted mesh.secret from %s: nothing uses it any more", self.dd.path)
        self.admin_token = self.dd.admin_token()
        self.raft: RaftNode | None = None
        self.metrics = Metrics()
        self.reconciler = None
        self.gateway_cert: MeshGatewayCertificate | None = None
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
        changes = _Changes(asyncio.get_running_loop(), 5)
        log.info("node %s (%s) starting in %s", record.name, record.node_id, self.dd.path)
        raft_tls = RaftTls.from_pem(self.identity.cert_pem, self.identity.key_pem, self.identity.ca_pem)
        self.live.on_change(lambda i: raft_tls.reload(i.cert_pem, i.key_pem, i.ca_pem))
        self.raft = raft = RaftNode(node.raft_address, list(record.partners), self.dd.raft_dir, "",
                                    raft_timing(cfg), on_applied=changes.notify, limits=raft_limits(cfg),
                                    journal_sync=cfg.raft.journal_sync, tls=raft_tls)
        signing = peer_client(self.live, 15.0, expect=self._member_at)
        self.authority = Authority(record.node_id, lambda: self.live().ca_pem, self.dd.ca_key, lambda: raft.state,
                                   lambda: authority_peers(raft.state, record.node_id, peer_address_of),
                                   lambda: signing, cfg.security.node_cert_days)
        try:
            tls = await self._gateway_tls()
        except BaseException:
            raft.close()
            await signing.aclose()
            raise
        self.metrics.watch_sessions(lambda: raft.state)
        placer = Placer(raft, cfg.placement.grace_s, cfg.placement.reserve_mib << 20,
                        battery=battery_policy(cfg.placement))
        # Another member's slots come from its profile (its node.parallel); this member's stand in where none says.
        router = Router(record.node_id, lambda: raft.state, self._local_shards, self._remote_shard,
                        default_slots=cfg.node.resolved_parallel())
        gateway = Gateway(cfg, self.metrics, router,
                          SessionLog(raft, cfg.sessions.checkpoint_tokens, cfg.sessions.checkpoint_ms))
        gateway.admission.unready_reason = lambda model: why_no_replica(raft.state, model)
        gateway.admission.recorded_replica = lambda owner, session_id: recorded_replica(raft.state, owner, session_id)
        control = Control(ControlPlane(raft=raft, ca_pem=lambda: self.live().ca_pem,
                                       status=self.status, leader_peer=self.leader_peer,
                                       leave=self.leave, authority=self.authority,
                                       authorities=cfg.security.authorities))
        forwarder = LeaderForwarder(create_app(gateway, control.routes()), self._gateway_here, self._leader_url,
                                    cfg.gateway.max_body_bytes, cfg.gateway.retry_after_s,
                                    client=lambda: peer_client(self.live, httpx.Timeout(10.0, read=None),
                                                               expect=self._member_at))
        enforce = api_keys_required(cfg.gateway.api_keys, node.host)
        admin = AdminCheck(forwarder, lambda: raft.state, lambda: self.admin_token)
        app = ApiKeyCheck(admin, lambda: raft.state, enforce,
                          hosts=(node.host, node.public_host), max_inflight=cfg.gateway.max_inflight_per_key,
                          retry_after_s=cfg.gateway.retry_after_s)
        limits = limits_from(cfg.gateway)
        peers = peer_server(PeerGate(app, lambda: raft.state, lambda: self.live().ca_pem), self.identity, limits,
                            is_member=self._live_member, context=self.live.server_context())
        public = StripRelayHeaders(app)
        if enforce:
            log.info("the gateway requires API keys (gateway.api_keys = %s)", cfg.gateway.api_keys)
        server = public_server(public, limits, tls)
        grpc_server = None
        try:
            async with asyncio.TaskGroup() as tasks:
                serving = tasks.create_task(server.serve(sockets=[sock]), name="http")
                peering = tasks.create_task(peers.serve(sockets=[peer_sock]), name="peer-https")
                log.info("gateway and control API on %s://%s (Raft %s, peers https://%s)",
                         "https" if tls else "http", node.listen,
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
                keeper = AuthorityKeeper(raft, self.dd, record.node_id, cfg, self.propose)
                loops.append(tasks.create_task(_after(announced, keeper.run(changes.events[3])), name="authority"))
                renewer = Renewer(self.live, self.dd.path, record.node_id, self.authority.sign)
                loops.append(tasks.create_task(_after(announced, renewer.run()), name="renewal"))
                trust = trust_keeper(raft, self.dd, record.node_id, cfg, self.live, self.propose, lambda: signing,
                                     renewer.wake)  # CA rotations (mesh/security/ca_rotation.py)
                loops.append(tasks.create_task(_after(announced, trust.run(changes.events[4])), name="trust"))
                if self.gateway_cert is not None:
                    identity_changed = asyncio.Event()
                    self.live.on_change(lambda _identity: identity_changed.set())
                    loops.append(tasks.create_task(self.gateway_cert.run(identity_changed), name="gateway-cert"))
                if cfg.discovery.advertise:  # mDNS for `meshd join --discover`; never fails the node
                    from mesh.cluster.discovery import advertise
                    from mesh.security.pki import fingerprint

                    ca_changed = asyncio.Event()
                    self.live.on_change(lambda _identity: ca_changed.set())
                    loops.append(tasks.create_task(advertise(cfg, record.mesh_id, record.node_id, record.name,
                                                             lambda: fingerprint(self.live().ca_pem), ca_changed),
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
            await signing.aclose()
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
        from mesh.security.grpc_tls import MemberOnly, server_credentials
        from shards.grpc_service import SERVER_OPTIONS, NodeService, ShardService

        def fetch(*args, **kwargs):  # the certificate held now (renewals)
            return fetch_model(*args, credentials=self.live.grpc_channel_credentials(), expect=self._member_at_grpc,
                               **kwargs)

        self.reconciler = Reconciler(self.record.node_id, self.raft, self.dd.models_dir, self.cfg,
                                     self.opts.backend, self.metrics, fetch, self.opts.progress, run_dir(self.dd.path),
                                     identity=self.live)  # split models: stage tunnels (mesh/replicas/splits.py)
        member_only = MemberOnly(self._live_member, lambda: self.live().ca_pem)  # a live id, from a CA trusted now
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[member_only])
        ShardService(self._local_shards).add_to(server)
        NodeService(self.dd.models_dir).add_to(server)
        host = self.cfg.node.host
        address = f"{f'[{host}]' if ':' in host else host}:{self.cfg.node.grpc_address.rpartition(':')[2]}"
        if server.add_secure_port(address, server_credentials(self.live)) == 0:
            raise StartupError(f"cannot listen for gRPC on {address}")
        await server.start()
        log.info("gRPC data plane on %s", self.cfg.node.grpc_address)
        return server

    def _remote_shard(self, address: str, role: str, model: str, node_id: str):
        from mesh.replicas.remote_shard import RemoteShard

        return RemoteShard(address, role, model, node_id, credentials=self.live.grpc_channel_credentials)

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

    def _member_at_grpc(self, grpc_address: str) -> str | None:
        """The node id of the live member serving gRPC at `grpc_address` (what a model fetch accepts there)."""
        return next((m.node_id for m in self.raft.state.live_members() if m.grpc_address == grpc_address), None)

    def _member_at(self, peer_address: str) -> str | None:
        """The node id of the live member whose peer port is `peer_address` (what a peer client accepts there)."""
        return next((m.node_id for m in self.raft.state.live_members() if peer_address_of(m) == peer_address), None)

    async def _gateway_tls(self):
        """The public port's TLS context (gateway.tls). A mesh certificate is signed by an authority: here, or,
        on a member without the CA key, by another member once this one knows the mesh (a caught-up log)."""
        cfg, loop = self.cfg, asyncio.get_running_loop()

        async def ready_then_sign(body: dict) -> bytes:
            if not self.authority.here():
                await until(self.raft.is_ready, "the Raft log to catch up (an authority signs the gateway "
                                                "certificate)", 120)
            return await self.authority.sign(body)

        def sign(csr_pem: bytes, names: tuple[str, ...]) -> bytes:
            job = ready_then_sign({"kind": "gateway", "csr": csr_pem.decode(), "names": list(names)})
            try:
                return asyncio.run_coroutine_threadsafe(job, loop).result(150)
            except (NoAuthority, StartupError) as exc:
                raise PkiError(str(exc)) from None

        if cfg.gateway.tls == "mesh":  # renewed while the member runs, and after a CA rotation
            self.gateway_cert = MeshGatewayCertificate(self.dd.path, lambda: self.live().ca_pem,
                                                       gateway_names(cfg.node.advertise, cfg.node.host), sign)
            return await asyncio.to_thread(self.gateway_cert.context)
        return await asyncio.to_thread(
            gateway_context, cfg.gateway.tls, self.dd.path, cert_file=cfg.gateway.tls_cert,
            key_file=cfg.gateway.tls_key)

    def _live_member(self, node_id: str) -> bool:
        member = self.raft.state.members.get(node_id)
        return member is not None and member.state != MemberState.GONE

    async def _announce(self) -> None:
        """Once the log is caught up: refresh this member's addresses and profile, and register the
        catalog models this node can provide (assembling packaged ones into the data dir)."""
        raft, record, node = self.raft, self.record, self.cfg.node
        await until(lambda: raft.is_ready() and raft.leader() is not None, "the Raft log to catch up", 300)
        profile = {**await asyncio.to_thread(local_profile, node.memory_budget_bytes),
                   "threads": self.cfg.node.resolved_threads(), "parallel": self.cfg.node.resolved_parallel()}
        # An election at this moment (pre-vote at start-up) must not end this member: each step is tried again.
        await self.propose_until_taken(AddMember(
            node_id=record.node_id, name=record.name, http_address=node.http_address, raft_address=node.raft_address,
            grpc_address=node.grpc_address, profile=profile, joined_at=time.time(), witness=record.witness,
            peer_address=node.peer_address))
        fresh = await ensure_member_credential(
            raft.state, record.node_id, record.name, self.admin_token,
            lambda cmd: self.propose_until_taken(cmd, applied=lambda: cmd.cred_id in raft.state.admins))
        if fresh is not None:  # a data dir from before credentials were recorded in the log, or a lost one
            self.dd.write_admin_token(fresh)
            self.admin_token = fresh
            log.info("recorded this member's admin credential (admin.token)")
        if not self.witness:
            await register_models(self.cfg.models, self.dd.models_dir, raft.state.models, self.propose_until_taken,
                                  self.opts.progress, self.cfg.node.resolved_parallel())

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

    async def propose_until_taken(self, cmd: Command, within_s: float = 120.0,
                                  applied: Callable[[], bool] = lambda: False) -> dict:
        """propose(), tried again while the log cannot take the command (a leader change, no leader yet, a
        timeout), for up to `within_s`; a command the state refuses (Rejected) is not tried again. A failed
        proposal may still have been committed: `applied` tells, for a command that is not idempotent."""
        deadline, delay, tries = time.monotonic() + within_s, 0.2, 0
        while True:
            tries += 1
            try:
                return await self.propose(cmd)
            except Rejected:
                if tries > 1 and applied():  # an earlier try committed after all; this one found it done
                    return {}
                raise
            except (ProposalFailed, asyncio.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("%s not taken (%s); trying again", type(cmd).__name__, exc or "timed out")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                if applied():
                    return {}

    async def leave(self) -> dict:
        """Drains this node, has the leader remove it from the group, forgets the mesh, and stops."""
        async with peer_client(self.live, expect=self._member_at) as client:
            await leave_mesh(self.raft, self.record.node_id, self.propose, self._leader_url, client,
                             self.admin_token)
        self.record = dataclasses.replace(self.record, mesh_id="", partners=())
        self.dd.forget_mesh(self.record)
        asyncio.get_running_loop().call_later(0.3, self.stopping.set)
        log.info("left the mesh")
        return {"left": self.record.name}

    def status(self) -> dict[str, Any]:
        return status_view(self.raft, self.record, self.cfg, self.reconciler)



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


