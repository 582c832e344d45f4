"""The state of each stage of a split model in Raft (SetStageState, issue #17): who may report it, what apply
accepts, that a new plan starts it afresh, and that older logs and dumps (without the new fields) still load."""

from __future__ import annotations

import dataclasses

import pytest

from raft import codec
from raft.apply_splits import MAX_STAGE_DETAIL
from raft.commands import (
    AddMember,
    ClearSplit,
    CreateToken,
    InitMesh,
    RegisterModel,
    SetMemberState,
    SetSplit,
    SetStageState,
    decode,
    encode,
)
from raft.snapshot import STATE, check_state, decode_dump, encode_dump
from raft.state import MeshState, Model, Rejected, Split, apply
from raft.wire import proposer_may_send


def member(node_id: str, port: int) -> AddMember:
    return AddMember(node_id=node_id, name=f"m-{node_id}", http_address=f"127.0.0.1:{port}",
                     raft_address=f"127.0.0.1:{port + 2}", profile={"cores": 2}, joined_at=2.0, token_id="t1")


def split_mesh() -> MeshState:
    state = MeshState()
    for cmd in (InitMesh("m1", "home", 1.0), CreateToken("t1", "c" * 64, 1.0, 1e9, uses=9),
                member("a", 8000), member("b", 8010), member("c", 8020),
                RegisterModel("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 512, "gemma", 10, layers=18,
                              layer_bytes=7 << 20),
                SetSplit("gemma", "a", (("b", 5), ("c", 4)), auto=True)):
        state = apply(state, cmd)
    return state


def test_each_stage_records_its_own_state_in_pipeline_order():
    state = apply(split_mesh(), SetStageState("gemma", "c", "starting"))
    state = apply(state, SetStageState("gemma", "b", "failed", "RPC protocol 2.0.0, this build 3.0.0"))
    split = state.splits["gemma"]
    assert split.stage_states == (("b", "failed", "RPC protocol 2.0.0, this build 3.0.0"), ("c", "starting", ""))
    assert split.stage_state("b") == ("failed", "RPC protocol 2.0.0, this build 3.0.0")
    assert split.stage_state("a") is None and split.failed_stages() == ("b",)
    state = apply(state, SetStageState("gemma", "b", "ready"))
    assert state.splits["gemma"].stage_states == (("b", "ready", ""), ("c", "starting", ""))
    assert state.splits["gemma"].failed_stages() == ()


def test_a_new_plan_starts_every_stages_record_afresh():
    state = apply(split_mesh(), SetStageState("gemma", "b", "failed", "cannot allocate 40 MiB"))
    again = apply(state, SetSplit("gemma", "a", (("c", 9),), auto=True))
    assert again.splits["gemma"] == Split("gemma", "a", (("c", 9),), auto=True)
    assert apply(state, ClearSplit("gemma")).splits == {}
    assert apply(state, SetMemberState("b", "gone")).splits == {}  # a stage member left: the split with it


@pytest.mark.parametrize("cmd, why", [
    (SetStageState("nope", "b", "ready"), "not split"),
    (SetStageState("gemma", "a", "ready"), "holds no stage"),  # the head is a shard: SetShardState
    (SetStageState("gemma", "zz", "ready"), "holds no stage"),
    (SetStageState("gemma", "b", "sleeping"), "unknown stage state"),
    (SetStageState("gemma", "b", "failed", "x" * (MAX_STAGE_DETAIL + 1)), "at most"),
    (SetStageState("gemma", "b", "failed", 7), "at most"),
])
def test_a_bad_stage_report_is_rejected(cmd, why):
    with pytest.raises(Rejected, match=why):
        apply(split_mesh(), cmd)


def test_only_the_stage_member_itself_may_propose_its_state():
    wire = encode(SetStageState("gemma", "b", "failed", "sha256 differs"))
    assert decode(wire) == SetStageState("gemma", "b", "failed", "sha256 differs")
    assert proposer_may_send("b", wire)
    assert not proposer_may_send("a", wire)  # the head (or anyone else) cannot fail another member's stage
    assert not proposer_may_send("c", wire)


def test_new_fields_stay_out_of_entries_at_their_default_so_older_members_read_them():
    manual = encode(SetSplit("gemma", "a", (("b", 9),)))
    assert "auto" not in manual and decode(manual).auto is False
    assert encode(SetSplit("gemma", "a", (("b", 9),), auto=True))["auto"] is True
    old_model = encode(RegisterModel("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 512, "gemma", 10))
    assert "layers" not in old_model and "layer_bytes" not in old_model
    assert decode(old_model).layers == 0
    state = apply(apply(MeshState(), InitMesh("m", "m", 1.0)), decode(old_model))
    assert state.models["gemma"].layers == 0 and state.models["gemma"].layer_bytes == 0


def test_a_split_beyond_the_models_layers_is_rejected():
    with pytest.raises(Rejected, match="18 layers"):
        apply(split_mesh(), SetSplit("gemma", "a", (("b", 9), ("c", 9))))
    with pytest.raises(Rejected, match="layers and layer_bytes"):
        apply(split_mesh(), RegisterModel("x", "x.gguf", "b" * 64, 1, ("reasoning",), 512, None, 10, layers=-1))


def test_stage_states_survive_the_full_dump_and_older_records_load_without_them():
    state = apply(split_mesh(), SetStageState("gemma", "b", "ready"))
    restored, *_ = decode_dump(encode_dump(state, (b"\x01", 3, 1), (b"\x01", 2, 1), ["127.0.0.1:8002"]))
    assert restored == state and restored.splits["gemma"].stage_states == (("b", "ready", ""),)

    @dataclasses.dataclass(frozen=True)
    class OldSplit:  # the record before `auto` and `stage_states`
        model: str
        head: str
        stages: tuple

    @dataclasses.dataclass(frozen=True)
    class OldModel:  # the record before `layers` and `layer_bytes`
        name: str
        file: str
        sha256: str
        size: int
        roles: tuple
        context_length: int
        chat_template: str | None
        memory_bytes: int

    old = codec.Profile("old", records={"Split": OldSplit, "Model": OldModel})
    assert codec.loads(codec.dumps(OldSplit("gemma", "a", (("b", 9),)), old), STATE) == Split("gemma", "a", (("b", 9),))
    model = codec.loads(codec.dumps(OldModel("g", "g.gguf", "a" * 64, 1, ("reasoning",), 512, None, 10), old), STATE)
    assert model == Model("g", "g.gguf", "a" * 64, 1, ("reasoning",), 512, None, 10)
    assert model.layers == 0
    bad = dataclasses.replace(state, splits={"gemma": dataclasses.replace(state.splits["gemma"],
                                                                          stage_states=(("b", "ready"),))})
    with pytest.raises(ValueError, match="stage states"):
        check_state(bad)
