"""Apply handlers for models run as pipelines across members (SetSplit, ClearSplit, SetStageState)."""

from __future__ import annotations

import dataclasses

from raft.commands import STAGE_STATES, ClearSplit, SetSplit, SetStageState
from raft.records import MeshState, Rejected, Split
from raft.vocab import MemberState

MAX_STAGES = 16
MAX_STAGE_LAYERS = 4096
MAX_STAGE_DETAIL = 500  # characters of a stage's report (SetStageState.detail); a longer one is refused
MAX_STAGE_FAILURES = 64  # failures kept in MeshState.stage_failures (the oldest go first)


def _set_split(state: MeshState, cmd: SetSplit) -> MeshState:
    model = state.models.get(cmd.model)
    if model is None:
        raise Rejected(f"unknown model {cmd.model!r}")
    if "reasoning" not in model.roles:
        raise Rejected(f"model {cmd.model!r} does not serve reasoning: only a chat model runs as a pipeline")
    if not isinstance(cmd.stages, tuple) or not 1 <= len(cmd.stages) <= MAX_STAGES:
        raise Rejected(f"a split has 1 to {MAX_STAGES} stages")
    for stage in cmd.stages:
        if not (isinstance(stage, tuple) and len(stage) == 2 and isinstance(stage[0], str)
                and type(stage[1]) is int and 1 <= stage[1] <= MAX_STAGE_LAYERS):
            raise Rejected(f"a stage is (member, layers from 1 to {MAX_STAGE_LAYERS}), got {stage!r}")
    if type(cmd.auto) is not bool:
        raise Rejected("a split's auto flag is true or false")
    nodes = [cmd.head, *(node_id for node_id, _ in cmd.stages)]
    if len(set(nodes)) != len(nodes):
        raise Rejected("the head and every stage of a split are distinct members")
    for node_id in nodes:
        member = state.members.get(node_id)
        if member is None or member.state == MemberState.GONE:
            raise Rejected(f"unknown member {node_id}")
        if member.witness:
            raise Rejected(f"{member.name} is a witness: it holds no model layers")
    if model.layers and sum(layers for _, layers in cmd.stages) >= model.layers:
        raise Rejected(f"model {cmd.model!r} has {model.layers} layers: the stages hold fewer, the head the rest")
    split = Split(cmd.model, cmd.head, tuple((node_id, layers) for node_id, layers in cmd.stages), auto=cmd.auto)
    return dataclasses.replace(state, splits={**state.splits, cmd.model: split})


def _clear_split(state: MeshState, cmd: ClearSplit) -> MeshState:
    if cmd.model not in state.splits:
        raise Rejected(f"model {cmd.model!r} is not split")
    return dataclasses.replace(state, splits={m: s for m, s in state.splits.items() if m != cmd.model})


def _set_stage_state(state: MeshState, cmd: SetStageState) -> MeshState:
    split = state.splits.get(cmd.model)
    if split is None:
        raise Rejected(f"model {cmd.model!r} is not split")
    order = [node_id for node_id, _ in split.stages]
    if cmd.node_id not in order:
        raise Rejected(f"{cmd.node_id} holds no stage of {cmd.model!r}")
    if cmd.state not in STAGE_STATES:
        raise Rejected(f"unknown stage state {cmd.state!r} (one of {', '.join(STAGE_STATES)})")
    if not isinstance(cmd.detail, str) or len(cmd.detail) > MAX_STAGE_DETAIL:
        raise Rejected(f"a stage's detail is text of at most {MAX_STAGE_DETAIL} characters")
    if type(cmd.at) not in (int, float) or not 0 <= cmd.at < 1e11:
        raise Rejected("a stage report's time is seconds since 1970")
    states = {n: (s, d) for n, s, d in split.stage_states}
    states[cmd.node_id] = (cmd.state, cmd.detail)
    recorded = tuple((n, *states[n]) for n in order if n in states)
    split = dataclasses.replace(split, stage_states=recorded)
    return dataclasses.replace(state, splits={**state.splits, cmd.model: split},
                               stage_failures=_failures(state.stage_failures, cmd))


def _failures(failures: dict, cmd: SetStageState) -> dict:
    """MeshState.stage_failures after a stage report: a "failed" recorded, a "ready" clearing it."""
    key = (cmd.model, cmd.node_id)
    if cmd.state == "failed":
        kept = sorted({**failures, key: (cmd.detail, float(cmd.at))}.items(), key=lambda kv: (kv[1][1], kv[0]))
        return dict(kept[-MAX_STAGE_FAILURES:])
    if cmd.state == "ready" and key in failures:
        return {k: v for k, v in failures.items() if k != key}
    return failures


def placer_split(state: MeshState, model: str, head: str, stages: tuple) -> MeshState:
    """The split change an ApplyPlacement carries: the placer's own pipeline for `model` (head and stages), or its
    split cleared (empty head). A split pinned by hand is only a person's to change."""
    current = state.splits.get(model)
    if current is not None and not current.auto:
        raise Rejected(f"model {model!r} is split by hand: only meshctl changes it")
    if not head:
        return _clear_split(state, ClearSplit(model))
    return _set_split(state, SetSplit(model, head, stages, auto=True))


HANDLERS = {
    SetSplit: _set_split,
    ClearSplit: _clear_split,
    SetStageState: _set_stage_state,
}
