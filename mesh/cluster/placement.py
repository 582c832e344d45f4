"""Placement: which shard runs on which node, as a pure, deterministic function.

The leader calls place() whenever membership, health, pins or desired replicas change, and commits
the difference (moves()) through Raft. No I/O, no clock, no randomness: every input is sorted (ties
by node id), so one mesh always gives one plan, whatever order its nodes, pins or current shards
arrive in. The one ordered input is `models`: catalog order decides which model serves a role.

Order of work, each step over all roles before the next:
1. pins (manual placement wins), by role, node id, model;
2. current shards that are still valid, fastest node first, so a shrinking role drops the slowest;
3. new shards: reasoning on the fastest node that fits, other roles on the node with most free memory.
Roles go in the order of MODEL_ROLES. Whatever is left short is reported in Plan.unplaced.

Phones on battery (BatteryPolicy): a phone (BATTERY_CLASSES) that is not charging (when the policy
requires charging) or whose charge is low is "battery-limited" for the BATTERY_ROLES (reasoning).
A limited node's current reasoning shard is not kept in step 2; in step 3 limited nodes come after
every other node that fits, the ones that held the role before first. So a phone's replica moves
only when another node can take it, and a phone alone (or with no room elsewhere) keeps serving.
Crash loops: `avoid` lists shards whose process crash-looped on their node (state "crashed"). Such
a shard is not kept (step 2), and its node is not chosen for that role and model again (step 3),
so it moves to another node that can hold it; pins still win.

Hysteresis, so a charge hovering at the threshold does not move replicas back and forth: a phone
that holds the role is limited below `min_percent`, one that does not only below `resume_percent`
(higher). Pins are never moved for battery reasons. A node with no battery facts is never limited.
A phone that charges again becomes a candidate for new replicas; the ones that moved off it stay
where they are (step 2 keeps valid current shards), so replicas do not follow the charger around.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from nodes.device_class import NO_MODEL_CLASSES, DeviceClass
from raft.profile import MemberProfile
from raft.records import memory_for_slots
from raft.vocab import MODEL_ROLES, Role

BATTERY_CLASSES = frozenset({DeviceClass.TERMUX_PHONE})  # device classes whose battery limits what they hold
BATTERY_ROLES = frozenset({Role.REASONING})  # roles kept off battery-limited nodes when others can hold them
_MIB = 1 << 20


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    device_class: str  # raspberry-pi, termux-phone, openwrt-router, desktop, server
    memory_available: int  # bytes this node can give to model shards
    speed: float  # higher is faster (a local benchmark score)
    witness: bool = False  # a witness votes in Raft and never holds a model
    healthy: bool = True  # active and reachable; unhealthy nodes get no new shards and lose theirs
    battery_percent: float | None = None  # charge, 0-100; None when the node has no battery (or cannot tell)
    charging: bool | None = None  # on external power; None when the node cannot tell
    slots: int = 0  # sequences each of its generating shards decodes at once (node.parallel); 0: not reported


@dataclass(frozen=True)
class BatteryPolicy:
    """When a phone's battery keeps reasoning off it (see the module docstring)."""
    min_percent: float = 30.0  # a phone holding reasoning keeps it down to this charge
    resume_percent: float = 40.0  # a phone without reasoning takes it (if others can) from this charge up
    require_charging: bool = True  # a phone not on external power is limited whatever its charge

    def limited(self, node: NodeInfo, holds: bool) -> bool:
        """True when `node` should give up (holds) or not take (not holds) a battery role."""
        if node.device_class not in BATTERY_CLASSES:
            return False
        if self.require_charging and node.charging is False:
            return True
        if node.battery_percent is None:
            return False
        return node.battery_percent < (self.min_percent if holds else self.resume_percent)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    roles: tuple[str, ...]  # of "reasoning", "context", "tool-use"
    memory_bytes: int  # model file + KV cache for its context (`slots` of them) + runtime overhead
    slots: int = 0  # the KV caches memory_bytes counts (0: not recorded: every node is charged memory_bytes)
    slot_bytes: int = 0  # one slot's KV cache

    def need(self, node: NodeInfo | None) -> int:
        """What one shard of this model needs on `node`, which decodes `node.slots` sequences at once
        (raft.records.Model.memory_for)."""
        return memory_for_slots(self.memory_bytes, self.slots, self.slot_bytes, node.slots if node is not None else 0)


@dataclass(frozen=True, order=True)
class Assignment:
    """One shard: (role, model, node). As a pin, an empty model means the role's first model."""
    role: str
    model: str
    node_id: str


@dataclass(frozen=True, order=True)
class Unplaced:
    role: str
    model: str  # "" when no model in the catalog serves the role
    missing: int  # replicas (pinned or automatic) that could not be placed
    reason: str  # human-readable, shown by `meshctl status`


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...]  # sorted
    unplaced: tuple[Unplaced, ...]  # sorted


def place(nodes: Iterable[NodeInfo], models: Sequence[ModelInfo], replicas: Mapping[str, int],
          pins: Iterable[Assignment], current: Iterable[Assignment],
          battery: BatteryPolicy = BatteryPolicy(), avoid: Iterable[Assignment] = ()) -> Plan:
    """The plan for this mesh. Raises ValueError only for inputs config validation already refuses
    (duplicate node ids or model names, unknown roles or negative counts in `replicas`, NaN speeds).
    `battery` decides which phones are battery-limited; the default is mesh.toml's [placement]."""
    avoid = frozenset(avoid)
    current = set(current) - avoid
    ledger = _Ledger(_index(nodes, "node_id"), _index(models, "name"), battery,
                     {(s.role, s.node_id) for s in current if s.role in BATTERY_ROLES}, avoid)
    if any(math.isnan(n.speed) for n in ledger.nodes.values()):
        raise ValueError("placement: a node's speed is NaN; speeds must be comparable")
    desired = _desired(replicas)
    first = {role: next((m.name for m in ledger.models.values() if role in m.roles), "") for role in MODEL_ROLES}
    short: dict[tuple[str, str], list[tuple[int, str]]] = {}

    pinned = dict.fromkeys(MODEL_ROLES, 0)
    for pin in sorted({_resolve(p, first) for p in pins}, key=lambda p: (_rank(p.role), p.node_id, p.model)):
        why = ledger.refusal(pin)
        if why is None:
            ledger.add(pin)
            pinned[pin.role] += 1
        else:
            short.setdefault((pin.role, pin.model), []).append((1, f"pin on {pin.node_id}: {why}"))

    # A pin that could not be placed does not count: an automatic replica stands in for it.
    wanted = {role: max(0, desired[role] - pinned[role]) for role in MODEL_ROLES}
    auto = dict.fromkeys(MODEL_ROLES, 0)
    for shard in sorted(current, key=lambda a: (_rank(a.role), -ledger.speed(a.node_id), a.node_id, a.model)):
        still_wanted = shard.role in MODEL_ROLES and auto[shard.role] < wanted[shard.role]
        if ledger.limited(shard.role, shard.node_id):
            continue  # step 3 puts it back here only if no other node can take it
        if still_wanted and shard.model == first[shard.role] and ledger.refusal(shard) is None:
            ledger.add(shard)
            auto[shard.role] += 1

    left_short = []
    for role in MODEL_ROLES:
        missing, model = wanted[role] - auto[role], first[role]
        while missing > 0:
            node_id = ledger.best_node(role, model) if model else None
            if node_id is None:
                left_short.append((role, model, missing))
                break
            ledger.add(Assignment(role, model, node_id))
            missing -= 1
    # Reasons describe the final plan (free memory after every shard), so placing again from this
    # plan gives the same words, and `meshctl status` shows memory as it will be.
    for role, model, missing in left_short:
        short.setdefault((role, model), []).append((missing, ledger.why_not(role, model)))

    unplaced = (Unplaced(role, model, sum(n for n, _ in parts), "; ".join(why for _, why in parts))
                for (role, model), parts in short.items())
    return Plan(tuple(sorted(ledger.placed)), tuple(sorted(unplaced)))


def moves(old: Iterable[Assignment], new: Iterable[Assignment]) -> tuple[set[Assignment], set[Assignment]]:
    """(to_add, to_remove) that turn the shards `old` into `new`."""
    old, new = set(old), set(new)
    return new - old, old - new


class _Ledger:
    """What has been placed so far: memory used per node and the nodes holding each role."""

    def __init__(self, nodes: dict[str, NodeInfo], models: dict[str, ModelInfo], battery: BatteryPolicy,
                 held: set[tuple[str, str]], avoid: frozenset[Assignment] = frozenset()) -> None:
        self.nodes = dict(sorted(nodes.items()))
        self.avoid = avoid  # (role, model, node) that crash-looped there
        self.models = models
        self.battery = battery
        self.held = held  # (role, node_id) of current shards in BATTERY_ROLES
        self.used = dict.fromkeys(self.nodes, 0)
        self.holders: dict[str, set[str]] = {role: set() for role in MODEL_ROLES}
        self.placed: list[Assignment] = []

    def speed(self, node_id: str) -> float:
        node = self.nodes.get(node_id)
        return node.speed if node else 0.0

    def limited(self, role: str, node_id: str) -> bool:
        """True when `node_id`'s battery should keep `role` off it while another node can hold it."""
        node = self.nodes.get(node_id)
        if role not in BATTERY_ROLES or node is None:
            return False
        return self.battery.limited(node, (role, node_id) in self.held)

    def free(self, node_id: str) -> int:
        return self.nodes[node_id].memory_available - self.used[node_id]

    def need(self, model: str, node_id: str) -> int:
        return self.models[model].need(self.nodes.get(node_id))

    def add(self, shard: Assignment) -> None:
        self.used[shard.node_id] += self.need(shard.model, shard.node_id)
        self.holders[shard.role].add(shard.node_id)
        self.placed.append(shard)

    def refusal(self, shard: Assignment) -> str | None:
        """Why `shard` cannot be added now, or None when it can."""
        if shard.role not in MODEL_ROLES:
            return f"role {shard.role!r} holds no model"
        if not shard.model:
            return f"no model in the catalog serves {shard.role}"
        model = self.models.get(shard.model)
        if model is None:
            return f"model {shard.model!r} is not in the catalog"
        if shard.role not in model.roles:
            return f"model {shard.model} does not serve {shard.role}"
        node = self.nodes.get(shard.node_id)
        if node is None:
            return "no such node in the mesh"
        if (why := ineligible(node)) is not None:
            return why
        if shard.node_id in self.holders[shard.role]:
            return f"node already holds a {shard.role} replica"
        if model.need(node) > self.free(shard.node_id):
            return f"needs {_size(model.need(node))}; {_size(self.free(shard.node_id))} free"
        return None

    def _open(self, role: str) -> list[NodeInfo]:
        """Eligible nodes that hold no replica of `role` yet, by node id."""
        return [n for n in self.nodes.values() if ineligible(n) is None and n.node_id not in self.holders[role]]

    def best_node(self, role: str, model: str) -> str | None:
        fits = [n for n in self._open(role) if self.free(n.node_id) >= self.need(model, n.node_id)
                and Assignment(role, model, n.node_id) not in self.avoid]
        if not fits:
            return None

        def last_resort(n: NodeInfo) -> tuple[bool, bool]:  # battery-limited nodes last, earlier holders first
            limited = self.limited(role, n.node_id)
            return limited, limited and (role, n.node_id) not in self.held

        if role == Role.REASONING:
            return min(fits, key=lambda n: (*last_resort(n), -n.speed, n.node_id)).node_id
        return min(fits, key=lambda n: (*last_resort(n), -self.free(n.node_id), n.node_id)).node_id

    def why_not(self, role: str, model: str) -> str:
        if not model:
            return f"no model in the catalog serves {role}"
        eligible = [n for n in self.nodes.values() if ineligible(n) is None]
        if not eligible:
            return "no eligible node: every node is a witness, a router or unhealthy" if self.nodes \
                else "no eligible node: the mesh has no nodes"
        open_nodes = self._open(role)
        if not open_nodes:
            return f"too few distinct nodes: all {len(eligible)} eligible nodes already hold a {role} replica"
        crashed = sorted(n.node_id for n in open_nodes if Assignment(role, model, n.node_id) in self.avoid)
        open_nodes = [n for n in open_nodes if n.node_id not in crashed]
        if not open_nodes:
            return f"its process crash-looped on {', '.join(crashed)}, and no other node is free to hold it"
        roomiest = min(open_nodes, key=lambda n: (-self.free(n.node_id), n.node_id))
        return (f"needs {_size(self.need(model, roomiest.node_id))}; "
                f"largest free is {_size(self.free(roomiest.node_id))} on {roomiest.node_id}")


def ineligible(node: NodeInfo) -> str | None:
    """Why `node` holds no model at all (a witness, a router, unhealthy), or None."""
    if node.witness:
        return "a witness holds no model"
    if node.device_class in NO_MODEL_CLASSES:
        return f"an {node.device_class} holds no model"
    if not node.healthy:
        return "node is unhealthy"
    return None


def member_memory(profile: MemberProfile, reserve: int) -> int:
    """What a member can give to shards: its own report when it made one, else available RAM less a reserve;
    never more than its memory budget (node.memory_budget_mib) when it set one."""
    if profile.memory_available_for_models is not None:
        free = profile.memory_available_for_models
    else:
        free = max(0, profile.ram_available - reserve)
    return min(free, profile.memory_budget) if profile.memory_budget > 0 else free


def _index(items: Iterable, key: str) -> dict:
    out = {}
    for item in items:
        name = getattr(item, key)
        if name in out:
            raise ValueError(f"placement: duplicate {key} {name!r}")
        out[name] = item
    return out


def _desired(replicas: Mapping[str, int]) -> dict[str, int]:
    for role, count in replicas.items():
        if role not in MODEL_ROLES and role != Role.WITNESS:  # witnesses are members, not shards
            raise ValueError(f"placement: replicas for unknown role {role!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"placement: replicas.{role} must be a count of 0 or more, got {count!r}")
    return {role: replicas.get(role, 0) for role in MODEL_ROLES}


def _resolve(pin: Assignment, first: Mapping[str, str]) -> Assignment:
    return replace(pin, model=first.get(pin.role, "")) if not pin.model else pin


def _rank(role: str) -> tuple[int, str]:
    return (MODEL_ROLES.index(role) if role in MODEL_ROLES else len(MODEL_ROLES), role)


def _size(n: int) -> str:
    if n % _MIB == 0:
        return f"{n // _MIB} MiB"
    return f"{n / _MIB:.1f} MiB" if abs(n) >= _MIB else f"{n} B"
