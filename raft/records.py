"""The records of the replicated mesh state (MeshState and what it holds). raft/state.py applies commands to them.

Every record is frozen: apply() builds new ones and new dicts, never edits in place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from raft.profile import MemberProfile
from raft.session_budget import turn_bytes

ROLES = ("reasoning", "context", "tool-use")


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
    ca: str = ""  # fingerprint of the CA that signed its current certificate, as it reports it (SetMemberCa)
    trusts: str = ""  # fingerprint of the newest CA it trusts, as it reports it (SetMemberCa)
    cert: str = ""  # fingerprint of its current certificate, as it reports it (SetMemberCa); "" before it has

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
    # What splitting the model across members needs (read from the GGUF when registered; 0 in older logs and
    # for models that are not split by layers: such a model is only ever placed whole).
    layers: int = 0  # transformer blocks
    layer_bytes: int = 0  # what one block costs the member holding it: its weights and its KV cache
    # memory_bytes counts `slots` KV caches (the registering member's node.parallel), each `slot_bytes`: a member
    # decoding another number of sequences at once needs memory_for(its slots). 0 in older logs and for models
    # without a KV cache: every member is then charged memory_bytes.
    slots: int = 0
    slot_bytes: int = 0

    def memory_for(self, slots: int) -> int:
        """What one whole shard of this model needs on a member whose generating shards have `slots` slots
        (0: not reported, charged as registered)."""
        return memory_for_slots(self.memory_bytes, self.slots, self.slot_bytes, slots)


def memory_for_slots(memory_bytes: int, recorded_slots: int, slot_bytes: int, slots: int) -> int:
    """A model's need with `slots` KV caches, from its catalog figures: `memory_bytes` counting `recorded_slots`
    caches of `slot_bytes` each. Unchanged when either side is not known (0)."""
    if slots <= 0 or recorded_slots <= 0 or slot_bytes <= 0:
        return memory_bytes
    return memory_bytes + (slots - recorded_slots) * slot_bytes


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
    auto: bool = False  # planned by the placer (it re-plans it); False: pinned by hand (older logs too)
    # (node id, "starting" | "ready" | "failed", detail) per stage that reported (SetStageState), stage order;
    # a new SetSplit starts it empty.
    stage_states: tuple[tuple[str, str, str], ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return (self.head, *(node_id for node_id, _ in self.stages))

    def stage_state(self, node_id: str) -> tuple[str, str] | None:
        """(state, detail) that stage `node_id` last reported, or None."""
        return next(((state, detail) for n, state, detail in self.stage_states if n == node_id), None)

    def failed_stages(self) -> tuple[str, ...]:
        return tuple(n for n, state, _ in self.stage_states if state == "failed")


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
    replica: str = ""  # the member whose replica ended its last turn (its KV cache is there); "" if unknown

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
    # The last failure each member reported for its stage of a model, kept past the split it was in (a new
    # SetSplit starts the split's stage states afresh): (model, node id) -> (detail, when: the member's clock).
    # A "ready" from that member for that model clears it (raft/apply_splits.py).
    stage_failures: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    # The CAs every member trusts (raft/apply_trust.py): (fingerprint, certificate PEM) pairs, () until the first
    # rotation (each member trusts its ca.pem); `signing_ca` signs new certificates; `ca_rotation_owed` says why
    # a rotation is owed ("" when none); `ca_made_by` is the authority that made the signing CA.
    trusted_cas: tuple[tuple[str, str], ...] = ()
    signing_ca: str = ""
    ca_rotation_owed: str = ""
    ca_made_by: str = ""
    ca_finish: bool = False  # an operator finishes the rotation without the members that do not trust the new CA
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
