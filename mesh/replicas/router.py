"""Which replica answers a request: a ready shard of the role and model, least loaded first, or the
one a named session's previous turn ran on while it has a free slot (it still holds that turn's
prompt in its KV cache, so the next turn prefills only what is new: shards/backend_llama_batch.py).

The replicated state says which shards are ready where; shards on this node are called in
process, the others over gRPC (one RemoteShard per node, role and model, kept while it is used).
A replica's free slots: its own count where it has one (a shard process of this member); for another
member's, what that member reports in its profile (node.parallel, raft/profile.py), one for a pipeline head
(a split model's head decodes one sequence: mesh/replicas/reconciler.py), and this member's own figure only
for a member that does not say (one from before the profile carried it).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from raft.state import MeshState
from raft.vocab import MemberState, Role, ShardState
from shards.types import GenerateRequest, NotReady, Opened

log = logging.getLogger("quorum.router")


class Replica(Protocol):
    role: str
    model: str

    async def open(self, req: GenerateRequest) -> Opened: ...


class NoReplica(LookupError):
    """No ready replica of a role/model right now (the gateway answers 503)."""


T = TypeVar("T")


async def try_replicas(pick: Callable[[set[str]], tuple[str, Any]], use: Callable[[Any], Awaitable[T]],
                       none_left: Callable[[set[str]], Awaitable[set[str]]], what: str,
                       avoid: set[str] = frozenset()) -> tuple[str, T]:
    """(node id, `use(replica)`) on the first replica `pick(avoid)` gives that takes the work; one that
    is NotReady (loading, stopping, unreachable) is avoided for the next. When `pick` finds none
    (NoReplica), `none_left(avoid)` raises the caller's error or returns the avoid set to try again
    with (after waiting for a replica to come back). Every other error of `use` is the caller's."""
    avoid = set(avoid)
    while True:
        try:
            node_id, replica = pick(avoid)
        except NoReplica:
            avoid = await none_left(avoid)
            continue
        try:
            return node_id, await use(replica)
        except NotReady as exc:
            log.warning("%s on %s cannot take requests (%s); trying another", what, node_id, exc)
            avoid = avoid | {node_id}


class LocalPicker:
    """Replicas held in this process only: the gateway of a node that routes to no one else."""

    def __init__(self) -> None:
        self.shards: dict[tuple[str, str], Any] = {}

    def ready_models(self, role: str = Role.REASONING) -> list[str]:
        return sorted(m for r, m in self.shards if r == role)

    def known_models(self) -> list[str]:
        return sorted({m for _, m in self.shards})

    def model_roles(self, model: str) -> tuple[str, ...]:
        return tuple(sorted({r for r, m in self.shards if m == model}))

    def pick(self, role: str, model: str, exclude: set[str] = frozenset(),
             prefer: str | None = None) -> tuple[str, Replica]:
        shard = self.shards.get((role, model))
        if shard is None or "local" in exclude:
            raise NoReplica(f"no ready {role} replica of {model!r}")
        return "local", shard


class Router:
    def __init__(self, node_id: str, state: Callable[[], MeshState], local: Callable[[], dict],
                 remote: Callable[[str, str, str, str], Any], default_slots: int = 1) -> None:
        self.node_id = node_id
        self.default_slots = default_slots  # slots of a replica whose member does not say (this member's own)
        self._state = state
        self._local = local  # () -> {(role, model): LocalShard} loaded on this node
        self._make_remote = remote  # (address, role, model, node_id) -> RemoteShard
        self._remote: dict[tuple[str, str, str], Any] = {}

    def known_models(self) -> list[str]:
        """The mesh's model catalog (every member's additions, as the log has them)."""
        return sorted(self._state().models)

    def model_roles(self, model: str) -> tuple[str, ...]:
        entry = self._state().models.get(model)
        return tuple(entry.roles) if entry is not None else ()

    def ready_models(self, role: str = Role.REASONING) -> list[str]:
        state = self._state()
        return sorted({s.model for s in state.shards.values() if s.role == role and self._usable(state, s)})

    def pick(self, role: str, model: str, exclude: set[str] = frozenset(),
             prefer: str | None = None) -> tuple[str, Replica]:
        """(node id, replica) of the least-loaded ready replica not on a node in `exclude`; the one on
        `prefer` (a session's previous turn ran there) while it is ready and has a free slot."""
        state = self._state()
        candidates = []
        for shard in state.shards_for(role, model):
            if shard.node_id in exclude or not self._usable(state, shard):
                continue
            replica = self._replica(state, shard)
            if replica is not None:
                candidates.append((_load(replica), shard.node_id != self.node_id, shard.node_id, replica))
        if not candidates:
            raise NoReplica(f"no ready {role} replica of {model!r}")
        for load, _, node_id, replica in candidates:
            if node_id == prefer and load < slots_of(replica, self.reported_slots(state, role, model, node_id)):
                return node_id, replica
        best = min(candidates, key=lambda c: c[:3])
        return best[2], best[3]

    def reported_slots(self, state: MeshState, role: str, model: str, node_id: str) -> int:
        """The slots member `node_id`'s replica of role/model decodes with, as the state says: one for a pipeline
        head, else the member's profile (node.parallel), else `default_slots` (a member that does not report it)."""
        split = state.splits.get(model)
        if role == Role.REASONING and split is not None and split.head == node_id:
            return 1
        member = state.members.get(node_id)
        return (member.profile.parallel if member is not None else 0) or self.default_slots

    def _usable(self, state: MeshState, shard) -> bool:
        member = state.members.get(shard.node_id)
        if shard.state != ShardState.READY or member is None \
                or member.state not in (MemberState.ACTIVE, MemberState.DRAINING):
            return False
        return shard.node_id != self.node_id or (shard.role, shard.model) in self._local()

    def _replica(self, state: MeshState, shard) -> Any:
        if shard.node_id == self.node_id:
            return self._local().get((shard.role, shard.model))
        member = state.members[shard.node_id]
        key = (member.grpc_address, shard.role, shard.model)
        if key not in self._remote:
            self._remote[key] = self._make_remote(member.grpc_address, shard.role, shard.model, shard.node_id)
        return self._remote[key]

    async def close(self) -> None:
        remotes, self._remote = list(self._remote.values()), {}
        for remote in remotes:
            await remote.close()


def slots_of(replica: Any, default: int) -> int:
    """Generations a replica decodes at once: its `slots` (an in-process shard), its shard process's
    `spec.parallel`, else `default` (a remote replica: what its member reports, Router.reported_slots)."""
    slots = getattr(replica, "slots", None)
    if slots is None:
        slots = getattr(getattr(replica, "spec", None), "parallel", None)
    return max(1, int(slots if slots is not None else default))


def _load(replica: Any) -> int:
    """Requests a replica is working on or holding in its queue."""
    load = getattr(replica, "load", None)
    if load is not None:
        return int(load)
    return int(replica.waiting) + int(replica.busy)
