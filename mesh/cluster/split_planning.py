"""Splitting a model across members (issue #17): which members run it as a pipeline, and how many layers each
holds. Pure and deterministic, like placement.py: no I/O, no clock, every choice broken by node id.

A split model runs on a head (the model's reasoning shard there: the embeddings, the output layer, the context
and its first layers) and stages (each an RPC server holding some of its last layers). What each needs:

    head, h layers:   the whole model's memory less the layers it does not hold  (SplitModel.head_need)
    stage, s layers:  s x layer_bytes + STAGE_OVERHEAD                           (SplitModel.stage_need)

`layer_bytes` is one block's weights and its KV cache for the model's context (read from the GGUF when the
model is registered: mesh/cluster/catalog.py).

`plan_split` builds one when the model fits no single member:
1. candidates: members that hold models (no witness, router or unhealthy member, see placement.ineligible),
   no battery-limited phone, no member `avoid` names (its stage of this model failed);
2. the head: the candidate with the most memory (it carries the embeddings), then the fastest; if it cannot
   hold even one layer besides, the next;
3. stages: the fewest that hold the rest, those with the most memory first (each hop costs LAN latency on
   every token);
4. shares: every member at least one layer, the rest in proportion to what each can hold (its memory, in
   layers) weighted by its speed relative to the fastest when every member reports one, never beyond what it
   can hold (D'Hondt's method: the same inputs always give the same shares).
When no plan exists it says why (the placer records it as the reasoning role's Unplaced reason).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.cluster.placement import BatteryPolicy, NodeInfo, ineligible
from raft.apply_splits import MAX_STAGES

_MIB = 1 << 20
# A stage process beyond its layers: the interpreter, ggml's libraries, its compute buffers (a few MiB for
# the default model's batch) and headroom.
STAGE_OVERHEAD = 96 * _MIB


@dataclass(frozen=True)
class SplitModel:
    name: str
    memory_bytes: int  # the whole model with one slot (raft.records.Model.memory_for(1): a head decodes one sequence)
    layers: int  # transformer blocks; 0: not known (the model is never split)
    layer_bytes: int  # one block's weights and KV cache

    @property
    def splittable(self) -> bool:
        return self.layers >= 2 and self.layer_bytes > 0

    def head_need(self, layers: int) -> int:
        return self.memory_bytes - (self.layers - layers) * self.layer_bytes

    def stage_need(self, layers: int) -> int:
        return layers * self.layer_bytes + STAGE_OVERHEAD

    def head_capacity(self, free: int) -> int:
        """The most layers a head with `free` bytes holds (at most all but one: the rest need a stage)."""
        return max(0, min(self.layers - 1, (free - self.head_need(0)) // self.layer_bytes))

    def stage_capacity(self, free: int) -> int:
        return max(0, min(self.layers - 1, (free - STAGE_OVERHEAD) // self.layer_bytes))


@dataclass(frozen=True)
class Pipeline:
    model: str
    head: str
    stages: tuple[tuple[str, int], ...]  # (node id, layers), pipeline order: the last layers

    @property
    def members(self) -> tuple[str, ...]:
        return (self.head, *(n for n, _ in self.stages))

    def needs(self, model: SplitModel) -> dict[str, int]:
        """Bytes each member gives to this pipeline."""
        head_layers = model.layers - sum(k for _, k in self.stages)
        return {self.head: model.head_need(head_layers), **{n: model.stage_need(k) for n, k in self.stages}}


@dataclass(frozen=True)
class SplitPlan:
    pipeline: Pipeline | None
    reason: str  # why there is none ("" when there is)


def candidates(nodes: Iterable[NodeInfo], battery: BatteryPolicy, avoid: Mapping[str, str],
               holding: frozenset[str] = frozenset()) -> tuple[list[NodeInfo], list[str]]:
    """(members that may hold part of a split model, why each other one may not), both by node id. `holding`:
    members of its current pipeline (a phone keeps its part down to the lower battery threshold)."""
    ok, why_not = [], []
    for node in sorted(nodes, key=lambda n: n.node_id):
        why = ineligible(node)
        if why is None and battery.limited(node, node.node_id in holding):
            why = "a phone on battery"
        if why is None and node.node_id in avoid:
            why = f"its stage failed: {avoid[node.node_id]}"
        if why is None:
            ok.append(node)
        else:
            why_not.append(f"{node.node_id} ({why})")
    return ok, why_not


def plan_split(nodes: Iterable[NodeInfo], model: SplitModel, battery: BatteryPolicy = BatteryPolicy(),
               avoid: Mapping[str, str] = {}) -> SplitPlan:  # noqa: B006 - read only
    """A pipeline for `model` over `nodes` (their memory_available is what each can give it), or why none."""
    if not model.splittable:
        return SplitPlan(None, f"{model.name} cannot be split across members (no layer figures for it)")
    ok, why_not = candidates(nodes, battery, avoid)
    excluded = f"; left out: {', '.join(why_not)}" if why_not else ""
    if len(ok) < 2:
        return SplitPlan(None, f"a split needs 2 members that hold models, {len(ok)} can{excluded}")
    by_memory = sorted(ok, key=lambda n: (-n.memory_available, -n.speed, n.node_id))
    for head in by_memory:
        head_cap = model.head_capacity(head.memory_available)
        if head_cap < 1:
            continue
        others = sorted((n for n in ok if n is not head and model.stage_capacity(n.memory_available) >= 1),
                        key=lambda n: (-n.memory_available, -n.speed, n.node_id))
        chosen, total = [], head_cap
        for node in others[:MAX_STAGES]:
            if total >= model.layers:
                break
            chosen.append(node)
            total += model.stage_capacity(node.memory_available)
        if total < model.layers or not chosen:
            break  # the roomiest head with every other member could not hold it: no other head can
        members = [head, *chosen]
        caps = [head_cap, *(model.stage_capacity(n.memory_available) for n in chosen)]
        speeds = [n.speed for n in members]
        weights = [c * (s / max(speeds)) for c, s in zip(caps, speeds)] if min(speeds) > 0 else caps
        shares = layer_shares(model.layers, caps, weights)
        stages = tuple((n.node_id, k) for n, k in zip(chosen, shares[1:]))
        return SplitPlan(Pipeline(model.name, head.node_id, stages), "")
    roomiest = by_memory[0]
    held = sum(model.stage_capacity(n.memory_available) for n in by_memory[1:MAX_STAGES + 1])
    return SplitPlan(None, f"split across members: a head needs {_size(model.head_need(1))} for the embeddings "
                           f"and one layer, and the roomiest member, {roomiest.node_id}, has "
                           f"{_size(roomiest.memory_available)} (room for "
                           f"{model.head_capacity(roomiest.memory_available)} layers); the others hold {held} of its "
                           f"{model.layers} layers{excluded}")


def layer_shares(total: int, caps: list[int], weights: list[float]) -> list[int]:
    """`total` layers over members that hold at most `caps` each: at least one each, then one at a time to the
    member with the highest weight / (layers + 1) that has room (ties: the earlier member)."""
    if len(caps) > total or sum(caps) < total or min(caps) < 1:
        raise ValueError(f"cannot share {total} layers over capacities {caps}")
    shares = [1] * len(caps)
    for _ in range(total - len(caps)):
        open_ = [i for i in range(len(caps)) if shares[i] < caps[i]]
        best = max(open_, key=lambda i: (weights[i] / (shares[i] + 1), -i))
        shares[best] += 1
    return shares


def still_fits(pipeline: Pipeline, nodes: Iterable[NodeInfo], model: SplitModel,
               battery: BatteryPolicy = BatteryPolicy(), avoid: Mapping[str, str] = {}) -> str | None:  # noqa: B006
    """Why the recorded `pipeline` can no longer run (a member gone, unhealthy, battery-limited, failed, or
    short of memory), or None when it still can: a pipeline that runs is kept, not re-planned for a better one."""
    if not model.splittable or sum(k for _, k in pipeline.stages) >= model.layers:
        return f"{model.name}'s layers changed"
    ok, _ = candidates(nodes, battery, avoid, holding=frozenset(pipeline.members))
    by_id = {n.node_id: n for n in ok}
    for node_id, need in pipeline.needs(model).items():
        node = by_id.get(node_id)
        if node is None:
            why = avoid.get(node_id)
            return f"{node_id} {'failed: ' + why if why else 'can no longer hold a part'}"
        if need > node.memory_available:
            return f"{node_id} needs {_size(need)} for its part; {_size(node.memory_available)} free"
    return None


def _size(n: int) -> str:
    return f"{n / _MIB:.0f} MiB"


def pinned_pipeline(model: SplitModel, members: list[NodeInfo]) -> tuple[Pipeline, str]:
    """A split pinned by hand (meshctl assign reasoning --node HEAD --node STAGE ...): the first member the head,
    the others stages in the order given, each member's share in proportion to what it can hold. Returns the
    pipeline and a warning ("" when none): when the members' reported memory cannot hold the model, the shares
    follow their memory all the same. ValueError for fewer than 2 members, more than the layers, or a model
    without layer figures."""
    if not model.splittable:
        raise ValueError(f"{model.name} cannot be split across members (no layer figures for it in the catalog)")
    if not 2 <= len(members) <= min(model.layers, MAX_STAGES + 1):
        raise ValueError(f"a pipeline of {model.name} has 2 to {min(model.layers, MAX_STAGES + 1)} members")
    if len({m.node_id for m in members}) != len(members):
        raise ValueError("each member appears once in a pipeline")
    head, stages = members[0], members[1:]
    caps = [model.head_capacity(head.memory_available), *(model.stage_capacity(n.memory_available) for n in stages)]
    warning = ""
    if min(caps) < 1 or sum(caps) < model.layers:
        warning = (f"these members report too little free memory for {model.name} "
                   f"({sum(caps)} of {model.layers} layers); shares follow their memory all the same")
        caps, weights = [model.layers - 1] * len(members), [max(1, m.memory_available) for m in members]
    else:
        weights = caps
    shares = layer_shares(model.layers, caps, weights)
    return Pipeline(model.name, head.node_id, tuple((n.node_id, k) for n, k in zip(stages, shares[1:]))), warning
