"""Placement: hand-written cases for each rule, then properties over random meshes."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.cluster.placement import (
    MODEL_ROLES,
    Assignment,
    ModelInfo,
    NodeInfo,
    Plan,
    Unplaced,
    moves,
    place,
)

MIB = 1 << 20

PI = NodeInfo("pi-1", "raspberry-pi", 1500 * MIB, speed=2.0)
PHONE = NodeInfo("phone-1", "termux-phone", 2000 * MIB, speed=3.0)
ROUTER = NodeInfo("router-1", "openwrt-router", 9000 * MIB, speed=50.0)
DESKTOP = NodeInfo("desktop-1", "desktop", 8000 * MIB, speed=10.0)
WITNESS = NodeInfo("witness-1", "server", 16000 * MIB, speed=99.0, witness=True)
MESH = (PI, PHONE, ROUTER, DESKTOP, WITNESS)

GEMMA = ModelInfo("gemma", ("reasoning", "tool-use"), 400 * MIB)
QWEN = ModelInfo("qwen", ("reasoning",), 900 * MIB)
MINILM = ModelInfo("minilm", ("context",), 100 * MIB)
CATALOG = (GEMMA, QWEN, MINILM)


def a(role: str, model: str, node: NodeInfo | str) -> Assignment:
    return Assignment(role, model, node if isinstance(node, str) else node.node_id)


def on(plan: Plan, role: str) -> set[str]:
    return {s.node_id for s in plan.assignments if s.role == role}


def sick(node: NodeInfo) -> NodeInfo:
    return NodeInfo(node.node_id, node.device_class, node.memory_available, node.speed, node.witness, healthy=False)


# -- which node, which model ----------------------------------------------------------------------

def test_reasoning_goes_to_the_fastest_nodes_never_the_witness_or_router():
    plan = place(MESH, CATALOG, {"reasoning": 2}, [], [])
    assert plan.assignments == (a("reasoning", "gemma", DESKTOP), a("reasoning", "gemma", PHONE))
    assert plan.unplaced == ()


def test_context_goes_to_the_nodes_with_most_free_memory():
    plan = place(MESH, CATALOG, {"context": 2}, [], [])
    assert on(plan, "context") == {"desktop-1", "phone-1"}


def test_free_memory_counts_shards_already_placed_for_earlier_roles():
    # The desktop's 8000 MiB drop to 400 after a big reasoning model; context then prefers the phone.
    big = ModelInfo("big", ("reasoning",), 7600 * MIB)
    plan = place(MESH, (big, MINILM), {"reasoning": 1, "context": 1}, [], [])
    assert plan.assignments == (a("context", "minilm", PHONE), a("reasoning", "big", DESKTOP))


def test_ties_in_speed_go_to_the_lowest_node_id():
    twins = [NodeInfo(n, "desktop", 1000 * MIB, speed=5.0) for n in ("b", "a", "c")]
    plan = place(twins, CATALOG, {"reasoning": 2, "context": 2}, [], [])
    assert on(plan, "reasoning") == {"a", "b"}
    assert on(plan, "context") == {"c", "a"}  # c is untouched (most free), then a ties b and wins by id


def test_first_catalog_model_serves_each_role():
    plan = place(MESH, CATALOG, {"reasoning": 1, "tool-use": 1, "context": 1}, [], [])
    assert {(s.role, s.model) for s in plan.assignments} == {
        ("reasoning", "gemma"), ("tool-use", "gemma"), ("context", "minilm")}


def test_witness_and_router_never_get_shards_even_when_replicas_run_short():
    plan = place(MESH, CATALOG, {"reasoning": 5}, [], [])
    assert on(plan, "reasoning") == {"desktop-1", "phone-1", "pi-1"}
    (short,) = plan.unplaced
    assert (short.role, short.model, short.missing) == ("reasoning", "gemma", 2)
    assert "too few distinct nodes" in short.reason


def test_replicas_of_one_role_sit_on_distinct_nodes():
    plan = place([DESKTOP], CATALOG, {"reasoning": 2}, [], [])
    assert plan.assignments == (a("reasoning", "gemma", DESKTOP),)
    assert plan.unplaced[0].missing == 1


def test_memory_is_the_sum_of_all_shards_on_a_node():
    # The pi has 1500 MiB: qwen (900) and gemma for tool-use (400) leave 200, too little for a 300 MiB encoder.
    encoder = ModelInfo("encoder", ("context",), 300 * MIB)
    plan = place([PI], (GEMMA, QWEN, encoder), {"reasoning": 1, "tool-use": 1, "context": 1},
                 [a("reasoning", "qwen", PI)], [])
    assert plan.assignments == (a("reasoning", "qwen", PI), a("tool-use", "gemma", PI))
    assert plan.unplaced == (Unplaced("context", "encoder", 1, "needs 300 MiB; largest free is 200 MiB on pi-1"),)


def test_shard_that_fits_nowhere_is_reported_with_largest_free_memory_and_where():
    huge = ModelInfo("huge", ("reasoning",), 12000 * MIB)
    plan = place(MESH, (huge,), {"reasoning": 1}, [], [])
    assert plan.assignments == ()
    assert plan.unplaced == (
        Unplaced("reasoning", "huge", 1, "needs 12000 MiB; largest free is 8000 MiB on desktop-1"),)


def test_no_eligible_node_is_reported_as_such():
    plan = place([ROUTER, WITNESS, sick(DESKTOP)], CATALOG, {"context": 1}, [], [])
    assert plan.assignments == ()
    assert plan.unplaced == (
        Unplaced("context", "minilm", 1, "no eligible node: every node is a witness, a router or unhealthy"),)


def test_role_no_model_serves_is_reported_with_an_empty_model():
    plan = place(MESH, (MINILM,), {"reasoning": 2}, [], [])
    assert plan.unplaced == (Unplaced("reasoning", "", 2, "no model in the catalog serves reasoning"),)


def test_desired_zero_places_nothing_and_reports_nothing():
    plan = place(MESH, CATALOG, {"reasoning": 0, "context": 0}, [], [a("context", "minilm", DESKTOP)])
    assert plan == Plan((), ())


def test_witness_replicas_are_ignored_and_unknown_roles_refused():
    assert place(MESH, CATALOG, {"witness": 3}, [], []) == Plan((), ())
    with pytest.raises(ValueError, match="unknown role"):
        place(MESH, CATALOG, {"reasonning": 1}, [], [])
    with pytest.raises(ValueError, match="0 or more"):
        place(MESH, CATALOG, {"reasoning": -1}, [], [])


def test_duplicate_node_ids_or_model_names_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        place([PI, PI], CATALOG, {}, [], [])
    with pytest.raises(ValueError, match="duplicate"):
        place(MESH, (GEMMA, GEMMA), {}, [], [])


# -- pins ------------------------------------------------------------------------------------------

def test_pin_is_honoured_on_a_slow_node_and_counts_toward_desired():
    plan = place(MESH, CATALOG, {"reasoning": 2}, [a("reasoning", "gemma", PI)], [])
    assert on(plan, "reasoning") == {"pi-1", "desktop-1"}


def test_pin_naming_another_model_uses_it_and_unpinned_replicas_use_the_first_model():
    plan = place(MESH, CATALOG, {"reasoning": 2}, [a("reasoning", "qwen", PHONE)], [])
    assert plan.assignments == (a("reasoning", "gemma", DESKTOP), a("reasoning", "qwen", PHONE))


def test_pin_without_model_means_the_first_model_for_the_role():
    plan = place(MESH, CATALOG, {"reasoning": 1}, [a("reasoning", "", PI)], [])
    assert plan.assignments == (a("reasoning", "gemma", PI),)


def test_pins_beyond_the_desired_count_are_all_placed():
    pins = [a("context", "minilm", n) for n in (PI, PHONE, DESKTOP)]
    plan = place(MESH, CATALOG, {"context": 1}, pins, [])
    assert on(plan, "context") == {"pi-1", "phone-1", "desktop-1"}
    assert place(MESH, CATALOG, {}, pins, []).assignments == plan.assignments


def test_pin_on_a_router_is_refused_with_reason():
    plan = place(MESH, CATALOG, {"context": 1}, [a("context", "minilm", ROUTER)], [])
    assert a("context", "minilm", ROUTER) not in plan.assignments
    assert plan.unplaced == (Unplaced("context", "minilm", 1, "pin on router-1: an openwrt-router holds no model"),)


def test_failed_pin_is_reported_and_an_automatic_replica_stands_in_for_it():
    plan = place(MESH, CATALOG, {"context": 1}, [a("context", "minilm", ROUTER)], [])
    assert plan.assignments == (a("context", "minilm", DESKTOP),)


@pytest.mark.parametrize("pin, reason", [
    (a("reasoning", "gemma", WITNESS), "pin on witness-1: a witness holds no model"),
    (a("reasoning", "gemma", "ghost"), "pin on ghost: no such node in the mesh"),
    (a("reasoning", "qwen", "pi-1"), None),  # control: placeable
    (a("reasoning", "minilm", PI), "pin on pi-1: model minilm does not serve reasoning"),
    (a("reasoning", "llama", PI), "pin on pi-1: model 'llama' is not in the catalog"),
    (a("witness", "gemma", PI), "pin on pi-1: role 'witness' holds no model"),
])
def test_invalid_pin_is_reported_with_the_constraint_that_stopped_it(pin, reason):
    plan = place(MESH, CATALOG, {}, [pin], [])
    if reason is None:
        assert plan == Plan((pin,), ())
    else:
        assert plan == Plan((), (Unplaced(pin.role, pin.model, 1, reason),))


def test_pin_on_an_unhealthy_node_is_refused():
    plan = place([sick(PI), DESKTOP], CATALOG, {}, [a("context", "minilm", PI)], [])
    assert plan == Plan((), (Unplaced("context", "minilm", 1, "pin on pi-1: node is unhealthy"),))


def test_pin_that_does_not_fit_is_refused_and_never_overcommits():
    fat = ModelInfo("fat", ("reasoning",), 1600 * MIB)
    plan = place(MESH, (fat,), {}, [a("reasoning", "fat", PI)], [])
    assert plan == Plan((), (Unplaced("reasoning", "fat", 1, "pin on pi-1: needs 1600 MiB; 1500 MiB free"),))


def test_pins_claim_memory_before_automatic_shards_of_earlier_roles():
    # Reasoning is placed first, but the pinned context shard gets the pi's memory.
    fits_once = ModelInfo("fits-once", ("reasoning", "context"), 1000 * MIB)
    plan = place([PI], (fits_once,), {"reasoning": 1}, [a("context", "fits-once", PI)], [])
    assert plan.assignments == (a("context", "fits-once", PI),)
    assert plan.unplaced[0].role == "reasoning"


# -- few moves -------------------------------------------------------------------------------------

def test_current_shards_are_kept_even_where_a_fresh_plan_would_differ():
    current = [a("reasoning", "gemma", PI), a("context", "minilm", PI)]
    plan = place(MESH, CATALOG, {"reasoning": 1, "context": 1}, [], current)
    assert set(plan.assignments) == set(current)


def test_shrinking_replicas_removes_the_slowest():
    current = place(MESH, CATALOG, {"reasoning": 3}, [], []).assignments
    assert on(Plan(current, ()), "reasoning") == {"desktop-1", "phone-1", "pi-1"}
    plan = place(MESH, CATALOG, {"reasoning": 2}, [], current)
    assert moves(current, plan.assignments) == (set(), {a("reasoning", "gemma", PI)})
    plan = place(MESH, CATALOG, {"reasoning": 1}, [], current)
    assert plan.assignments == (a("reasoning", "gemma", DESKTOP),)


def test_growing_replicas_keeps_current_and_adds_the_fastest_free_node():
    current = [a("reasoning", "gemma", PI)]
    plan = place(MESH, CATALOG, {"reasoning": 2}, [], current)
    assert moves(current, plan.assignments) == ({a("reasoning", "gemma", DESKTOP)}, set())
    plan = place(MESH, CATALOG, {"reasoning": 3}, [], plan.assignments)
    assert moves(current, plan.assignments)[0] == {a("reasoning", "gemma", DESKTOP), a("reasoning", "gemma", PHONE)}


def test_node_going_unhealthy_moves_its_shard_to_another_node_and_nothing_else():
    desired = {"reasoning": 2, "tool-use": 1, "context": 1}
    before = place(MESH, CATALOG, desired, [], [])
    assert a("reasoning", "gemma", PHONE) in before.assignments
    mesh = [sick(PHONE) if n is PHONE else n for n in MESH]
    after = place(mesh, CATALOG, desired, [], before.assignments)
    to_add, to_remove = moves(before.assignments, after.assignments)
    assert to_remove == {s for s in before.assignments if s.node_id == "phone-1"}
    assert {(s.role, s.model) for s in to_add} == {(s.role, s.model) for s in to_remove}
    assert all(s.node_id not in ("phone-1", "witness-1", "router-1") for s in to_add)


def test_current_shard_of_a_model_that_no_longer_serves_the_role_is_replaced():
    plan = place(MESH, CATALOG, {"reasoning": 1}, [], [a("reasoning", "qwen", PI)])
    assert plan.assignments == (a("reasoning", "gemma", DESKTOP),)


def test_unpinning_a_model_returns_the_role_to_the_first_model():
    pinned = place(MESH, CATALOG, {"reasoning": 1}, [a("reasoning", "qwen", PI)], [])
    plan = place(MESH, CATALOG, {"reasoning": 1}, [], pinned.assignments)
    assert plan.assignments == (a("reasoning", "gemma", DESKTOP),)


def test_moves_returns_shards_to_add_and_to_remove():
    old = [a("reasoning", "gemma", PI), a("context", "minilm", PI)]
    new = [a("reasoning", "gemma", PI), a("context", "minilm", DESKTOP)]
    assert moves(old, new) == ({a("context", "minilm", DESKTOP)}, {a("context", "minilm", PI)})
    assert moves(new, new) == (set(), set())


# -- properties over random meshes -----------------------------------------------------------------

NODE_IDS = ("n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7")
CLASSES = ("raspberry-pi", "termux-phone", "openwrt-router", "desktop", "server")
MODEL_NAMES = ("m0", "m1", "m2")
PIN_ROLES = MODEL_ROLES + ("witness",)


# Meshes are drawn as rows of small integers (few draws, so examples are cheap) and decoded here.
ROLE_SETS = [tuple(r for i, r in enumerate(MODEL_ROLES) if k >> i & 1) for k in range(1, 8)]
NODE_ROW = st.tuples(st.sampled_from(NODE_IDS), st.sampled_from(CLASSES),
                     st.integers(0, 40),  # memory, in 100 MiB
                     st.integers(1, 5),  # speed: few values, so ties happen
                     st.integers(0, 5),  # 0: witness
                     st.integers(0, 5))  # 0: unhealthy
MODEL_ROWS = st.lists(st.tuples(st.sampled_from(MODEL_NAMES), st.sampled_from(ROLE_SETS),
                                st.integers(1, 20)),  # memory, in 100 MiB
                      min_size=1, max_size=3, unique_by=lambda row: row[0])
# (role, model, node): model 0-2 picks one of the catalog's, 3 is "" and 4 unknown; node 8 is unknown.
SHARD_ROWS = st.tuples(st.sampled_from(PIN_ROLES), st.integers(0, 4), st.integers(0, 8))


@st.composite
def meshes(draw):
    size = draw(st.integers(1, len(NODE_IDS)))  # drawn first: lists alone favour one-node meshes
    rows = draw(st.lists(NODE_ROW, min_size=size, max_size=size, unique_by=lambda row: row[0]))
    nodes = [NodeInfo(node_id, cls, mem * 100 * MIB, float(speed), witness=w == 0, healthy=h > 0)
             for node_id, cls, mem, speed, w, h in rows]
    models = [ModelInfo(name, roles, mem * 100 * MIB) for name, roles, mem in draw(MODEL_ROWS)]
    counts = draw(st.tuples(*[st.integers(-1, 4)] * len(MODEL_ROLES)))  # -1: role left out
    replicas = {role: n for role, n in zip(MODEL_ROLES, counts) if n >= 0}

    def shard(row):
        role, m, n = row
        model = models[m % len(models)].name if m < 3 else ("", "ghost-model")[m - 3]
        return Assignment(role, model, nodes[n % len(nodes)].node_id if n < 8 else "ghost-node")

    pins = [shard(row) for row in draw(st.lists(SHARD_ROWS, max_size=4))]
    # Current shards: an earlier plan for other counts, made while every node was healthy, plus noise.
    earlier = dict(zip(MODEL_ROLES, draw(st.tuples(*[st.integers(0, 4)] * len(MODEL_ROLES)))))
    all_healthy = [dataclasses.replace(n, healthy=True) for n in nodes]
    current = [*place(all_healthy, models, earlier, [], []).assignments,
               *(shard(row) for row in draw(st.lists(SHARD_ROWS, max_size=4)))]
    return nodes, models, replicas, pins, current


def _first_models(models):
    return {r: next((m.name for m in models if r in m.roles), "") for r in MODEL_ROLES}


def _valid_pins(nodes, models, pins):
    """Pins that name a model serving the role and an eligible node, with empty models resolved."""
    by_id, catalog, first = {n.node_id: n for n in nodes}, {m.name: m for m in models}, _first_models(models)
    out = set()
    for p in pins:
        if p.role not in MODEL_ROLES:
            continue
        p = Assignment(p.role, p.model or first[p.role], p.node_id)
        node, model = by_id.get(p.node_id), catalog.get(p.model)
        if model and p.role in model.roles and node and node.healthy and not node.witness \
                and node.device_class != "openwrt-router":
            out.add(p)
    return out


PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(meshes())
def test_no_node_is_given_more_than_its_memory(mesh):
    nodes, models, replicas, pins, current = mesh
    plan = place(nodes, models, replicas, pins, current)
    size = {m.name: m.memory_bytes for m in models}
    used = Counter()
    for s in plan.assignments:
        used[s.node_id] += size[s.model]
    assert all(used[n.node_id] <= n.memory_available for n in nodes)


@PROPS
@given(meshes())
def test_replicas_of_a_role_sit_on_distinct_nodes(mesh):
    plan = place(*mesh)
    pairs = [(s.role, s.node_id) for s in plan.assignments]
    assert len(pairs) == len(set(pairs))


@PROPS
@given(meshes())
def test_no_shard_on_a_witness_router_unhealthy_or_unknown_node_and_every_model_serves_its_role(mesh):
    nodes, models, *_ = mesh
    plan = place(*mesh)
    by_id, catalog = {n.node_id: n for n in nodes}, {m.name: m for m in models}
    for s in plan.assignments:
        node = by_id[s.node_id]
        assert node.healthy and not node.witness and node.device_class != "openwrt-router"
        assert s.role in catalog[s.model].roles


@PROPS
@given(meshes())
def test_every_valid_pin_that_fits_alongside_the_other_pins_is_kept(mesh):
    nodes, models, replicas, pins, current = mesh
    plan = place(nodes, models, replicas, pins, current)
    valid = _valid_pins(nodes, models, pins)
    size, by_id = {m.name: m.memory_bytes for m in models}, {n.node_id: n for n in nodes}
    for p in valid:
        same_node = [q for q in valid if q.node_id == p.node_id]
        fits = sum(size[q.model] for q in same_node) <= by_id[p.node_id].memory_available
        alone_in_role = all(q.role != p.role for q in same_node if q != p)
        if fits and alone_in_role:
            assert p in plan.assignments


@PROPS
@given(meshes(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_independent_of_input_order(mesh, rnd):
    nodes, models, replicas, pins, current = mesh
    plan = place(nodes, models, replicas, pins, current)
    assert place(nodes, models, replicas, pins, current) == plan
    shuffled = [list(x) for x in (nodes, pins, current, replicas.items())]
    for x in shuffled:
        rnd.shuffle(x)
    assert place(shuffled[0], models, dict(shuffled[3]), shuffled[1], shuffled[2]) == plan
    assert list(plan.assignments) == sorted(plan.assignments)
    assert list(plan.unplaced) == sorted(plan.unplaced)


@PROPS
@given(meshes())
def test_placing_again_from_the_result_changes_nothing(mesh):
    nodes, models, replicas, pins, _ = mesh
    plan = place(*mesh)
    again = place(nodes, models, replicas, pins, plan.assignments)
    assert again == plan
    assert moves(plan.assignments, again.assignments) == (set(), set())


@PROPS
@given(meshes())
def test_replicas_per_role_never_exceed_desired_or_valid_pins(mesh):
    nodes, models, replicas, pins, _ = mesh
    plan = place(*mesh)
    valid = _valid_pins(nodes, models, pins)
    count = Counter(s.role for s in plan.assignments)
    for role in MODEL_ROLES:
        assert count[role] <= max(replicas.get(role, 0), sum(p.role == role for p in valid))


@PROPS
@given(meshes())
def test_every_role_short_of_its_desired_count_is_reported(mesh):
    replicas = mesh[2]
    plan = place(*mesh)
    count = Counter(s.role for s in plan.assignments)
    reported = {u.role for u in plan.unplaced}
    for role in MODEL_ROLES:
        if count[role] < replicas.get(role, 0):
            assert role in reported
    assert all(u.missing > 0 and u.reason for u in plan.unplaced)
    assert len({(u.role, u.model) for u in plan.unplaced}) == len(plan.unplaced)


@PROPS
@given(meshes())
def test_every_unpinned_shard_uses_the_first_model_serving_its_role(mesh):
    nodes, models, _, pins, _ = mesh
    plan = place(*mesh)
    first = _first_models(models)
    for s in set(plan.assignments) - _valid_pins(nodes, models, pins):
        assert s.model == first[s.role]
