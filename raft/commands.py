"""Typed commands: the only way the replicated state changes.

Commands travel through the Raft log as plain dicts ({"kind": ..., fields...}) so the journal does
not depend on Python class paths; `encode`/`decode` convert at the boundary. Everything a command
needs (ids, timestamps) is inside it: apply() never reads a clock or a random source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from raft.profile import MemberProfile
from raft.vocab import MemberState, ShardState

MEMBER_STATES = tuple(MemberState)
SHARD_STATES = tuple(ShardState)


@dataclass(frozen=True)
class Command:
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class InitMesh(Command):
    """First entry of every mesh: fixes its identity."""
    kind: ClassVar[str] = "init_mesh"
    mesh_id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class AddMember(Command):
    """A node joins (or a known node re-announces its addresses after a restart).

    A new node must present a join token (its id; the leader has checked the secret) that is
    valid at `joined_at`, except the mesh's first member. A command carrying a token never names
    a node id the mesh already has (live or gone): only a member's own re-announce, without a
    token, refreshes its addresses.
    """
    kind: ClassVar[str] = "add_member"
    node_id: str
    name: str
    http_address: str
    raft_address: str
    profile: MemberProfile  # a mapping is read into one (raft/profile.py); the wire carries its to_wire()
    joined_at: float
    grpc_address: str = ""
    witness: bool = False
    token_id: str | None = None
    peer_address: str = ""  # the HTTPS peer port (joins, relayed requests); "" in logs from before it
    authority: bool = False  # a join whose answer carries the CA key (only a new member's is taken)

    def __post_init__(self) -> None:
        if not isinstance(self.profile, MemberProfile):
            object.__setattr__(self, "profile", MemberProfile.from_wire(self.profile))


@dataclass(frozen=True)
class UpdateProfile(Command):
    """A live member's changed profile facts (battery, memory), merged into its recorded profile."""
    kind: ClassVar[str] = "update_profile"
    node_id: str
    profile: dict[str, Any]


@dataclass(frozen=True)
class SetMemberState(Command):
    kind: ClassVar[str] = "set_member_state"
    node_id: str
    state: str


@dataclass(frozen=True)
class SetAuthority(Command):
    """Whether a member holds the mesh CA's key (an authority: it signs certificates), as it says of itself
    when it starts (mesh/security/authority.py). Kept on a removed member: it says the CA key left with it."""
    kind: ClassVar[str] = "set_authority"
    node_id: str
    authority: bool


@dataclass(frozen=True)
class RegisterModel(Command):
    kind: ClassVar[str] = "register_model"
    name: str
    file: str
    sha256: str
    size: int
    roles: tuple[str, ...]
    context_length: int
    chat_template: str | None
    memory_bytes: int
    layers: int = 0  # transformer blocks (GGUF block_count); 0: not split by layers
    layer_bytes: int = 0  # one block's weights (on average) and its KV cache for the context
    slots: int = 0  # the KV caches (node.parallel) memory_bytes counts; 0: not recorded (older members)
    slot_bytes: int = 0  # one slot's KV cache for the context; 0: not recorded (every member charged memory_bytes)


@dataclass(frozen=True)
class CreateToken(Command):
    """A join token: the log keeps only the sha256 of its secret."""
    kind: ClassVar[str] = "create_token"
    token_id: str
    secret_sha256: str
    created_at: float
    expires_at: float
    uses: int = 1  # how many nodes may join with it


@dataclass(frozen=True)
class RevokeToken(Command):
    kind: ClassVar[str] = "revoke_token"
    token_id: str


@dataclass(frozen=True)
class SpendToken(Command):
    """A join the leader refused after checking its token (it named a node id the mesh already
    knows): the use is spent anyway, so probing with a token costs a use like joining does."""
    kind: ClassVar[str] = "spend_token"
    token_id: str
    at: float


@dataclass(frozen=True)
class SetReplicas(Command):
    kind: ClassVar[str] = "set_replicas"
    role: str
    count: int


@dataclass(frozen=True)
class PinShard(Command):
    """Manual placement (meshctl assign): the placer keeps this shard on this node."""
    kind: ClassVar[str] = "pin_shard"
    role: str
    model: str
    node_id: str


@dataclass(frozen=True)
class UnpinShard(Command):
    kind: ClassVar[str] = "unpin_shard"
    role: str
    node_id: str


@dataclass(frozen=True)
class ApplyPlacement(Command):
    """The leader's placement result: the whole set of shards, and what could not be placed.

    assignments: [[role, model, node_id], ...]; unplaced: [[role, model, missing, reason], ...].
    Shards that stay keep their state; new ones start as "assigned"; the rest are dropped.
    """
    kind: ClassVar[str] = "apply_placement"
    assignments: tuple[tuple[str, str, str], ...]
    unplaced: tuple[tuple[str, str, int, str], ...] = ()
    # A change to the placer's own split of a model (mesh/cluster/split_planning.py), committed in the same entry
    # as the placement that goes with it, so no member ever sees a pipeline's new head or stages without the
    # shards placed for them, or its old head's shard without the split (which it would then load whole):
    # split_model names the model; split_head empty clears its split, else SetSplit(split_model, split_head,
    # split_stages, auto=True). Left out of an entry while empty.
    split_model: str = ""
    split_head: str = ""
    split_stages: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class HaveModelFile(Command):
    """A member holds a verified copy of a model file (peers may fetch it from there)."""
    kind: ClassVar[str] = "have_model_file"
    node_id: str
    model: str
    have: bool = True


@dataclass(frozen=True)
class CreateApiKey(Command):
    """A gateway API key: the log keeps only the sha256 of its secret."""
    kind: ClassVar[str] = "create_api_key"
    key_id: str
    name: str
    secret_sha256: str
    created_at: float


@dataclass(frozen=True)
class RevokeApiKey(Command):
    kind: ClassVar[str] = "revoke_api_key"
    key_id: str


@dataclass(frozen=True)
class CreateAdminCredential(Command):
    """An admin credential for the control API: the log keeps only the sha256 of its secret. `node_id`
    names the member it belongs to (revoked with that member's removal); "" is an operator's."""
    kind: ClassVar[str] = "create_admin_credential"
    cred_id: str
    name: str
    secret_sha256: str
    created_at: float
    node_id: str = ""


@dataclass(frozen=True)
class RevokeAdminCredential(Command):
    kind: ClassVar[str] = "revoke_admin_credential"
    cred_id: str


@dataclass(frozen=True)
class SessionTurnStart(Command):
    """A named session's next turn begins: the messages the client added, when, and the prompt the
    shard tokenized (the whole rendered conversation: at most the context window, and nothing over
    raft.state.MAX_PROMPT_IDS, so an entry stays under about 40 KB pickled; empty in older logs)."""
    kind: ClassVar[str] = "session_turn_start"
    session_id: str
    turn: int
    messages: tuple[tuple[str, str], ...]  # (role, content)
    prompt_tokens: int
    at: float
    prompt_token_ids: tuple[int, ...] = ()
    # The id of the API key that started the session ("" when the gateway checks no keys, and in
    # older logs): every later turn must come with the same key.
    owner: str = ""


@dataclass(frozen=True)
class SessionAppend(Command):
    """A checkpoint: answer tokens (and their text) generated since the last one."""
    kind: ClassVar[str] = "session_append"
    session_id: str
    turn: int
    tokens: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class SessionTurnEnd(Command):
    kind: ClassVar[str] = "session_turn_end"
    session_id: str
    turn: int
    finish_reason: str
    at: float
    # The member whose replica ended the turn, and so holds the conversation's KV cache: the session's next turn
    # goes there, whichever member leads by then. Left out of an entry while "" (older members read it).
    replica: str = ""


@dataclass(frozen=True)
class AssignShard(Command):
    kind: ClassVar[str] = "assign_shard"
    role: str
    model: str
    node_id: str


@dataclass(frozen=True)
class SetShardState(Command):
    kind: ClassVar[str] = "set_shard_state"
    role: str
    model: str
    node_id: str
    state: str
    detail: str = ""


@dataclass(frozen=True)
class SetSplit(Command):
    """A model run as a pipeline (meshctl split): the head member holds its first layers, the output layer and
    the context, and serves as the model's reasoning replica there; each stage member holds the count of the
    last layers given, in pipeline order (llama.cpp's RPC backend, reached over the mesh's mutual TLS)."""
    kind: ClassVar[str] = "set_split"
    model: str
    head: str  # node id
    stages: tuple[tuple[str, int], ...]  # (node id, layers), pipeline order
    # Planned by the placer (mesh/cluster/split_planning.py), which replaces or clears it as members come and
    # go; False for a split pinned by hand (meshctl split, meshctl assign reasoning --node A --node B), which
    # only a person clears. Left out of an entry while False, so older members still read it.
    auto: bool = False


@dataclass(frozen=True)
class ClearSplit(Command):
    kind: ClassVar[str] = "clear_split"
    model: str


STAGE_STATES = ("starting", "ready", "failed")


@dataclass(frozen=True)
class SetStageState(Command):
    """A stage member's report on its stage of a split model: "starting", "ready" or "failed" (a protocol
    mismatch, an allocation failure, a GGUF that differs, ...) with a one-line `detail`. Only the stage member
    itself proposes it (raft/wire.py proposer_may_send); a new SetSplit starts every stage's record afresh."""
    kind: ClassVar[str] = "set_stage_state"
    model: str
    node_id: str
    state: str
    detail: str = ""
    # When the stage member said it (its clock): a "failed" is kept in MeshState.stage_failures with it, so that
    # any leader's placer plans around that member for a while. Left out of an entry while 0 (older members).
    at: float = 0.0


@dataclass(frozen=True)
class RequestCaRotation(Command):
    """A CA rotation is owed (`meshctl ca rotate`; a removed authority owes one by itself, raft/state.py):
    a live authority carries it out (RotateCa)."""
    kind: ClassVar[str] = "request_ca_rotation"
    reason: str


@dataclass(frozen=True)
class RotateCa(Command):
    """Authority `node_id` made a new CA (`ca_pem`, its key stays with it): trusted by every member beside the
    CAs trusted now and signing from now on. `trusted_before`: the CA certificates its ca.pem trusts, which the
    state adopts when it names none yet (the first rotation). Only that member proposes it (raft/wire.py)."""
    kind: ClassVar[str] = "rotate_ca"
    node_id: str
    ca_pem: str
    trusted_before: tuple[str, ...] = ()


@dataclass(frozen=True)
class SetMemberCa(Command):
    """A member reports which trusted CA signed its current certificate (`ca`) and which signing CA it trusts
    (`trusts`), as fingerprints, and the fingerprint of that certificate itself (`cert`: the peer port signs
    and hands out keys only to a member presenting the certificate it recorded); only that member proposes it."""
    kind: ClassVar[str] = "set_member_ca"
    node_id: str
    ca: str
    trusts: str = ""
    cert: str = ""


@dataclass(frozen=True)
class RetireCas(Command):
    """Drops every trusted CA but the signing one (`keep`), once every live member's certificate is from it.
    `force` (meshctl ca finish): without the members that do not trust the new CA yet (away; they must join
    again): dropped once the others hold certificates from it, which they renew for at once."""
    kind: ClassVar[str] = "retire_cas"
    keep: str
    force: bool = False


COMMANDS: dict[str, type[Command]] = {
    cls.kind: cls
    for cls in (InitMesh, AddMember, SetMemberState, RegisterModel, AssignShard, SetShardState, CreateToken,
                RevokeToken, SetReplicas, PinShard, UnpinShard, ApplyPlacement, HaveModelFile, SessionTurnStart,
                SessionAppend, SessionTurnEnd, CreateApiKey, RevokeApiKey, UpdateProfile, SpendToken,
                CreateAdminCredential, RevokeAdminCredential, SetAuthority, SetSplit, ClearSplit, SetStageState,
                RequestCaRotation, RotateCa, SetMemberCa, RetireCas)
}


class BadCommand(ValueError):
    """A log entry that is not a well-formed command (never applied)."""


# Fields added later that stay out of an entry while they hold their default, so that a member running
# the version before them still reads the entry (decode fills the default back in).
_OMITTED_AT_DEFAULT = {("session_turn_start", "owner"): "", ("set_split", "auto"): False,
                       ("register_model", "layers"): 0, ("register_model", "layer_bytes"): 0,
                       ("register_model", "slots"): 0, ("register_model", "slot_bytes"): 0,
                       ("apply_placement", "split_model"): "", ("apply_placement", "split_head"): "",
                       ("apply_placement", "split_stages"): (), ("session_turn_end", "replica"): "",
                       ("set_stage_state", "at"): 0.0}


def encode(cmd: Command) -> dict[str, Any]:
    body = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd)}
    for (kind, name), default in _OMITTED_AT_DEFAULT.items():
        if kind == cmd.kind and body.get(name) == default:
            del body[name]
    for key, value in body.items():
        if isinstance(value, MemberProfile):
            body[key] = value.to_wire()
        elif isinstance(value, tuple):
            body[key] = [list(v) if isinstance(v, tuple) else v for v in value]
    return {"kind": cmd.kind, **body}


def decode(wire: Any) -> Command:
    if not isinstance(wire, dict) or wire.get("kind") not in COMMANDS:
        raise BadCommand(f"not a command: {str(wire)[:200]}")
    cls = COMMANDS[wire["kind"]]
    names = {f.name: f for f in dataclasses.fields(cls)}
    body = {k: v for k, v in wire.items() if k != "kind"}
    unknown = set(body) - set(names)
    missing = {n for n, f in names.items() if f.default is dataclasses.MISSING} - set(body)
    if unknown or missing:
        raise BadCommand(f"{cls.kind}: unknown {sorted(unknown)} missing {sorted(missing)}")
    for key, value in body.items():
        if isinstance(value, list):
            body[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return cls(**body)
