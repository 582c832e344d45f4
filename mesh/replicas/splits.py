"""This member's part in split models (meshctl split): the stages it runs and the tunnels its heads use.

Raft records each pipeline (raft/state.py `Split`: the head member, the stage members and their layer
counts). The reconciler (mesh/replicas/reconciler.py) calls `step(state)` on every round and, when it starts
a head here, `head_stages(split)` for the endpoints the head process talks RPC to.

On a stage member: one stage process per split model that names this member (mesh/replicas/stage_process.py),
restarted when it dies (at once the first time, then after RESTART_BACKOFF_S doubling up to
RESTART_BACKOFF_MAX_S, never given up while the split stands: a head cannot run without it), and the tunnel
listener (mesh/replicas/rpc_tunnel.py StageTunnelServer, on the listen host, port + 4) while there is at
least one. Only the live head member of that model's split is let through, to that model's stage.

On a head member: one loopback HeadTunnel per stage, kept while the split stands, so a restarted head process
finds the same endpoints; each connection is carried over TLS to the stage member, whose certificate must
name it.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any, Callable

from mesh.replicas.rpc_tunnel import TUNNEL_PORT_OFFSET, HeadTunnel, StageTunnelServer, tunnel_address_of
from mesh.replicas.shard_process import Exit
from mesh.replicas.stage_process import StageProcess, StageStartError
from raft.state import MeshState, Split
from raft.vocab import MemberState

log = logging.getLogger("quorum.splits")

RESTART_BACKOFF_S = 1.0  # after the 2nd exit; doubles with each one within CRASH_WINDOW_S
RESTART_BACKOFF_MAX_S = 30.0
CRASH_WINDOW_S = 120.0
RETRY_BIND_S = 5.0  # the tunnel port was taken: try again after this long


class SplitRunner:
    def __init__(self, node_id: str, state: Callable[[], MeshState], identity: Any, host: str, listen_port: int,
                 threads: int, cache_dir: Path | None, wake: Callable[[], None]) -> None:
        """`identity`: this member's LiveIdentity (mesh/security/renewal.py): a server context that follows
        renewals for the tunnel listener, and the current certificate for each dial."""
        self.node_id, self.state, self.identity = node_id, state, identity
        self.host, self.tunnel_port = host, listen_port + TUNNEL_PORT_OFFSET
        self.threads, self.cache_dir, self.wake = threads, cache_dir, wake
        self.stages: dict[str, StageProcess] = {}  # model -> its stage here
        self.heads: dict[tuple[str, str], HeadTunnel] = {}  # (model, stage node id) -> tunnel
        self.server: StageTunnelServer | None = None
        self.restarts: collections.Counter[str] = collections.Counter()
        self.last_exit: dict[str, str] = {}
        self._exits: dict[str, collections.deque[float]] = {}
        self._not_before: dict[str, float] = {}  # model -> monotonic time its stage may start again
        self._server_not_before = 0.0

    def local_stages(self, state: MeshState) -> dict[str, int]:
        """model -> layers, for every split with a stage on this member."""
        return {split.model: layers for split in state.splits.values()
                for node_id, layers in split.stages if node_id == self.node_id}

    async def step(self, state: MeshState) -> None:
        want = self.local_stages(state)
        for model in sorted(self.stages):
            if want.get(model) != self.stages[model].layers:
                stage = self.stages.pop(model)
                await stage.stop()
                log.info("stopped the stage of %s (no longer placed here)", model)
        for model, layers in sorted(want.items()):
            if model not in self.stages and time.monotonic() >= self._not_before.get(model, 0.0):
                await self._start_stage(model, layers)
        await self._tunnel_server(bool(want))
        headed = {(s.model, node_id) for s in state.splits.values() if s.head == self.node_id
                  for node_id, _ in s.stages}
        for key in sorted(set(self.heads) - headed):
            await self.heads.pop(key).close()

    async def head_stages(self, split: Split) -> tuple[str, ...]:
        """"ENDPOINT=LAYERS" per stage of `split` (headed here), each a loopback tunnel to the stage's member."""
        out = []
        for node_id, layers in split.stages:
            tunnel = self.heads.get((split.model, node_id))
            if tunnel is None:
                tunnel = HeadTunnel(split.model, lambda n=node_id: self._stage_target(n), self._client_context)
                await tunnel.start()
                self.heads[(split.model, node_id)] = tunnel
            out.append(f"{tunnel.endpoint}={layers}")
        return tuple(out)

    def authorize(self, caller: str, model: str) -> str | None:
        """The loopback endpoint of `model`'s stage here, if `caller` is the live head of its split."""
        state = self.state()
        split = state.splits.get(model)
        member = state.members.get(caller)
        if split is None or split.head != caller or member is None or member.state == MemberState.GONE:
            return None
        if self.node_id not in (node_id for node_id, _ in split.stages):
            return None
        stage = self.stages.get(model)
        return stage.endpoint if stage is not None and stage.running else None

    def status(self) -> list[dict]:
        return [{"model": model, "layers": stage.layers, "pid": stage.pid, "endpoint": stage.endpoint,
                 "restarts": self.restarts[model], "last_exit": self.last_exit.get(model, "")}
                for model, stage in sorted(self.stages.items())]

    async def close(self) -> None:
        for key in list(self.heads):
            await self.heads.pop(key).close()
        if self.server is not None:
            await self.server.close()
            self.server = None
        for model in list(self.stages):
            await self.stages.pop(model).stop()

    # -- internals ---------------------------------------------------------------------------

    async def _start_stage(self, model: str, layers: int) -> None:
        cache = self.cache_dir / "stage-cache" if self.cache_dir is not None else None
        stage = StageProcess(model, layers, self.threads, cache, self._exited)
        try:
            await stage.start()
        except (StageStartError, OSError) as exc:  # reported and retried after a back-off, never fatal to meshd
            log.warning("the stage of %s did not start: %s", model, exc)
            self._backoff(model, str(exc))
            return
        self.stages[model] = stage

    async def _exited(self, stage: StageProcess, exit_: Exit) -> None:
        if self.stages.get(stage.model) is stage:
            del self.stages[stage.model]
        self.restarts[stage.model] += 1
        self._backoff(stage.model, exit_.describe())
        self.wake()

    def _backoff(self, model: str, why: str) -> None:
        now = time.monotonic()
        exits = self._exits.setdefault(model, collections.deque())
        exits.append(now)
        while exits and exits[0] < now - CRASH_WINDOW_S:
            exits.popleft()
        delay = 0.0 if len(exits) == 1 else min(RESTART_BACKOFF_S * 2 ** (len(exits) - 2), RESTART_BACKOFF_MAX_S)
        self._not_before[model] = now + delay
        self.last_exit[model] = f"{time.strftime('%H:%M:%S')} {why}"[:300]
        log.warning("stage of %s: %s; starting again in %.0f s", model, why, delay)

    async def _tunnel_server(self, wanted: bool) -> None:
        if wanted and self.server is None and time.monotonic() >= self._server_not_before:
            server = StageTunnelServer(self.host, self.tunnel_port, self.identity.server_context(), self.authorize)
            try:
                await server.start()
            except OSError as exc:  # the port is taken: said in the log, tried again shortly
                log.error("cannot listen for stage tunnels on %s:%d: %s", self.host, self.tunnel_port, exc)
                self._server_not_before = time.monotonic() + RETRY_BIND_S
                return
            self.server = server
        elif not wanted and self.server is not None:
            await self.server.close()
            self.server = None

    def _stage_target(self, node_id: str) -> tuple[str, str] | None:
        member = self.state().members.get(node_id)
        if member is None or member.state == MemberState.GONE:
            return None
        return tunnel_address_of(member), node_id

    def _client_context(self):
        return self.identity().client_context()
