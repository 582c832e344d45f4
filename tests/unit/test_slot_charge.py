"""Each member is charged the KV caches of its own slots (node.parallel), not the registering member's.

A model's catalog entry records how many slots its memory_bytes counts and one slot's bytes (RegisterModel.slots,
slot_bytes); placement, the split planner's `whole` check and a member's own refusal to load a model whole all
charge a member memory_bytes + (its slots - recorded slots) x slot_bytes. An entry from an older member (no slot
figures) charges every member memory_bytes, as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import pytest

from mesh.cluster.catalog import KV_BYTES_PER_TOKEN, RUNTIME_OVERHEAD, register_models
from mesh.cluster.placement import ModelInfo, NodeInfo, Unplaced, place
from mesh.core.config import ModelSpec
from raft.commands import InitMesh, RegisterModel, decode, encode
from raft.state import MeshState, Rejected, apply

MIB = 1 << 20
# Registered by a member with 4 slots of 100 MiB: 1000 MiB in all, 700 of it beyond the slots.
GEMMA = ModelInfo("gemma", ("reasoning",), 1000 * MIB, slots=4, slot_bytes=100 * MIB)


def node(name: str, memory_mib: int, slots: int) -> NodeInfo:
    return NodeInfo(name, "desktop", memory_mib * MIB, speed=1.0, slots=slots)


def test_a_member_is_charged_for_its_own_slots():
    assert GEMMA.need(node("one", 0, 1)) == 700 * MIB
    assert GEMMA.need(node("eight", 0, 8)) == 1400 * MIB
    assert GEMMA.need(node("silent", 0, 0)) == 1000 * MIB  # a member that does not report its slots


def test_a_one_slot_phone_holds_what_a_four_slot_registration_would_refuse_it():
    phone = node("phone", 800, slots=1)
    plan = place([phone], [GEMMA], {"reasoning": 1}, pins=(), current=())
    assert [a.node_id for a in plan.assignments] == ["phone"]
    assert plan.unplaced == ()


def test_an_eight_slot_desktop_is_charged_its_eight_caches_and_nothing_is_overcommitted():
    desktop, small = node("desktop", 1300, slots=8), node("small", 1300, slots=4)
    plan = place([desktop, small], [GEMMA], {"reasoning": 2}, pins=(), current=())
    assert [a.node_id for a in plan.assignments] == ["small"]
    assert plan.unplaced == (Unplaced("reasoning", "gemma", 1, "needs 1400 MiB; largest free is 1300 MiB on desktop"),)


def test_an_entry_without_slot_figures_charges_every_member_its_memory_bytes():
    old = ModelInfo("gemma", ("reasoning",), 1000 * MIB)
    assert old.need(node("one", 0, 1)) == old.need(node("eight", 0, 8)) == 1000 * MIB


def empty() -> MeshState:
    return apply(MeshState(), InitMesh("m1", "home", 1.0))


def register(**kw) -> RegisterModel:
    return RegisterModel("gemma", "g.gguf", "a" * 64, 300 * MIB, ("reasoning",), 4096, None, 1000 * MIB, **kw)


def test_the_log_records_the_slot_figures_and_older_entries_read_without_them():
    state = apply(empty(), register(slots=4, slot_bytes=100 * MIB))
    model = state.models["gemma"]
    assert (model.slots, model.slot_bytes) == (4, 100 * MIB)
    assert model.memory_for(1) == 700 * MIB and model.memory_for(0) == 1000 * MIB
    assert "slots" not in encode(register()) and "slot_bytes" not in encode(register())  # older members read it
    assert decode(encode(register(slots=4, slot_bytes=100 * MIB))) == register(slots=4, slot_bytes=100 * MIB)
    assert apply(empty(), register()).models["gemma"].memory_for(8) == 1000 * MIB


@pytest.mark.parametrize("kw", [dict(slots=-1), dict(slot_bytes=-5), dict(slots=20, slot_bytes=100 * MIB)])
def test_impossible_slot_figures_are_rejected(kw):
    with pytest.raises(Rejected, match="slot"):
        apply(empty(), register(**kw))


def test_registering_records_this_members_slots_and_upgrades_an_entry_without_them(tmp_path):
    data = b"not a real GGUF: registered whole-only, with its slots"
    (tmp_path / "tiny.gguf").write_bytes(data)
    spec = ModelSpec("tiny", "tiny.gguf", hashlib.sha256(data).hexdigest(), ("reasoning",), 1024)
    proposed: list = []

    async def propose(cmd):
        proposed.append(cmd)
        return {}

    asyncio.run(register_models((spec,), tmp_path, {}, propose, progress=False, slots=3))
    [cmd] = proposed
    slot = 1024 * KV_BYTES_PER_TOKEN
    assert (cmd.slots, cmd.slot_bytes, cmd.memory_bytes) == (3, slot, len(data) + 3 * slot + RUNTIME_OVERHEAD)

    known = apply(empty(), cmd).models
    asyncio.run(register_models((spec,), tmp_path, known, propose, progress=False, slots=3))
    assert len(proposed) == 1, "an entry with its slot figures is not registered again"
    older = apply(empty(), RegisterModel(**{**cmd.__dict__, "slots": 0, "slot_bytes": 0})).models
    asyncio.run(register_models((spec,), tmp_path, older, propose, progress=False, slots=3))
    assert len(proposed) == 2 and proposed[-1].slot_bytes == slot, "an older entry is registered again, with them"


def test_a_pipeline_head_is_charged_one_slot_whatever_the_registering_member_ran():
    from mesh.cli.pipelines import pinned_split
    from mesh.cluster.placer import split_model

    state = apply(empty(), register(slots=8, slot_bytes=50 * MIB, layers=10, layer_bytes=20 * MIB))
    assert split_model(state.models["gemma"]).memory_bytes == 650 * MIB  # 1000 - 7 x 50: the head decodes one

    # meshctl's pinned split reads the same figures from the control API's JSON: 800 MiB between the two members
    # hold the model with one slot's cache (650 MiB), not with the registering member's eight (1000 MiB).
    members = [{"node_id": n, "name": n, "state": "active", "profile": {"memory_available_for_models": mib * MIB}}
               for n, mib in (("head", 600), ("stage", 200))]
    model = {**dataclasses.asdict(state.models["gemma"]), "roles": ["reasoning"]}
    body, warning = pinned_split({"node": {}, "members": members}, [model], ["head", "stage"], None)
    assert warning == "" and body["head"] == "head", warning
    model.update(slots=0, slot_bytes=0)  # an entry without slot figures: the whole 1000 MiB is charged
    assert "too little free memory" in pinned_split({"node": {}, "members": members}, [model], ["head", "stage"],
                                                    None)[1]
