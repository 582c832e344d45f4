"""The profile refresh path: live facts from a captured phone, what is worth a log entry, the
UpdateProfile command and its apply, and the whole loop through a real one-member Raft node and the
placer: unplugging the phone moves its reasoning replica to the desktop (after the desktop is ready)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from mesh.cluster.placer import Placer
from mesh.cluster.profile_refresh import ProfileRefresher, changed_facts, live_facts
from nodes.profile import probe
from raft.commands import (
    AddMember,
    CreateToken,
    InitMesh,
    RegisterModel,
    SetMemberState,
    SetReplicas,
    SetShardState,
    UpdateProfile,
    decode,
    encode,
)
from raft.node import RaftNode, RaftTiming
from raft.profile import Battery, MemberProfile
from raft.state import MeshState, Rejected, apply
from tests.procs import free_ports

TERMUX = Path(__file__).parent / "fixtures" / "nodes" / "termux-phone"
TERMUX_ENV = json.loads((TERMUX / "capture.json").read_text())["environ"]
GIB = 1 << 30


class Phone:
    """termux-battery-status as the phone would answer it, changed by the test between refreshes."""

    def __init__(self) -> None:
        self.status = json.loads((TERMUX / "commands" / "termux-battery-status.json").read_text())
        self.calls = 0

    def unplug(self, percentage: int | None = None) -> None:
        self.status.update(plugged="UNPLUGGED", status="DISCHARGING")
        if percentage is not None:
            self.status.update(percentage=percentage, level=percentage)

    def plug(self) -> None:
        self.status.update(plugged="PLUGGED_AC", status="CHARGING")

    def run(self, argv) -> str | None:
        if list(argv) == ["termux-battery-status"]:
            self.calls += 1
            return json.dumps(self.status)
        return None  # no other tool on this phone

    def read(self, device_class: str) -> dict:
        return live_facts(device_class, TERMUX, TERMUX_ENV, self.run, sensors=lambda: None)


# -- UpdateProfile: command and apply --------------------------------------------------------------

def _members() -> MeshState:
    state = apply(MeshState(), InitMesh("mesh-1", "m", 1.0))
    state = apply(state, AddMember("p", "phone", "h:1", "r:1", {"cores": 8, "battery": None}, 2.0))
    return state


def test_update_profile_merges_fields_into_a_live_members_profile():
    before = _members()
    after = apply(before, UpdateProfile("p", {"battery": {"percent": 20.0, "charging": False}}))
    assert (after.members["p"].profile.cores, after.members["p"].profile.battery) == (8, Battery(20.0, False))
    assert before.members["p"].profile == MemberProfile(cores=8)  # the old state is untouched
    assert after.applied == before.applied + 1
    assert (after.members["p"].name, after.members["p"].joined_at) == ("phone", 2.0)


def test_update_profile_for_an_unknown_or_gone_member_is_rejected():
    with pytest.raises(Rejected, match="unknown member"):
        apply(_members(), UpdateProfile("nobody", {"cores": 1}))
    gone = apply(_members(), SetMemberState("p", "gone"))
    with pytest.raises(Rejected, match="unknown member"):
        apply(gone, UpdateProfile("p", {"cores": 1}))


def test_update_profile_travels_as_plain_data():
    cmd = UpdateProfile("p", {"battery": {"percent": 55.0, "charging": True}, "ram_available": 3 * GIB})
    wire = encode(cmd)
    assert wire == {"kind": "update_profile", "node_id": "p",
                    "profile": {"battery": {"percent": 55.0, "charging": True}, "ram_available": 3 * GIB}}
    assert decode(json.loads(json.dumps(wire))) == cmd


# -- what the phone reads, and what is worth committing ------------------------------------------

def test_live_facts_of_the_captured_phone():
    phone = Phone()
    facts = phone.read("termux-phone")
    assert facts["battery"] == {"percent": 64.0, "charging": True}
    assert facts["ram_total"] > facts["ram_available"] > facts["memory_available_for_models"] > 0
    phone.unplug(percentage=27)
    assert phone.read("termux-phone")["battery"] == {"percent": 27.0, "charging": False}
    assert live_facts("openwrt-router", TERMUX, TERMUX_ENV, phone.run, lambda: None)[
        "memory_available_for_models"] == 0


def _battery(percent, charging):
    return {"battery": {"percent": percent, "charging": charging}}


@pytest.mark.parametrize("recorded, live, fields", [
    (_battery(64.0, True), _battery(64.0, True), {}),
    (_battery(64.0, True), _battery(61.0, True), {}),  # under BATTERY_STEP points
    (_battery(64.0, True), _battery(59.0, True), _battery(59.0, True)),
    (_battery(31.0, True), _battery(29.5, True), {}),  # jitter at a threshold is not an entry
    (_battery(64.0, True), _battery(64.0, False), _battery(64.0, False)),  # unplugged: always
    (_battery(64.0, None), _battery(64.0, True), _battery(64.0, True)),
    ({"battery": None}, _battery(50.0, None), _battery(50.0, None)),
    (_battery(50.0, None), {"battery": None}, {"battery": None}),
    ({}, {"battery": None}, {}),  # no battery recorded and none now
    ({}, _battery(90.0, True), _battery(90.0, True)),
])
def test_battery_changes_worth_committing(recorded, live, fields):
    assert changed_facts(recorded, live, holds_shards=True) == fields


def test_memory_is_refreshed_only_on_a_node_holding_no_shard_and_only_when_it_moved_enough():
    recorded = {"ram_total": 8 * GIB, "ram_available": 4 * GIB, "memory_available_for_models": 3 * GIB}
    small = {"ram_total": 8 * GIB, "ram_available": 4 * GIB + (100 << 20),
             "memory_available_for_models": 3 * GIB + (100 << 20)}
    big = {"ram_total": 8 * GIB, "ram_available": 2 * GIB, "memory_available_for_models": 1 * GIB}
    assert changed_facts(recorded, small, holds_shards=False) == {}
    assert changed_facts(recorded, big, holds_shards=False) == big
    assert changed_facts(recorded, big, holds_shards=True) == {}  # its own shards would be counted twice


# -- the whole path: reading -> UpdateProfile through Raft -> placement --------------------------

TIMING = RaftTiming(heartbeat_s=0.02, election_min_s=0.1, election_max_s=0.2, connection_retry_s=0.1,
                    leader_fallback_s=0.3)


async def _until(condition, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def _reasoning(state: MeshState) -> dict[str, str]:
    return {s.node_id: s.state for s in state.shards_for("reasoning")}


async def _refresh_moves_reasoning(raft: RaftNode) -> None:
    async def propose(cmd):
        return await asyncio.wait_for(asyncio.wrap_future(raft.propose(cmd)), 30)

    await _until(lambda: raft.is_leader() and raft.is_ready(), "the one-member group to elect itself")
    phone = Phone()
    # The phone's real profile, probed from the capture (charging, 64 %), and faster than the desktop.
    profile = probe(TERMUX, TERMUX_ENV, phone.run, machine="aarch64", system="Linux", sensors=lambda: None, speed=50.0)
    assert (profile["device_class"], profile["battery"]) == ("termux-phone", {"percent": 64.0, "charging": True})
    profile["memory_available_for_models"] = 2 * GIB
    desktop = {"device_class": "desktop", "memory_available_for_models": 8 * GIB, "speed": 10.0, "battery": None}
    for cmd in (InitMesh("mesh-1", "m", 1.0),
                AddMember("phone", "phone", "127.0.0.1:1", raft.address, profile, 2.0),
                CreateToken("t", "c" * 64, 1.0, 1e9),
                AddMember("desktop", "desktop", "127.0.0.1:2", "127.0.0.1:3", desktop, 3.0, token_id="t"),
                RegisterModel("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 4096, None, GIB),
                SetReplicas("reasoning", 1)):
        await propose(cmd)
    # The desktop's Raft address is nobody's: within the (long) grace period it still counts as healthy.
    placer = Placer(raft, grace_s=3600, reserve_bytes=0)
    refresher = ProfileRefresher("phone", lambda: raft.state, propose, read=phone.read)

    assert await placer.step()
    assert _reasoning(raft.state) == {"phone": "assigned"}
    await propose(SetShardState("reasoning", "gemma", "phone", "ready"))
    applied, calls = raft.state.applied, phone.calls
    assert await refresher.refresh() == {}  # nothing moved: no log entry
    assert raft.state.applied == applied and phone.calls == calls + 1

    phone.unplug()
    assert await refresher.refresh() == {"battery": {"percent": 64.0, "charging": False}}
    assert raft.state.members["phone"].profile.battery == Battery(64.0, False)
    assert raft.state.members["phone"].profile.speed == 50.0  # the rest of the profile is kept
    assert await placer.step()
    # Make before break: the phone serves until the desktop's replica is ready.
    assert _reasoning(raft.state) == {"phone": "ready", "desktop": "assigned"}
    assert not await placer.step()
    await propose(SetShardState("reasoning", "gemma", "desktop", "ready"))
    assert await placer.step()
    assert _reasoning(raft.state) == {"desktop": "ready"}

    phone.plug()
    assert await refresher.refresh() == {"battery": {"percent": 64.0, "charging": True}}
    assert not await placer.step()  # charging again: the phone may take a replica, none is moved back
    assert _reasoning(raft.state) == {"desktop": "ready"}


def test_unplugging_the_phone_moves_its_reasoning_replica_through_raft(tmp_path):
    raft = RaftNode(f"127.0.0.1:{free_ports(1)}", [], tmp_path / "raft", "unit-test-secret", TIMING)
    try:
        asyncio.run(asyncio.wait_for(_refresh_moves_reasoning(raft), 120))
    finally:
        raft.close()
