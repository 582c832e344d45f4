"""Battery-aware placement: phones on battery or low charge hand reasoning to nodes that can hold it.

Pure cases for place() with BatteryPolicy, the placer's reading of battery facts from the replicated
profile and its make-before-break hand-off, then properties over random meshes with random batteries.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.cluster.placement import Assignment, BatteryPolicy, ModelInfo, NodeInfo, moves, place
from mesh.cluster.placer import battery_policy, keep_until_replaced, node_infos
from mesh.core.config import ConfigError, PlacementConfig, parse_config
from raft.commands import AddMember, ApplyPlacement, CreateToken, InitMesh, RegisterModel, SetShardState
from raft.state import MeshState, apply
from tests.unit.test_placement import PROPS, _valid_pins, meshes

MIB = 1 << 20
GEMMA = ModelInfo("gemma", ("reasoning",), 400 * MIB)
MINILM = ModelInfo("minilm", ("context",), 100 * MIB)
CATALOG = (GEMMA, MINILM)
POLICY = BatteryPolicy(min_percent=30, resume_percent=40, require_charging=True)

DESKTOP = NodeInfo("desktop-1", "desktop", 8000 * MIB, speed=10.0)
PI = NodeInfo("pi-1", "raspberry-pi", 1500 * MIB, speed=2.0)


def phone(percent: float | None = 80.0, charging: bool | None = True, node_id: str = "phone-1",
          speed: float = 20.0, memory: int = 2000 * MIB) -> NodeInfo:
    """A phone faster than the desktop, so only its battery keeps reasoning off it."""
    return NodeInfo(node_id, "termux-phone", memory, speed=speed, battery_percent=percent, charging=charging)


def reasoning(node: NodeInfo) -> Assignment:
    return Assignment("reasoning", "gemma", node.node_id)


def holders(plan, role: str = "reasoning") -> set[str]:
    return {s.node_id for s in plan.assignments if s.role == role}


# -- who gives up a replica, who keeps it ---------------------------------------------------------

def test_phone_on_battery_with_a_desktop_present_loses_its_reasoning_replica():
    on_battery = phone(80.0, charging=False)
    plan = place([on_battery, DESKTOP], CATALOG, {"reasoning": 1}, [], [reasoning(on_battery)], POLICY)
    assert holders(plan) == {"desktop-1"}
    assert moves([reasoning(on_battery)], plan.assignments) == ({reasoning(DESKTOP)}, {reasoning(on_battery)})
    assert plan.unplaced == ()


def test_phone_alone_keeps_its_replica_however_low_the_battery():
    flat = phone(5.0, charging=False)
    assert holders(place([flat], CATALOG, {"reasoning": 1}, [], [reasoning(flat)], POLICY)) == {"phone-1"}
    assert holders(place([flat], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"phone-1"}


def test_charging_phone_above_the_threshold_keeps_its_replica_and_is_preferred_when_fastest():
    plugged = phone(80.0, charging=True)
    assert holders(place([plugged, DESKTOP], CATALOG, {"reasoning": 1}, [], [reasoning(plugged)], POLICY)) \
        == {"phone-1"}
    assert holders(place([plugged, DESKTOP], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"phone-1"}


def test_charging_phone_below_the_minimum_charge_loses_its_replica():
    low = phone(20.0, charging=True)
    assert holders(place([low, DESKTOP], CATALOG, {"reasoning": 1}, [], [reasoning(low)], POLICY)) == {"desktop-1"}


def test_phone_on_battery_gets_no_new_replica_while_another_node_fits():
    plan = place([phone(95.0, charging=False), PI], CATALOG, {"reasoning": 1}, [], [], POLICY)
    assert holders(plan) == {"pi-1"}  # slower, but on mains power


def test_replica_stays_on_the_phone_when_no_other_node_has_room():
    small_desktop = dataclasses.replace(DESKTOP, memory_available=300 * MIB)
    on_battery = phone(50.0, charging=False)
    plan = place([on_battery, small_desktop], CATALOG, {"reasoning": 1}, [], [reasoning(on_battery)], POLICY)
    assert holders(plan) == {"phone-1"}
    assert plan.unplaced == ()


def test_a_second_replica_falls_back_to_the_phone_when_nothing_else_can_hold_it():
    plan = place([phone(10.0, charging=False), DESKTOP], CATALOG, {"reasoning": 2}, [], [], POLICY)
    assert holders(plan) == {"desktop-1", "phone-1"}


def test_of_two_phones_on_battery_the_one_holding_the_replica_keeps_it():
    holder = phone(12.0, charging=False, node_id="phone-a", speed=5.0)
    faster = phone(90.0, charging=False, node_id="phone-b", speed=50.0)
    plan = place([holder, faster], CATALOG, {"reasoning": 1}, [], [reasoning(holder)], POLICY)
    assert holders(plan) == {"phone-a"}  # no reload for a move between two phones that are both on battery


def test_shrinking_replicas_drops_the_battery_limited_holder_first():
    on_battery = phone(50.0, charging=False)
    current = [reasoning(on_battery), reasoning(PI)]
    assert holders(place([on_battery, PI], CATALOG, {"reasoning": 1}, [], current, POLICY)) == {"pi-1"}


def test_pins_are_honoured_on_a_phone_on_battery():
    on_battery = phone(10.0, charging=False)
    plan = place([on_battery, DESKTOP], CATALOG, {"reasoning": 1}, [reasoning(on_battery)], [], POLICY)
    assert holders(plan) == {"phone-1"}


def test_only_reasoning_is_moved_off_the_phone():
    on_battery = dataclasses.replace(phone(10.0, charging=False), memory_available=9000 * MIB)
    current = [Assignment("context", "minilm", on_battery.node_id)]
    plan = place([on_battery, DESKTOP], CATALOG, {"context": 1}, [], current, POLICY)
    assert holders(plan, "context") == {"phone-1"}


def test_battery_facts_only_limit_phones_and_unknown_facts_limit_nothing():
    laptop = NodeInfo("laptop-1", "desktop", 8000 * MIB, speed=30.0, battery_percent=5.0, charging=False)
    assert holders(place([laptop, DESKTOP], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"laptop-1"}
    unknown = phone(None, None)
    assert holders(place([unknown, DESKTOP], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"phone-1"}
    unknown_charging = phone(80.0, None)  # the source cannot tell: only the charge counts
    assert holders(place([unknown_charging, DESKTOP], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"phone-1"}


def test_charging_not_required_lets_a_well_charged_phone_on_battery_keep_reasoning():
    relaxed = BatteryPolicy(min_percent=30, resume_percent=40, require_charging=False)
    on_battery = phone(80.0, charging=False)
    assert holders(place([on_battery, DESKTOP], CATALOG, {"reasoning": 1}, [], [], relaxed)) == {"phone-1"}
    assert holders(place([phone(25.0, False), DESKTOP], CATALOG, {"reasoning": 1}, [], [], relaxed)) == {"desktop-1"}


# -- hysteresis: a charge hovering at a threshold does not move replicas -------------------------

def test_a_holder_keeps_its_replica_inside_the_band_and_a_non_holder_needs_the_resume_charge():
    mid = phone(35.0, charging=True)  # above min_percent, below resume_percent
    assert holders(place([mid, PI], CATALOG, {"reasoning": 1}, [], [reasoning(mid)], POLICY)) == {"phone-1"}
    assert holders(place([mid, PI], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"pi-1"}
    resumed = phone(40.0, charging=True)
    assert holders(place([resumed, PI], CATALOG, {"reasoning": 1}, [], [], POLICY)) == {"phone-1"}


def _hover(percents: tuple[float, float], policy: BatteryPolicy, rounds: int = 24) -> int:
    """How often the phone gains or loses the replica while its charge alternates between `percents`
    and the pi (the preferred other holder) drops in and out, so a fresh placement is needed every
    other round; a slow spare node on mains power can always take the replica."""
    spare = NodeInfo("spare-1", "desktop", 4000 * MIB, speed=1.0)
    current: list[Assignment] = []
    changes = 0
    for round_no in range(rounds):
        nodes = [phone(percents[round_no % 2], charging=True), dataclasses.replace(PI, healthy=round_no % 2 == 0),
                 spare]
        plan = place(nodes, CATALOG, {"reasoning": 1}, [], current, policy)
        changes += ("phone-1" in holders(plan)) != ("phone-1" in {s.node_id for s in current})
        current = list(plan.assignments)
    return changes


def test_a_charge_hovering_at_either_threshold_moves_the_replica_at_most_once():
    assert _hover((29.0, 31.0), POLICY) == 0  # never charged enough to take a fresh replica
    assert _hover((41.0, 39.0), POLICY) <= 1  # takes one at 41, keeps it at 39
    assert _hover((39.0, 41.0), POLICY) <= 1


def test_without_a_band_the_same_hovering_would_flip_replicas():
    # The counterpart of the test above, showing what the band between the two charges prevents.
    no_band = BatteryPolicy(min_percent=30, resume_percent=30, require_charging=True)
    assert _hover((29.0, 31.0), no_band) > 10


# -- the placer: battery facts from the replicated profile, make before break --------------------

def _mesh(*members: tuple[str, dict]) -> MeshState:
    state = apply(MeshState(), InitMesh("mesh-1", "m", 1.0))
    for i, (node_id, profile) in enumerate(members):
        state = apply(state, CreateToken(f"t{i}", "c" * 64, 1.0, 1e9))  # one join each
        state = apply(state, AddMember(node_id, node_id, f"h:{i}", f"r:{i}", profile, 2.0, token_id=f"t{i}"))
    return apply(state, RegisterModel("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 4096, None, 400 * MIB))


def test_node_infos_read_battery_facts_from_the_member_profile():
    state = _mesh(("p", {"device_class": "termux-phone", "memory_available_for_models": 1 << 30, "speed": 3.0,
                         "battery": {"percent": 41.5, "charging": False}}),
                  ("d", {"device_class": "desktop", "ram_available": 2 << 30, "battery": None}),
                  ("x", {"device_class": "termux-phone", "battery": {"percent": "full", "charging": "yes"}}))
    infos = {n.node_id: n for n in node_infos(state, {"p": True, "d": True}, reserve=0)}
    assert (infos["p"].battery_percent, infos["p"].charging, infos["p"].memory_available) == (41.5, False, 1 << 30)
    assert (infos["d"].battery_percent, infos["d"].charging, infos["d"].healthy) == (None, None, True)
    assert (infos["x"].battery_percent, infos["x"].charging, infos["x"].healthy) == (None, None, False)


def test_config_defaults_give_the_documented_policy():
    assert battery_policy(PlacementConfig()) == BatteryPolicy(30.0, 40.0, True)
    assert (PlacementConfig().profile_refresh_s, BatteryPolicy()) == (60, battery_policy(PlacementConfig()))


def test_config_battery_keys_are_validated_naming_the_key():
    off = parse_config({"placement": {"battery_min_percent": 0, "battery_resume_percent": 0,
                                      "battery_require_charging": False}}).placement
    assert battery_policy(off) == BatteryPolicy(0.0, 0.0, False)  # 0 turns the charge rules off
    for bad, key in (({"battery_min_percent": 101, "battery_resume_percent": 101}, "battery_min_percent"),
                     ({"battery_resume_percent": 20}, "battery_resume_percent"),
                     ({"battery_resume_percent": 101}, "battery_resume_percent"),
                     ({"battery_require_charging": 1}, "battery_require_charging"),
                     ({"battery_require_charging": "yes"}, "battery_require_charging"),
                     ({"profile_refresh_s": 0}, "profile_refresh_s")):
        with pytest.raises(ConfigError, match=f"placement.{key}"):
            parse_config({"placement": bad})


def _with_shards(state: MeshState, *shards: tuple[str, str]) -> MeshState:
    state = apply(state, ApplyPlacement(tuple(("reasoning", "gemma", n) for n, _ in shards)))
    for node_id, shard_state in shards:
        state = apply(state, SetShardState("reasoning", "gemma", node_id, shard_state))
    return state


def test_a_battery_move_keeps_the_phones_ready_replica_until_its_replacement_is_ready():
    state = _with_shards(_mesh(("p", {}), ("d", {})), ("p", "ready"))
    plan = place([phone(80.0, False, node_id="p"), dataclasses.replace(DESKTOP, node_id="d")], CATALOG,
                 {"reasoning": 1}, [], [Assignment("reasoning", "gemma", "p")], POLICY)
    assert holders(plan) == {"d"}
    assert holders(keep_until_replaced(plan, state, {"p"})) == {"p", "d"}  # the desktop is still loading
    loading = _with_shards(state, ("p", "ready"), ("d", "loading"))
    assert holders(keep_until_replaced(plan, loading, {"p"})) == {"p", "d"}
    ready = _with_shards(state, ("p", "ready"), ("d", "ready"))
    assert holders(keep_until_replaced(plan, ready, {"p"})) == {"d"}
    assert holders(keep_until_replaced(plan, loading, set())) == {"d"}  # not a battery move: no hand-off


def test_no_hand_off_for_a_replica_that_was_not_serving_or_when_the_role_is_scaled_to_zero():
    state = _with_shards(_mesh(("p", {}), ("d", {})), ("p", "loading"))
    plan = place([phone(80.0, False, node_id="p"), dataclasses.replace(DESKTOP, node_id="d")], CATALOG,
                 {"reasoning": 1}, [], [Assignment("reasoning", "gemma", "p")], POLICY)
    assert holders(keep_until_replaced(plan, state, {"p"})) == {"d"}
    ready = _with_shards(state, ("p", "ready"))
    zero = place([phone(80.0, False, node_id="p")], CATALOG, {"reasoning": 0}, [], [], POLICY)
    assert keep_until_replaced(zero, ready, {"p"}) == zero


# -- properties over random meshes with random batteries -----------------------------------------

BATTERIES = st.lists(st.tuples(st.sampled_from([None, 5.0, 29.0, 30.0, 35.0, 40.0, 90.0]),
                               st.sampled_from([None, True, False])), min_size=8, max_size=8)


def _with_batteries(mesh, batteries):
    """Every model-holding node given a battery reading becomes a phone (the current shards were
    placed before, without batteries, so many phones hold a replica their battery now refuses)."""
    nodes, models, replicas, pins, current = mesh
    nodes = [dataclasses.replace(n, battery_percent=p, charging=c,
                                 device_class="termux-phone" if (p, c) != (None, None)
                                 and n.device_class != "openwrt-router" else n.device_class)
             for n, (p, c) in zip(nodes, batteries)]
    return nodes, models, replicas, pins, current


@PROPS
@given(meshes(), BATTERIES, st.randoms(use_true_random=False))
def test_battery_plans_are_deterministic_and_stable(mesh, batteries, rnd):
    nodes, models, replicas, pins, current = _with_batteries(mesh, batteries)
    plan = place(nodes, models, replicas, pins, current, POLICY)
    shuffled = [list(x) for x in (nodes, pins, current)]
    for x in shuffled:
        rnd.shuffle(x)
    assert place(shuffled[0], models, replicas, shuffled[1], shuffled[2], POLICY) == plan
    assert place(nodes, models, replicas, pins, plan.assignments, POLICY) == plan


@PROPS
@given(meshes(), BATTERIES)
def test_a_limited_phone_holds_automatic_reasoning_only_where_no_other_node_had_room(mesh, batteries):
    nodes, models, replicas, pins, current = _with_batteries(mesh, batteries)
    plan = place(nodes, models, replicas, pins, current, POLICY)
    by_id, size = {n.node_id: n for n in nodes}, {m.name: m.memory_bytes for m in models}
    used = {n.node_id: 0 for n in nodes}
    for s in plan.assignments:
        used[s.node_id] += size[s.model]
    held = {s.node_id for s in current if s.role == "reasoning"}
    reasoning_nodes = holders(plan)
    for s in set(plan.assignments) - _valid_pins(nodes, models, pins):
        if s.role != "reasoning" or not POLICY.limited(by_id[s.node_id], s.node_id in held):
            continue
        for other in nodes:
            usable = other.healthy and not other.witness and other.device_class != "openwrt-router"
            if usable and other.node_id not in reasoning_nodes and not POLICY.limited(other, other.node_id in held):
                assert other.memory_available - used[other.node_id] < size[s.model], \
                    f"{s.node_id} is battery-limited but {other.node_id} had room"
