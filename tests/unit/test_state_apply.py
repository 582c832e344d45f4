"""raft/state.py apply() and raft/commands.py encode/decode: pure, deterministic, never mutating."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft.commands import (
    COMMANDS,
    MEMBER_STATES,
    SHARD_STATES,
    AddMember,
    ApplyPlacement,
    AssignShard,
    BadCommand,
    ClearSplit,
    Command,
    CreateAdminCredential,
    CreateApiKey,
    CreateToken,
    HaveModelFile,
    InitMesh,
    PinShard,
    RegisterModel,
    RequestCaRotation,
    RetireCas,
    RevokeAdminCredential,
    RevokeApiKey,
    RevokeToken,
    RotateCa,
    SessionAppend,
    SessionTurnEnd,
    SessionTurnStart,
    SetAuthority,
    SetMemberCa,
    SetMemberState,
    SetReplicas,
    SetShardState,
    SetSplit,
    SetStageState,
    SpendToken,
    UnpinShard,
    UpdateProfile,
    decode,
    encode,
)
from raft.profile import MemberProfile
from raft.state import MeshState, Rejected, apply

SHA_A = "a" * 64
SHA_B = "b" * 64


TOKEN = CreateToken("t1", "c" * 64, created_at=1000.0, expires_at=1_000_000.0)


def init(mesh_id: str = "mesh-1") -> InitMesh:
    return InitMesh(mesh_id=mesh_id, name="first", created_at=1000.0)


def add(node_id: str = "n1", name: str = "alpha", port: int = 8080, joined_at: float = 1001.0) -> AddMember:
    """A member joining with the test token (the first member of a mesh needs none)."""
    return AddMember(node_id=node_id, name=name, http_address=f"127.0.0.1:{port}",
                     raft_address=f"127.0.0.1:{port + 2}", profile={"cores": 4}, joined_at=joined_at,
                     token_id="t1")


def register(name: str = "gemma", sha256: str = SHA_A, roles: tuple[str, ...] = ("reasoning",)) -> RegisterModel:
    return RegisterModel(name=name, file=f"{name}.gguf", sha256=sha256, size=1234, roles=roles,
                         context_length=4096, chat_template="gemma", memory_bytes=99)


def run(*cmds: Command, state: MeshState | None = None) -> MeshState:
    state = MeshState() if state is None else state
    for cmd in cmds:
        state = apply(state, cmd)
    return state


def setup() -> MeshState:
    """An initialised mesh with one member, one model and one shard of it."""
    return run(init(), TOKEN, add(), register(), AssignShard("reasoning", "gemma", "n1"))


# -- initialisation --------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [add(), register(), AssignShard("reasoning", "gemma", "n1"),
                                 SetMemberState("n1", "gone"), SetShardState("reasoning", "gemma", "n1", "ready")])
def test_every_command_before_init_mesh_is_rejected(cmd):
    with pytest.raises(Rejected, match="not initialised"):
        apply(MeshState(), cmd)


def test_init_mesh_sets_identity():
    state = apply(MeshState(), init("abc"))
    assert state.initialised
    assert (state.mesh_id, state.name, state.created_at, state.applied) == ("abc", "first", 1000.0, 1)


def test_init_mesh_twice_is_rejected():
    state = run(init("abc"))
    with pytest.raises(Rejected, match="already initialised"):
        apply(state, init("other"))


def test_init_mesh_with_empty_id_is_rejected():
    with pytest.raises(Rejected):
        apply(MeshState(), InitMesh(mesh_id="", name="x", created_at=0.0))


def test_unknown_command_type_is_rejected():
    @dataclasses.dataclass(frozen=True)
    class Mystery(Command):
        kind = "mystery"
    with pytest.raises(Rejected):
        apply(run(init()), Mystery())


# -- members, models, shards -----------------------------------------------------------------

def test_add_member_assign_shard_set_shard_state():
    state = run(init(), add(), register(), AssignShard("reasoning", "gemma", "n1"))
    member = state.members["n1"]
    assert (member.name, member.state, member.joined_at) == ("alpha", "active", 1001.0)
    assert member.http_address == "127.0.0.1:8080" and member.raft_address == "127.0.0.1:8082"
    [shard] = state.shards_for("reasoning")
    assert (shard.role, shard.model, shard.node_id, shard.state) == ("reasoning", "gemma", "n1", "assigned")

    state = apply(state, SetShardState("reasoning", "gemma", "n1", "failed", "out of memory"))
    shard = state.shards[("reasoning", "gemma", "n1")]
    assert (shard.state, shard.detail) == ("failed", "out of memory")
    state = apply(state, SetShardState("reasoning", "gemma", "n1", "ready"))
    assert state.shards[("reasoning", "gemma", "n1")].detail == ""
    assert state.applied == 6


def test_assign_shard_twice_is_idempotent():
    state = setup()
    again = apply(state, AssignShard("reasoning", "gemma", "n1"))
    assert again.shards == state.shards
    assert again.applied == state.applied + 1


def test_assign_shard_to_unknown_member_is_rejected():
    with pytest.raises(Rejected, match="unknown member"):
        apply(setup(), AssignShard("reasoning", "gemma", "nobody"))


def test_assign_shard_of_unknown_model_is_rejected():
    with pytest.raises(Rejected, match="unknown model"):
        apply(setup(), AssignShard("reasoning", "llama", "n1"))


def test_assign_shard_for_role_the_model_lacks_is_rejected():
    with pytest.raises(Rejected, match="does not serve role"):
        apply(setup(), AssignShard("context", "gemma", "n1"))


def test_assign_shard_to_gone_member_is_rejected():
    state = apply(setup(), SetMemberState("n1", "gone"))
    with pytest.raises(Rejected, match="unknown member"):
        apply(state, AssignShard("reasoning", "gemma", "n1"))


def test_set_state_of_missing_shard_is_rejected():
    with pytest.raises(Rejected):
        apply(setup(), SetShardState("reasoning", "gemma", "n2", "ready"))


@pytest.mark.parametrize("bad", ["bogus", "", "READY"])
def test_unknown_shard_state_is_rejected(bad):
    with pytest.raises(Rejected, match="unknown shard state"):
        apply(setup(), SetShardState("reasoning", "gemma", "n1", bad))


@pytest.mark.parametrize("bad", ["bogus", "", "Active"])
def test_unknown_member_state_is_rejected(bad):
    with pytest.raises(Rejected, match="unknown member state"):
        apply(setup(), SetMemberState("n1", bad))


def test_set_state_of_unknown_member_is_rejected():
    with pytest.raises(Rejected, match="unknown member"):
        apply(setup(), SetMemberState("n9", "draining"))


def test_readding_live_member_updates_addresses_and_keeps_joined_at():
    state = setup()
    state = apply(state, AddMember(node_id="n1", name="alpha", http_address="127.0.0.1:9000",
                                   raft_address="127.0.0.1:9002", profile={"cores": 8}, joined_at=5000.0))
    member = state.members["n1"]
    assert member.http_address == "127.0.0.1:9000" and member.raft_address == "127.0.0.1:9002"
    assert member.profile == MemberProfile(cores=8)
    assert member.joined_at == 1001.0, "a restart must not change when the member joined"
    assert member.state == "active"
    assert len(state.members) == 1
    assert ("reasoning", "gemma", "n1") in state.shards, "a restart keeps the member's shards"


def test_second_member_with_same_name_is_rejected():
    with pytest.raises(Rejected, match="already exists"):
        apply(setup(), add(node_id="n2", name="alpha", port=9000))


def test_name_of_gone_member_can_be_reused():
    state = apply(setup(), SetMemberState("n1", "gone"))
    state = apply(state, add(node_id="n2", name="alpha", port=9000))
    assert state.members["n2"].state == "active"


def test_a_join_cannot_bring_back_a_gone_members_id():
    state = apply(setup(), SetMemberState("n1", "gone"))
    with pytest.raises(Rejected, match="existing id"):
        apply(state, add(joined_at=7000.0))
    assert state.members["n1"].state == "gone"


def test_readding_live_member_cannot_take_another_members_name():
    state = run(init(), TOKEN, add("n1", "alpha"), add("n2", "beta", port=9000))
    with pytest.raises(Rejected):
        apply(state, add("n1", "beta"))


def test_member_gone_removes_its_shards_only():
    state = run(init(), TOKEN, add("n1", "alpha"), add("n2", "beta", port=9000), register(),
                AssignShard("reasoning", "gemma", "n1"), AssignShard("reasoning", "gemma", "n2"))
    state = apply(state, SetMemberState("n1", "gone"))
    assert state.members["n1"].state == "gone"
    assert list(state.shards) == [("reasoning", "gemma", "n2")]


def test_member_draining_keeps_its_shards():
    state = apply(setup(), SetMemberState("n1", "draining"))
    assert state.members["n1"].state == "draining"
    assert ("reasoning", "gemma", "n1") in state.shards


def test_register_model_with_new_sha_while_in_use_is_rejected():
    with pytest.raises(Rejected, match="in use"):
        apply(setup(), register(sha256=SHA_B))


def test_register_model_with_same_sha_while_in_use_updates_it():
    state = apply(setup(), dataclasses.replace(register(), size=4321))
    assert state.models["gemma"].size == 4321


def test_register_model_with_new_sha_when_unused_replaces_it():
    state = run(init(), register(sha256=SHA_A), register(sha256=SHA_B))
    assert state.models["gemma"].sha256 == SHA_B


def test_register_model_with_new_sha_after_its_shards_went_away():
    state = apply(setup(), SetMemberState("n1", "gone"))
    state = apply(state, register(sha256=SHA_B))
    assert state.models["gemma"].sha256 == SHA_B


def test_applied_counts_only_accepted_commands():
    state = MeshState()
    cmds = [add(), init(), init(), add(), add("n2", "alpha"), register(), AssignShard("context", "gemma", "n1"),
            AssignShard("reasoning", "gemma", "n1"), SetShardState("reasoning", "gemma", "n1", "nope")]
    accepted = 0
    for cmd in cmds:
        try:
            state = apply(state, cmd)
            accepted += 1
        except Rejected:
            pass
    assert accepted == 4
    assert state.applied == 4


def test_rejected_command_leaves_state_unchanged():
    state = setup()
    before = copy.deepcopy(state)
    with pytest.raises(Rejected):
        apply(state, register(sha256=SHA_B))
    assert state == before


def test_apply_never_mutates_its_input():
    cmds = [init(), TOKEN, add(), add("n2", "beta", port=9000), register(), AssignShard("reasoning", "gemma", "n1"),
            AssignShard("reasoning", "gemma", "n2"), SetShardState("reasoning", "gemma", "n1", "ready"),
            dataclasses.replace(add("n1", "alpha", port=7000), token_id=None), SetMemberState("n2", "gone"),
            register(sha256=SHA_A), SetMemberState("n1", "draining")]
    state = MeshState()
    for cmd in cmds:
        before = copy.deepcopy(state)
        new = apply(state, cmd)
        assert state == before, f"{type(cmd).__name__} changed its input state"
        assert new is not state
        state = new


def test_member_profile_is_copied_from_the_command():
    profile = {"cores": 4}
    cmd = AddMember("n1", "alpha", "h:1", "h:3", profile, 1.0)
    state = run(init(), cmd)
    profile["cores"] = 64
    assert state.members["n1"].profile == MemberProfile(cores=4)


# -- encode / decode -------------------------------------------------------------------------

text = st.text(max_size=20)
floats = st.floats(allow_nan=False, allow_infinity=False)
ints = st.integers(min_value=0, max_value=1 << 40)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), text)

command_strategies = {
    InitMesh: st.builds(InitMesh, mesh_id=text, name=text, created_at=floats),
    AddMember: st.builds(AddMember, node_id=text, name=text, http_address=text, raft_address=text,
                         profile=st.dictionaries(text, json_scalar, max_size=4), joined_at=floats),
    SetMemberState: st.builds(SetMemberState, node_id=text, state=st.sampled_from(MEMBER_STATES)),
    RegisterModel: st.builds(RegisterModel, name=text, file=text, sha256=text, size=ints,
                             roles=st.lists(text, max_size=3).map(tuple), context_length=ints,
                             chat_template=st.one_of(st.none(), text), memory_bytes=ints, layers=ints,
                             layer_bytes=ints),
    AssignShard: st.builds(AssignShard, role=text, model=text, node_id=text),
    SetShardState: st.builds(SetShardState, role=text, model=text, node_id=text,
                             state=st.sampled_from(SHARD_STATES), detail=text),
    CreateToken: st.builds(CreateToken, token_id=text, secret_sha256=text, created_at=floats, expires_at=floats),
    RevokeToken: st.builds(RevokeToken, token_id=text),
    SetReplicas: st.builds(SetReplicas, role=text, count=ints),
    PinShard: st.builds(PinShard, role=text, model=text, node_id=text),
    UnpinShard: st.builds(UnpinShard, role=text, node_id=text),
    ApplyPlacement: st.builds(ApplyPlacement, assignments=st.lists(st.tuples(text, text, text), max_size=3).map(tuple),
                              unplaced=st.lists(st.tuples(text, text, ints, text), max_size=2).map(tuple)),
    HaveModelFile: st.builds(HaveModelFile, node_id=text, model=text, have=st.booleans()),
    SessionTurnStart: st.builds(SessionTurnStart, session_id=text, turn=ints,
                                messages=st.lists(st.tuples(text, text), max_size=3).map(tuple),
                                prompt_tokens=ints, at=floats),
    SessionAppend: st.builds(SessionAppend, session_id=text, turn=ints,
                             tokens=st.lists(st.integers(0, 300000), max_size=5).map(tuple), text=text),
    SessionTurnEnd: st.builds(SessionTurnEnd, session_id=text, turn=ints, finish_reason=text, at=floats),
    CreateApiKey: st.builds(CreateApiKey, key_id=text, name=text, secret_sha256=text, created_at=floats),
    RevokeApiKey: st.builds(RevokeApiKey, key_id=text),
    UpdateProfile: st.builds(UpdateProfile, node_id=text, profile=st.dictionaries(text, json_scalar, max_size=4)),
    SpendToken: st.builds(SpendToken, token_id=text, at=floats),
    CreateAdminCredential: st.builds(CreateAdminCredential, cred_id=text, name=text, secret_sha256=text,
                                     created_at=floats, node_id=text),
    RevokeAdminCredential: st.builds(RevokeAdminCredential, cred_id=text),
    SetAuthority: st.builds(SetAuthority, node_id=text, authority=st.booleans()),
    SetSplit: st.builds(SetSplit, model=text, head=text, stages=st.lists(st.tuples(text, ints), max_size=3).map(tuple),
                        auto=st.booleans()),
    ClearSplit: st.builds(ClearSplit, model=text),
    SetStageState: st.builds(SetStageState, model=text, node_id=text, state=text, detail=text),
    RequestCaRotation: st.builds(RequestCaRotation, reason=text),
    RotateCa: st.builds(RotateCa, node_id=text, ca_pem=text, trusted_before=st.lists(text, max_size=2).map(tuple)),
    SetMemberCa: st.builds(SetMemberCa, node_id=text, ca=text),
    RetireCas: st.builds(RetireCas, keep=text, force=st.booleans()),
}


def test_every_command_type_has_a_strategy():
    assert set(command_strategies) == set(COMMANDS.values())


@given(st.one_of(*command_strategies.values()))
def test_encode_decode_round_trip(cmd):
    wire = encode(cmd)
    assert wire["kind"] == cmd.kind
    assert decode(wire) == cmd
    assert type(decode(wire)) is type(cmd)


def test_encode_is_plain_data():
    wire = encode(register(roles=("reasoning", "context")))
    assert wire["roles"] == ["reasoning", "context"]
    assert wire["kind"] == "register_model"


def test_decode_fills_defaulted_field():
    cmd = decode({"kind": "set_shard_state", "role": "r", "model": "m", "node_id": "n", "state": "ready"})
    assert cmd == SetShardState("r", "m", "n", "ready", "")


@pytest.mark.parametrize("wire", [
    None, 3, "init_mesh", ["init_mesh"], {}, {"kind": "nuke_mesh"}, {"kind": None},
    {"mesh_id": "x", "name": "y", "created_at": 1.0},
    {"kind": "init_mesh", "mesh_id": "x", "name": "y"},
    {"kind": "init_mesh", "mesh_id": "x", "name": "y", "created_at": 1.0, "extra": 1},
    {"kind": "assign_shard", "role": "r", "model": "m"},
])
def test_decode_garbage_raises_bad_command(wire):
    with pytest.raises(BadCommand):
        decode(wire)


# -- determinism -----------------------------------------------------------------------------

node_ids = st.sampled_from(["n1", "n2", "n3"])
names = st.sampled_from(["alpha", "beta", "gamma"])
models = st.sampled_from(["gemma", "llama"])
roles = st.sampled_from(["reasoning", "context", "tool-use"])
small_commands = st.one_of(
    st.builds(InitMesh, mesh_id=st.sampled_from(["", "m1", "m2"]), name=names, created_at=st.floats(0, 10)),
    st.builds(AddMember, node_id=node_ids, name=names, http_address=st.sampled_from(["h:1", "h:2"]),
              raft_address=st.sampled_from(["h:3", "h:4"]), profile=st.just({"cores": 2}),
              joined_at=st.floats(0, 10)),
    st.builds(SetMemberState, node_id=node_ids, state=st.sampled_from(MEMBER_STATES + ("bogus",))),
    st.builds(RegisterModel, name=models, file=st.just("f.gguf"), sha256=st.sampled_from([SHA_A, SHA_B]),
              size=st.integers(0, 5), roles=st.lists(roles, min_size=1, max_size=2).map(tuple),
              context_length=st.just(4096), chat_template=st.none(), memory_bytes=st.just(1)),
    st.builds(AssignShard, role=roles, model=models, node_id=node_ids),
    st.builds(SetShardState, role=roles, model=models, node_id=node_ids,
              state=st.sampled_from(SHARD_STATES + ("bogus",)), detail=st.sampled_from(["", "x"])),
)


def replay(start: MeshState, cmds: list[Command]) -> tuple[MeshState, list[bool]]:
    state, outcomes = start, []
    for cmd in cmds:
        try:
            state = apply(state, cmd)
            outcomes.append(True)
        except Rejected:
            outcomes.append(False)
    return state, outcomes


@settings(max_examples=200, deadline=None)
@given(st.lists(small_commands, max_size=30), st.booleans())
def test_same_commands_from_same_start_give_equal_states(cmds, start_initialised):
    start = run(init()) if start_initialised else MeshState()
    snapshot = copy.deepcopy(start)
    first, first_outcomes = replay(start, cmds)
    second, second_outcomes = replay(start, cmds)
    assert first == second
    assert first_outcomes == second_outcomes
    assert first.applied == start.applied + sum(first_outcomes)
    assert start == snapshot, "replaying must not change the starting state"
    # Through the wire format, as the Raft log carries them, the result is the same too.
    third, _ = replay(start, [decode(encode(c)) for c in cmds])
    assert third == first


# -- joining, tokens, placement (multi-node) -------------------------------------------------

def test_first_member_needs_no_token_but_the_second_does():
    state = run(init(), AddMember("n1", "alpha", "h:1", "h:3", {}, 1001.0))
    with pytest.raises(Rejected, match="join token"):
        apply(state, AddMember("n2", "beta", "h:4", "h:6", {}, 1002.0))


@pytest.mark.parametrize("when, token", [
    (999.0, TOKEN),  # before the token was made
    (1_000_000.0, TOKEN),  # at expiry
    (2000.0, None),  # revoked
])
def test_expired_early_or_revoked_tokens_are_refused(when, token):
    state = run(init(), TOKEN, add("n1", "alpha"))
    if token is None:
        state = apply(state, RevokeToken("t1"))
    with pytest.raises(Rejected, match="join token"):
        apply(state, AddMember("n2", "beta", "h:4", "h:6", {}, when, token_id="t1"))


def test_a_known_member_rejoins_without_a_token():
    state = run(init(), TOKEN, add("n1", "alpha"), add("n2", "beta", port=9000))
    state = apply(state, AddMember("n2", "beta", "h:7", "h:9", {}, 9999999.0))
    assert state.members["n2"].http_address == "h:7"


def _two_members(uses: int = 3) -> MeshState:
    token = dataclasses.replace(TOKEN, uses=uses)
    return run(init(), token, AddMember("n1", "alpha", "h:1", "h:3", {}, 1001.0),
               AddMember("n2", "beta", "h:4", "h:6", {}, 1002.0, token_id="t1"))


@pytest.mark.parametrize("gone", [False, True])
def test_a_token_join_naming_an_existing_id_is_rejected(gone):
    state = _two_members()
    if gone:
        state = apply(state, SetMemberState("n2", "gone"))
    before = state.members["n2"]
    for target in ("n1", "n2"):  # the first member (the leader here) and the second, live or gone
        with pytest.raises(Rejected, match="existing id"):
            apply(state, AddMember(target, "mallory", "evil:1", "evil:3", {}, 2000.0, token_id="t1",
                                   grpc_address="evil:2", peer_address="evil:4"))
    assert state.members["n2"] == before
    assert state.tokens["t1"].used == 1, "a rejected command leaves the state (and the token) as it was"


def test_a_token_is_not_reusable_to_take_an_existing_id():
    """Every use of a token goes to a new id: spending the refused probes (as the leader does) leaves
    nothing, and an id taken by a join cannot be joined again with the same token."""
    state = _two_members(uses=3)
    state = apply(state, SpendToken("t1", 2000.0))  # the leader spends the refused probe's use
    assert state.tokens["t1"].used == 2
    state = apply(state, AddMember("n3", "gamma", "h:7", "h:9", {}, 2001.0, token_id="t1"))
    assert state.tokens["t1"].used == 3
    with pytest.raises(Rejected, match="existing id"):
        apply(state, AddMember("n3", "gamma", "h:10", "h:12", {}, 2002.0, token_id="t1"))
    with pytest.raises(Rejected, match="used up"):
        apply(state, SpendToken("t1", 2003.0))
    with pytest.raises(Rejected, match="join token"):
        apply(state, AddMember("n4", "delta", "h:13", "h:15", {}, 2004.0, token_id="t1"))


def test_spending_an_unknown_expired_or_revoked_token_is_rejected():
    state = _two_members()
    with pytest.raises(Rejected, match="unknown token"):
        apply(state, SpendToken("nope", 2000.0))
    with pytest.raises(Rejected, match="expired"):
        apply(state, SpendToken("t1", 1_000_000.0))
    with pytest.raises(Rejected, match="revoked"):
        apply(apply(state, RevokeToken("t1")), SpendToken("t1", 2000.0))


def test_a_members_own_reannounce_still_refreshes_its_addresses():
    state = _two_members()
    state = apply(state, AddMember("n1", "alpha", "h:21", "h:23", {}, 5000.0, peer_address="h:24"))
    assert (state.members["n1"].http_address, state.members["n1"].peer_address) == ("h:21", "h:24")
    assert state.members["n1"].joined_at == 1001.0


def test_two_members_cannot_share_a_raft_address():
    state = run(init(), TOKEN, add("n1", "alpha", port=8080))
    with pytest.raises(Rejected, match="raft address"):
        apply(state, add("n2", "beta", port=8080))


def test_placement_keeps_state_of_remaining_shards_and_drops_the_rest():
    state = run(init(), TOKEN, add("n1", "alpha"), add("n2", "beta", port=9000), register(),
                AssignShard("reasoning", "gemma", "n1"), SetShardState("reasoning", "gemma", "n1", "ready"))
    state = apply(state, ApplyPlacement((("reasoning", "gemma", "n1"), ("reasoning", "gemma", "n2")),
                                        (("context", "enc", 1, "no model serves it"),)))
    assert state.shards[("reasoning", "gemma", "n1")].state == "ready"
    assert state.shards[("reasoning", "gemma", "n2")].state == "assigned"
    assert state.unplaced[0].reason == "no model serves it"
    state = apply(state, ApplyPlacement((("reasoning", "gemma", "n2"),)))
    assert list(state.shards) == [("reasoning", "gemma", "n2")]


def test_placement_on_a_witness_is_rejected():
    state = run(init(), TOKEN, add("n1", "alpha"), register(),
                AddMember("w1", "wit", "h:4", "h:6", {}, 1002.0, witness=True, token_id="t1"))
    with pytest.raises(Rejected, match="not a live model-holding member"):
        apply(state, ApplyPlacement((("reasoning", "gemma", "w1"),)))


def test_pins_and_replicas_are_validated():
    state = setup()
    state = apply(state, PinShard("reasoning", "gemma", "n1"))
    assert ("reasoning", "n1") in state.pins
    with pytest.raises(Rejected, match="does not serve"):
        apply(state, PinShard("context", "gemma", "n1"))
    state = apply(state, UnpinShard("reasoning", "n1"))
    assert not state.pins
    assert apply(state, SetReplicas("reasoning", 3)).replicas == {"reasoning": 3}
    with pytest.raises(Rejected, match="unknown role"):
        apply(state, SetReplicas("witness", 1))


def test_model_file_holders_are_tracked_and_forgotten_with_the_member():
    state = apply(setup(), HaveModelFile("n1", "gemma"))
    assert state.model_files["gemma"] == {"n1"}
    state = apply(state, SetMemberState("n1", "gone"))
    assert state.model_files["gemma"] == frozenset()


# -- the session log -------------------------------------------------------------------------

def turn(sid: str, n: int, at: float, text: str = "hi") -> list[Command]:
    return [SessionTurnStart(sid, n, (("user", f"question {n}"),), 10, at),
            SessionAppend(sid, n, (1, 2), text[:1]), SessionAppend(sid, n, (3,), text[1:]),
            SessionTurnEnd(sid, n, "stop", at + 1)]


def test_a_session_keeps_each_turns_messages_and_answer():
    state = run(init(), *turn("s", 0, 2000.0, "ab"), *turn("s", 1, 2010.0, "cd"))
    session = state.sessions["s"]
    assert [t.answer_tokens for t in session.turns] == [(1, 2, 3), (1, 2, 3)]
    assert session.history() == [("user", "question 0"), ("assistant", "ab"),
                                 ("user", "question 1"), ("assistant", "cd")]


def test_turns_must_come_in_order_and_appends_go_to_the_open_turn():
    state = run(init(), *turn("s", 0, 2000.0))
    with pytest.raises(Rejected, match="out of order"):
        apply(state, SessionTurnStart("s", 5, (), 1, 2001.0))
    with pytest.raises(Rejected, match="not the open turn"):
        apply(state, SessionAppend("s", 0, (9,), "x"))
    with pytest.raises(Rejected, match="unknown session"):
        apply(state, SessionAppend("nope", 0, (9,), "x"))


def test_an_unfinished_turn_is_replaced_by_the_next_start_and_left_out_of_history():
    state = run(init(), *turn("s", 0, 2000.0), SessionTurnStart("s", 1, (("user", "lost"),), 5, 2001.0),
                SessionAppend("s", 1, (7,), "partial"))
    assert len(state.sessions["s"].history()) == 2
    state = apply(state, SessionTurnStart("s", 1, (("user", "again"),), 5, 2002.0))
    assert state.sessions["s"].turns[-1].messages == (("user", "again"),)


def test_idle_sessions_expire_and_the_count_is_bounded():
    from raft.state import MAX_SESSIONS, SESSION_TTL_S
    state = run(init(), *turn("old", 0, 2000.0))
    state = apply(state, SessionTurnStart("new", 0, (), 1, 2001.0 + SESSION_TTL_S + 5))
    assert "old" not in state.sessions and "new" in state.sessions
    for i in range(MAX_SESSIONS + 3):
        state = apply(state, SessionTurnStart(f"s{i}", 0, (), 1, 3e5 + i))
    assert len(state.sessions) == MAX_SESSIONS
    assert "s0" not in state.sessions and f"s{MAX_SESSIONS + 2}" in state.sessions


def test_set_authority_marks_a_live_member_and_survives_its_removal():
    state = run(SetAuthority("n1", True), state=setup())
    assert state.members["n1"].authority
    gone = run(SetMemberState("n1", "gone"), state=state)
    assert gone.members["n1"].authority  # the record says the CA key left with it
    with pytest.raises(Rejected, match="unknown member"):
        run(SetAuthority("n1", False), state=gone)
