"""This member's part in split models (meshctl split): the stages it runs and the tunnels its heads use.

Raft records each pipeline (raft/records.py `Split`: the head member, the stage members and their layer
counts, and each stage's reported state). The reconciler (mesh/replicas/reconciler.py) calls `step(state)` on
every round and, when it starts a head here, `head_stages(split)` for the endpoints the head process talks RPC
to; it starts a head only once every stage of its split reports "ready" (`stages_pending`), so no reconciler
waits on a stage that is still coming up.

On a stage member: one stage process per split model that names this member (mesh/replicas/stage_process.py),
restarted when it dies (at once the first time, then after RESTART_BACKOFF_S doubling up to
RESTART_BACKOFF_MAX_S, never given up while the split stands: a head cannot run without it), and the tunnel
listener (mesh/replicas/rpc_tunnel.py StageTunnelServer, on the listen host, port + 4) while there is at
least one. Only the live head member of that model's split is let through, to that model's stage.

Each stage's state goes to Raft (SetStageState, proposed by this member for itself whenever Raft's record
differs from what this member knows): "starting"; "ready" once the stage listens; "failed" with a one-line
reason when it cannot serve: this member's copy of the GGUF differs from the mesh's (sha256: hashed in a
task of its own, off the event loop, mesh/replicas/copy_check.py; the stage stays "starting" meanwhile), the stage
cannot allocate its share, the head runs another llama.cpp build (RPC protocol), it failed to start, or it
crash-loops. A failed stage is tried again after FAILED_RETRY_S (the placer may meanwhile plan around it).

On a head member: one loopback HeadTunnel per stage, kept while the split stands, so a restarted head process
finds the same endpoints; each connection is carried over TLS to the stage member, whose certificate must
name it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from mesh.replicas.child_supervision import Exit, child_socket
from mesh.replicas.copy_check import CopyCheck
from mesh.replicas.rpc_tunnel import TUNNEL_PORT_OFFSET, HeadTunnel, StageTunnelServer, tunnel_address_of
from mesh.replicas.stage_process import StageProcess, StageStartError
from raft.commands import Command, SetStageState
from raft.state import MeshState, Split
from raft.vocab import MemberState
from shards import rpc_ggml
from shards.model_files import ModelFileError, model_path

log = logging.getLogger("quorum.splits")

RESTART_BACKOFF_S = 1.0  # after the 2nd exit; doubles with each one within CRASH_WINDOW_S
RESTART_BACKOFF_MAX_S = 30.0
CRASH_WINDOW_S = 120.0
CRASH_LOOP = 4  # exits within CRASH_WINDOW_S that make the stage "failed" (still restarted)
FAILED_RETRY_S = 60.0  # a stage that could not serve (a bad GGUF, no memory, another build) is tried again
RETRY_BIND_S = 5.0  # the tunnel port was taken: try again after this long
STARTING, READY, FAILED = "starting", "ready", "failed"


def stages_pending(split: Split, names: Callable[[str], str] = str) -> str | None:
    """Why the head of `split` cannot start yet ("beta: starting", "gamma: failed: ..."), or None once every
    stage reports "ready" in Raft. `names(node_id)` -> a member's name for the reason."""
    waiting = []
    for node_id, _ in split.stages:
        recorded = split.stage_state(node_id)
        if recorded is None or recorded[0] != READY:
            said = "not reported" if recorded is None else ": ".join(filter(None, recorded))
            waiting.append(f"{names(node_id)}: {said}")
    return "; ".join(waiting) or None


class SplitRunner:
    def __init__(self, node_id: str, state: Callable[[], MeshState], identity: Any, host: str, listen_port: int,
                 threads: int, cache_dir: Path | None, wake: Callable[[], None],
                 report: Callable[[Command], Awaitable[None]] | None = None,
                 models_dir: Path | None = None) -> None:
        """`identity`: this member's LiveIdentity (mesh/security/renewal.py): a server context that follows
        renewals for the tunnel listener, and the current certificate for each dial. `report(cmd)` proposes
        a stage's state to Raft (best effort); `models_dir`: where this member keeps model files (a local
        copy of a split model's GGUF is checked against the mesh's sha256 before its stage serves)."""
        self.node_id, self.state, self.identity = node_id, state, identity
        self.host, self.tunnel_port = host, listen_port + TUNNEL_PORT_OFFSET
        self.threads, self.cache_dir, self.wake = threads, cache_dir, wake
        self.report, self.models_dir = report, models_dir
        self.stages: dict[str, StageProcess] = {}  # model -> its stage here
        self.heads: dict[tuple[str, str], HeadTunnel] = {}  # (model, stage node id) -> tunnel
        self.server: StageTunnelServer | None = None
        self.restarts: collections.Counter[str] = collections.Counter()
        self.last_exit: dict[str, str] = {}
        self.states: dict[str, tuple[str, str]] = {}  # model -> (state, detail) of its stage here, as we know it
        self._exits: dict[str, collections.deque[float]] = {}
        self._not_before: dict[str, float] = {}  # model -> monotonic time its stage may start again
        self._server_not_before = 0.0
        self.copies = CopyCheck(wake)  # this member's copies of split models' GGUFs, hashed off the loop
        self._reporting: dict[str, asyncio.Task] = {}  # model -> its SetStageState in flight
        self._protocol = _protocol()

    def local_stages(self, state: MeshState) -> dict[str, int]:
        """model -> layers, for every split with a stage on this member."""
        return {split.model: layers for split in state.splits.values()
                for node_id, layers in split.stages if node_id == self.node_id}

    async def step(self, state: MeshState) -> None:
        want = self.local_stages(state)
        now = time.monotonic()
        for model in sorted(self.stages):
            failed_out = self.states.get(model, ("",))[0] == FAILED and now >= self._not_before.get(model, 0.0)
            if want.get(model) != self.stages[model].layers or failed_out:
                stage = self.stages.pop(model)
                await stage.stop()
                log.info("stopped the stage of %s (%s)", model,
                         "to try it afresh" if failed_out else "no longer placed here")
        for model in sorted(set(self.states) - set(want)):
            del self.states[model]
        self.copies.keep(set(want))
        for model, layers in sorted(want.items()):
            if model not in self.stages and now >= self._not_before.get(model, 0.0):
                await self._start_stage(state, model, layers)
        await self._tunnel_server(bool(want))
        headed = {(s.model, node_id) for s in state.splits.values() if s.head == self.node_id
                  for node_id, _ in s.stages}
        for key in sorted(set(self.heads) - headed):
            await self.heads.pop(key).close()
        self._sync_reports(state)

    async def head_stages(self, split: Split) -> tuple[str, ...]:
        """"ENDPOINT=LAYERS" per stage of `split` (headed here), each a loopback tunnel to the stage's member."""
        out = []
        for node_id, layers in split.stages:
            tunnel = self.heads.get((split.model, node_id))
            if tunnel is None:
                tunnel = HeadTunnel(split.model, lambda n=node_id: self._stage_target(n), self._client_context,
                                    self._protocol)
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
        """Every stage placed here: its process (pid None while there is none), state, restarts, last exit."""
        models = sorted(set(self.stages) | set(self.states))
        out = []
        for model in models:
            stage = self.stages.get(model)
            state, detail = self.states.get(model, (STARTING, ""))
            out.append({"model": model, "layers": stage.layers if stage else None,
                        "pid": stage.pid if stage and stage.alive else None,
                        "endpoint": stage.endpoint if stage else "", "isolated": bool(stage and stage.isolated),
                        "state": state, "detail": detail,
                        "restarts": self.restarts[model], "last_exit": self.last_exit.get(model, "")})
        return out

    async def close(self) -> None:
        await self.copies.close()
        for task in list(self._reporting.values()):
            task.cancel()
        await asyncio.gather(*self._reporting.values(), return_exceptions=True)  # cancelled on purpose
        self._reporting.clear()
        for key in list(self.heads):
            await self.heads.pop(key).close()
        if self.server is not None:
            await self.server.close()
            self.server = None
        for model in list(self.stages):
            await self.stages.pop(model).stop()

    # -- internals ---------------------------------------------------------------------------

    def _set(self, model: str, state: str, detail: str) -> None:
        detail = " ".join(detail.split())[:300]  # one line
        if self.states.get(model) != (state, detail):
            self.states[model] = (state, detail)
            (log.error if state == FAILED else log.info)("stage of %s: %s%s", model, state,
                                                         f": {detail}" if detail else "")
            self.wake()

    def _sync_reports(self, state: MeshState) -> None:
        """Proposes SetStageState for every stage here whose Raft record differs from what we know."""
        if self.report is None:
            return
        for model, known in sorted(self.states.items()):
            split = state.splits.get(model)
            if split is None or split.stage_state(self.node_id) == known or model in self._reporting:
                continue
            task = asyncio.create_task(self.report(SetStageState(model, self.node_id, *known, at=time.time())),
                                       name=f"stage-state-{model}")
            self._reporting[model] = task
            task.add_done_callback(lambda t, m=model: self._reported(m, t))

    def _reported(self, model: str, task: asyncio.Task) -> None:
        """A report that did not commit (no quorum: `report` logs it) is proposed again on a later step; no wake
        here, so a mesh without a leader is not asked in a tight loop."""
        if self._reporting.get(model) is task:
            del self._reporting[model]

    async def _start_stage(self, state: MeshState, model: str, layers: int) -> None:
        checked, bad = self._copy_verdict(state, model)
        if not checked:  # being hashed in a task of its own: this step goes on, the verdict wakes the next one
            self._set(model, STARTING, f"{layers} layers; checking this member's copy of the model (sha256)")
            return
        if bad is not None:
            self._fail(model, bad)
            return
        self._set(model, STARTING, f"{layers} layers")
        cache = self.cache_dir / "stage-cache" if self.cache_dir is not None else None
        stage = StageProcess(model, layers, self.threads, cache, self._exited, self._fault,
                             child_socket(self.cache_dir, model, prefix="stage-"))
        try:
            await stage.start()
        except (StageStartError, OSError) as exc:  # reported and retried after a back-off, never fatal to meshd
            log.warning("the stage of %s did not start: %s", model, exc)
            delay = self._backoff(model, str(exc))
            self._set(model, FAILED, f"did not start: {exc}; retrying in {delay:.0f} s")
            return
        self.stages[model] = stage
        protocol = ".".join(map(str, self._protocol)) if self._protocol else "unknown"
        self._set(model, READY, f"{layers} layers, RPC protocol {protocol}"
                                + ("" if stage.isolated else "; its RPC port is open to this machine's users"))

    def _copy_verdict(self, state: MeshState, model: str) -> tuple[bool, str | None]:
        """(known, reason) for this member's copy of the model's GGUF (mesh/replicas/copy_check.py): a reason when
        its sha256 differs from the mesh's; (True, None) when it matches or there is no copy here (the head sends
        the tensors); (False, None) while it is being hashed."""
        record = state.models.get(model)
        if record is None or self.models_dir is None:
            return True, None
        try:
            path = model_path(self.models_dir, record.file)
        except ModelFileError:  # a name that cannot be a file here: no copy to check
            return True, None
        return self.copies.verdict(model, path, record.sha256)

    def _fail(self, model: str, reason: str) -> None:
        self._not_before[model] = time.monotonic() + FAILED_RETRY_S
        self._set(model, FAILED, reason)

    def _fault(self, stage: StageProcess, reason: str) -> None:
        if self.stages.get(stage.model) is stage and not reason.startswith("frozen"):
            self._fail(stage.model, reason)

    def _mismatch(self, model: str, reason: str) -> None:
        if model in self.stages:
            self._fail(model, reason)

    async def _exited(self, stage: StageProcess, exit_: Exit) -> None:
        if self.stages.get(stage.model) is stage:
            del self.stages[stage.model]
        self.restarts[stage.model] += 1
        why = f"{stage.fault}; {exit_.how}" if stage.fault else exit_.describe()
        delay = self._backoff(stage.model, why)
        if self.states.get(stage.model, ("",))[0] == FAILED and stage.fault and not stage.fault.startswith("frozen"):
            pass  # it could not serve (allocation): its reason stands until it is tried again
        elif len(self._exits[stage.model]) >= CRASH_LOOP:
            self._set(stage.model, FAILED, f"crash loop: {len(self._exits[stage.model])} exits in "
                                           f"{CRASH_WINDOW_S:.0f} s, last: {why}; restarting in {delay:.0f} s")
        else:
            self._set(stage.model, STARTING, f"restarting in {delay:.0f} s after: {why}")
        self.wake()

    def _backoff(self, model: str, why: str) -> float:
        now = time.monotonic()
        exits = self._exits.setdefault(model, collections.deque())
        exits.append(now)
        while exits and exits[0] < now - CRASH_WINDOW_S:
            exits.popleft()
        delay = 0.0 if len(exits) == 1 else min(RESTART_BACKOFF_S * 2 ** (len(exits) - 2), RESTART_BACKOFF_MAX_S)
        self._not_before[model] = max(self._not_before.get(model, 0.0), now + delay)
        self.last_exit[model] = f"{time.strftime('%H:%M:%S')} {why}"[:300]
        log.warning("stage of %s: %s; starting again in %.0f s", model, why, delay)
        return delay

    async def _tunnel_server(self, wanted: bool) -> None:
        if wanted and self.server is None and time.monotonic() >= self._server_not_before:
            server = StageTunnelServer(self.host, self.tunnel_port, self.identity.server_context(), self.authorize,
                                       self._protocol, self._mismatch)
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


def _protocol() -> tuple[int, int, int] | None:
    """This member's llama.cpp RPC protocol version (None without llama.cpp or its header)."""
    try:
        return rpc_ggml.build_protocol()
    except ImportError:  # no llama-cpp-python here: no stage or head runs either
        return None
