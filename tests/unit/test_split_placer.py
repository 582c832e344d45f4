"""The placer splits a model that fits no member (issue #17) through a real one-member Raft group: it records the
pipeline (SetSplit, auto), places its head, keeps it while it runs, plans around a stage that failed or a member
that left, says why when nothing can hold the model, and serves the model whole again once a member can. Also:
the layer figures the catalog records, read from the real GGUF; the memory budget; `meshctl assign` with several
nodes."""

from __future__ import annotations

import asyncio
import dataclasses
import types
from pathlib import Path

import pytest

from mesh.cli.meshctl import build_parser
from mesh.cli.pipelines import pinned_split
from mesh.cluster.placement import member_memory
from mesh.cluster.placer import Placer
from mesh.core.config import DEFAULT_MODEL, ConfigError, MeshConfig, parse_config
from mesh.core.metrics import Metrics
from mesh.replicas.child_supervision import Exit
from mesh.replicas.reconciler import Reconciler
from nodes.profile import local_profile
from raft.commands import (
    AddMember,
    ClearSplit,
    CreateToken,
    InitMesh,
    PinShard,
    RegisterModel,
    SetMemberState,
    SetReplicas,
    SetShardState,
    SetSplit,
    SetStageState,
    UpdateProfile,
    encode,
)
from raft.node import RaftNode, RaftTiming
from raft.profile import MemberProfile
from raft.state import Rejected, Split, apply
from tests.procs import free_ports
from tests.unit.test_split import mesh as split_mesh

MIB, GIB = 1 << 20, 1 << 30
MEMORY, LAYER = 485_896_896, 7_990_272  # the default model's figures (test_split_planning.py)
TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.1, election_max_s=0.2, connection_retry_s=0.1,
                    leader_fallback_s=0.3)


def profile(mib: int, **kw) -> dict:
    return {"device_class": "desktop", "memory_available_for_models": mib * MIB, "speed": 10.0, **kw}


async def _placer_splits(raft: RaftNode) -> None:
    async def propose(cmd):
        return await asyncio.wait_for(asyncio.wrap_future(raft.propose(cmd)), 30)

    async def member(node_id: str, port: int, facts: dict, witness: bool = False) -> None:
        await propose(AddMember(node_id, node_id, f"127.0.0.1:{port}", f"127.0.0.1:{port + 2}", facts, 3.0,
                                token_id="t", witness=witness))

    deadline = asyncio.get_running_loop().time() + 30
    while not (raft.is_leader() and raft.is_ready()):
        assert asyncio.get_running_loop().time() < deadline, "the one-member group did not elect itself"
        await asyncio.sleep(0.02)
    # a: 8 GiB free but a budget of 400 MiB (node.memory_budget_mib); b 400 MiB; a witness and a router with
    # plenty that never hold layers.
    for cmd in (InitMesh("mesh-1", "m", 1.0),
                AddMember("a", "a", "127.0.0.1:1", raft.address, profile(8192, memory_budget=400 * MIB), 2.0),
                CreateToken("t", "c" * 64, 1.0, 1e9, uses=9)):
        await propose(cmd)
    await member("b", 10, profile(400))
    await member("w", 20, profile(4096), witness=True)
    await member("r", 30, profile(4096, device_class="openwrt-router"))
    await propose(RegisterModel("gemma", "g.gguf", "a" * 64, 253_113_024, ("reasoning",), 4096, "gemma", MEMORY,
                                layers=18, layer_bytes=LAYER))
    await propose(SetReplicas("reasoning", 1))
    placer = Placer(raft, grace_s=3600, reserve_bytes=0)

    assert await placer.step()  # the pipeline and its head (the model's reasoning shard), in one entry
    assert raft.state.splits == {"gemma": Split("gemma", "a", (("b", 12),), auto=True)}
    assert set(raft.state.shards) == {("reasoning", "gemma", "a")} and raft.state.unplaced == ()
    assert not await placer.step()  # stable

    await member("c", 40, profile(300))
    assert not await placer.step()  # a running pipeline is kept, not re-planned for another

    await propose(SetStageState("gemma", "b", "failed", "cannot allocate 60 MiB"))
    assert await placer.step()
    assert raft.state.splits["gemma"] == Split("gemma", "a", (("c", 12),), auto=True)  # around b; states afresh
    assert not await placer.step()

    await propose(SetMemberState("c", "gone"))  # the stage member leaves: its split goes with it
    assert raft.state.splits == {}
    assert await placer.step()  # b failed, c gone: nothing can hold it, and the placement says why
    assert set(raft.state.shards) == set()
    (unplaced,) = raft.state.unplaced
    assert (unplaced.role, unplaced.model, unplaced.missing) == ("reasoning", "gemma", 1)
    for words in ("b (its stage failed: cannot allocate 60 MiB)", "w (a witness holds no model)",
                  "r (an openwrt-router holds no model)", "a split needs 2 members that hold models, 1 can"):
        assert words in unplaced.reason

    await member("d", 50, profile(2048))  # a member that holds it whole: served whole, no split
    assert await placer.step()
    assert set(raft.state.shards) == {("reasoning", "gemma", "d")} and raft.state.splits == {}
    assert not await placer.step()

    # Pinned by hand: the placer leaves it, keeps its head, and counts it as the one reasoning replica wanted.
    await propose(SetSplit("gemma", "a", (("b", 9),)))
    assert await placer.step()
    assert raft.state.splits["gemma"].auto is False
    assert set(raft.state.shards) == {("reasoning", "gemma", "a")}
    await propose(SetReplicas("reasoning", 2))
    assert await placer.step()
    assert set(raft.state.shards) == {("reasoning", "gemma", "a"), ("reasoning", "gemma", "d")}
    await propose(SetReplicas("reasoning", 1))
    await propose(ClearSplit("gemma"))
    assert await placer.step()  # d again
    assert set(raft.state.shards) == {("reasoning", "gemma", "d")}
    await propose(SetSplit("gemma", "a", (("b", 9),), auto=True))  # an automatic one where d holds it whole
    assert await placer.step()
    assert raft.state.splits == {}


def on_one_member_raft(tmp_path: Path, body) -> None:
    """Runs `body(raft)` against a real one-member Raft group in `tmp_path`."""
    raft = RaftNode(f"127.0.0.1:{free_ports(1)}", [], tmp_path / "raft", "unit-test-secret", TIMING)
    try:
        asyncio.run(asyncio.wait_for(body(raft), 120))
    finally:
        raft.close()


def test_the_placer_splits_a_model_no_member_holds_and_plans_again_when_a_stage_fails(tmp_path):
    on_one_member_raft(tmp_path, _placer_splits)


async def _transitions(raft: RaftNode, tmp_path: Path) -> None:
    """Between a pipeline and a whole replica, both ways, the one serving stays until the other is ready; a phone's
    battery between the two thresholds does not flip the choice; no entry ever leaves an old head without its
    split."""
    async def propose(cmd):
        return await asyncio.wait_for(asyncio.wrap_future(raft.propose(cmd)), 30)

    async def ready(node_id: str) -> None:
        await propose(SetShardState("reasoning", "gemma", node_id, "ready"))

    deadline = asyncio.get_running_loop().time() + 30
    while not (raft.is_leader() and raft.is_ready()):
        assert asyncio.get_running_loop().time() < deadline, "the one-member group did not elect itself"
        await asyncio.sleep(0.02)
    entries: list[tuple] = []  # (splits, shards) after each placement the placer commits

    async def step() -> bool:
        stepped = await placer.step()
        if stepped:
            entries.append((dict(raft.state.splits), set(raft.state.shards)))
        return stepped

    for cmd in (InitMesh("mesh-1", "m", 1.0),
                AddMember("a", "a", "127.0.0.1:1", raft.address, profile(400), 2.0),
                CreateToken("t", "c" * 64, 1.0, 1e9, uses=9),
                AddMember("b", "b", "127.0.0.1:10", "127.0.0.1:12", profile(400), 3.0, token_id="t"),
                RegisterModel("gemma", "g.gguf", "a" * 64, 253_113_024, ("reasoning",), 4096, "gemma", MEMORY,
                              layers=18, layer_bytes=LAYER),
                SetReplicas("reasoning", 1)):
        await propose(cmd)
    placer = Placer(raft, grace_s=3600, reserve_bytes=0)
    assert await step()
    assert raft.state.splits["gemma"].head == "a"
    await ready("a")

    # Pipeline -> whole: d can hold it; the running pipeline serves until d's replica is ready.
    await propose(AddMember("d", "d", "127.0.0.1:20", "127.0.0.1:22", profile(2048), 4.0, token_id="t"))
    assert await step()
    assert raft.state.splits["gemma"].head == "a"
    assert set(raft.state.shards) == {("reasoning", "gemma", "a"), ("reasoning", "gemma", "d")}
    assert not await step()  # waiting for d
    await ready("d")
    assert await step()
    assert raft.state.splits == {} and set(raft.state.shards) == {("reasoning", "gemma", "d")}

    # Whole -> pipeline: d is a phone whose battery drops. Between the thresholds (30-40 %) it keeps the model.
    phone = {"device_class": "termux-phone", "battery": {"percent": 35.0, "charging": True}}
    await propose(UpdateProfile("d", phone))
    assert not await step()
    await propose(UpdateProfile("d", {"battery": {"percent": 20.0, "charging": True}}))
    assert await step()  # a pipeline over a and b; d's ready replica stays until the head is ready
    assert raft.state.splits["gemma"].head == "a"
    assert set(raft.state.shards) == {("reasoning", "gemma", "a"), ("reasoning", "gemma", "d")}
    assert not await step()
    await ready("a")
    assert await step()
    assert set(raft.state.shards) == {("reasoning", "gemma", "a")}
    # Charged again to 35 %: below the mark a phone without the model takes it at (40 %), so nothing moves.
    await propose(UpdateProfile("d", {"battery": {"percent": 35.0, "charging": True}}))
    assert not await step()

    # The reconciler's guard for a moment the placement never asks for (a split cleared by hand before the
    # placement follows): a member does not load whole a model beyond what it gives to models, unless pinned.
    def reconciler(node_id: str) -> Reconciler:
        return Reconciler(node_id, raft, tmp_path, MeshConfig(), "llama", Metrics(), fetch=None, run_dir=tmp_path)

    key = ("reasoning", "gemma")
    assert not reconciler("b")._fits_whole(key, raft.state)
    assert reconciler("d")._fits_whole(key, raft.state)
    await propose(PinShard("reasoning", "gemma", "b"))
    assert reconciler("b")._fits_whole(key, raft.state)  # a person's pin is obeyed

    # A head that lost its stage does not trust the stage's "ready" recorded before the loss: it waits for the
    # stage member to report again (it says "starting" as it restarts its stage).
    head = reconciler("a")
    await propose(SetStageState("gemma", "b", "ready", "12 layers"))
    split = raft.state.splits["gemma"]
    assert await head._stages_ready(key, split, raft.state)
    head._split_of[key] = split  # as when its process was started
    crash = Exit(-6, ("ggml_abort: Remote RPC server crashed or returned malformed response",))
    await head._exited(types.SimpleNamespace(role="reasoning", model="gemma"), crash)
    assert not await head._stages_ready(key, raft.state.splits["gemma"], raft.state)
    await propose(SetStageState("gemma", "b", "starting", "restarting in 0 s after: killed by SIGKILL"))
    assert not await head._stages_ready(key, raft.state.splits["gemma"], raft.state)
    await propose(SetStageState("gemma", "b", "ready", "12 layers"))
    assert await head._stages_ready(key, raft.state.splits["gemma"], raft.state)

    for splits, shards in entries:  # every head recorded had its shard placed in the same entry, and the reverse
        heads = {("reasoning", s.model, s.head) for s in splits.values()}
        assert heads <= shards
        for key in shards - heads:
            assert key[2] not in {s.head for s in splits.values()}


def test_the_placer_moves_between_a_pipeline_and_a_whole_replica_make_before_break(tmp_path):
    on_one_member_raft(tmp_path, lambda raft: _transitions(raft, tmp_path))


def test_the_layer_figures_are_read_from_the_real_gguf(tmp_path):
    gguf = pytest.importorskip(DEFAULT_MODEL.package)
    from shards.gguf_layers import GgufError, read_layer_facts
    from shards.model_files import ensure_model

    path = ensure_model(tmp_path, DEFAULT_MODEL.file, gguf.EXPECTED_SHA256, DEFAULT_MODEL.package, progress=False)
    facts = read_layer_facts(path)
    assert (facts.architecture, facts.layers) == ("gemma3", 18)
    assert facts.kv_bytes_per_token_layer == 1024  # 1 KV head of 256 for K and V, f16: the catalog's 18 KiB / 18
    # Every byte of the data section is a tensor's: the blocks and the rest (embeddings: 170 MB) add up.
    assert sum(facts.layer_weights) + facts.other_weights < path.stat().st_size
    assert path.stat().st_size - sum(facts.layer_weights) - facts.other_weights < 8 << 20  # the header
    assert 160e6 < facts.other_weights < 190e6 and 3e6 < facts.mean_layer_weights < 4.5e6
    assert facts.layer_bytes(4096) == facts.mean_layer_weights + 4096 * 1024 == LAYER
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(GgufError, match="truncated"):
        read_layer_facts(damaged)
    other = tmp_path / "not.gguf"
    other.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(GgufError, match="not a GGUF"):
        read_layer_facts(other)


def test_a_memory_budget_caps_what_placement_counts():
    cfg = parse_config({"node": {"memory_budget_mib": 400}})
    assert cfg.node.memory_budget_bytes == 400 * MIB
    assert MeshConfig().with_overrides(memory_budget_mib=300).node.memory_budget_mib == 300
    with pytest.raises(ConfigError, match="memory-budget"):
        MeshConfig().with_overrides(memory_budget_mib=-1)
    assert local_profile(400 * MIB)["memory_budget"] == 400 * MIB
    assert "memory_budget" not in local_profile()  # no cap, no key
    capped = MemberProfile.from_wire(profile(8192, memory_budget=400 * MIB))
    assert member_memory(capped, 0) == 400 * MIB
    assert member_memory(MemberProfile.from_wire(profile(300, memory_budget=400 * MIB)), 0) == 300 * MIB
    assert member_memory(MemberProfile.from_wire(profile(300)), 0) == 300 * MIB


def test_meshctl_assign_with_several_nodes_pins_a_split_shared_by_memory():
    args = build_parser().parse_args(["assign", "reasoning", "--node", "alpha", "--node", "beta"])
    assert args.node == ["alpha", "beta"]
    assert build_parser().parse_args(["assign", "context", "--node", "alpha"]).node == ["alpha"]
    st = {"members": [{"node_id": "a", "name": "alpha", "state": "active", "profile": profile(420)},
                      {"node_id": "b", "name": "beta", "state": "active", "profile": profile(300)},
                      {"node_id": "c", "name": "gamma", "state": "active", "profile": profile(300)}]}
    models = [{"name": "gemma", "roles": ["reasoning"], "memory_bytes": MEMORY, "layers": 18, "layer_bytes": LAYER},
              {"name": "minilm", "roles": ["context"], "memory_bytes": 1, "layers": 0, "layer_bytes": 0}]
    body, warning = pinned_split(st, models, ["alpha", "beta", "c"], None)
    assert warning == ""
    assert body["model"] == "gemma" and body["head"] == "alpha"
    assert [s["node"] for s in body["stages"]] == ["beta", "gamma"]
    assert body["stages"][0]["layers"] == body["stages"][1]["layers"]
    assert sum(s["layers"] for s in body["stages"]) < 18
    with pytest.raises(ValueError, match="no member 'zeta'"):
        pinned_split(st, models, ["alpha", "zeta"], None)
    with pytest.raises(ValueError, match="no model 'minilm' serves reasoning"):
        pinned_split(st, models, ["alpha", "beta"], "minilm")
    with pytest.raises(ValueError, match="no layer figures"):
        pinned_split(st, [{**models[0], "layers": 0}], ["alpha", "beta"], None)


def test_a_stage_member_keeps_its_recorded_memory_like_a_member_holding_a_shard():
    """Its stage lowers the free memory it reads; refreshing the profile then would count the stage twice and
    push the pipeline off it (mesh/cluster/profile_refresh.py)."""
    from mesh.cluster.profile_refresh import ProfileRefresher
    from raft.state import MeshState, apply

    state = MeshState()
    for cmd in (InitMesh("m", "m", 1.0), AddMember("a", "a", "h:1", "h:3", profile(400), 2.0),
                CreateToken("t", "c" * 64, 1.0, 1e9),
                AddMember("b", "b", "h:4", "h:6", profile(400), 3.0, token_id="t"),
                RegisterModel("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 4096, None, MEMORY, 18, LAYER)):
        state = apply(state, cmd)
    proposed = []

    async def propose(cmd):
        proposed.append(cmd)

    def read(device_class: str) -> dict:
        return {"battery": None, "ram_total": 8 * GIB, "ram_available": 100 * MIB,
                "memory_available_for_models": 100 * MIB}

    split = apply(state, SetSplit("gemma", "a", (("b", 12),), auto=True))
    assert asyncio.run(ProfileRefresher("b", lambda: split, propose, read=read).refresh()) == {}
    assert proposed == []
    assert asyncio.run(ProfileRefresher("b", lambda: state, propose, read=read).refresh())  # no split: refreshed
    assert len(proposed) == 1


def test_a_stage_failure_is_in_the_log_so_any_leader_plans_around_it():
    state = apply(split_mesh(), SetSplit("gemma", "a", (("b", 9),), auto=True))
    failed = apply(state, SetStageState("gemma", "b", "failed", "cannot allocate 60 MiB", at=1000.0))
    assert failed.stage_failures == {("gemma", "b"): ("cannot allocate 60 MiB", 1000.0)}
    replanned = apply(failed, SetSplit("gemma", "a", (("c", 9),), auto=True))  # states afresh, the failure kept
    assert replanned.splits["gemma"].stage_states == () and ("gemma", "b") in replanned.stage_failures

    def leader(wall: float) -> Placer:  # a placer that never saw the report (a leader elected since)
        return Placer(None, grace_s=3600, reserve_bytes=0, wall=lambda: wall)

    assert leader(1000.0 + 60)._failed_stages(replanned, "gemma") == {"b": "cannot allocate 60 MiB"}
    assert leader(1000.0 + 121)._failed_stages(replanned, "gemma") == {}, "tried again after 120 s"
    again = apply(apply(replanned, SetSplit("gemma", "a", (("b", 9),), auto=True)),
                  SetStageState("gemma", "b", "ready", "9 layers", at=1200.0))
    assert again.stage_failures == {}, "a ready stage clears its failure"
    assert apply(failed, SetMemberState("b", "gone")).stage_failures == {}
    with pytest.raises(Rejected):
        apply(state, SetStageState("gemma", "b", "failed", "x", at=-1.0))
    assert "at" not in encode(SetStageState("gemma", "b", "ready"))
    many = state
    for i in range(70):  # one failure per (model, member) and at most MAX_STAGE_FAILURES in all
        many = apply(many, SetStageState("gemma", "b", "failed", f"{i}", at=float(i)))
    assert many.stage_failures == {("gemma", "b"): ("69", 69.0)}
    crowded = {("m", f"n{i}"): ("x", float(i)) for i in range(64)}
    trimmed = apply(dataclasses.replace(state, stage_failures=crowded),
                    SetStageState("gemma", "b", "failed", "late", at=100.0))
    assert len(trimmed.stage_failures) == 64 and ("m", "n0") not in trimmed.stage_failures
