"""raft/profile.py: the member profile is a typed, versioned record in the commands and the state, read
leniently from what a member reports, and the same through the journal, a dump and an older dump."""

from __future__ import annotations

import math

import pytest

from nodes.profile import PROFILE_KEYS, local_profile
from raft import codec
from raft.commands import AddMember, UpdateProfile, decode, encode
from raft.profile import PROFILE_VERSION, Battery, Gpu, MemberProfile
from raft.state import Member


def test_this_machines_profile_reads_into_the_record_and_back():
    wire = {**local_profile(), "threads": 2}
    profile = MemberProfile.from_wire(wire)
    assert profile.version == PROFILE_VERSION and profile.threads == 2
    back = profile.to_wire()
    assert set(PROFILE_KEYS) <= set(back)
    for key in ("device_class", "cores", "ram_total", "arch", "speed"):
        assert back[key] == wire[key], key


@pytest.mark.parametrize("wire, field, expected", [
    ({"cores": "eight"}, "cores", 0),
    ({"cores": True}, "cores", 0),
    ({"cores": -3}, "cores", 0),
    ({"speed": math.inf}, "speed", 0.0),
    ({"speed": "fast"}, "speed", 0.0),
    ({"device_class": 7}, "device_class", "desktop"),
    ({"battery": "yes"}, "battery", None),
    ({"battery": {"percent": "full", "charging": "yes"}}, "battery", Battery(None, None)),
    ({"battery": {"percent": 250, "charging": True}}, "battery", Battery(100.0, True)),
    ({"gpus": [{"vendor": "nvidia", "name": "x", "memory_total": 8}, "junk"]}, "gpus", (Gpu("nvidia", "x", 8),)),
    ({"cpu_features": ["avx2", 3, None]}, "cpu_features", ("avx2",)),
    ({"memory_available_for_models": None}, "memory_available_for_models", None),
    ({"board": "x" * 10_000}, "board", "x" * 256),
    ({"parallel": "four"}, "parallel", 0),  # as from a member that does not say: routing uses its own figure
])
def test_odd_facts_fall_back_to_defaults_instead_of_rejecting_the_member(wire, field, expected):
    assert getattr(MemberProfile.from_wire(wire), field) == expected


def test_a_newer_members_unknown_keys_are_dropped():
    profile = MemberProfile.from_wire({"version": PROFILE_VERSION + 1, "cores": 4, "npu": {"tops": 40}})
    assert profile.cores == 4 and profile.version == PROFILE_VERSION + 1 and "npu" not in profile.to_wire()


def test_the_command_carries_the_record_and_the_wire_a_plain_mapping():
    cmd = AddMember("n1", "a", "h:1", "h:2", {"cores": 4, "battery": {"percent": 50, "charging": False}}, 1.0)
    assert isinstance(cmd.profile, MemberProfile) and cmd.profile.battery == Battery(50.0, False)
    wire = encode(cmd)
    assert isinstance(wire["profile"], dict) and wire["profile"]["version"] == PROFILE_VERSION
    assert decode(codec.loads(codec.dumps(wire))) == cmd


def test_updates_merge_into_the_record():
    profile = MemberProfile(cores=8, speed=3.0)
    merged = profile.merged(UpdateProfile("n1", {"battery": {"percent": 20.0, "charging": True}}).profile)
    assert merged == MemberProfile(cores=8, speed=3.0, battery=Battery(20.0, True))


def test_a_member_from_an_older_dump_holds_a_mapping_and_reads_it_into_the_record():
    member = Member("n1", "a", "h:1", "h:2", {"cores": 2, "device_class": "raspberry-pi"}, "active", 1.0)
    assert member.profile == MemberProfile(cores=2, device_class="raspberry-pi")


def test_a_dump_keeps_the_record():
    from raft.commands import InitMesh
    from raft.snapshot import STATE, check_state
    from raft.state import MeshState, apply

    state = apply(MeshState(), InitMesh("m", "x", 1.0))
    state = apply(state, AddMember("n1", "a", "h:1", "h:2", {"cores": 4, "gpus": [{"vendor": "amd"}],
                                                               "battery": {"percent": 9.5}}, 1.0))
    back = codec.loads(codec.dumps(state, STATE), STATE)
    check_state(back)
    assert back.members["n1"].profile == state.members["n1"].profile
    assert back.members["n1"].profile.gpus == (Gpu("amd", "", 0),)
