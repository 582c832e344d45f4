"""The leader's placement loop: turns the replicated state into a Plan and commits it.

It runs on every member but acts only while that member is the Raft leader with a quorum, so at
most one leader's placement is ever committed. It reruns whenever the state changes and at least
every `every_s` seconds (membership health changes without a log entry: a peer's Raft connection
dropping is seen here, and after `grace_s` the peer's shards move elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from mesh.cluster.placement import BATTERY_ROLES, Assignment, BatteryPolicy, ModelInfo, NodeInfo, Plan, place
from mesh.core.config import PlacementConfig
from raft.commands import ApplyPlacement
from raft.node import ProposalFailed, RaftNode
from raft.profile import MemberProfile
from raft.state import MeshState, Rejected
from raft.vocab import MemberState, Role, ShardState

log = logging.getLogger("quorum.placer")


class Placer:
    def __init__(self, raft: RaftNode, grace_s: float, reserve_bytes: int,
                 clock: Callable[[], float] = time.monotonic, battery: BatteryPolicy = BatteryPolicy()) -> None:
        self.raft = raft
        self.battery = battery
        self.grace_s = grace_s
        self.reserve = reserve_bytes
        self.clock = clock
        self._down_since: dict[str, float] = {}  # raft address -> when this leader lost it

    def healthy(self, state: MeshState) -> dict[str, bool]:
        """node_id -> usable for shards: active, and reachable (or lost for less than the grace period)."""
        connected = self.raft.partners()
        now = self.clock()
        out = {}
        for member in state.members.values():
            if member.state != MemberState.ACTIVE:
                out[member.node_id] = False
                continue
            if member.raft_address == self.raft.address or connected.get(member.raft_address, False):
                self._down_since.pop(member.raft_address, None)
                out[member.node_id] = True
            else:
                since = self._down_since.setdefault(member.raft_address, now)
                out[member.node_id] = now - since < self.grace_s
        return out

    def plan(self, state: MeshState) -> Plan:
        nodes = node_infos(state, self.healthy(state), self.reserve)
        # Catalog order (the order models were registered in the log) decides which model serves a role.
        models = [ModelInfo(name=m.name, roles=tuple(m.roles), memory_bytes=m.memory_bytes)
                  for m in state.models.values()]
        pins = [Assignment(p.role, p.model, p.node_id) for p in state.pins.values()]
        current = [Assignment(s.role, s.model, s.node_id) for s in state.shards.values()]
        crashed = [Assignment(s.role, s.model, s.node_id) for s in state.shards.values()
                   if s.state == ShardState.CRASHED]
        plan = place(nodes, models, state.replicas, pins, current, self.battery, avoid=crashed)
        limited = {n.node_id for n in nodes if n.healthy and self.battery.limited(n, True)}
        plan = keep_crashed_until_replaced(keep_until_replaced(plan, state, limited), crashed)
        return with_split_heads(plan, state, {n.node_id for n in nodes if n.healthy})

    async def step(self) -> bool:
        """Commits a new placement if it differs from the state's; True if it committed one."""
        raft = self.raft
        if not (raft.is_leader() and raft.is_ready() and raft.status()["has_quorum"]):
            return False
        state = raft.state
        if not state.initialised or not state.models:
            return False
        plan = self.plan(state)
        assignments = tuple((a.role, a.model, a.node_id) for a in plan.assignments)
        unplaced = tuple((u.role, u.model, u.missing, u.reason) for u in plan.unplaced)
        current = tuple(sorted(state.shards))
        known = tuple((u.role, u.model, u.missing, u.reason) for u in state.unplaced)
        if assignments == current and unplaced == known:
            return False
        try:
            await asyncio.wrap_future(raft.propose(ApplyPlacement(assignments, unplaced)))
        except (Rejected, ProposalFailed) as exc:
            # The state moved under us (a member left) or leadership changed: the next round retries.
            log.info("placement not committed: %s", exc)
            return False
        added = set(assignments) - set(current)
        dropped = set(current) - set(assignments)
        log.info("placement: +%s -%s%s", _names(state, added) or "none", _names(state, dropped) or "none",
                 f"; unplaced: {'; '.join(u[3] for u in unplaced)}" if unplaced else "")
        return True

    async def run(self, changed: asyncio.Event, every_s: float = 1.0) -> None:
        while True:
            try:
                await asyncio.wait_for(changed.wait(), every_s)
            except TimeoutError:
                pass
            changed.clear()
            await self.step()


def keep_crashed_until_replaced(plan: Plan, crashed: list[Assignment]) -> Plan:
    """A crash-looped shard whose role and model the plan could not place elsewhere stays in the
    state (as "crashed", shown by `meshctl status` with its reason): its record is what keeps the
    placer from putting it back on the node where it crashed. Once placed elsewhere it goes."""
    short = {(u.role, u.model) for u in plan.unplaced}
    keep = [a for a in crashed if (a.role, a.model) in short and a not in plan.assignments]
    if not keep:
        return plan
    return Plan(tuple(sorted({*plan.assignments, *keep})), plan.unplaced)


def with_split_heads(plan: Plan, state: MeshState, healthy: set[str]) -> Plan:
    """A split model (meshctl split) is served by its head member: the model's reasoning shard there (the
    reconciler runs it as the pipeline's head) is added to the plan while that member is healthy, beyond the
    desired replica count, like a pin that memory does not limit (the head holds only part of the layers;
    placement does not yet charge heads and stages for their shares)."""
    heads = {Assignment(Role.REASONING, s.model, s.head) for s in state.splits.values()
             if s.head in healthy and s.model in state.models and Role.REASONING in state.models[s.model].roles}
    if heads <= set(plan.assignments):
        return plan
    return Plan(tuple(sorted({*plan.assignments, *heads})), plan.unplaced)


def battery_policy(cfg: PlacementConfig) -> BatteryPolicy:
    return BatteryPolicy(min_percent=float(cfg.battery_min_percent), resume_percent=float(cfg.battery_resume_percent),
                         require_charging=cfg.battery_require_charging)


def node_infos(state: MeshState, health: dict[str, bool], reserve: int) -> list[NodeInfo]:
    """What placement needs to know of each live member, from its replicated profile."""
    out = []
    for m in state.members.values():
        if m.state == MemberState.GONE:
            continue
        battery = m.profile.battery
        out.append(NodeInfo(node_id=m.node_id, device_class=m.profile.device_class,
                            memory_available=_memory(m.profile, reserve), speed=m.profile.speed,
                            witness=m.witness, healthy=health.get(m.node_id, False),
                            battery_percent=battery.percent if battery else None,
                            charging=battery.charging if battery else None))
    return out


def keep_until_replaced(plan: Plan, state: MeshState, limited: set[str]) -> Plan:
    """Make before break for battery moves: a ready shard of a BATTERY_ROLES role that the plan takes
    off a `limited` node (healthy, battery-limited) stays, beyond the desired count, until every
    replica the plan gives the role is ready, so unplugging a phone never leaves its role without a
    serving replica. It is kept only where the plan adds nothing new to that node, so its memory is
    not promised twice, and never when the plan gives the role no replica (replicas set to 0)."""
    planned = set(plan.assignments)
    gaining = {a.node_id for a in planned if (a.role, a.model, a.node_id) not in state.shards}
    kept = []
    for key, shard in sorted(state.shards.items()):
        if shard.role not in BATTERY_ROLES or shard.state != ShardState.READY or Assignment(*key) in planned:
            continue
        if shard.node_id not in limited or shard.node_id in gaining:
            continue
        replicas = [a for a in planned if a.role == shard.role]
        if not replicas or all(_ready(state, a) for a in replicas):
            continue
        kept.append(Assignment(*key))
    if not kept:
        return plan
    return Plan(tuple(sorted((*plan.assignments, *kept))), plan.unplaced)


def _ready(state: MeshState, a: Assignment) -> bool:
    shard = state.shards.get((a.role, a.model, a.node_id))
    return shard is not None and shard.state == ShardState.READY


def _memory(profile: MemberProfile, reserve: int) -> int:
    """What a member can give to shards: its own report when it made one, else available RAM less a reserve."""
    if profile.memory_available_for_models is not None:
        return profile.memory_available_for_models
    return max(0, profile.ram_available - reserve)


def _names(state: MeshState, keys: set) -> str:
    return ", ".join(f"{role}/{model}@{state.members[n].name if n in state.members else n}"
                     for role, model, n in sorted(keys))
