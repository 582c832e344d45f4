"""The leader's placement loop: turns the replicated state into a Plan and commits it.

It runs on every member but acts only while that member is the Raft leader with a quorum, so at
most one leader's placement is ever committed. It reruns whenever the state changes and at least
every `every_s` seconds (membership health changes without a log entry: a peer's Raft connection
dropping is seen here, and after `grace_s` the peer's shards move elsewhere).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from mesh.cluster.placement import (
    BATTERY_ROLES,
    Assignment,
    BatteryPolicy,
    ModelInfo,
    NodeInfo,
    Plan,
    Unplaced,
    ineligible,
    member_memory,
    place,
)
from mesh.cluster.split_planning import Pipeline, SplitModel, plan_split, still_fits
from mesh.core.config import PlacementConfig
from raft.commands import ApplyPlacement, ClearSplit, Command, SetSplit
from raft.node import ProposalFailed, RaftNode
from raft.state import MeshState, Model, Rejected, Split
from raft.vocab import MemberState, Role, ShardState

log = logging.getLogger("quorum.placer")

FAILED_STAGE_RETRY_S = 120.0  # a member whose stage of a model failed is planned around this long


class Placer:
    def __init__(self, raft: RaftNode, grace_s: float, reserve_bytes: int,
                 clock: Callable[[], float] = time.monotonic, battery: BatteryPolicy = BatteryPolicy(),
                 wall: Callable[[], float] = time.time) -> None:
        self.raft = raft
        self.battery = battery
        self.grace_s = grace_s
        self.reserve = reserve_bytes
        self.clock = clock
        self.wall = wall  # stage failures carry the reporting member's clock
        self._down_since: dict[str, float] = {}  # raft address -> when this leader lost it
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}  # failures without a time: when first seen
        self._said: set[tuple[str, str]] = set()  # failures logged (once each)

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
        return self.planned(state)[0]

    def planned(self, state: MeshState) -> tuple[Plan, Command | None]:
        """The placement, and the change to the placer's split (SetSplit or ClearSplit) that goes with it, if any:
        both are committed in one ApplyPlacement entry."""
        nodes = node_infos(state, self.healthy(state), self.reserve)
        # Catalog order (the order models were registered in the log) decides which model serves a role.
        models = [ModelInfo(name=m.name, roles=tuple(m.roles), memory_bytes=m.memory_bytes, slots=m.slots,
                            slot_bytes=m.slot_bytes) for m in state.models.values()]
        pins = [Assignment(p.role, p.model, p.node_id) for p in state.pins.values()]
        current = [Assignment(s.role, s.model, s.node_id) for s in state.shards.values()]
        crashed = [Assignment(s.role, s.model, s.node_id) for s in state.shards.values()
                   if s.state == ShardState.CRASHED]
        split = self._split(state, nodes)
        replicas, placed_on, avoid = state.replicas, nodes, list(crashed)
        if split.pipeline is not None:  # the pipeline's members give its shares; it counts as one reasoning replica
            pipeline = split.pipeline
            needs = pipeline.needs(split_model(state.models[pipeline.model]))
            placed_on = [replace_memory(n, n.memory_available - needs.get(n.node_id, 0)) for n in nodes]
            if split.bridging:  # ...unless it only bridges until a whole replica, placed now elsewhere, is ready
                avoid += [Assignment(Role.REASONING, pipeline.model, m) for m in pipeline.members]
            else:
                replicas = {**replicas, Role.REASONING: max(0, replicas.get(Role.REASONING, 0) - 1)}
        plan = place(placed_on, models, replicas, pins, current, self.battery, avoid=avoid)
        if split.no_split:
            plan = Plan(plan.assignments, tuple(
                Unplaced(u.role, u.model, u.missing, f"{u.reason}; {split.no_split}")
                if (u.role, u.model) == no_split_key(state) else u for u in plan.unplaced))
        healthy = {n.node_id for n in nodes if n.healthy}
        # The heads first, so that a ready whole replica leaving a battery-limited member is kept until the
        # pipeline replacing it is ready (make before break).
        plan = with_split_heads(plan, state, splits_after(state, split.command), healthy)
        limited = {n.node_id for n in nodes if n.healthy and self.battery.limited(n, True)}
        plan = keep_crashed_until_replaced(keep_until_replaced(plan, state, limited), crashed)
        return plan, split.command

    def _split(self, state: MeshState, nodes: list[NodeInfo]) -> SplitDecision:
        """The pipeline of the first reasoning model (or none), why none when it needs one, and the change that
        records it. A split pinned by hand is left as it is (and counted, like an automatic one)."""
        first = next((m for m in state.models.values() if Role.REASONING in m.roles), None)
        for split in state.splits.values():  # automatic splits of a model that no longer serves reasoning
            if split.auto and (first is None or split.model != first.name):
                return SplitDecision(command=ClearSplit(split.model))
        if first is None:
            return SplitDecision()
        recorded = state.splits.get(first.name)
        if recorded is not None and not recorded.auto:
            return SplitDecision(Pipeline(first.name, recorded.head, recorded.stages))
        model = split_model(first)
        kept = None if recorded is None else Pipeline(first.name, recorded.head, recorded.stages)
        avoid = self._failed_stages(state, first.name)

        def holds_whole(node_id: str) -> bool:  # battery hysteresis: a holder keeps it down to the lower mark
            return (Role.REASONING, first.name, node_id) in state.shards and (kept is None or node_id != kept.head)

        whole = [n for n in nodes if ineligible(n) is None and not self.battery.limited(n, holds_whole(n.node_id))
                 and n.memory_available >= first.memory_for(n.slots)]
        if state.replicas.get(Role.REASONING, 0) < 1:  # no reasoning replica is wanted
            return SplitDecision(command=ClearSplit(first.name) if recorded is not None else None)
        if whole:  # one member holds it whole
            if kept is not None and self._bridges(state, kept, nodes, whole, model, avoid):
                return SplitDecision(kept, bridging=True)
            return SplitDecision(command=ClearSplit(first.name) if recorded is not None else None)
        if kept is not None:
            why = still_fits(kept, nodes, model, self.battery, avoid)
            if why is None:
                return SplitDecision(kept)
            log.info("the pipeline of %s cannot stay: %s", first.name, why)
        planned = plan_split(nodes, model, self.battery, avoid)
        if planned.pipeline is None:
            return SplitDecision(no_split=planned.reason,
                                 command=ClearSplit(first.name) if recorded is not None else None)
        p = planned.pipeline
        if recorded is None or (recorded.head, recorded.stages) != (p.head, p.stages):
            return SplitDecision(p, command=SetSplit(p.model, p.head, p.stages, auto=True))
        return SplitDecision(p)

    def _bridges(self, state: MeshState, kept: Pipeline, nodes: list[NodeInfo], whole: list[NodeInfo],
                 model: SplitModel, avoid: dict[str, str]) -> bool:
        """Make before break, from a pipeline back to a whole replica: the running pipeline (its head ready) keeps
        serving while a member outside it loads the model whole, until that replica is ready. Not when only a
        pipeline member could hold it whole (its memory is the pipeline's: break before make), nor when the
        pipeline can no longer run."""
        def ready(node_id: str) -> bool:
            shard = state.shards.get((Role.REASONING, kept.model, node_id))
            return shard is not None and shard.state == ShardState.READY

        if not ready(kept.head) or any(ready(n.node_id) for n in whole if n.node_id != kept.head):
            return False
        outside = [n for n in whole if n.node_id not in kept.members]
        return bool(outside) and still_fits(kept, nodes, model, self.battery, avoid) is None

    def _failed_stages(self, state: MeshState, model: str) -> dict[str, str]:
        """node id -> what failed, for members whose stage of `model` reported "failed" within
        FAILED_STAGE_RETRY_S. The log keeps each failure with when the member said it (MeshState.stage_failures),
        so a new leader plans around it too; a failure reported without a time (a member of the version before)
        is timed from when this placer first saw it."""
        now, wall = self.clock(), self.wall()
        failed = {}
        for (m, node_id), (detail, at) in sorted(state.stage_failures.items()):
            if m != model:
                continue
            if not at:
                at = wall - (now - self._failed.setdefault((m, node_id), (now, detail))[0])
            if wall - at < FAILED_STAGE_RETRY_S:
                failed[node_id] = detail or "no detail"
                if (m, node_id) not in self._said:
                    self._said.add((m, node_id))
                    log.warning("the stage of %s on %s failed (%s): planning around it", model, node_id, detail)
        for key in set(self._failed) - set(state.stage_failures):
            del self._failed[key]
        self._said &= {(model, n) for n in failed} | {k for k in self._said if k[0] != model}
        return failed

    async def step(self) -> bool:
        """Commits a new placement if it differs from the state's; True if it committed one."""
        raft = self.raft
        if not (raft.is_leader() and raft.is_ready() and raft.status()["has_quorum"]):
            return False
        state = raft.state
        if not state.initialised or not state.models:
            return False
        plan, split_command = self.planned(state)
        assignments = tuple((a.role, a.model, a.node_id) for a in plan.assignments)
        unplaced = tuple((u.role, u.model, u.missing, u.reason) for u in plan.unplaced)
        current = tuple(sorted(state.shards))
        known = tuple((u.role, u.model, u.missing, u.reason) for u in state.unplaced)
        if assignments == current and unplaced == known and split_command is None:
            return False
        split_fields = {}
        if isinstance(split_command, SetSplit):
            split_fields = dict(split_model=split_command.model, split_head=split_command.head,
                                split_stages=split_command.stages)
        elif isinstance(split_command, ClearSplit):
            split_fields = dict(split_model=split_command.model)
        try:
            await asyncio.wrap_future(raft.propose(ApplyPlacement(assignments, unplaced, **split_fields)))
        except (Rejected, ProposalFailed) as exc:
            # The state moved under us (a member left) or leadership changed: the next round retries.
            log.info("placement not committed: %s", exc)
            return False
        if split_command is not None:
            log.info("split: %s", _describe(state, split_command))
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


def with_split_heads(plan: Plan, state: MeshState, splits: dict[str, Split], healthy: set[str]) -> Plan:
    """A split model is served by its head member: the model's reasoning shard there (the reconciler runs it as
    the pipeline's head) is added to the plan while that member is healthy, beyond the desired replica count, like
    a pin that memory does not limit (the head holds only part of the layers). `splits`: the splits as they will
    be once the plan is committed (the entry carries the placer's own split change)."""
    heads = {Assignment(Role.REASONING, s.model, s.head) for s in splits.values()
             if s.head in healthy and s.model in state.models and Role.REASONING in state.models[s.model].roles}
    if heads <= set(plan.assignments):
        return plan
    return Plan(tuple(sorted({*plan.assignments, *heads})), plan.unplaced)


def splits_after(state: MeshState, command: Command | None) -> dict[str, Split]:
    """The state's splits once `command` (the placer's SetSplit or ClearSplit, or None) is applied."""
    if isinstance(command, SetSplit):
        return {**state.splits, command.model: Split(command.model, command.head, command.stages, auto=True)}
    if isinstance(command, ClearSplit):
        return {m: s for m, s in state.splits.items() if m != command.model}
    return dict(state.splits)


@dataclasses.dataclass(frozen=True)
class SplitDecision:
    """What the placer decided for the first reasoning model's split: the pipeline that serves it (or None),
    why there is none when one is needed, the change to record, and whether the pipeline only bridges until a
    whole replica placed beside it is ready."""
    pipeline: Pipeline | None = None
    no_split: str = ""
    command: Command | None = None
    bridging: bool = False


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
                            memory_available=member_memory(m.profile, reserve), speed=m.profile.speed,
                            witness=m.witness, healthy=health.get(m.node_id, False),
                            battery_percent=battery.percent if battery else None,
                            charging=battery.charging if battery else None, slots=m.profile.parallel))
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


def split_model(model: Model) -> SplitModel:
    """The model as the split planner sees it: a pipeline's head decodes one sequence at a time, so it is
    charged one slot's KV cache, whatever the registering member's node.parallel."""
    return SplitModel(model.name, model.memory_for(1), model.layers, model.layer_bytes)


def replace_memory(node: NodeInfo, memory: int) -> NodeInfo:
    return dataclasses.replace(node, memory_available=max(0, memory))


def no_split_key(state: MeshState) -> tuple[str, str]:
    first = next((m.name for m in state.models.values() if Role.REASONING in m.roles), "")
    return (Role.REASONING, first)


def _describe(state: MeshState, cmd: Command) -> str:
    def name(node_id: str) -> str:
        return state.members[node_id].name if node_id in state.members else node_id

    if isinstance(cmd, SetSplit):
        return f"{cmd.model} over {name(cmd.head)} (head) -> " + " -> ".join(f"{name(n)} ({k})" for n, k in cmd.stages)
    return f"{cmd.model} served whole again (or not at all)"


def _names(state: MeshState, keys: set) -> str:
    return ", ".join(f"{role}/{model}@{state.members[n].name if n in state.members else n}"
                     for role, model, n in sorted(keys))
