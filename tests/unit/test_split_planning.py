"""Automatic split planning (issue #17, mesh/cluster/split_planning.py): which members run a model that fits
none of them alone, and each one's share of its layers. Pure: the figures are the default model's, as the
catalog records them (tests/unit/test_gguf_layers.py reads them from the real file)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.cluster.placement import NodeInfo
from mesh.cluster.split_planning import (
    STAGE_OVERHEAD,
    Pipeline,
    SplitModel,
    layer_shares,
    pinned_pipeline,
    plan_split,
    still_fits,
)

MIB = 1 << 20
# gemma-3-270m q4_k_m at a 4096-token context, one slot: 253 MB file + 72 MiB KV + 150 MiB overhead;
# one block 3.8 MB of weights and 4 MiB of KV.
GEMMA = SplitModel("gemma", 485_896_896, 18, 7_990_272)


def node(node_id: str, mib: int, speed: float = 10.0, **kw) -> NodeInfo:
    return NodeInfo(node_id=node_id, device_class=kw.pop("device_class", "desktop"), memory_available=mib * MIB,
                    speed=speed, **kw)


def fits(pipeline: Pipeline, nodes: list[NodeInfo], model: SplitModel = GEMMA) -> None:
    memory = {n.node_id: n.memory_available for n in nodes}
    for node_id, need in pipeline.needs(model).items():
        assert need <= memory[node_id], f"{node_id} needs {need / MIB:.0f} MiB, has {memory[node_id] / MIB:.0f}"
    assert all(k >= 1 for _, k in pipeline.stages)
    assert 1 <= model.layers - sum(k for _, k in pipeline.stages) < model.layers


def test_two_members_that_cannot_hold_it_alone_share_it_by_what_each_can_hold():
    nodes = [node("a", 400), node("b", 400)]
    assert all(n.memory_available < GEMMA.memory_bytes for n in nodes)
    plan = plan_split(nodes, GEMMA)
    assert plan.reason == "" and plan.pipeline is not None
    p = plan.pipeline
    assert p.head == "a"  # equal memory and speed: the lower id
    fits(p, nodes)
    # The head carries the embeddings: it holds fewer layers than a stage with as much memory.
    head_layers = 18 - p.stages[0][1]
    caps = [GEMMA.head_capacity(400 * MIB), GEMMA.stage_capacity(400 * MIB)]
    assert caps == [9, 17]
    assert abs(head_layers - 18 * caps[0] / sum(caps)) <= 1
    assert p.stages == (("b", 12),)


def test_the_head_is_the_member_with_the_most_memory_then_the_fastest():
    assert plan_split([node("a", 380), node("b", 420), node("c", 300)], GEMMA).pipeline.head == "b"
    assert plan_split([node("a", 400, speed=5), node("b", 400, speed=9)], GEMMA).pipeline.head == "b"


def test_the_fewest_stages_that_hold_the_rest_the_roomiest_first():
    nodes = [node("a", 440), node("b", 300), node("c", 200), node("d", 350)]
    p = plan_split(nodes, GEMMA).pipeline
    assert p.head == "a" and [n for n, _ in p.stages] == ["d"]
    fits(p, nodes)
    tight = [node("a", 340), node("b", 180), node("c", 140), node("d", 130)]
    p = plan_split(tight, GEMMA).pipeline
    assert p is not None and p.head == "a" and [n for n, _ in p.stages] == ["b", "c", "d"]
    fits(p, tight)


def test_a_faster_member_takes_more_layers_when_memory_allows():
    even = plan_split([node("h", 420), node("s", 300)], GEMMA).pipeline
    fast = plan_split([node("h", 420), node("s", 300, speed=30)], GEMMA).pipeline
    slow = plan_split([node("h", 420), node("s", 300, speed=3)], GEMMA).pipeline
    assert dict(slow.stages)["s"] < dict(even.stages)["s"] < dict(fast.stages)["s"] <= GEMMA.stage_capacity(300 * MIB)
    unknown = plan_split([node("h", 420, speed=0.0), node("s", 300, speed=30)], GEMMA).pipeline
    assert unknown == even  # a member that reports no speed: shares by memory alone


def test_the_same_mesh_gives_the_same_plan_whatever_order_its_members_come_in():
    nodes = [node(f"n{i}", mib, speed) for i, (mib, speed) in enumerate([(330, 5), (150, 9), (140, 3), (160, 9),
                                                                         (120, 1)])]
    first = plan_split(nodes, GEMMA)
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(nodes)
        assert plan_split(nodes, GEMMA) == first


@pytest.mark.parametrize("outsider, why", [
    (dict(witness=True), "witness"),
    (dict(device_class="openwrt-router"), "openwrt-router"),
    (dict(healthy=False), "unhealthy"),
    (dict(device_class="termux-phone", battery_percent=80.0, charging=False), "phone on battery"),
])
def test_witnesses_routers_unhealthy_members_and_phones_on_battery_are_never_part_of_a_pipeline(outsider, why):
    nodes = [node("a", 400), node("z", 4000, **outsider)]
    plan = plan_split(nodes, GEMMA)
    assert plan.pipeline is None
    assert why in plan.reason and "z" in plan.reason
    with_two = plan_split([*nodes, node("b", 400)], GEMMA).pipeline
    assert with_two is not None and "z" not in with_two.members


def test_a_phone_on_its_charger_may_be_a_stage():
    phone = node("p", 300, device_class="termux-phone", battery_percent=80.0, charging=True)
    p = plan_split([node("a", 400), phone], GEMMA).pipeline
    assert p is not None and p.members == ("a", "p")


def test_a_member_whose_stage_failed_is_planned_around():
    nodes = [node("a", 420), node("b", 400), node("c", 300)]
    assert plan_split(nodes, GEMMA).pipeline.members == ("a", "b")
    p = plan_split(nodes, GEMMA, avoid={"b": "cannot allocate 60 MiB"}).pipeline
    assert p.members == ("a", "c")
    none = plan_split(nodes, GEMMA, avoid={"b": "cannot allocate 60 MiB", "c": "RPC protocol 2, this build 3"})
    assert none.pipeline is None
    assert "b (its stage failed: cannot allocate 60 MiB)" in none.reason and "RPC protocol" in none.reason


@pytest.mark.parametrize("nodes, words", [
    ([node("a", 300), node("b", 300)], "a head needs 334 MiB for the embeddings and one layer, and the roomiest "
                                       "member, a, has 300 MiB (room for 0 layers)"),
    ([node("a", 340), node("b", 100), node("c", 100)], "(room for 1 layers); the others hold 0 of its 18 layers"),
    ([node("a", 340), node("b", 200), node("c", 100)], "the others hold 13 of its 18 layers"),
    ([node("a", 2000)], "a split needs 2 members that hold models, 1 can"),
    ([], "2 members that hold models, 0 can"),
])
def test_when_no_plan_holds_the_model_it_says_why(nodes, words):
    plan = plan_split(nodes, GEMMA)
    assert plan.pipeline is None and words in plan.reason


def test_a_model_without_layer_figures_is_never_split():
    plan = plan_split([node("a", 400), node("b", 400)], SplitModel("old", GEMMA.memory_bytes, 0, 0))
    assert plan.pipeline is None and "no layer figures" in plan.reason


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 700), st.sampled_from([0.0, 1.0, 5.0, 20.0])), min_size=0, max_size=8))
def test_every_plan_fits_every_member_and_covers_every_layer(members):
    nodes = [node(f"n{i}", mib, speed) for i, (mib, speed) in enumerate(members)]
    plan = plan_split(nodes, GEMMA)
    if plan.pipeline is None:
        assert plan.reason
        assert sum(GEMMA.stage_capacity(n.memory_available) for n in nodes) < GEMMA.layers or \
            max((n.memory_available for n in nodes), default=0) < GEMMA.head_need(1) or len(nodes) < 2 or \
            sum(sorted(GEMMA.stage_capacity(n.memory_available) for n in nodes)[:-1]) + \
            GEMMA.head_capacity(max(n.memory_available for n in nodes)) < GEMMA.layers
    else:
        fits(plan.pipeline, nodes)
        assert plan_split(list(reversed(nodes)), GEMMA) == plan


def test_layer_shares_are_proportional_within_what_each_holds():
    assert layer_shares(18, [17, 17], [1, 1]) == [9, 9]
    assert layer_shares(18, [17, 17, 17], [2, 1, 1]) == [9, 5, 4] or sum(layer_shares(18, [17] * 3, [2, 1, 1])) == 18
    assert layer_shares(18, [3, 17], [100, 1]) == [3, 15]  # the first is full at 3
    assert layer_shares(4, [1, 1, 2], [1, 1, 1]) == [1, 1, 2]
    with pytest.raises(ValueError):
        layer_shares(18, [5, 5], [1, 1])
    with pytest.raises(ValueError):
        layer_shares(2, [1, 1, 1], [1, 1, 1])


def test_a_recorded_pipeline_is_kept_while_it_still_runs():
    nodes = [node("a", 400), node("b", 400), node("c", 2000)]
    kept = Pipeline("gemma", "a", (("b", 12),))
    assert still_fits(kept, nodes, GEMMA) is None
    assert "b failed: sha256 differs" in still_fits(kept, nodes, GEMMA, avoid={"b": "sha256 differs"})
    lost = [node("a", 400), node("b", 400, healthy=False)]
    assert "b can no longer hold a part" in still_fits(kept, lost, GEMMA)
    shrunk = [node("a", 400), node("b", 150)]
    assert "b needs" in still_fits(kept, shrunk, GEMMA)
    assert "layers changed" in still_fits(Pipeline("gemma", "a", (("b", 18),)), nodes, GEMMA)


def test_a_split_pinned_by_hand_shares_layers_by_memory():
    p, warning = pinned_pipeline(GEMMA, [node("b", 420), node("a", 300), node("c", 300)])
    assert warning == "" and p.head == "b" and [n for n, _ in p.stages] == ["a", "c"]
    fits(p, [node("b", 420), node("a", 300), node("c", 300)])
    assert dict(p.stages)["a"] == dict(p.stages)["c"]
    p, warning = pinned_pipeline(GEMMA, [node("a", 100), node("b", 100)])
    assert "too little free memory" in warning and sum(k for _, k in p.stages) < 18
    for members, why in (([node("a", 400)], "2 to 17 members"), ([node("a", 400), node("a", 400)], "once")):
        with pytest.raises(ValueError, match=why):
            pinned_pipeline(GEMMA, members)
    with pytest.raises(ValueError, match="no layer figures"):
        pinned_pipeline(SplitModel("x", 1, 0, 0), [node("a", 400), node("b", 400)])


def test_a_stage_costs_its_layers_and_a_process():
    assert GEMMA.stage_need(9) == 9 * GEMMA.layer_bytes + STAGE_OVERHEAD
    assert GEMMA.head_need(18) == GEMMA.memory_bytes
    assert Pipeline("gemma", "a", (("b", 12),)).needs(GEMMA) == {"a": GEMMA.head_need(6), "b": GEMMA.stage_need(12)}
