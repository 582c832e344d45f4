"""The replicated mesh state and the pure apply() that advances it.

apply(state, command) -> state does no I/O and reads no clock: the same log gives the same state
on every member. A command that breaks a rule raises Rejected and leaves the state as it was;
the proposer gets the reason back.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from raft.commands import (
    MEMBER_STATES,
    SHARD_STATES,
    AddMember,
    ApplyPlacement,
    AssignShard,
    ClearSplit,
    Command,
    CreateAdminCredential,
    CreateApiKey,
    CreateToken,
    HaveModelFile,
    InitMesh,
    PinShard,
    RegisterModel,
    RevokeAdminCredential,
    RevokeApiKey,
    RevokeToken,
    SessionAppend,
    SessionTurnEnd,
    SessionTurnStart,
    SetAuthority,
    SetMemberState,
    SetReplicas,
    SetShardState,
    SetSplit,
    SpendToken,
    UnpinShard,
    UpdateProfile,
)
from raft.profile import MemberProfile
from raft.session_budget import SESSION_BYTES, SESSIONS_BYTES, evict_sessions, fit_turns, turn_bytes
from raft.vocab import MemberState

ROLES = ("reasoning", "context", "tool-use")

# Session log policy (fixed here so every member applies the same): a session idle for longer than
# SESSION_TTL_S is dropped when the next turn of any session starts; beyond MAX_SESSIONS the least
# recently used go first; a session keeps its last MAX_TURNS turns (trimmed when a turn ends: turns are
# numbered by position, and the open turn's number must hold until it ends).
SESSION_TTL_S = 24 * 3600
MAX_SESSIONS = 1000
MAX_TURNS = 64
# A turn's prompt token ids (the whole rendered conversation) are kept when there are at most
# MAX_PROMPT_IDS of them (more than the context windows we load: 4096 by default; a longer list is
# kept as its count only), and only on a session's last PROMPT_IDS_TURNS turns: each prompt holds
# the conversation before it, so the last finished turn's prompt and answer rebuild the KV cache,
# and older copies would make the log grow with the square of a session's length. Worst case
# 1000 sessions x 2 turns x 8192 ids.
MAX_PROMPT_IDS = 8192
PROMPT_IDS_TURNS = 2
# And in bytes (raft/session_budget.py): SESSION_BYTES per session (oldest turns first), SESSIONS_BYTES in
# all (least recently used sessions first); MeshState counts what they evicted.


class Rejected(ValueError):
    """A well-formed command that the current state does not allow."""


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    http_address: str
    raft_address: str
    profile: MemberProfile  # a mapping (older dumps, tests) is read into one
    state: str
    joined_at: float
    grpc_address: str = ""
    witness: bool = False
    peer_address: str = ""  # HTTPS peer port: joins and requests relayed to the leader
    authority: bool = False  # holds the mesh CA's key (SetAuthority); still True on a member removed holding it

    def __post_init__(self) -> None:
        if not isinstance(self.profile, MemberProfile):
            object.__setattr__(self, "profile", MemberProfile.from_wire(self.profile))


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
class JoinToken:
    token_id: str
    secret_sha256: str
    created_at: float
    expires_at: float
    revoked: bool = False
    uses: int = 1  # joins it allows; each AddMember naming it spends one (a replayed token is refused)
    used: int = 0

    def valid_at(self, when: float) -> bool:
        return not self.revoked and self.used < self.uses and self.created_at <= when < self.expires_at


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    secret_sha256: str
    created_at: float
    revoked: bool = False


@dataclass(frozen=True)
class AdminCredential:
    cred_id: str
    name: str
    secret_sha256: str
    created_at: float
    node_id: str = ""  # the member it belongs to; "" for an operator's
    revoked: bool = False


@dataclass(frozen=True)
class Pin:
    role: str
    model: str
    node_id: str


@dataclass(frozen=True)
class Unplaced:
    role: str
    model: str
    missing: int
    reason: str


@dataclass(frozen=True)
class Split:
    """A model run as a pipeline (SetSplit): `head` holds the first layers, each stage the last ones."""
    model: str
    head: str  # node id
    stages: tuple[tuple[str, int], ...]  # (node id, layers), pipeline order

    @property
    def members(self) -> tuple[str, ...]:
        return (self.head, *(node_id for node_id, _ in self.stages))


@dataclass(frozen=True)
class Turn:
    messages: tuple[tuple[str, str], ...]  # what the client added this turn: (role, content)
    prompt_tokens: int
    answer_tokens: tuple[int, ...] = ()
    answer_text: str = ""
    finish_reason: str | None = None  # None while the answer is being generated
    # The prompt as the shard tokenized it; () in logs and dumps from before it was recorded, on
    # turns older than the last PROMPT_IDS_TURNS, and for prompts over MAX_PROMPT_IDS.
    prompt_token_ids: tuple[int, ...] = ()

    @functools.cached_property
    def size(self) -> int:
        """Estimated bytes in a dump (raft/session_budget.py). Not a field: never logged nor compared."""
        return turn_bytes(self)


@dataclass(frozen=True)
class Session:
    turns: tuple[Turn, ...]
    last_used: float
    owner: str = ""  # the API key id that started it; "" without keys (and in older logs and dumps)

    @functools.cached_property
    def size(self) -> int:
        """Estimated bytes of its turns in a dump (raft/session_budget.py); computed once per Session."""
        return sum(t.size for t in self.turns)

    def history(self) -> list[tuple[str, str]]:
        """The conversation so far, as (role, content): each finished turn's messages and answer."""
        out: list[tuple[str, str]] = []
        for turn in self.turns:
            if turn.finish_reason is None:
                continue
            out.extend(turn.messages)
            out.append(("assistant", turn.answer_text))
        return out


@dataclass(frozen=True)
class MeshState:
    """Treat as immutable: apply() builds new dicts, never edits these in place."""
    mesh_id: str = ""
    name: str = ""
    created_at: float = 0.0
    members: dict[str, Member] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    shards: dict[tuple[str, str, str], Shard] = field(default_factory=dict)
    tokens: dict[str, JoinToken] = field(default_factory=dict)
    api_keys: dict[str, ApiKey] = field(default_factory=dict)
    admins: dict[str, AdminCredential] = field(default_factory=dict)  # control API credentials, by id
    replicas: dict[str, int] = field(default_factory=dict)  # desired replicas per role
    pins: dict[tuple[str, str], Pin] = field(default_factory=dict)  # (role, node_id) -> pin
    unplaced: tuple[Unplaced, ...] = ()  # the last placement's shortfalls, with reasons
    model_files: dict[str, frozenset[str]] = field(default_factory=dict)  # model -> node ids holding it
    # The session log: per named session, each turn's messages, answer tokens and text.
    sessions: dict[str, Session] = field(default_factory=dict)
    splits: dict[str, Split] = field(default_factory=dict)  # model -> its pipeline (meshctl split)
    applied: int = 0  # commands applied so far (rejected ones excluded)
    # What the session caps evicted since the mesh began (monotonic: metrics read them as counters).
    sessions_evicted: int = 0  # whole sessions, least recently used first: over MAX_SESSIONS or SESSIONS_BYTES
    session_turns_evicted: int = 0  # oldest turns of a session: over MAX_TURNS or SESSION_BYTES, when a turn ends
    session_bytes_evicted: int = 0  # estimated bytes those two freed

    @property
    def session_bytes(self) -> int:
        """Estimated bytes the session log holds now (at most about SESSIONS_BYTES)."""
        return sum(s.size for s in self.sessions.values())

    @property
    def initialised(self) -> bool:
        return bool(self.mesh_id)

    def live_members(self) -> list[Member]:
        return sorted((m for m in self.members.values() if m.state != "gone"), key=lambda m: m.node_id)

    def member_by_name(self, name: str) -> Member | None:
        return next((m for m in self.members.values() if m.name == name and m.state != "gone"), None)

    def shards_on(self, node_id: str) -> list[Shard]:
        return sorted((s for s in self.shards.values() if s.node_id == node_id), key=lambda s: s.key)

    def shards_for(self, role: str, model: str | None = None) -> list[Shard]:
        return sorted((s for s in self.shards.values() if s.role == role and model in (None, s.model)),
                      key=lambda s: s.key)


def session_metrics(state: MeshState) -> dict[str, int]:
    """The session log's size and what its caps evicted, for the metrics layer (the three *_evicted values are
    counters: they only grow, the same on every member; the bytes are estimates, raft/session_budget.py)."""
    return {
        "session_bytes": state.session_bytes,
        "session_bytes_budget": SESSIONS_BYTES,
        "session_bytes_budget_per_session": SESSION_BYTES,
        "sessions": len(state.sessions),
        "sessions_evicted": state.sessions_evicted,
        "session_turns_evicted": state.session_turns_evicted,
        "session_bytes_evicted": state.session_bytes_evicted,
    }


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
                        peer_address=cmd.peer_address)
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
    return dataclasses.replace(state, members=members, shards=shards, pins=pins, model_files=files, admins=admins,
                               splits=splits)


def _set_authority(state: MeshState, cmd: SetAuthority) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None or member.state == "gone":
        raise Rejected(f"unknown member {cmd.node_id}")
    if not isinstance(cmd.authority, bool):
        raise Rejected("authority is true or false")
    member = dataclasses.replace(member, authority=cmd.authority)
    return dataclasses.replace(state, members={**state.members, cmd.node_id: member})


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


def _create_token(state: MeshState, cmd: CreateToken) -> MeshState:
    if cmd.token_id in state.tokens:
        raise Rejected(f"token {cmd.token_id} already exists")
    if cmd.expires_at <= cmd.created_at:
        raise Rejected("a token must expire after it is created")
    if not isinstance(cmd.uses, int) or cmd.uses < 1:
        raise Rejected("a token allows at least one join")
    token = JoinToken(cmd.token_id, cmd.secret_sha256, cmd.created_at, cmd.expires_at, uses=cmd.uses)
    return dataclasses.replace(state, tokens={**state.tokens, cmd.token_id: token})


def _spend_token(state: MeshState, cmd: SpendToken) -> MeshState:
    token = state.tokens.get(cmd.token_id)
    if token is None:
        raise Rejected(f"unknown token {cmd.token_id}")
    if not token.valid_at(cmd.at):
        raise Rejected(f"token {cmd.token_id} is expired, revoked or used up")
    return dataclasses.replace(state, tokens={**state.tokens, cmd.token_id: dataclasses.replace(
        token, used=token.used + 1)})


def _revoke_token(state: MeshState, cmd: RevokeToken) -> MeshState:
    token = state.tokens.get(cmd.token_id)
    if token is None:
        raise Rejected(f"unknown token {cmd.token_id}")
    return dataclasses.replace(state, tokens={**state.tokens, cmd.token_id: dataclasses.replace(token, revoked=True)})


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


MAX_STAGES = 16
MAX_STAGE_LAYERS = 4096


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
    nodes = [cmd.head, *(node_id for node_id, _ in cmd.stages)]
    if len(set(nodes)) != len(nodes):
        raise Rejected("the head and every stage of a split are distinct members")
    for node_id in nodes:
        member = state.members.get(node_id)
        if member is None or member.state == MemberState.GONE:
            raise Rejected(f"unknown member {node_id}")
        if member.witness:
            raise Rejected(f"{member.name} is a witness: it holds no model layers")
    split = Split(cmd.model, cmd.head, tuple((node_id, layers) for node_id, layers in cmd.stages))
    return dataclasses.replace(state, splits={**state.splits, cmd.model: split})


def _clear_split(state: MeshState, cmd: ClearSplit) -> MeshState:
    if cmd.model not in state.splits:
        raise Rejected(f"model {cmd.model!r} is not split")
    return dataclasses.replace(state, splits={m: s for m, s in state.splits.items() if m != cmd.model})


def _have_model_file(state: MeshState, cmd: HaveModelFile) -> MeshState:
    if cmd.node_id not in state.members:
        raise Rejected(f"unknown member {cmd.node_id}")
    if cmd.model not in state.models:
        raise Rejected(f"unknown model {cmd.model!r}")
    holders = state.model_files.get(cmd.model, frozenset())
    holders = holders | {cmd.node_id} if cmd.have else holders - {cmd.node_id}
    return dataclasses.replace(state, model_files={**state.model_files, cmd.model: holders})


def _session_turn_start(state: MeshState, cmd: SessionTurnStart) -> MeshState:
    sessions = {k: v for k, v in state.sessions.items() if cmd.at - v.last_used <= SESSION_TTL_S}
    old = sessions.get(cmd.session_id)
    if old is not None and old.owner != cmd.owner:
        raise Rejected(f"unknown session {cmd.session_id}")  # another key's: as if it did not exist
    turns = old.turns if old is not None else ()
    if turns and turns[-1].finish_reason is None:
        turns = turns[:-1]  # an unfinished turn (its answer was never completed) is replaced
    if cmd.turn != len(turns):
        raise Rejected(f"session {cmd.session_id}: turn {cmd.turn} out of order (next is {len(turns)})")
    ids = tuple(int(t) for t in cmd.prompt_token_ids) if len(cmd.prompt_token_ids) <= MAX_PROMPT_IDS else ()
    turn = Turn(messages=tuple(tuple(m) for m in cmd.messages), prompt_tokens=cmd.prompt_tokens,
                prompt_token_ids=ids)
    if turn.size > SESSION_BYTES and ids:
        turn = dataclasses.replace(turn, prompt_token_ids=())  # alone over the budget: its ids go first
    # Turns are numbered by position, and the open turn keeps its number until it ends: older turns are only
    # dropped (MAX_TURNS, SESSION_BYTES) once it has ended (_session_turn_end).
    turns = (*turns, turn)
    keep_from = len(turns) - PROMPT_IDS_TURNS
    turns = tuple(dataclasses.replace(t, prompt_token_ids=()) if i < keep_from and t.prompt_token_ids else t
                  for i, t in enumerate(turns))
    sessions[cmd.session_id] = Session(turns=turns, last_used=cmd.at, owner=cmd.owner)
    evicted = freed = 0
    if len(sessions) > MAX_SESSIONS:
        keep = set(sorted(sessions, key=lambda k: (sessions[k].last_used, k))[-MAX_SESSIONS:])
        evicted = len(sessions) - len(keep)
        freed = sum(s.size for k, s in sessions.items() if k not in keep)
        sessions = {k: s for k, s in sessions.items() if k in keep}
    state = dataclasses.replace(state, sessions_evicted=state.sessions_evicted + evicted,
                                session_bytes_evicted=state.session_bytes_evicted + freed)
    return _within_total(state, sessions, cmd.session_id)


def _within_total(state: MeshState, sessions: dict[str, Session], session_id: str) -> MeshState:
    """`state` with `sessions`, the least recently used evicted (never `session_id`, which has just grown) until
    they fit SESSIONS_BYTES, counted."""
    sessions, evicted, freed = evict_sessions(sessions, session_id, SESSIONS_BYTES)
    return dataclasses.replace(state, sessions=sessions, sessions_evicted=state.sessions_evicted + evicted,
                               session_bytes_evicted=state.session_bytes_evicted + freed)


def _open_turn(state: MeshState, session_id: str, turn: int) -> tuple[Session, Turn]:
    session = state.sessions.get(session_id)
    if session is None or not session.turns:
        raise Rejected(f"unknown session {session_id}")
    last = session.turns[-1]
    if turn != len(session.turns) - 1 or last.finish_reason is not None:
        raise Rejected(f"session {session_id}: turn {turn} is not the open turn")
    return session, last


def _session_append(state: MeshState, cmd: SessionAppend) -> MeshState:
    session, turn = _open_turn(state, cmd.session_id, cmd.turn)
    turn = dataclasses.replace(turn, answer_tokens=turn.answer_tokens + tuple(cmd.tokens),
                               answer_text=turn.answer_text + cmd.text)
    session = dataclasses.replace(session, turns=(*session.turns[:-1], turn))
    return _within_total(state, {**state.sessions, cmd.session_id: session}, cmd.session_id)


def _session_turn_end(state: MeshState, cmd: SessionTurnEnd) -> MeshState:
    session, turn = _open_turn(state, cmd.session_id, cmd.turn)
    turn = dataclasses.replace(turn, finish_reason=cmd.finish_reason)
    turns = (*session.turns[:-1], turn)
    dropped = max(0, len(turns) - MAX_TURNS)
    freed = sum(t.size for t in turns[:dropped])
    turns, over, over_freed = fit_turns(turns[dropped:], SESSION_BYTES)  # oldest first, the newest kept
    session = dataclasses.replace(session, turns=turns, last_used=cmd.at)
    state = dataclasses.replace(state, session_turns_evicted=state.session_turns_evicted + dropped + over,
                                session_bytes_evicted=state.session_bytes_evicted + freed + over_freed)
    return _within_total(state, {**state.sessions, cmd.session_id: session}, cmd.session_id)


def _create_api_key(state: MeshState, cmd: CreateApiKey) -> MeshState:
    if cmd.key_id in state.api_keys:
        raise Rejected(f"API key {cmd.key_id} already exists")
    key = ApiKey(cmd.key_id, cmd.name, cmd.secret_sha256, cmd.created_at)
    return dataclasses.replace(state, api_keys={**state.api_keys, cmd.key_id: key})


def _create_admin(state: MeshState, cmd: CreateAdminCredential) -> MeshState:
    if cmd.cred_id in state.admins:
        raise Rejected(f"admin credential id {cmd.cred_id} already exists")
    if cmd.node_id:
        member = state.members.get(cmd.node_id)
        if member is None or member.state == MemberState.GONE:
            raise Rejected(f"no live member {cmd.node_id} to hold an admin credential")
    cred = AdminCredential(cmd.cred_id, cmd.name, cmd.secret_sha256, cmd.created_at, cmd.node_id)
    return dataclasses.replace(state, admins={**state.admins, cmd.cred_id: cred})


def _revoke_admin(state: MeshState, cmd: RevokeAdminCredential) -> MeshState:
    cred = state.admins.get(cmd.cred_id)
    if cred is None:
        raise Rejected(f"unknown admin credential {cmd.cred_id}")
    return dataclasses.replace(state, admins={**state.admins, cmd.cred_id: dataclasses.replace(cred, revoked=True)})


def _revoke_api_key(state: MeshState, cmd: RevokeApiKey) -> MeshState:
    key = state.api_keys.get(cmd.key_id)
    if key is None:
        raise Rejected(f"unknown API key {cmd.key_id}")
    return dataclasses.replace(state, api_keys={**state.api_keys, cmd.key_id: dataclasses.replace(key, revoked=True)})


_HANDLERS = {
    InitMesh: _init_mesh,
    AddMember: _add_member,
    UpdateProfile: _update_profile,
    SetMemberState: _set_member_state,
    RegisterModel: _register_model,
    AssignShard: _assign_shard,
    SetShardState: _set_shard_state,
    CreateToken: _create_token,
    RevokeToken: _revoke_token,
    SpendToken: _spend_token,
    SetReplicas: _set_replicas,
    PinShard: _pin_shard,
    UnpinShard: _unpin_shard,
    ApplyPlacement: _apply_placement,
    HaveModelFile: _have_model_file,
    SessionTurnStart: _session_turn_start,
    SessionAppend: _session_append,
    SessionTurnEnd: _session_turn_end,
    CreateApiKey: _create_api_key,
    RevokeApiKey: _revoke_api_key,
    CreateAdminCredential: _create_admin,
    RevokeAdminCredential: _revoke_admin,
    SetAuthority: _set_authority,
    SetSplit: _set_split,
    ClearSplit: _clear_split,
}
