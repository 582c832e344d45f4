"""A model split across members (issue #17): the replicated record (SetSplit/ClearSplit), its dump, the
placer keeping the head's replica, the head's HostSpec, and meshctl's command and table."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.cli.meshctl import build_parser, pipeline_rows, render_status
from mesh.cluster.placement import Assignment, Plan
from mesh.cluster.placer import with_split_heads
from raft.commands import (
    AddMember,
    ApplyPlacement,
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
from raft.snapshot import decode_dump, encode_dump
from raft.state import MeshState, Rejected, Split, apply
from shards.host import HostSpec


def member(node_id: str, name: str, port: int, witness: bool = False) -> AddMember:
    return AddMember(node_id=node_id, name=name, http_address=f"127.0.0.1:{port}", raft_address=f"127.0.0.1:{port + 2}",
                     profile={"cores": 2}, joined_at=2.0, token_id="t1", witness=witness)


def mesh() -> MeshState:
    state = MeshState()
    for cmd in (InitMesh("m1", "home", 1.0), CreateToken("t1", "c" * 64, 1.0, 1e9, uses=9),
                member("a", "alpha", 8000), member("b", "beta", 8010), member("c", "gamma", 8020),
                member("w", "router", 8030, witness=True),
                RegisterModel("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 512, "gemma", 10),
                RegisterModel("minilm", "m.onnx", "b" * 64, 1, ("context",), 256, None, 10)):
        state = apply(state, cmd)
    return state


def test_a_split_is_recorded_and_cleared():
    state = apply(mesh(), SetSplit("gemma", "a", (("b", 5), ("c", 4))))
    assert state.splits == {"gemma": Split("gemma", "a", (("b", 5), ("c", 4)))}
    assert state.splits["gemma"].members == ("a", "b", "c")
    again = apply(state, SetSplit("gemma", "b", (("a", 9),)))  # a new plan replaces the old one
    assert again.splits["gemma"].head == "b"
    assert apply(again, ClearSplit("gemma")).splits == {}
    with pytest.raises(Rejected, match="not split"):
        apply(mesh(), ClearSplit("gemma"))


@pytest.mark.parametrize("cmd, why", [
    (SetSplit("nope", "a", (("b", 9),)), "unknown model"),
    (SetSplit("minilm", "a", (("b", 9),)), "does not serve reasoning"),
    (SetSplit("gemma", "a", ()), "1 to 16 stages"),
    (SetSplit("gemma", "a", (("b", 0),)), "layers from 1"),
    (SetSplit("gemma", "a", (("a", 9),)), "distinct"),
    (SetSplit("gemma", "a", (("b", 4), ("b", 5))), "distinct"),
    (SetSplit("gemma", "a", (("zz", 9),)), "unknown member"),
    (SetSplit("gemma", "a", (("w", 9),)), "witness"),
])
def test_a_bad_split_is_rejected(cmd, why):
    with pytest.raises(Rejected, match=why):
        apply(mesh(), cmd)


def test_a_member_that_leaves_takes_its_pipelines_with_it():
    state = apply(mesh(), SetSplit("gemma", "a", (("b", 9),)))
    assert apply(state, SetMemberState("c", "gone")).splits == state.splits
    assert apply(state, SetMemberState("b", "gone")).splits == {}
    assert apply(state, SetMemberState("a", "gone")).splits == {}


def test_splits_survive_the_full_dump():
    state = apply(mesh(), SetSplit("gemma", "a", (("b", 5), ("c", 4))))
    state = apply(state, SetStageState("gemma", "b", "failed", "cannot allocate its share", at=1.5))
    restored, *_ = decode_dump(encode_dump(state, (b"\x01", 3, 1), (b"\x01", 2, 1), ["127.0.0.1:8002"]))
    assert restored == state
    assert type(restored.splits["gemma"]) is Split


def test_the_placer_keeps_the_heads_replica_beyond_the_desired_count():
    state = apply(mesh(), SetSplit("gemma", "a", (("b", 9),)))
    plan = Plan((Assignment("reasoning", "gemma", "b"),), ())
    planned = with_split_heads(plan, state, state.splits, healthy={"a", "b", "c"})
    assert planned.assignments == (Assignment("reasoning", "gemma", "a"), Assignment("reasoning", "gemma", "b"))
    assert with_split_heads(planned, state, state.splits, healthy={"a", "b", "c"}) is planned  # already there
    assert with_split_heads(plan, state, state.splits, healthy={"b", "c"}) is plan  # an unhealthy head is not kept
    assert with_split_heads(plan, mesh(), {}, healthy={"a", "b"}) is plan  # no split, nothing added


def test_a_placement_entry_carries_the_placers_split_all_or_nothing():
    state = mesh()
    both = apply(state, ApplyPlacement((("reasoning", "gemma", "a"),), (), split_model="gemma", split_head="a",
                                       split_stages=(("b", 9),)))
    assert both.splits["gemma"] == Split("gemma", "a", (("b", 9),), auto=True)
    assert set(both.shards) == {("reasoning", "gemma", "a")}
    cleared = apply(both, ApplyPlacement((("reasoning", "gemma", "c"),), (), split_model="gemma"))
    assert cleared.splits == {} and set(cleared.shards) == {("reasoning", "gemma", "c")}
    with pytest.raises(Rejected):  # a bad split rejects the placement too: nothing applied
        apply(state, ApplyPlacement((("reasoning", "gemma", "a"),), (), split_model="gemma", split_head="a",
                                    split_stages=(("a", 9),)))
    by_hand = apply(state, SetSplit("gemma", "a", (("b", 9),)))
    with pytest.raises(Rejected, match="by hand"):  # the placer never changes a split a person pinned
        apply(by_hand, ApplyPlacement((), (), split_model="gemma"))
    wire = ApplyPlacement((("reasoning", "gemma", "a"),), (), split_model="gemma", split_head="a",
                          split_stages=(("b", 9),))
    assert decode(encode(wire)) == wire
    assert set(encode(ApplyPlacement((), ()))) == {"kind", "assignments", "unplaced"}  # older members read it


def test_a_heads_spec_carries_its_stages_through_json():
    spec = HostSpec(role="reasoning", model="gemma", kind="llama", path="/m.gguf", n_ctx=512, threads=1,
                    queue_depth=4, socket="/tmp/s.sock", parent=1, parallel=1, stages=("127.0.0.1:4000=9",))
    assert HostSpec.from_json(spec.to_json()) == spec
    whole = dataclasses.replace(spec, stages=())
    assert HostSpec.from_json(whole.to_json()) == whole


def test_meshctl_split_arguments():
    args = build_parser().parse_args(["split", "gemma", "--head", "alpha", "--stage", "beta=5", "--stage", "gamma=4"])
    assert (args.model, args.head, args.stage) == ("gemma", "alpha", [{"node": "beta", "layers": 5},
                                                                      {"node": "gamma", "layers": 4}])
    assert build_parser().parse_args(["split", "gemma", "--clear"]).clear
    with pytest.raises(SystemExit):
        build_parser().parse_args(["split", "gemma", "--head", "a", "--stage", "beta"])


def test_meshctl_status_shows_each_pipeline():
    st = {"mesh": {"id": "f" * 32, "name": "home"}, "raft": {"term": 1, "commit_index": 5, "has_quorum": True},
          "health": {"detail": "ok"},
          "members": [{"node_id": n, "name": name, "http_address": "h:1", "state": "active", "profile": {}}
                      for n, name in (("a", "alpha"), ("b", "beta"), ("c", "gamma"))],
          "shards": [{"role": "reasoning", "model": "gemma", "node_id": "a", "state": "ready",
                      "detail": "pipeline head: beta=5, gamma=4"}],
          "replicas": {"reasoning": 1}, "unplaced": [],
          "splits": [{"model": "gemma", "head": "a", "stages": [{"node_id": "b", "layers": 5},
                                                                {"node_id": "c", "layers": 4}]}]}
    names = {"a": "alpha", "b": "beta", "c": "gamma"}
    assert pipeline_rows(st, names) == [["gemma", "alpha", "beta (5) -> gamma (4)", "pinned", "ready"]]
    assert "beta (5) -> gamma (4)" in render_status(st)
    # Planned by the placer, with the model's layer count and each stage's reported state.
    st["splits"] = [{"model": "gemma", "head": "a", "auto": True, "layers": 18,
                     "stages": [{"node_id": "b", "layers": 5, "state": "ready", "detail": ""},
                                {"node_id": "c", "layers": 4, "state": "failed", "detail": "cannot allocate 40 MiB"}]}]
    assert pipeline_rows(st, names) == [["gemma", "alpha (9)", "beta (5, ready) -> gamma (4, failed)", "auto", "ready"]]
    shown = render_status(st)
    assert "gemma: the stage on gamma failed: cannot allocate 40 MiB" in shown
    assert "HEAD (LAYERS)" in shown and "STAGES (LAYERS, STATE)" in shown


def test_a_stage_member_lets_only_the_live_head_through_to_that_models_stage():
    from mesh.replicas.splits import SplitRunner

    state = apply(mesh(), SetSplit("gemma", "a", (("b", 9),)))
    runner = SplitRunner("b", lambda: state, identity=None, host="127.0.0.1", listen_port=8010, threads=1,
                         cache_dir=None, wake=lambda: None)
    assert runner.local_stages(state) == {"gemma": 9}
    assert runner.tunnel_port == 8014
    assert runner.authorize("a", "gemma") is None  # no stage process runs yet

    class Running:
        endpoint, running, layers = "127.0.0.1:5000", True, 9

    runner.stages["gemma"] = Running()
    assert runner.authorize("a", "gemma") == "127.0.0.1:5000"
    assert runner.authorize("c", "gemma") is None  # a member, not the head
    assert runner.authorize("a", "minilm") is None  # not split
    state = apply(state, SetMemberState("a", "gone"))
    assert runner.authorize("a", "gemma") is None  # the head left: its split went with it
