"""The replicated mesh state and the pure apply() that advances it.

apply(state, command) -> state does no I/O and reads no clock: the same log gives the same state
on every member. A command that breaks a rule raises Rejected and leaves the state as it was;
the proposer gets the reason back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raft.commands import (
    MEMBER_STATES,
    SHARD_STATES,
    AddMember,
    AssignShard,
    Command,
    InitMesh,
    RegisterModel,
    SetMemberState,
    SetShardState,
)


class Rejected(ValueError):
    """A well-formed command that the current state does not allow."""


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    http_address: str
    raft_address: str
    profile: dict[str, Any]
    state: str
    joined_at: float


@dataclass(frozen=True)
class Model:
    name: str
    file: str
    sha256: str
    size: int
    roles: tuple[str, ...]
    context_length: int
    chat_template: str | None
    memory_bytes: int


@dataclass(frozen=True)
class Shard:
    role: str
    model: str
    node_id: str
    state: str = "assigned"
    detail: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.role, self.model, self.node_id)


@dataclass(frozen=True)
class MeshState:
    """Treat as immutable: apply() builds new dicts, never edits these in place."""
    mesh_id: str = ""
    name: str = ""
    created_at: float = 0.0
    members: dict[str, Member] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    shards: dict[tuple[str, str, str], Shard] = field(default_factory=dict)
    applied: int = 0  # commands applied so far (rejected ones excluded)

    @property
    def initialised(self) -> bool:
        return bool(self.mesh_id)

    def shards_for(self, role: str, model: str | None = None) -> list[Shard]:
        return sorted((s for s in self.shards.values() if s.role == role and model in (None, s.model)),
                      key=lambda s: s.key)


def apply(state: MeshState, cmd: Command) -> MeshState:
    handler = _HANDLERS.get(type(cmd))
    if handler is None:
        raise Rejected(f"no handler for {type(cmd).__name__}")
    if not state.initialised and not isinstance(cmd, InitMesh):
        raise Rejected("the mesh is not initialised yet")
    new = handler(state, cmd)
    return dataclasses.replace(new, applied=state.applied + 1)


def _init_mesh(state: MeshState, cmd: InitMesh) -> MeshState:
    if state.initialised:
        raise Rejected(f"mesh already initialised as {state.mesh_id}")
    if not cmd.mesh_id:
        raise Rejected("mesh_id must not be empty")
    return dataclasses.replace(state, mesh_id=cmd.mesh_id, name=cmd.name, created_at=cmd.created_at)


def _add_member(state: MeshState, cmd: AddMember) -> MeshState:
    old = state.members.get(cmd.node_id)
    clash = [m for m in state.members.values()
             if m.name == cmd.name and m.state != "gone" and m.node_id != cmd.node_id]
    if clash:
        raise Rejected(f"a member named {cmd.name!r} already exists")
    if old is not None and old.state != "gone":
        # Re-adding a live member refreshes its addresses and profile (a restart with a new port).
        member = dataclasses.replace(old, name=cmd.name, http_address=cmd.http_address,
                                     raft_address=cmd.raft_address, profile=dict(cmd.profile))
    else:
        member = Member(node_id=cmd.node_id, name=cmd.name, http_address=cmd.http_address,
                        raft_address=cmd.raft_address, profile=dict(cmd.profile), state="active",
                        joined_at=cmd.joined_at)
    return dataclasses.replace(state, members={**state.members, cmd.node_id: member})


def _set_member_state(state: MeshState, cmd: SetMemberState) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None:
        raise Rejected(f"unknown member {cmd.node_id}")
    if cmd.state not in MEMBER_STATES:
        raise Rejected(f"unknown member state {cmd.state!r}")
    members = {**state.members, cmd.node_id: dataclasses.replace(member, state=cmd.state)}
    shards = state.shards
    if cmd.state == "gone":
        shards = {k: s for k, s in shards.items() if s.node_id != cmd.node_id}
    return dataclasses.replace(state, members=members, shards=shards)


def _register_model(state: MeshState, cmd: RegisterModel) -> MeshState:
    model = Model(name=cmd.name, file=cmd.file, sha256=cmd.sha256, size=cmd.size, roles=tuple(cmd.roles),
                  context_length=cmd.context_length, chat_template=cmd.chat_template,
                  memory_bytes=cmd.memory_bytes)
    old = state.models.get(cmd.name)
    if old is not None and old.sha256 != cmd.sha256:
        in_use = [s for s in state.shards.values() if s.model == cmd.name]
        if in_use:
            raise Rejected(f"model {cmd.name!r} is in use by {len(in_use)} shard(s); its file cannot change")
    return dataclasses.replace(state, models={**state.models, cmd.name: model})


def _assign_shard(state: MeshState, cmd: AssignShard) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None or member.state == "gone":
        raise Rejected(f"unknown member {cmd.node_id}")
    model = state.models.get(cmd.model)
    if model is None:
        raise Rejected(f"unknown model {cmd.model!r}")
    if cmd.role not in model.roles:
        raise Rejected(f"model {cmd.model!r} does not serve role {cmd.role!r}")
    key = (cmd.role, cmd.model, cmd.node_id)
    if key in state.shards:
        return state
    shard = Shard(role=cmd.role, model=cmd.model, node_id=cmd.node_id)
    return dataclasses.replace(state, shards={**state.shards, key: shard})


def _set_shard_state(state: MeshState, cmd: SetShardState) -> MeshState:
    key = (cmd.role, cmd.model, cmd.node_id)
    shard = state.shards.get(key)
    if shard is None:
        raise Rejected(f"no {cmd.role} shard of {cmd.model!r} on {cmd.node_id}")
    if cmd.state not in SHARD_STATES:
        raise Rejected(f"unknown shard state {cmd.state!r}")
    shards = {**state.shards, key: dataclasses.replace(shard, state=cmd.state, detail=cmd.detail)}
    return dataclasses.replace(state, shards=shards)


_HANDLERS = {
    InitMesh: _init_mesh,
    AddMember: _add_member,
    SetMemberState: _set_member_state,
    RegisterModel: _register_model,
    AssignShard: _assign_shard,
    SetShardState: _set_shard_state,
}
