"""The replicated mesh state and the pure apply() that advances it.

apply(state, command) -> state does no I/O and reads no clock: the same log gives the same state
on every member. A command that breaks a rule raises Rejected and leaves the state as it was;
the proposer gets the reason back.

The records live in raft/records.py; this module applies membership, models, shards and placement, and
hands the session log (raft/apply_sessions.py), credentials (raft/apply_credentials.py) and pipelines
(raft/apply_splits.py) to their own handlers. The records and the session policy are re-exported here:
`from raft.state import MeshState` is how the rest of the code reads them.
"""

from __future__ import annotations

import dataclasses

from raft import apply_credentials, apply_sessions, apply_splits, apply_trust
from raft.apply_sessions import (  # noqa: F401 (re-exported)
    MAX_PROMPT_IDS,
    MAX_SESSIONS,
    MAX_TURNS,
    PROMPT_IDS_TURNS,
    SESSION_TTL_S,
    session_metrics,
)
from raft.apply_splits import MAX_STAGE_LAYERS, MAX_STAGES  # noqa: F401 (re-exported)
from raft.commands import (
    MEMBER_STATES,
    SHARD_STATES,
    AddMember,
    ApplyPlacement,
    AssignShard,
    Command,
    HaveModelFile,
    InitMesh,
    PinShard,
    RegisterModel,
    SetMemberState,
    SetReplicas,
    SetShardState,
    UnpinShard,
    UpdateProfile,
)
from raft.records import (  # noqa: F401 (re-exported)
    ROLES,
    AdminCredential,
    ApiKey,
    JoinToken,
    Member,
    MeshState,
    Model,
    Pin,
    Rejected,
    Session,
    Shard,
    Split,
    Turn,
    Unplaced,
)
from raft.vocab import MemberState


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
    if old is not None and cmd.token_id is not None:
        # A join (it carries a token) may never take over an id the mesh knows, live or gone: the
        # id is public, and taking it would redirect what members send to that member.
        raise Rejected(f"node id {cmd.node_id} already belongs to a member ({old.name}, {old.state}); "
                       f"a join cannot take over an existing id")
    clash = [m for m in state.members.values()
             if m.name == cmd.name and m.state != "gone" and m.node_id != cmd.node_id]
    if clash:
        raise Rejected(f"a member named {cmd.name!r} already exists")
    if old is not None and old.state != "gone":
        # Re-adding a live member refreshes its addresses and profile (a restart with a new port).
        member = dataclasses.replace(old, name=cmd.name, http_address=cmd.http_address,
                                     raft_address=cmd.raft_address, profile=cmd.profile,
                                     grpc_address=cmd.grpc_address or old.grpc_address,
                                     peer_address=cmd.peer_address or old.peer_address)
    else:
        if any(m.state != "gone" for m in state.members.values()):
            token = state.tokens.get(cmd.token_id or "")
            if token is None or not token.valid_at(cmd.joined_at):
                raise Rejected("a valid join token is required to join this mesh")
            state = dataclasses.replace(state, tokens={**state.tokens, token.token_id: dataclasses.replace(
                token, used=token.used + 1)})
        taken = [m for m in state.members.values() if m.state != "gone" and m.raft_address == cmd.raft_address]
        if taken:
            raise Rejected(f"raft address {cmd.raft_address} is already used by {taken[0].name}")
        member = Member(node_id=cmd.node_id, name=cmd.name, http_address=cmd.http_address,
                        raft_address=cmd.raft_address, profile=cmd.profile, state="active",
                        joined_at=cmd.joined_at, grpc_address=cmd.grpc_address, witness=cmd.witness,
                        peer_address=cmd.peer_address, authority=cmd.authority is True)
    return dataclasses.replace(state, members={**state.members, cmd.node_id: member})


def _update_profile(state: MeshState, cmd: UpdateProfile) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None or member.state == "gone":
        raise Rejected(f"unknown member {cmd.node_id}")
    if not isinstance(cmd.profile, dict):
        raise Rejected("a profile update is a mapping of profile fields")
    member = dataclasses.replace(member, profile=member.profile.merged(cmd.profile))
    return dataclasses.replace(state, members={**state.members, cmd.node_id: member})


def _set_member_state(state: MeshState, cmd: SetMemberState) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None:
        raise Rejected(f"unknown member {cmd.node_id}")
    if cmd.state not in MEMBER_STATES:
        raise Rejected(f"unknown member state {cmd.state!r}")
    members = {**state.members, cmd.node_id: dataclasses.replace(member, state=cmd.state)}
    shards, pins, files, admins = state.shards, state.pins, state.model_files, state.admins
    if cmd.state == MemberState.GONE:
        shards = {k: s for k, s in shards.items() if s.node_id != cmd.node_id}
        pins = {k: p for k, p in pins.items() if p.node_id != cmd.node_id}
        files = {m: nodes - {cmd.node_id} for m, nodes in files.items()}
        # A removed member's admin credential dies with it (its copy on a lost device opens nothing).
        admins = {k: dataclasses.replace(a, revoked=True) if a.node_id == cmd.node_id else a
                  for k, a in admins.items()}
    # A pipeline needs every one of its members: one that leaves takes the split with it.
    splits = {m: s for m, s in state.splits.items() if cmd.state != MemberState.GONE or cmd.node_id not in s.members}
    failures = {k: f for k, f in state.stage_failures.items() if cmd.state != MemberState.GONE or k[1] != cmd.node_id}
    new = dataclasses.replace(state, members=members, shards=shards, pins=pins, model_files=files, admins=admins,
                              splits=splits, stage_failures=failures)
    if cmd.state == MemberState.GONE and member.authority and member.state != MemberState.GONE:
        # Its copy of the CA key left with it: a rotation is owed (raft/apply_trust.py).
        new = apply_trust.owe_rotation(new, f"{member.name} held the CA key and was removed")
    return new


def _register_model(state: MeshState, cmd: RegisterModel) -> MeshState:
    if not all(type(n) is int and n >= 0 for n in (cmd.layers, cmd.layer_bytes, cmd.slots, cmd.slot_bytes)):
        raise Rejected("a model's slots, slot_bytes, layers and layer_bytes are counts of 0 or more")
    if type(cmd.memory_bytes) is int and cmd.slots * cmd.slot_bytes > cmd.memory_bytes:
        raise Rejected("a model's slots cannot need more than its memory_bytes")
    model = Model(name=cmd.name, file=cmd.file, sha256=cmd.sha256, size=cmd.size, roles=tuple(cmd.roles),
                  context_length=cmd.context_length, chat_template=cmd.chat_template,
                  memory_bytes=cmd.memory_bytes, layers=cmd.layers, layer_bytes=cmd.layer_bytes,
                  slots=cmd.slots, slot_bytes=cmd.slot_bytes)
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


def _set_replicas(state: MeshState, cmd: SetReplicas) -> MeshState:
    if cmd.role not in ROLES:
        raise Rejected(f"unknown role {cmd.role!r} (roles with replicas: {', '.join(ROLES)})")
    if cmd.count < 0 or cmd.count > 64:
        raise Rejected(f"replicas must be between 0 and 64, got {cmd.count}")
    return dataclasses.replace(state, replicas={**state.replicas, cmd.role: cmd.count})


def _pin_shard(state: MeshState, cmd: PinShard) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None or member.state == "gone":
        raise Rejected(f"unknown member {cmd.node_id}")
    if member.witness:
        raise Rejected(f"{member.name} is a witness: it holds no model shards")
    model = state.models.get(cmd.model)
    if model is None:
        raise Rejected(f"unknown model {cmd.model!r}")
    if cmd.role not in model.roles:
        raise Rejected(f"model {cmd.model!r} does not serve role {cmd.role!r}")
    pin = Pin(cmd.role, cmd.model, cmd.node_id)
    return dataclasses.replace(state, pins={**state.pins, (cmd.role, cmd.node_id): pin})


def _unpin_shard(state: MeshState, cmd: UnpinShard) -> MeshState:
    if (cmd.role, cmd.node_id) not in state.pins:
        raise Rejected(f"no {cmd.role} pin on {cmd.node_id}")
    return dataclasses.replace(state, pins={k: p for k, p in state.pins.items() if k != (cmd.role, cmd.node_id)})


def _apply_placement(state: MeshState, cmd: ApplyPlacement) -> MeshState:
    if cmd.split_model:  # the placer's split change first, in the same entry (all or nothing: handlers are pure)
        state = apply_splits.placer_split(state, cmd.split_model, cmd.split_head, cmd.split_stages)
    shards = {}
    for role, model, node_id in cmd.assignments:
        member = state.members.get(node_id)
        if member is None or member.state == "gone" or member.witness:
            raise Rejected(f"cannot place {role} on {node_id}: not a live model-holding member")
        if model not in state.models or role not in state.models[model].roles:
            raise Rejected(f"cannot place {role} with model {model!r}")
        key = (role, model, node_id)
        shards[key] = state.shards.get(key) or Shard(role=role, model=model, node_id=node_id)
    unplaced = tuple(Unplaced(r, m, int(n), str(why)) for r, m, n, why in cmd.unplaced)
    return dataclasses.replace(state, shards=shards, unplaced=unplaced)


def _have_model_file(state: MeshState, cmd: HaveModelFile) -> MeshState:
    if cmd.node_id not in state.members:
        raise Rejected(f"unknown member {cmd.node_id}")
    if cmd.model not in state.models:
        raise Rejected(f"unknown model {cmd.model!r}")
    holders = state.model_files.get(cmd.model, frozenset())
    holders = holders | {cmd.node_id} if cmd.have else holders - {cmd.node_id}
    return dataclasses.replace(state, model_files={**state.model_files, cmd.model: holders})


_HANDLERS = {
    InitMesh: _init_mesh,
    AddMember: _add_member,
    UpdateProfile: _update_profile,
    SetMemberState: _set_member_state,
    RegisterModel: _register_model,
    AssignShard: _assign_shard,
    SetShardState: _set_shard_state,
    SetReplicas: _set_replicas,
    PinShard: _pin_shard,
    UnpinShard: _unpin_shard,
    ApplyPlacement: _apply_placement,
    HaveModelFile: _have_model_file,
    **apply_sessions.HANDLERS,
    **apply_credentials.HANDLERS,
    **apply_splits.HANDLERS,
    **apply_trust.HANDLERS,
}
